"""Several stream pipelines in one process (`tanium-connector run DIR`): each keeps its own Tanium
client, cursor and checkpoint; one black-holed Tanium server does not hold up the others; one
metrics listener serves every pipeline, /readyz answers per pipeline."""

from __future__ import annotations

import contextlib
import json
import signal

import pytest
from helpers import Cli, ids_of, metric, read_topic, scrape, stream_sections, wait_until, write_pipeline

from connector.simulator import Simulator
from connector.tools.embedded import free_port


def _readyz(port: int) -> tuple[int, dict]:
    code, body = scrape(port, "/readyz")
    return code, (json.loads(body) if body.startswith("{") else {})


@pytest.mark.timeout(240)
def test_a_black_holed_tanium_server_does_not_hold_up_the_other_pipelines(broker, topic_prefix, tmp_path):
    port = free_port()
    names = [f"{topic_prefix}-{x}" for x in "abc"]
    folder = tmp_path / "pipelines"
    folder.mkdir()
    with contextlib.ExitStack() as stack:
        sims = [
            stack.enter_context(Simulator(alerts=200, intel_docs=4, seed=60 + i, history=3600, live_rate=20))
            for i in range(3)
        ]
        for name, sim in zip(names, sims, strict=True):
            sections = stream_sections(name, sim, broker.bootstrap, tmp_path / "state", metrics_port=port)
            sections["tanium"].update(timeout=2, max_retries=0)
            write_pipeline(folder / f"{name}.toml", sections)
        cli = Cli(["run", str(folder)], tmp_path / "fleet.log")
        stack.callback(cli.stop)
        wait_until(
            lambda: _readyz(port) == (200, {n: {"ready": True, "reason": "ready"} for n in names}),
            timeout=60,
            what="every pipeline ready",
        )
        a, b, c = sims

        c.faults.stall_rate, c.faults.stall_seconds = 1.0, 60.0  # c's Tanium answers nothing any more
        wait_until(lambda: not _readyz(port)[1][names[2]]["ready"], timeout=30, what="c not ready")
        for sim in (a, b):
            sim.live_total = sim.live_created  # a and b stop creating alerts; c's stay unread
        for name, sim in ((names[0], a), (names[1], b)):
            got = read_topic(broker.bootstrap, f"{name}.events", expect=sim.alert_count, timeout=60)
            assert sorted(ids_of(got)) == list(range(1, sim.alert_count + 1)), name
        code, ready = _readyz(port)
        assert code == 200 and ready[names[0]]["ready"] and ready[names[1]]["ready"]
        assert not ready[names[2]]["ready"] and "Tanium" in ready[names[2]]["reason"]
        _, text = scrape(port)
        for name in names:
            assert metric(text, "build_info", pipeline=name) == 1.0
        assert (metric(text, "records_sent_total", pipeline=names[0], stage="sink") or 0) >= a.alert_count

        c.faults.reset()
        c.live_total = c.live_created
        got = read_topic(broker.bootstrap, f"{names[2]}.events", expect=c.alert_count, timeout=60)
        assert sorted(ids_of(got)) == list(range(1, c.alert_count + 1))
        cli.proc.send_signal(signal.SIGTERM)
        exit_code, _ = cli.wait(60)
        logs = cli.logs()
        assert exit_code == 0, logs[-3000:]
        assert "Traceback" not in logs
        assert all(sim.api_key not in logs for sim in sims)
        for name in names:
            assert f"summary {name}:" in logs
        for name, sim in zip(names, sims, strict=True):  # to the end: nothing more, no duplicate
            ids = ids_of(read_topic(broker.bootstrap, f"{name}.events"))
            assert sorted(ids) == list(range(1, sim.alert_count + 1)), name


def test_pipelines_run_together_need_distinct_names_and_stream_mode(tmp_path, sim):
    folder = tmp_path / "pipelines"
    folder.mkdir()
    for file in ("one.toml", "two.toml"):
        write_pipeline(folder / file, stream_sections("same", sim, "127.0.0.1:9", tmp_path / "state"))
    cli = Cli(["run", str(folder)], tmp_path / "names.log")
    code, _ = cli.wait(30)
    assert code == 2
    assert "pipeline.name 'same' is also the name in" in cli.logs() and "Traceback" not in cli.logs()

    empty = tmp_path / "empty"
    empty.mkdir()
    cli = Cli(["run", str(empty)], tmp_path / "empty.log")
    code, _ = cli.wait(30)
    assert code == 2 and "holds no pipeline file" in cli.logs()
