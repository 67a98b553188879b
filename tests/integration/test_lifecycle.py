"""The lifecycle of alerts end to end, on the real broker and the simulator over HTTP: analysts resolve,
suppress and re-open alerts (`PUT .../alerts/{id}` and the bulk `PUT .../alerts/?id=…`) while the
pipeline runs on a live stream of new alerts, in three formats.

- Without a crash: each change is exactly one update event per format (same guid key, the new state
  and updatedAt, "updated"/"closed"), the creation event first, then the changes in order; a
  compacted read of each topic (last value per key, read to the end) equals the simulator's final
  states.
- With a kill -9 while changes are being published, and a restart: no change is lost; what repeats is
  exactly what at-least-once allows here, an event whose guid and updatedAt an event of that guid
  already carried; per guid updatedAt never goes back; the compacted read again equals the final states.
- Exactly-once: the watermark is committed in a transaction after the update events it passes.
- `run --dry-run --once` from a checkpoint shows the update events of the changes since, in each format.
"""

from __future__ import annotations

import json

import requests
from helpers import Cli, Running, make_cfg, read_topic, stream_sections, wait_until, write_pipeline

from connector.simulator import TR_PATH, Simulator
from connector.stream.checkpoint import read_committed_log
from connector.stream.updates import epoch_ms

FORMATS = ["normalized", "ocsf", "ecs"]
CLOSED = ("resolved", "suppressed")


def _put(sim: Simulator, ids: list[int], state: str) -> None:
    """A state change over HTTP: the one-alert form for one id, the bulk form for several."""
    url = f"{sim.url}{TR_PATH}/alerts/{ids[0]}" if len(ids) == 1 else f"{sim.url}{TR_PATH}/alerts/"
    params = [] if len(ids) == 1 else [("id", i) for i in ids]
    r = requests.put(url, params=params, json={"state": state}, headers={"session": sim.api_key}, timeout=10)
    assert r.status_code == 200, r.text


def _view(fmt: str, doc: dict) -> tuple[str, str, int, str]:
    """(guid, action, updatedAt in ms, state) of one record of a format."""
    if fmt == "normalized":
        return doc["uid"], doc["event_action"], epoch_ms(doc["raw"]["updatedAt"]), doc["state"]
    if fmt == "ocsf":
        action = {1: "created", 2: "updated", 3: "closed"}[doc["activity_id"]]
        assert doc["type_uid"] == 200400 + doc["activity_id"]
        return (
            doc["finding_info"]["uid"],
            action,
            doc["finding_info"]["modified_time"],
            doc["unmapped"]["alert"]["state"],
        )
    alert = doc["tanium"]["alert"]
    action = doc["event"]["action"]
    assert ("change" in doc["event"]["type"]) == (action != "created")
    return doc["event"]["id"], action, epoch_ms(alert["updatedAt"]), alert["state"]


def _read(bootstrap: str, prefix: str, fmt: str) -> list[tuple[str, str, int, str]]:
    """Every record of a format's topic, read to the end, as (guid, action, updatedAt, state)."""
    topic = f"{prefix}.events" if fmt == "normalized" else f"{prefix}.events.{fmt}"
    rows = []
    for r in read_topic(bootstrap, topic, timeout=10):
        view = _view(fmt, json.loads(r.value))
        assert r.key.decode() == view[0], "keyed by guid"
        rows.append(view)
    return rows


def _changes(sim: Simulator) -> set[tuple[str, int, str]]:
    return {(guid, epoch_ms(at), state) for _, guid, state, at in sim.lifecycle.changes}


def _final(sim: Simulator) -> dict[str, tuple[int, str]]:
    alerts = (sim.get_alert(i) for i in range(1, sim.alert_count + 1))
    return {a["guid"]: (epoch_ms(a["updatedAt"]), a["state"]) for a in alerts}


def _settled(checkpoint: dict | None, sim: Simulator, alerts: int = 150) -> bool:
    """Whether the durable checkpoint is past every change made so far (its update watermark at or
    after the newest) and past the first `alerts` alerts (all 150 of the history by default)."""
    if not checkpoint or "updates" not in checkpoint:
        return False
    newest = max((epoch_ms(at) for *_, at in sim.lifecycle.changes), default=0)
    return epoch_ms(checkpoint["updates"]["updated_at"]) >= newest and checkpoint["id"] >= alerts


def _check(rows: list[tuple[str, str, int, str]], sim: Simulator, crashed: bool) -> None:
    changes, final = _changes(sim), _final(sim)
    seen: dict[str, list[tuple[str, int, str]]] = {}
    for guid, action, at, state in rows:
        earlier = seen.setdefault(guid, [])
        if not earlier:
            assert action == "created", f"{guid}: {action} before its creation event"
        else:
            assert at >= earlier[-1][1], f"{guid}: updatedAt went back ({earlier[-1]} then {at})"
        if action != "created":
            assert action == ("closed" if state in CLOSED else "updated")
            repeat = any(at == e[1] and state == e[2] for e in earlier)
            if crashed:
                assert (guid, at, state) in changes or repeat, f"{guid}: an update event for no change"
            else:
                assert (guid, at, state) in changes and not repeat, f"{guid}: update {at} {state} is no new change"
        earlier.append((action, at, state))
    published = {(g, at, s) for g, a, at, s in rows if a != "created"}
    assert changes <= published, f"changes never published: {changes - published}"
    compacted = {g: (at, s) for g, _, at, s in rows}  # last value per key
    assert compacted == final


def _rounds(sim: Simulator) -> list[tuple[list[int], str]]:
    """Changes to history alerts: in progress, one resolved alone, some resolved and some suppressed in
    bulk, some re-opened (each round waits until the previous one is published)."""
    a = list(range(10, 130, 10))  # 12 alerts of the history
    return [(a, "inprogress"), (a[:1], "resolved"), (a[1:6], "resolved"), (a[6:], "suppressed"), (a[4:8], "unresolved")]


def test_each_change_is_one_update_event_in_order_and_the_compacted_topic_holds_the_final_states(
    broker, topic_prefix, tmp_path
):
    with Simulator(alerts=150, intel_docs=5, seed=21, history=3600, live_rate=20) as sim:
        cfg = make_cfg(sim, broker.bootstrap, topic_prefix, tmp_path, output={"formats": FORMATS})
        with Running(cfg) as run:
            for ids, state in _rounds(sim):
                wait_until(lambda: _settled(run.pipe.committed, sim), what="the checkpoint past every change")
                _put(sim, ids, state)
            sim.live_rate = 0
            wait_until(lambda: _settled(run.pipe.committed, sim, sim.alert_count), what="every alert and change")
    topics = {fmt: _read(broker.bootstrap, topic_prefix, fmt) for fmt in FORMATS}
    assert len(_changes(sim)) == 12 + 1 + 5 + 6 + 4
    for fmt, rows in topics.items():
        assert len([r for r in rows if r[1] != "created"]) == 28, fmt  # exactly one per change
        _check(rows, sim, crashed=False)


def test_a_kill9_while_changes_are_published_loses_none_and_repeats_only_identical_events(
    broker, topic_prefix, tmp_path
):
    with Simulator(alerts=150, intel_docs=5, seed=22, history=3600, live_rate=20) as sim:
        sections = stream_sections(topic_prefix, sim, broker.bootstrap, tmp_path / "state", output={"formats": FORMATS})
        path = write_pipeline(tmp_path / "p.toml", sections)
        checkpoint = tmp_path / "state" / f"{topic_prefix}.json"

        def settled(alerts: int = 150) -> bool:
            return checkpoint.exists() and _settled(json.loads(checkpoint.read_text()), sim, alerts)

        rounds = _rounds(sim)
        cli = Cli(["run", str(path)], tmp_path / "run.log")
        try:
            for ids, state in rounds[:3]:
                wait_until(settled, what="the checkpoint past every change")
                _put(sim, ids, state)
            # the kill lands while the third round is read and published
            served = sim.stats["alerts"]
            wait_until(lambda: sim.stats["alerts"] > served + 1, what="the next poll")
            assert cli.kill9() == -9
            cli = Cli(["run", str(path)], tmp_path / "run.log")
            for ids, state in rounds[3:]:
                wait_until(settled, what="the checkpoint past every change")
                _put(sim, ids, state)
            sim.live_rate = 0
            wait_until(lambda: settled(sim.alert_count), what="every alert and change")
            assert cli.alive, cli.logs()[-3000:]
        finally:
            cli.stop()
    topics = {fmt: _read(broker.bootstrap, topic_prefix, fmt) for fmt in FORMATS}
    for rows in topics.values():
        _check(rows, sim, crashed=True)


def test_exactly_once_commits_the_update_watermark_with_the_update_events(broker, topic_prefix, tmp_path):
    """In exactly-once mode the watermark a scan sets is in a transaction after its update events: the
    committed checkpoint passes the changes, and the committed topic holds each once, in order."""
    with Simulator(alerts=100, intel_docs=4, seed=24, history=3600) as sim:
        cfg = make_cfg(
            sim,
            broker.bootstrap,
            topic_prefix,
            tmp_path,
            pipeline={"delivery": "exactly-once"},
            state={"backend": "kafka", "topic": f"{topic_prefix}.state"},
            output={"formats": FORMATS},
        )
        with Running(cfg) as run:
            for ids, state in ([5, 6, 7], "inprogress"), ([6], "resolved"), ([5, 7], "suppressed"):
                wait_until(lambda: _settled(run.pipe.committed, sim, 100), what="the checkpoint past every change")
                _put(sim, ids, state)
            wait_until(lambda: _settled(run.pipe.committed, sim, 100), what="the checkpoint past every change")
        saved = json.loads(read_committed_log(cfg.kafka, f"{topic_prefix}.state")[-1].value)
    assert _settled(saved, sim, 100)
    for fmt in FORMATS:
        topic = cfg.kafka.topic if fmt == "normalized" else cfg.kafka.topics[fmt]
        rows = [_view(fmt, json.loads(r.value)) for r in read_committed_log(cfg.kafka, topic)]
        assert len([r for r in rows if r[1] != "created"]) == 6, fmt
        _check(rows, sim, crashed=False)


def test_dry_run_once_shows_the_update_events_since_the_checkpoint(tmp_path):
    with Simulator(alerts=30, intel_docs=4, seed=23, history=600) as sim:
        sections = {
            "pipeline": {"name": "dry"},
            "tanium": sim.settings(),
            "source": {"start_from": "1h"},
            "output": {"formats": FORMATS},
            "state": {"path": str(tmp_path / "state")},
        }
        # a checkpoint after every alert, with the update watermark at the newest updatedAt so far
        alerts = [sim.get_alert(i) for i in range(1, 31)]
        newest = max(a["updatedAt"] for a in alerts)
        (tmp_path / "state").mkdir()
        (tmp_path / "state" / "dry.json").write_text(
            json.dumps(
                {
                    "created_at": alerts[-1]["createdAt"],
                    "id": 30,
                    "offset": 30,
                    "updates": {
                        "updated_at": newest,
                        "ids": [a["id"] for a in alerts if a["updatedAt"] == newest],
                        "since": None,
                    },
                }
            )
        )
        _put(sim, [3], "resolved")
        _put(sim, [4, 5], "inprogress")
        code, out = Cli(
            ["run", "--dry-run", "--once", str(write_pipeline(tmp_path / "p.toml", sections))], tmp_path / "run.log"
        ).wait(120)
        assert code == 0, (tmp_path / "run.log").read_text()
    views = [_view(fmt, json.loads(line)) for fmt, line in zip(FORMATS * 3, out.splitlines(), strict=True)]
    guids = {i: sim.get_alert(i)["guid"] for i in (3, 4, 5)}
    for fmt_index in range(3):
        got = [(g, a, s) for g, a, _, s in views[fmt_index::3]]
        # the scan reads the newest first: the bulk change of 4 and 5 (one updatedAt, ties by id), then 3
        assert got == [
            (guids[5], "updated", "inprogress"),
            (guids[4], "updated", "inprogress"),
            (guids[3], "closed", "resolved"),
        ]
