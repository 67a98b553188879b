"""Several stream pipelines in one process (`tanium-connector run DIR`): each keeps its own Tanium
client, cursor and checkpoint; one black-holed Tanium server does not hold up the others; one
metrics listener serves every pipeline, /readyz answers per pipeline."""

from __future__ import annotations

import contextlib
import json
import signal
import time

import pytest
from helpers import Cli, ids_of, metric, read_topic, scrape, stream_sections, wait_until, write_pipeline

from connector.config import KafkaSection
from connector.simulator import Simulator
from connector.stream.checkpoint import read_committed_log
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


SESSION_MS, HEARTBEAT_MS = 4000, 1000
# kill -9 of a worker → each of its pipelines is polled by another worker within
#     fleet.session_timeout_ms + fleet.heartbeat_interval_ms + HAND_OVER_MARGIN_S
# (the coordinator drops the dead worker a session after its last heartbeat; the others hear of
# the rebalance at their next heartbeat; the margin covers rejoining — tansu holds a JoinGroup
# about 2 s — and starting the pipeline on a loaded machine). The README states this bound.
HAND_OVER_MARGIN_S = 8.0
HAND_OVER_BOUND_S = (SESSION_MS + HEARTBEAT_MS) / 1000 + HAND_OVER_MARGIN_S


def write_fleet_pipeline(folder, name, sim, bootstrap, prefix, delivery="at-least-once") -> None:
    """A pipeline of the fleet `prefix`, its metrics port from the worker's ${METRICS_PORT}."""
    sections = stream_sections(name, sim, bootstrap, folder / "unused")
    sections["pipeline"]["delivery"] = delivery
    sections["state"] = {"backend": "kafka", "topic": f"{prefix}.state"}
    sections["metrics"] = {"listen": "127.0.0.1:${METRICS_PORT}"}
    sections["fleet"] = {"group_id": prefix, "session_timeout_ms": SESSION_MS, "heartbeat_interval_ms": HEARTBEAT_MS}
    write_pipeline(folder / f"{name}.toml", sections)


class Workers:
    """Worker processes running `run DIR` on one directory of fleet pipelines; each has its own
    metrics port through ${METRICS_PORT} in the shared files."""

    def __init__(self, folder, tmp_path):
        self.folder, self.tmp_path = folder, tmp_path
        self.clis: list[Cli] = []
        self.ports: list[int] = []

    def start(self, folder=None) -> int:
        port = free_port()
        n = len(self.clis)
        args = ["run", str(folder or self.folder)]
        cli = Cli(args, self.tmp_path / f"worker{n}.log", env={"METRICS_PORT": str(port)})
        self.clis.append(cli)
        self.ports.append(port)
        return n

    def owned(self, n: int) -> set[str]:
        _, text = scrape(self.ports[n])
        out = set()
        for line in text.splitlines():
            if line.startswith("tanium_connector_fleet_owner{") and line.endswith(" 1.0"):
                out.add(line.split('pipeline="', 1)[1].split('"', 1)[0])
        return out

    def worker_of(self, agent: str) -> int | None:
        for n, cli in enumerate(self.clis):
            if agent.endswith(f":{cli.proc.pid})"):
                return n
        return None

    def stop_all(self):
        for cli in self.clis:
            cli.stop()


def _owners(workers: Workers, alive: list[int]) -> dict[str, list[int]]:
    owners: dict[str, list[int]] = {}
    for n in alive:
        for name in workers.owned(n):
            owners.setdefault(name, []).append(n)
    return owners


@pytest.mark.timeout(300)
@pytest.mark.parametrize("delivery, pipelines", [("at-least-once", 12), ("exactly-once", 6)])
def test_workers_share_the_fleet_and_hand_a_dead_workers_pipelines_over(
    delivery, pipelines, broker, topic_prefix, tmp_path
):
    """3 workers, 12 fleet pipelines (6 in exactly-once mode) against simulators with live alerts:
    Kafka's group gives each pipeline to one worker; kill -9 of a worker hands its pipelines to
    the others within the bound; a new worker takes a share. Every alert of every pipeline
    arrives (exactly-once: committed exactly once), and by the simulators' request logs no two
    workers ever polled one pipeline at the same time."""
    folder = tmp_path / "pipelines"
    folder.mkdir()
    names = [f"{topic_prefix}-{i:02d}" for i in range(pipelines)]
    workers = Workers(folder, tmp_path)
    with contextlib.ExitStack() as stack:
        sims = {
            name: stack.enter_context(Simulator(alerts=50, intel_docs=3, seed=80 + i, history=3600, live_rate=5))
            for i, name in enumerate(names)
        }
        for name, sim in sims.items():
            write_fleet_pipeline(folder, name, sim, broker.bootstrap, topic_prefix, delivery)
        stack.callback(workers.stop_all)
        for _ in range(3):
            workers.start()

        def settled(alive):
            owners = _owners(workers, alive)
            return sorted(owners) == names and all(len(v) == 1 for v in owners.values())

        wait_until(lambda: settled([0, 1, 2]), timeout=90, what="every pipeline run by exactly one worker")
        lost = {name for name, (n,) in _owners(workers, [0, 1, 2]).items() if n == 0}
        assert lost, "the group gave worker 0 a share"

        workers.clis[0].kill9()
        t_kill = time.monotonic()
        wait_until(lambda: settled([1, 2]), timeout=60, what="the dead worker's pipelines to move")
        workers.start()  # worker 3
        wait_until(lambda: settled([1, 2, 3]) and workers.owned(3), timeout=90, what="the new worker to take a share")

        for sim in sims.values():
            sim.live_total = sim.live_created
        for name, sim in sims.items():
            got = read_topic(broker.bootstrap, f"{name}.events", expect=sim.alert_count, timeout=60)
            assert set(ids_of(got)) == set(range(1, sim.alert_count + 1)), name
            if delivery == "exactly-once":
                committed = ids_of(
                    read_committed_log(KafkaSection(bootstrap_servers=broker.bootstrap), f"{name}.events")
                )
                assert sorted(committed) == list(range(1, sim.alert_count + 1)), name

        hand_overs, moves = [], {}
        for name, sim in sims.items():
            polls = [(t, workers.worker_of(agent)) for t, agent in sim.polls.copy()]
            assert all(w is not None for _, w in polls), name
            # one worker at a time: once another worker polled the pipeline, the one before never again
            order = [w for i, (_, w) in enumerate(polls) if i == 0 or polls[i - 1][1] != w]
            assert len(order) == len(set(order)), (name, order)
            moves[name] = order
            if name in lost:
                hand_overs.append(next(t for t, w in polls if w != 0 and t > t_kill) - t_kill)
        figures = {"hand_over_s": [round(t, 1) for t in hand_overs], "bound_s": HAND_OVER_BOUND_S, "owners": moves}
        print(f"\nFLEET FIGURES: {json.dumps(figures)}")
        assert max(hand_overs) <= HAND_OVER_BOUND_S, hand_overs
        for n in (1, 2, 3):
            workers.clis[n].proc.send_signal(signal.SIGTERM)
        for n in (1, 2, 3):
            code, _ = workers.clis[n].wait(60)
            assert code == 0, workers.clis[n].logs()[-3000:]
            assert "Traceback" not in workers.clis[n].logs()


@pytest.mark.timeout(240)
def test_a_pipeline_not_every_worker_has_runs_nowhere_until_every_worker_has_it(broker, topic_prefix, tmp_path):
    """Two workers whose pipeline directories differ (a roll-out in progress): the pipelines both
    have run, each on one worker; the one only the second worker has is refused — nobody polls it,
    the second worker says why and its /readyz names it — until the first worker leaves and every
    worker has it; then it runs and delivers every alert."""
    names = [f"{topic_prefix}-{x}" for x in ("a", "b", "new")]
    dirs = {"old": tmp_path / "old", "new": tmp_path / "new"}
    with contextlib.ExitStack() as stack:
        sims = {n: stack.enter_context(Simulator(alerts=30, intel_docs=2, seed=70 + i)) for i, n in enumerate(names)}
        for key, folder in dirs.items():
            folder.mkdir()
            for name in names if key == "new" else names[:2]:
                write_fleet_pipeline(folder, name, sims[name], broker.bootstrap, topic_prefix)
        workers = Workers(None, tmp_path)
        stack.callback(workers.stop_all)
        workers.start(dirs["old"])
        wait_until(lambda: workers.owned(0) == set(names[:2]), timeout=60, what="the first worker to run its pipelines")
        workers.start(dirs["new"])
        wait_until(
            lambda: f"pipeline {names[2]} is refused" in workers.clis[1].logs(),
            timeout=60,
            what="the second worker to report the refused pipeline",
        )
        for name in names[:2]:
            got = read_topic(broker.bootstrap, f"{name}.events", expect=30, timeout=60)
            assert sorted(ids_of(got)) == list(range(1, 31)), name
        wait_until(
            lambda: sorted(_owners(workers, [0, 1])) == names[:2], timeout=60, what="one owner for each common pipeline"
        )
        assert all(len(v) == 1 for v in _owners(workers, [0, 1]).values())
        code, ready = _readyz(workers.ports[1])
        assert code == 200 and ready[names[2]]["reason"].startswith("refused: not every worker"), ready
        assert sims[names[2]].stats["alerts"] == 0, "nobody polls the refused pipeline"

        workers.clis[0].proc.send_signal(signal.SIGTERM)
        assert workers.clis[0].wait(60)[0] == 0
        got = read_topic(broker.bootstrap, f"{names[2]}.events", expect=30, timeout=60)
        assert sorted(ids_of(got)) == list(range(1, 31))
        assert f"every worker has pipeline {names[2]} now" in workers.clis[1].logs()
        assert all(workers.worker_of(agent) == 1 for _, agent in sims[names[2]].polls.copy())
