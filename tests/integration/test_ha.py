"""HA poller on the real broker (tansu): one leader polls, the standby takes over after the
leader dies (kill -9) or freezes (SIGSTOP), resuming from the shared Kafka checkpoint.

Group settings are lowered for tansu (and for test time): session 4 s, heartbeat 1 s. Takeover
times are measured and printed, never asserted against a tight bound (shared noisy machine);
the deadlines here only stop a hung test.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
from helpers import Cli, metric, read_topic, scrape, stream_sections, wait_until, write_pipeline

from connector.config import KafkaSection
from connector.metrics import Metrics
from connector.simulator import Simulator
from connector.stream.checkpoint import KafkaCheckpointStore, read_committed_log
from connector.stream.leader import LeaderElection
from connector.tools.embedded import free_port

SESSION_MS, HEARTBEAT_MS = 4000, 1000


def alert_ids(records) -> list[int]:
    return [json.loads(r.value)["raw"]["id"] for r in records]


def test_one_leader_and_a_graceful_hand_over(broker, topic_prefix):
    k = KafkaSection(bootstrap_servers=broker.bootstrap)
    changes: dict[str, list[bool]] = {"a": [], "b": []}
    metrics = {n: Metrics(topic_prefix) for n in "ab"}

    def member(n):
        return LeaderElection(
            k,
            f"{topic_prefix}.state.leader",
            f"{topic_prefix}-group",
            session_timeout_ms=SESSION_MS,
            heartbeat_interval_ms=HEARTBEAT_MS,
            metrics=metrics[n],
            on_change=changes[n].append,
        )

    a = member("a").start()
    b = None
    try:
        assert a.wait_leader(60), "a single member must be elected"
        b = member("b").start()
        # b joins; the cooperative-sticky assignment leaves the lead where it is
        assert b.joined.wait(60), "b must join the group"
        assert a.is_leader and not b.is_leader
        assert changes["a"] == [True] and changes["b"] == []
        assert f'tanium_connector_ha_leader{{pipeline="{topic_prefix}"}} 1.0' in metrics["a"].render().decode()
        assert f'tanium_connector_ha_leader{{pipeline="{topic_prefix}"}} 0.0' in metrics["b"].render().decode()
        t0 = time.monotonic()
        a.close()  # leaves the group: no session timeout to wait for
        assert changes["a"] == [True, False] and not a.is_leader
        assert b.wait_leader(60), "the standby must take over"
        print(f"\nHA graceful hand-over: {time.monotonic() - t0:.1f}s")
        assert f'tanium_connector_ha_leader{{pipeline="{topic_prefix}"}} 1.0' in metrics["b"].render().decode()
    finally:
        a.close()
        if b is not None:
            b.close()


def _leader_gauge(port: int) -> float | None:
    status, text = scrape(port)
    return metric(text, "ha_leader") if status == 200 else None


def _alert_requests(port: int) -> float:
    return metric(scrape(port)[1], "source_requests_total", endpoint="alerts") or 0


class Pair:
    """Two CLI processes running the same HA pipeline, each with its own metrics port."""

    def __init__(self, tmp_path, sim, bootstrap, name, delivery):
        self.ports = [free_port(), free_port()]
        self.files = []
        for i, port in enumerate(self.ports):
            self.files.append(
                write_pipeline(
                    tmp_path / f"p{i}.toml",
                    stream_sections(
                        name,
                        sim,
                        bootstrap,
                        tmp_path / f"state{i}",
                        metrics_port=port,
                        pipeline={"delivery": delivery},
                        state={"backend": "kafka", "topic": f"{name}.state"},
                        ha={"enabled": True, "session_timeout_ms": SESSION_MS, "heartbeat_interval_ms": HEARTBEAT_MS},
                        tanium={"page_size": 50},
                        kafka={"delivery_timeout_ms": 10000},
                    ),
                )
            )
        self.tmp_path = tmp_path
        self.clis: list[Cli | None] = [None, None]
        self.runs = 0

    def start(self, i):
        self.runs += 1
        self.clis[i] = Cli(
            ["--log-format", "json", "run", str(self.files[i])], self.tmp_path / f"cli{i}-{self.runs}.log"
        )

    def gauges(self):
        return [_leader_gauge(p) for p in self.ports]

    def leader(self) -> int | None:
        g = self.gauges()
        return g.index(1.0) if g.count(1.0) == 1 and g.count(0.0) == 1 else None

    def stop_all(self):
        for c in self.clis:
            if c is not None:
                c.stop()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
def test_kill_9_of_the_leader_the_standby_takes_over(delivery, broker, topic_prefix, tmp_path):
    """Only the leader polls; after kill -9 of the leader the standby becomes leader, resumes from
    the shared checkpoint, and every alert arrives (at least once; exactly once in the committed
    view with exactly-once delivery)."""
    with Simulator(alerts=2000, intel_docs=8, seed=31, history=3600, live_rate=40) as sim:
        pair = Pair(tmp_path, sim, broker.bootstrap, topic_prefix, delivery)
        k = KafkaSection(bootstrap_servers=broker.bootstrap)
        store = KafkaCheckpointStore(k, f"{topic_prefix}.state", topic_prefix, transactional=delivery == "exactly-once")
        try:
            pair.start(0)
            pair.start(1)
            wait_until(lambda: pair.leader() is not None, timeout=90, what="one leader and one standby")
            lead = pair.leader()
            standby = 1 - lead
            # the leader works through the history while the standby never asks Tanium anything
            wait_until(
                lambda: (store.load() or {}).get("offset", 0) >= 1000, timeout=90, what="the leader's checkpoint"
            )
            assert _alert_requests(pair.ports[lead]) > 10
            assert _alert_requests(pair.ports[standby]) == 0
            assert pair.leader() == lead

            before = (store.load() or {}).get("offset", 0)
            t_kill = time.monotonic()
            assert pair.clis[lead].kill9() == -9
            wait_until(lambda: _leader_gauge(pair.ports[standby]) == 1.0, timeout=90, what="the standby to take over")
            takeover = time.monotonic() - t_kill
            wait_until(lambda: _alert_requests(pair.ports[standby]) > 0, timeout=30, what="the new leader to poll")
            # it resumed from the shared checkpoint, not from source.start_from
            log = pair.clis[standby].logs()
            started = [json.loads(line)["msg"] for line in log.splitlines() if "starting from" in line]
            assert started and "checkpoint" in started[-1] and "createdAt >=" not in started[-1], started

            sim.live_total = sim.live_created
            wait_until(
                lambda: not any(t.name == "simulator-live" for t in threading.enumerate()),
                what="the simulator to stop creating alerts",
            )
            created = sim.alert_count
            wait_until(
                lambda: (store.load() or {}).get("id") == created,
                timeout=90,
                what="the new leader to deliver everything",
            )
            pair.clis[standby].proc.send_signal(signal.SIGTERM)
            code, _ = pair.clis[standby].wait(60)
            assert code == 0, pair.clis[standby].logs()[-3000:]
            for c in pair.clis:
                assert "Traceback" not in c.logs()
        finally:
            pair.stop_all()

    everything = alert_ids(read_topic(broker.bootstrap, f"{topic_prefix}.events", timeout=90))
    missing = set(range(1, created + 1)) - set(everything)
    assert not missing, f"{len(missing)} alerts lost, e.g. {sorted(missing)[:10]}"
    assert set(everything) == set(range(1, created + 1))
    figures = {
        "delivery": delivery,
        "alerts": created,
        "checkpoint_at_kill": before,
        "takeover_seconds": round(takeover, 1),
        "session_timeout_ms": SESSION_MS,
        "records_in_log": len(everything),
        "duplicates_in_log": len(everything) - len(set(everything)),
    }
    if delivery == "exactly-once":
        committed = alert_ids(read_committed_log(k, f"{topic_prefix}.events"))
        assert sorted(committed) == list(range(1, created + 1)), "every alert committed exactly once"
        figures["committed_duplicates"] = len(committed) - len(set(committed))
    print(f"\nHA TAKEOVER FIGURES: {json.dumps(figures)}")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_frozen_leader_is_replaced_and_fenced_when_it_wakes(broker, topic_prefix, tmp_path):
    """SIGSTOP the leader (a long GC pause, a frozen VM) beyond the session timeout: the standby
    takes over; on SIGCONT the old leader steps down on its own (lease lapsed, then the group
    says it lost the partition) and its transactional producer is fenced, so the committed view
    still holds every alert exactly once."""
    with Simulator(alerts=1500, intel_docs=8, seed=37, history=3600, live_rate=40) as sim:
        pair = Pair(tmp_path, sim, broker.bootstrap, topic_prefix, "exactly-once")
        k = KafkaSection(bootstrap_servers=broker.bootstrap)
        store = KafkaCheckpointStore(k, f"{topic_prefix}.state", topic_prefix, transactional=True)
        try:
            pair.start(0)
            pair.start(1)
            wait_until(lambda: pair.leader() is not None, timeout=90, what="one leader and one standby")
            old = pair.leader()
            new = 1 - old
            wait_until(lambda: (store.load() or {}).get("offset", 0) >= 500, timeout=90, what="the leader's checkpoint")
            os.kill(pair.clis[old].proc.pid, signal.SIGSTOP)
            t_stop = time.monotonic()
            try:
                wait_until(
                    lambda: _leader_gauge(pair.ports[new]) == 1.0,
                    timeout=90,
                    what="the standby to take over from the frozen leader",
                )
                takeover = time.monotonic() - t_stop
                wait_until(lambda: _alert_requests(pair.ports[new]) > 0, timeout=30, what="the new leader to poll")
            finally:
                os.kill(pair.clis[old].proc.pid, signal.SIGCONT)
            wait_until(lambda: _leader_gauge(pair.ports[old]) == 0.0, timeout=60, what="the woken leader to step down")
            polls_after_waking = _alert_requests(pair.ports[old])
            assert pair.leader() == new

            sim.live_total = sim.live_created
            wait_until(
                lambda: not any(t.name == "simulator-live" for t in threading.enumerate()),
                what="the simulator to stop creating alerts",
            )
            created = sim.alert_count
            wait_until(
                lambda: (store.load() or {}).get("id") == created,
                timeout=90,
                what="the new leader to deliver everything",
            )
            # the old process stands by: no poll since it stepped down, except at most the one
            # request that was already on the wire when it froze (it completes on waking)
            assert _alert_requests(pair.ports[old]) <= polls_after_waking + 1
            assert _leader_gauge(pair.ports[old]) == 0.0
            old_log = pair.clis[old].logs()
            assert "standing by" in old_log
        finally:
            pair.stop_all()
    committed = alert_ids(read_committed_log(k, f"{topic_prefix}.events"))
    assert sorted(committed) == list(range(1, created + 1)), "every alert committed exactly once"
    print(f"\nHA FROZEN-LEADER FIGURES: {json.dumps({'alerts': created, 'takeover_seconds': round(takeover, 1)})}")
