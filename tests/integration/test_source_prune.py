"""The source cursor in the running pipeline (simulator over HTTP → pipeline → real broker) when
Tanium prunes below it: while alerts keep arriving, and across restarts from the checkpoint; and a
hand-edited checkpoint with a field of the wrong type, through the CLI."""

from __future__ import annotations

import json
import threading
import time

import pytest
from helpers import Cli, Running, ids_of, make_cfg, read_topic, stream_sections, wait_until, write_pipeline

from connector.simulator import Simulator


def committed_id(run) -> int:
    return (run.pipe.committed or {}).get("id") or 0


def inject(sim, n: int, pause: float = 0.0) -> None:
    for _ in range(n):
        sim.inject()
        time.sleep(pause)  # the arrival rate of the workload


def test_prune_below_the_cursor_while_alerts_keep_arriving(broker, topic_prefix, tmp_path):
    """After 1,000 alerts are read, 300 more arrive one by one while Tanium prunes, again and again,
    everything delivered so far (below the cursor, to an empty list, the cursor record itself).
    Only delivered alerts are pruned, so every alert must reach the topic, each once."""
    with Simulator(alerts=1000, intel_docs=4, seed=41, history=3600) as sim:
        cfg = make_cfg(sim, broker.bootstrap, topic_prefix, tmp_path, tanium={"page_size": 100})
        with Running(cfg) as run:
            wait_until(lambda: committed_id(run) == 1000, what="the first 1,000 alerts")
            arrivals = threading.Thread(target=inject, args=(sim, 300, 0.005), daemon=True)
            arrivals.start()
            prunes = 0
            while arrivals.is_alive() or committed_id(run) < 1300:
                done = committed_id(run)
                pruned = sim.prune(0)
                if done > pruned:
                    sim.prune(done - pruned)
                    prunes += 1
                wait_until(
                    lambda d=done: committed_id(run) > d or (not arrivals.is_alive() and d == 1300),
                    timeout=30,
                    what=f"delivery to go on past alert {done} after a prune",
                )
            arrivals.join()
        assert prunes >= 3, "the test pruned below the cursor several times"
        assert run.code == 0
    ids = ids_of(read_topic(broker.bootstrap, cfg.kafka.topic, expect=1300))
    assert sorted(ids) == list(range(1, 1301)), "every alert exactly once"


def test_prune_below_the_checkpoint_across_restarts(broker, topic_prefix, tmp_path):
    """Stop, prune below the checkpoint (then, the second time, everything), add alerts, start
    again: each start finds its place, delivers everything new and nothing twice (graceful stops
    leave the checkpoint on the last delivered alert), and its checkpoint counts the list as it is now."""
    with Simulator(alerts=1000, intel_docs=4, seed=42, history=3600) as sim:
        cfg = make_cfg(sim, broker.bootstrap, topic_prefix, tmp_path, tanium={"page_size": 100})
        with Running(cfg) as run:
            wait_until(lambda: committed_id(run) == 1000, what="the first 1,000 alerts")
        sim.prune(950)
        inject(sim, 200)
        with Running(cfg) as run:
            wait_until(lambda: committed_id(run) == 1200, timeout=30, what="the 200 alerts added while stopped")
        assert run.pipe.committed["offset"] == 250  # 50 left of the first 1,000, then 200 new
        sim.prune(sim.alert_count)  # to empty
        inject(sim, 50)
        with Running(cfg) as run:
            wait_until(lambda: committed_id(run) == 1250, timeout=30, what="the 50 alerts added to an empty list")
        assert run.pipe.committed["offset"] == 50
        assert run.code == 0
    ids = ids_of(read_topic(broker.bootstrap, cfg.kafka.topic, expect=1250))
    assert sorted(ids) == list(range(1, 1251)), "every alert exactly once"


GOOD = {"created_at": "2026-01-31T12:00:00.000Z", "id": 7, "offset": 7}


@pytest.mark.parametrize(
    ("checkpoint", "field"),
    [
        ({**GOOD, "offset": "abc"}, "offset"),
        ({**GOOD, "id": "x"}, "id"),
        ({**GOOD, "created_at": 5}, "created_at"),
        ({"created_at": GOOD["created_at"], "id": 7}, "offset"),
    ],
    ids=["offset-not-a-number", "id-not-a-number", "created_at-not-a-time", "offset-missing"],
)
def test_a_hand_edited_checkpoint_with_a_wrong_field_is_a_clear_error(
    checkpoint, field, broker, tmp_path, topic_prefix
):
    """`run` ends with exit code 1 and one `error:` line that names the checkpoint file, the field
    and what it may hold; no traceback."""
    with Simulator(alerts=10, intel_docs=2, seed=43, history=600) as sim:
        state = tmp_path / "state"
        state.mkdir()
        (state / f"{topic_prefix}.json").write_text(json.dumps(checkpoint), encoding="utf-8")
        pipeline = write_pipeline(tmp_path / "p.toml", stream_sections(topic_prefix, sim, broker.bootstrap, state))
        cli = Cli(["run", str(pipeline), "--once"], tmp_path / "run.log")
        code, _ = cli.wait(60)
    err = cli.logs()
    assert code == 1, err
    assert "Traceback" not in err
    line = next(line for line in err.splitlines() if line.startswith("error:"))
    assert str(state / f"{topic_prefix}.json") in line and field in line and ("must" in line), line
