"""HA poller on the real broker (tansu): one leader polls, the standby takes over after the
leader dies (kill -9), freezes (SIGSTOP) or is cut off from the group coordinator in mid-rebalance,
resuming from the shared Kafka checkpoint; a leader whose producer another instance fenced stands
by instead of fencing back.

Group settings are lowered for tansu (and for test time): session 4 s, heartbeat 1 s. One timing
is asserted, the takeover bound after kill -9 of the leader (TAKEOVER_MARGIN_S); the other
deadlines here only stop a hung test.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import threading
import time
from datetime import datetime

import pytest
from helpers import (
    Cli,
    Running,
    StallProxy,
    broker_behind_proxy,
    make_cfg,
    metric,
    read_topic,
    scrape,
    stream_sections,
    wait_until,
    write_pipeline,
)

from connector.config import KafkaSection
from connector.kafka import ProducerFenced
from connector.metrics import Metrics
from connector.simulator import Simulator
from connector.stream.checkpoint import KafkaCheckpointStore, read_committed_log
from connector.stream.leader import LeaderElection
from connector.stream.sink import KafkaSink
from connector.tools.embedded import free_port

SESSION_MS, HEARTBEAT_MS = 4000, 1000
# kill -9 of the leader → the standby leads and polls Tanium within
#     ha.session_timeout_ms + ha.heartbeat_interval_ms + TAKEOVER_MARGIN_S:
# the coordinator drops the dead leader a session after its last heartbeat; the standby hears of
# the rebalance at its next heartbeat; the margin covers its rejoining (tansu holds a JoinGroup
# about 2 s) and its start as leader (producer, checkpoint read, first Tanium request) on a
# loaded machine.
TAKEOVER_MARGIN_S = 5.0
TAKEOVER_BOUND_S = (SESSION_MS + HEARTBEAT_MS) / 1000 + TAKEOVER_MARGIN_S


def alert_ids(records) -> list[int]:
    return [json.loads(r.value)["raw"]["id"] for r in records]


def log_times(text: str, msg_part: str) -> list[datetime]:
    """When each JSON log line whose message contains `msg_part` was written."""
    out = []
    for line in text.splitlines():
        if line.startswith("{") and msg_part in line:
            out.append(datetime.fromisoformat(json.loads(line)["ts"]))
    return out


class GroupCutProxy(StallProxy):
    """A StallProxy that can cut one client off from the group coordinator alone: after
    `cut(client_id)`, that client's next JoinGroup request and everything after it on the same
    connection are held (the coordinator never hears of them), while its other connections,
    the data path included, keep flowing. `heal()` lets the held bytes through."""

    JOIN_GROUP = 11  # Kafka API key

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cut_client: bytes | None = None
        self.healed = threading.Event()
        self.held: set[threading.Thread] = set()  # pumps (client → broker) of cut connections

    def cut(self, client_id: str) -> None:
        self.healed.clear()
        self.cut_client = client_id.encode()

    def heal(self) -> None:
        self.cut_client = None
        self.healed.set()

    def seen(self, data: bytes, from_client: bool) -> None:
        # a request starts: size (4), api key (2), api version (2), correlation id (4), client id
        # (2-byte length, bytes); kafka-python writes each request in one piece
        pump = threading.current_thread()
        if from_client and pump not in self.held and self.cut_client and len(data) >= 14:
            api_key, _, _, n = struct.unpack_from(">hhih", data, 4)
            if api_key == self.JOIN_GROUP and data[14 : 14 + n] == self.cut_client:
                self.held.add(pump)
        if pump in self.held:
            self.healed.wait()


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
    """Two CLI processes running the same HA pipeline, each with its own metrics port and Kafka
    client id (`client_ids`); `kafka` and `ha` add settings to both."""

    def __init__(self, tmp_path, sim, bootstrap, name, delivery, kafka=None, ha=None):
        self.ports = [free_port(), free_port()]
        self.client_ids = [f"{name}-0", f"{name}-1"]
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
                        ha={
                            "enabled": True,
                            "session_timeout_ms": SESSION_MS,
                            "heartbeat_interval_ms": HEARTBEAT_MS,
                            **(ha or {}),
                        },
                        tanium={"page_size": 50},
                        kafka={"delivery_timeout_ms": 10000, "client_id": self.client_ids[i], **(kafka or {})},
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
    """Only the leader polls; after kill -9 of the leader the standby becomes leader and polls
    within ha.session_timeout_ms + ha.heartbeat_interval_ms + 5 s (TAKEOVER_BOUND_S), resumes
    from the shared checkpoint, and every alert arrives (at least once; exactly once in the
    committed view with exactly-once delivery)."""
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
            wait_until(
                lambda: _leader_gauge(pair.ports[standby]) == 1.0 and _alert_requests(pair.ports[standby]) > 0,
                timeout=90,
                what="the standby to lead and poll",
            )
            takeover = time.monotonic() - t_kill
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
        "takeover_bound_seconds": TAKEOVER_BOUND_S,
        "session_timeout_ms": SESSION_MS,
        "records_in_log": len(everything),
        "duplicates_in_log": len(everything) - len(set(everything)),
    }
    if delivery == "exactly-once":
        committed = alert_ids(read_committed_log(k, f"{topic_prefix}.events"))
        assert sorted(committed) == list(range(1, created + 1)), "every alert committed exactly once"
        figures["committed_duplicates"] = len(committed) - len(set(committed))
    print(f"\nHA TAKEOVER FIGURES: {json.dumps(figures)}")
    assert takeover <= TAKEOVER_BOUND_S, f"takeover took {takeover:.1f}s, bound {TAKEOVER_BOUND_S:g}s"


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
            assert old_log.count("transactional producer ready") == 1, "the woken leader opened no new producer"
        finally:
            pair.stop_all()
    committed = alert_ids(read_committed_log(k, f"{topic_prefix}.events"))
    assert sorted(committed) == list(range(1, created + 1)), "every alert committed exactly once"
    print(f"\nHA FROZEN-LEADER FIGURES: {json.dumps({'alerts': created, 'takeover_seconds': round(takeover, 1)})}")


@pytest.fixture(scope="module")
def cut_broker(tmp_path_factory):
    """A broker whose proxy can cut one client off from the group coordinator (GroupCutProxy)."""
    with broker_behind_proxy(tmp_path_factory, "tansu-group-cut", proxy_class=GroupCutProxy) as b:
        yield b
        b.proxy.heal()


IN_FLIGHT = 20  # kafka.max_unacked below: the most records the leader can have handed to Kafka unconfirmed


@pytest.mark.timeout(240)
def test_a_leader_cut_off_from_the_coordinator_in_mid_rebalance_steps_down_before_the_standby_leads(
    cut_broker, topic_prefix, tmp_path
):
    """The leader streams (at-least-once); a standby starts, which starts a rebalance; the leader
    hears of it, but its JoinGroup never reaches the coordinator (cut off from the coordinator
    alone, its data path still up). Its lease runs out in mid-rebalance: it steps down before the
    coordinator can drop it and give partition 0 to the standby, finishes up within that margin
    (flush, checkpoint), and the standby takes over from that checkpoint. Every alert arrives;
    duplicates are at most what the old leader had in flight when it stepped down
    (kafka.max_unacked, IN_FLIGHT here). The margin is the heartbeat interval: 2 s here, so that
    finishing up fits in it on a loaded machine."""
    proxy = cut_broker.proxy
    with Simulator(alerts=600, intel_docs=8, seed=47, history=3600, live_rate=60) as sim:
        pair = Pair(
            tmp_path,
            sim,
            cut_broker.bootstrap,
            topic_prefix,
            "at-least-once",
            kafka={"max_unacked": IN_FLIGHT},
            ha={"session_timeout_ms": 6000, "heartbeat_interval_ms": 2000},
        )
        store = KafkaCheckpointStore(
            KafkaSection(bootstrap_servers=cut_broker.bootstrap), f"{topic_prefix}.state", topic_prefix
        )
        try:
            pair.start(0)
            wait_until(lambda: _leader_gauge(pair.ports[0]) == 1.0, timeout=90, what="the first process to lead")
            wait_until(lambda: (store.load() or {}).get("offset", 0) >= 600, timeout=90, what="the history delivered")
            proxy.cut(pair.client_ids[0])
            pair.start(1)
            wait_until(lambda: _leader_gauge(pair.ports[1]) == 1.0, timeout=90, what="the standby to take over")
            old_log, new_log = pair.clis[0].logs(), pair.clis[1].logs()
            assert "stepping down before the group can give the lead to another process" in old_log
            stepped_down = log_times(old_log, "this process is standing by")
            took_over = log_times(new_log, "this process is the LEADER")
            assert stepped_down and took_over and stepped_down[-1] < took_over[0], (stepped_down, took_over)
            assert _leader_gauge(pair.ports[0]) == 0.0
            proxy.heal()

            sim.live_total = sim.live_created
            wait_until(
                lambda: not any(t.name == "simulator-live" for t in threading.enumerate()),
                what="the simulator to stop creating alerts",
            )
            created = sim.alert_count
            wait_until(lambda: (store.load() or {}).get("id") == created, timeout=90, what="everything delivered")
            for cli in pair.clis:
                cli.proc.send_signal(signal.SIGTERM)
                code, _ = cli.wait(60)
                assert code == 0, cli.logs()[-3000:]
                assert "Traceback" not in cli.logs()
        finally:
            proxy.heal()
            pair.stop_all()
    everything = alert_ids(read_topic(cut_broker.bootstrap, f"{topic_prefix}.events", timeout=90))
    assert set(everything) == set(range(1, created + 1))
    duplicates = len(everything) - len(set(everything))
    gap = (took_over[0] - stepped_down[-1]).total_seconds()
    print(f"\nHA CUT-OFF FIGURES: {json.dumps({'alerts': created, 'duplicates': duplicates, 'step_down_lead_s': gap})}")
    assert duplicates <= IN_FLIGHT


@pytest.mark.timeout(240)
def test_a_fenced_leader_stands_by_and_never_fences_back(broker, topic_prefix, tmp_path):
    """Exactly-once HA: another producer initialises the pipeline's transactional id (a second
    instance started without HA, say). The leader, fenced on its next transaction, stands by: it
    stays the group's leader but writes nothing and opens no new producer (which would fence the
    other in turn), and /readyz says why. Once the lead moves (the fenced process stops), the new
    leader's producer fences the intruder and delivers what waited; every alert is committed
    exactly once."""
    name = topic_prefix
    k = KafkaSection(bootstrap_servers=broker.bootstrap, linger_ms=0)
    with Simulator(alerts=200, intel_docs=5, seed=53, history=3600) as sim:
        pair = Pair(tmp_path, sim, broker.bootstrap, name, "exactly-once")
        store = KafkaCheckpointStore(k, f"{name}.state", name, transactional=True)
        intruder = None
        try:
            pair.start(0)
            wait_until(lambda: (store.load() or {}).get("id") == 200, timeout=90, what="the leader to deliver")
            pair.start(1)
            wait_until(lambda: "HA: joined group" in pair.clis[1].logs(), timeout=90, what="the second to join")
            assert pair.leader() == 0
            intruder = KafkaSink(k, transactional_id=f"tanium-connector.{name}")
            for _ in range(30):
                sim.inject()
            wait_until(
                lambda: "another instance took over transactional.id" in pair.clis[0].logs(),
                timeout=60,
                what="the leader to find itself fenced",
            )
            assert "standing by until elected again" in pair.clis[0].logs()
            status, body = scrape(pair.ports[0], "/readyz")
            assert status == 200 and "took over the transactional id" in body, body
            assert pair.leader() == 0  # still the group's leader, but not writing
            # the intruder's producer was not fenced back
            intruder.begin()
            intruder.send(f"{name}.intruder", b"k", b"v", [], lambda ok, e: None)
            intruder.commit(timeout=30)

            pair.clis[0].proc.send_signal(signal.SIGTERM)
            code, _ = pair.clis[0].wait(60)
            assert code == 0, pair.clis[0].logs()[-3000:]
            created = sim.alert_count
            wait_until(lambda: (store.load() or {}).get("id") == created, timeout=90, what="the new leader")
            intruder.begin()
            with pytest.raises(ProducerFenced):
                intruder.send(f"{name}.intruder", b"k", b"v", [], lambda ok, e: None)
                intruder.commit(timeout=30)
            pair.clis[1].proc.send_signal(signal.SIGTERM)
            code, _ = pair.clis[1].wait(60)
            assert code == 0, pair.clis[1].logs()[-3000:]
            logs = [c.logs() for c in pair.clis]
        finally:
            if intruder is not None:
                intruder.close(1)
            pair.stop_all()
    assert logs[0].count("transactional producer ready") == 1, "the fenced leader opened no new producer"
    assert "Traceback" not in logs[0] + logs[1]
    committed = alert_ids(read_committed_log(k, f"{name}.events"))
    assert sorted(committed) == list(range(1, created + 1)), "every alert committed exactly once"


class FlappingElection:
    """An election (the pipeline's interface to it) whose lead can be lost and won back before the
    pipeline looks again, as a lease that runs out in a rebalance and is renewed 200 ms later does."""

    group = "flapping"
    refused = False

    def __init__(self, on_change):
        self.on_change = on_change
        self.terms = 0
        self._leader = threading.Event()

    @property
    def is_leader(self) -> bool:
        return self._leader.is_set()

    def wait_leader(self, timeout=None) -> bool:
        return self._leader.wait(timeout)

    def safe_until(self) -> float:
        return time.monotonic() + 30

    def start(self):
        self.terms += 1
        self._leader.set()
        return self

    def flap(self) -> None:
        self._leader.clear()
        self.on_change(False)
        self.terms += 1
        self._leader.set()
        self.on_change(True)

    def close(self) -> None:
        self._leader.clear()


def test_a_lead_lost_and_won_back_at_once_starts_a_new_term(broker, topic_prefix, tmp_path):
    """Losing the lead stops the term's producer at once; when the lead comes back before the
    pipeline noticed the loss, the pipeline still ends that term and starts a new one (new
    producer, from the checkpoint) instead of going on with the stopped producer."""
    with Simulator(alerts=100, intel_docs=3, seed=91, history=3600) as sim:
        cfg = make_cfg(
            sim,
            broker.bootstrap,
            topic_prefix,
            tmp_path,
            ha={"enabled": True},
            state={"backend": "kafka", "topic": f"{topic_prefix}.state"},
        )
        run = Running(cfg)
        election = run.pipe.election = FlappingElection(run.pipe._leadership)
        with run:
            wait_until(lambda: run.committed_offset() >= 100, timeout=60, what="the history delivered")
            election.flap()
            for _ in range(20):
                sim.inject()
            wait_until(lambda: run.committed_offset() >= 120, timeout=30, what="delivery after the flap")
        ids = alert_ids(read_topic(broker.bootstrap, cfg.kafka.topic, expect=120))
        assert set(ids) == set(range(1, 121))
