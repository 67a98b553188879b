"""The output formats end to end: `run --dry-run --once` (the CLI in a subprocess) shows each
configured format for every alert, and on the real broker every alert reaches each format's topic
exactly once, keyed by its guid, with the checkpoint behind all of them — in at-least-once and in
exactly-once mode."""

from __future__ import annotations

import json

from helpers import Cli, Running, make_cfg, read_topic, wait_until, write_pipeline

from connector.simulator import Simulator
from connector.stream.checkpoint import read_committed_log
from connector.stream.pipeline import StreamPipeline

FORMATS = ["normalized", "ocsf", "ecs"]


def _format(doc: dict) -> str:
    if doc.get("class_uid") == 2004:
        return "ocsf"
    if doc.get("ecs", {}).get("version") == "9.4.0":
        return "ecs"
    return "normalized" if doc.get("schema_version") == "1.0" else "other"


def _guid(fmt: str, doc: dict) -> str:
    return {
        "normalized": lambda: doc["uid"],
        "ocsf": lambda: doc["finding_info"]["uid"],
        "ecs": lambda: doc["event"]["id"],
    }[fmt]()


def test_dry_run_once_shows_each_format(tmp_path):
    with Simulator(alerts=40, intel_docs=4, seed=8, history=600) as sim:
        sections = {
            "pipeline": {"name": "dry"},
            "tanium": sim.settings(),
            "source": {"start_from": "1h"},
            "output": {"formats": FORMATS},
            "state": {"path": str(tmp_path / "state")},
        }
        code, out = Cli(
            ["run", "--dry-run", "--once", str(write_pipeline(tmp_path / "p.toml", sections))], tmp_path / "run.log"
        ).wait(120)
        assert code == 0, (tmp_path / "run.log").read_text()
        docs = [json.loads(line) for line in out.splitlines()]
        assert [_format(d) for d in docs] == FORMATS * 40
        for i in range(0, len(docs), 3):
            guids = {_guid(f, d) for f, d in zip(FORMATS, docs[i : i + 3], strict=True)}
            assert guids == {sim.get_alert(i // 3 + 1)["guid"]}
        # without output.formats: the normalized event only, as before
        del sections["output"]
        code, out = Cli(
            ["run", "--dry-run", "--once", str(write_pipeline(tmp_path / "n.toml", sections))], tmp_path / "n.log"
        ).wait(120)
        assert code == 0 and [_format(json.loads(line)) for line in out.splitlines()] == ["normalized"] * 40


def _by_format(bootstrap, cfg, expect, **kw):
    topics = {"normalized": cfg.kafka.topic, **cfg.kafka.topics}
    return {fmt: read_topic(bootstrap, topics[fmt], expect=expect, **kw) for fmt in FORMATS}


def test_every_alert_reaches_each_format_topic_once(broker, topic_prefix, tmp_path):
    with Simulator(alerts=300, intel_docs=6, seed=9, history=3600) as sim:
        cfg = make_cfg(
            sim,
            broker.bootstrap,
            topic_prefix,
            tmp_path,
            output={"formats": FORMATS},
            kafka={"topics": {"ocsf": f"{topic_prefix}.security-lake"}},
        )
        with Running(cfg) as run:
            wait_until(lambda: run.committed_offset() == 300, what="300 alerts committed")
            for _ in range(20):
                sim.inject()
            wait_until(lambda: run.committed_offset() == 320, what="20 more")
        guids = {sim.get_alert(i)["guid"] for i in range(1, 321)}
    got = _by_format(broker.bootstrap, cfg, 320)
    assert cfg.kafka.topics == {"ocsf": f"{topic_prefix}.security-lake", "ecs": f"{topic_prefix}.events.ecs"}
    for fmt, records in got.items():
        docs = [json.loads(r.value) for r in records]
        assert {_format(d) for d in docs} == {fmt}
        keys = [r.key.decode() for r in records]
        assert sorted(keys) == sorted(guids), fmt  # each alert once: no loss, no duplicate
        assert keys == [_guid(fmt, d) for d in docs]
        if fmt != "normalized":
            assert {dict(r.headers)["format"] for r in records} == {fmt.encode()}


def test_exactly_once_puts_every_format_in_the_transaction(broker, topic_prefix, tmp_path):
    with Simulator(alerts=250, intel_docs=5, seed=10, history=3600) as sim:
        cfg = make_cfg(
            sim,
            broker.bootstrap,
            topic_prefix,
            tmp_path,
            pipeline={"delivery": "exactly-once"},
            state={"backend": "kafka", "topic": f"{topic_prefix}.state"},
            tanium={"page_size": 100},
            output={"formats": FORMATS},
        )
        pipe = StreamPipeline(cfg, once=True)
        assert pipe.run() == 0
        assert pipe.committed["id"] == 250
        guids = sorted(sim.get_alert(i)["guid"] for i in range(1, 251))
    topics = {"normalized": cfg.kafka.topic, **cfg.kafka.topics}
    for fmt in FORMATS:
        committed = read_committed_log(cfg.kafka, topics[fmt])
        assert sorted(r.key.decode() for r in committed) == guids, fmt
