"""Security Validation Kafka mode on the real broker (tansu) and the TR simulator over HTTP:
job actions from a consumer group, verdicts and events out, offsets committed only after the
verdict, and exactly one verdict per action across a consumer-group hand-over."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from helpers import Cli, read_topic, write_pipeline
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic

from connector.config import parse_pipeline
from connector.metrics import Metrics
from connector.simulator import Simulator
from connector.timeutil import format_ts
from connector.validation.kafka_runner import KafkaValidationRunner

FAST_GROUP = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000, "max_poll_interval_ms": 30000}
S = timedelta(seconds=1)


@pytest.fixture(scope="module")
def sim():
    with Simulator(seed=5, alerts=300, hosts=20, history=86400) as s:
        yield s


def make_cfg(sim, broker, prefix, kafka=None, **validation):
    v = {
        "job_actions_topic": f"{prefix}.jobs",
        "results_topic": f"{prefix}.results",
        "events_topic": f"{prefix}.events",
        "suspicious_topic": f"{prefix}.suspicious",
        "devices_topic": f"{prefix}.devices",
        "group_id": f"{prefix}.group",
        **validation,
    }
    return parse_pipeline(
        {
            "pipeline": {"name": "sv-kafka", "mode": "validation", "shutdown_timeout": 10},
            "tanium": sim.settings(max_retries=1),
            "metrics": {"enabled": False},
            "kafka": {"bootstrap_servers": broker.bootstrap, "linger_ms": 0, **(kafka or {})},
            "validation": v,
        }
    )


def create_topic(broker, name, partitions):
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        admin.close()


def produce(
    broker, topic, items: list[tuple[str | None, bytes]], partition: int | None = None, timestamp_ms: int | None = None
) -> dict[int, int]:
    """Sends the records (to `partition` when given, else by key); returns the end offset per
    partition they reached."""
    p = KafkaProducer(bootstrap_servers=broker.bootstrap)
    futures = [
        p.send(topic, key=key.encode() if key else None, value=value, partition=partition, timestamp_ms=timestamp_ms)
        for key, value in items
    ]
    p.flush()
    p.close()
    ends: dict[int, int] = {}
    for f in futures:
        md = f.get(10)
        ends[md.partition] = max(ends.get(md.partition, 0), md.offset + 1)
    return ends


def action(aid, host, t, **over) -> tuple[str, bytes]:
    a = {
        "id": aid,
        "job_id": "job-k",
        "name": f"action {aid}",
        "type": "host_cli",
        "started_at": format_ts(t),
        "source": {"hostnames": [host]},
    }
    a.update(over)
    return aid, orjson.dumps(a)


def wait_for(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}" + (f": {cond.__doc__}" if cond.__doc__ else ""))


def wait_committed(broker, cfg, ends: dict[int, int], timeout=30) -> None:
    """Waits until the group's committed offsets equal `ends` (partitions without records: none)."""
    v = cfg.validation
    want = {p: ends.get(p) for p in committed(broker, v.group_id, v.job_actions_topic)}
    last = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = committed(broker, v.group_id, v.job_actions_topic)
        if last == want:
            return
        time.sleep(0.2)
    raise AssertionError(f"committed offsets {last}, expected {want}")


def end_offsets(broker, topic) -> dict[int, int]:
    """The end offset of each partition of `topic`, from its records (tansu reports the end offset
    of a multi-record batch too low)."""
    ends: dict[int, int] = {}
    for r in read_all(broker, topic):
        ends[r.partition] = max(ends.get(r.partition, 0), r.offset + 1)
    return ends


def committed(broker, group, topic) -> dict[int, int | None]:
    c = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=group, enable_auto_commit=False)
    try:
        parts = c.partitions_for_topic(topic) or set()
        return {p: c.committed(TopicPartition(topic, p)) for p in sorted(parts)}
    finally:
        c.close()


def read_all(broker, topic, expect=None, timeout=30) -> list:
    """Every record of `topic`: until `expect` arrived, or until a poll at the end returns nothing
    (tansu reports the end offset of a multi-record batch too low, so end offsets alone mislead)."""
    c = KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False)
    deadline = time.monotonic() + timeout
    try:
        while not c.partitions_for_topic(topic):
            assert time.monotonic() < deadline, f"topic {topic} never appeared"
            time.sleep(0.1)
        tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic))]
        c.assign(tps)
        c.seek_to_beginning(*tps)
        out = []
        while time.monotonic() < deadline:
            batch = c.poll(timeout_ms=300)
            for recs in batch.values():
                out.extend(recs)
            if expect is not None and len(out) >= expect:
                break
            if expect is None and not batch:
                break
        return out
    finally:
        c.close()


class Runner:
    def __init__(self, cfg, **kw):
        self.stop = threading.Event()
        self.metrics = Metrics(cfg.pipeline.name)
        self.runner = KafkaValidationRunner(
            cfg, self.stop, self.metrics, consumer_options=FAST_GROUP, poll_ms=200, **kw
        )
        self.code = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        self.code = self.runner.run()

    def halt(self, timeout=30):
        self.stop.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive()


def verdicts(broker, topic, expect=None, timeout=30):
    return [
        (r.key.decode() if r.key else None, orjson.loads(r.value))
        for r in read_all(broker, topic, expect=expect, timeout=timeout)
    ]


def test_kafka_mode_publishes_verdicts_events_and_commits_after_them(sim, broker, topic_prefix):
    cfg = make_cfg(sim, broker, topic_prefix, save_suspicious_events=True)
    t = datetime.now(UTC) - timedelta(hours=2)
    seen, unseen = f"k-{uuid.uuid4().hex[:6]}", f"k-{uuid.uuid4().hex[:6]}"
    sim.inject(computer_name=seen, alerted_at=t + 4 * S)
    create_topic(broker, cfg.validation.job_actions_topic, 2)
    ends = produce(
        broker,
        cfg.validation.job_actions_topic,
        [
            action("k1", seen, t),
            action("k2", unseen, t),
            (None, b'{"id": "k3", "type": 7}'),
            action("k4", seen, t, expected={"command_line_contains": ["no-such-marker"]}),
        ],
    )
    r = Runner(cfg)
    try:
        out = dict(verdicts(broker, cfg.validation.results_topic, expect=4))
        assert out["k1"]["result"] == "detected" and out["k1"]["latency_seconds"] == 4.0
        assert out["k2"]["result"] == "missed" and out["k4"]["result"] == "missed"
        rejected = out["k3"]  # keyed by the id when the record has one
        assert rejected["result"] == "rejected" and rejected["action_id"] == "k3"
        assert "type: must be one of host_cli, network; got 7" in rejected["reason"]
        assert rejected["input"] == {"id": "k3", "type": 7}
        wait_committed(broker, cfg, ends)
        events = verdicts(broker, cfg.validation.events_topic, expect=1)
        assert [(k, e["action_id"], e["matched_rules"][:2]) for k, e in events] == [
            ("k1", "k1", ["time", "host:computer"])
        ]
        ((key, sus),) = verdicts(broker, cfg.validation.suspicious_topic, expect=1)
        assert key == "k4" and sus["failed_fields"][0]["field"] == "command_line"
        devices = verdicts(broker, cfg.validation.devices_topic)
        assert [d for k, d in devices if k == seen][0]["computer_name"] == seen
        m = r.metrics
        assert m.verdicts.labels("sv-kafka", "detected")._value.get() == 1
        assert m.verdicts.labels("sv-kafka", "rejected")._value.get() == 1
    finally:
        r.halt()
    assert r.code == 0


def test_an_action_that_already_has_a_verdict_is_not_judged_twice(sim, broker, topic_prefix):
    """The previous owner published k9's verdict but stopped before committing its offset: the
    next owner finds that verdict on the results topic, publishes nothing, and commits."""
    cfg = make_cfg(sim, broker, topic_prefix)
    t = datetime.now(UTC) - timedelta(hours=3)
    create_topic(broker, cfg.validation.job_actions_topic, 1)
    produce(broker, cfg.validation.job_actions_topic, [action("k9", "nobody", t), action("k10", "nobody", t)])
    produce(
        broker,
        cfg.validation.results_topic,
        [("k9", orjson.dumps({"action_id": "k9", "result": "missed", "by": "previous owner"}))],
    )
    r = Runner(cfg)
    try:
        wait_committed(broker, cfg, {0: 2})
        out = verdicts(broker, cfg.validation.results_topic)
        assert Counter(k for k, _ in out) == {"k9": 1, "k10": 1}
        assert [v.get("by") for k, v in out if k == "k9"] == ["previous owner"]
    finally:
        r.halt()


def test_an_action_dated_far_ahead_is_rejected_and_does_not_hold_its_partition(sim, broker, topic_prefix):
    """A job action starting in three days gets a rejected verdict naming the clock-skew allowance;
    the action behind it on the same partition is judged and both offsets are committed."""
    cfg = make_cfg(sim, broker, topic_prefix)
    now = datetime.now(UTC)
    create_topic(broker, cfg.validation.job_actions_topic, 1)
    ends = produce(
        broker,
        cfg.validation.job_actions_topic,
        [action("f1", "nobody", now + timedelta(days=3)), action("f2", "nobody", now - timedelta(hours=2))],
    )
    r = Runner(cfg)
    try:
        wait_committed(broker, cfg, ends)
        out = dict(verdicts(broker, cfg.validation.results_topic))
        assert out["f1"]["result"] == "rejected" and "3 days ahead" in out["f1"]["reason"]
        assert "validation.max_clock_skew = 5 minutes" in out["f1"]["reason"]
        assert out["f2"]["result"] == "missed"
    finally:
        r.halt()


def test_the_same_action_id_on_two_partitions_gets_one_verdict(sim, broker, topic_prefix):
    """Two runners, one partition each; the same six job actions (same ids) are produced to both
    partitions, so without coordination both runners would judge each id at the same moment:
    exactly one verdict per id, and every offset is committed."""
    cfg = make_cfg(sim, broker, topic_prefix, query_time=0.05, query_interval=1)
    create_topic(broker, cfg.validation.job_actions_topic, 2)
    a, b = Runner(cfg), Runner(cfg)
    try:
        wait_for(
            lambda: len(a.runner.consumer.assignment()) == 1 and len(b.runner.consumer.assignment()) == 1,
            60,
            "each runner to own one partition",
        )
        t = datetime.now(UTC) + 2 * S
        items = []
        for i in range(6):
            h = f"dup-{uuid.uuid4().hex[:6]}"
            sim.inject(computer_name=h, alerted_at=t + i * S)
            items.append(action(f"x{i}", h, t + i * 0.4 * S))
        for p in (0, 1):
            produce(broker, cfg.validation.job_actions_topic, items, partition=p)
        verdicts(broker, cfg.validation.results_topic, expect=6, timeout=60)
        # every record is finished by now (the copies forwarded to their home partition included)
        wait_committed(broker, cfg, end_offsets(broker, cfg.validation.job_actions_topic), timeout=60)
        out = verdicts(broker, cfg.validation.results_topic)
        assert sorted((k, v["result"]) for k, v in out) == [(f"x{i}", "detected") for i in range(6)]
    finally:
        a.halt()
        b.halt()


def test_an_action_redelivered_long_after_its_verdict_is_not_judged_again(sim, broker, topic_prefix):
    """A verdict for y1 was published an hour ago; y1's job action arrives again now (a producer
    retry, a replay): no second verdict, and its offset is committed."""
    cfg = make_cfg(sim, broker, topic_prefix)
    now = datetime.now(UTC)
    create_topic(broker, cfg.validation.job_actions_topic, 1)
    hour_ago = int((now - timedelta(hours=1)).timestamp() * 1000)
    earlier = orjson.dumps({"action_id": "y1", "result": "missed", "by": "an hour ago"})
    produce(broker, cfg.validation.results_topic, [("y1", earlier)], timestamp_ms=hour_ago)
    ends = produce(broker, cfg.validation.job_actions_topic, [action("y1", "nobody", now - timedelta(hours=2))])
    r = Runner(cfg)
    try:
        wait_committed(broker, cfg, ends)
        out = verdicts(broker, cfg.validation.results_topic)
        assert [(k, v.get("by")) for k, v in out] == [("y1", "an hour ago")]
    finally:
        r.halt()


def test_a_device_is_published_once_across_restarts(sim, broker, topic_prefix):
    """Two runners one after the other see alerts of the same endpoint: it is on the devices topic
    once (the second runner reads the topic at start)."""
    cfg = make_cfg(sim, broker, topic_prefix)
    h = f"dev-{uuid.uuid4().hex[:6]}"
    t = datetime.now(UTC) - timedelta(hours=2)
    sim.inject(computer_name=h, alerted_at=t + 2 * S)
    create_topic(broker, cfg.validation.job_actions_topic, 1)
    for n in (1, 2):
        ends = produce(broker, cfg.validation.job_actions_topic, [action(f"d{n}", h, t)])
        r = Runner(cfg)
        try:
            wait_committed(broker, cfg, ends)
        finally:
            r.halt()
    devices = verdicts(broker, cfg.validation.devices_topic)
    assert [k for k, _ in devices].count(h) == 1
    assert {k: v["result"] for k, v in verdicts(broker, cfg.validation.results_topic)} == {
        "d1": "detected",
        "d2": "detected",
    }


def test_a_verdict_is_committed_only_after_its_evidence_was_published(sim, proxied, proxy, topic_prefix):
    """The broker stalls just before an action's matched event is published, long enough for the
    delivery to fail; once it is back, the event is on the events topic, then the verdict, and
    only then the offset is committed."""
    cfg = make_cfg(
        sim,
        proxied,
        topic_prefix,
        kafka={"delivery_timeout_ms": 3000},
        query_time=0.05,
        query_interval=1,
        discover_network_devices=False,
    )
    h = f"ev-{uuid.uuid4().hex[:6]}"
    t = datetime.now(UTC) + 10 * S  # window 0 ends at t and holds the alert; the last window ends at t + 3 s
    sim.inject(computer_name=h, alerted_at=t)
    create_topic(proxied, cfg.validation.job_actions_topic, 1)
    ends = produce(proxied, cfg.validation.job_actions_topic, [action("e1", h, t)])
    r = Runner(cfg)
    try:
        wait_for(lambda: "e1" in r.runner.engine.open, 60, "the action to be open")
        wait_for(lambda: datetime.now(UTC) >= t - 0.3 * S, 20, "just before window 0 runs")
        proxy.stall()
        wait_for(lambda: r.runner.failed_sends > 0, 30, "a failed delivery")
        proxy.resume()
        wait_committed(proxied, cfg, ends, timeout=60)
        events = verdicts(proxied, cfg.validation.events_topic)
        assert [(k, e["event"]["computer"]) for k, e in events] == [("e1", h)]
        out = verdicts(proxied, cfg.validation.results_topic)
        assert [(k, v["result"]) for k, v in out] == [("e1", "detected")]
    finally:
        proxy.resume()
        r.halt()


@pytest.mark.slow
def test_consumer_group_hand_over_gives_exactly_one_verdict_per_action(sim, broker, topic_prefix):
    """Two runners share the job actions; one is stopped while actions are mid-schedule; the other
    takes its partitions, re-evaluates the unfinished actions, and every action ends with exactly
    one verdict (detected where an alert exists)."""
    cfg = make_cfg(sim, broker, topic_prefix, query_time=0.25, query_interval=5)  # 4 windows over 15 s
    create_topic(broker, cfg.validation.job_actions_topic, 4)
    a, b = Runner(cfg), Runner(cfg)
    try:
        wait_for(lambda: a.runner.consumer.assignment() and b.runner.consumer.assignment(), 60, "both runners joined")
        t0 = datetime.now(UTC) + 2 * S
        items, want = [], {}
        for i in range(16):
            h = f"ho-{uuid.uuid4().hex[:6]}"
            t = t0 + (i % 4) * S
            if i % 2 == 0:
                sim.inject(computer_name=h, alerted_at=t + 2 * S)
            items.append(action(f"h{i}", h, t))
            want[f"h{i}"] = "detected" if i % 2 == 0 else "missed"
        ends = produce(broker, cfg.validation.job_actions_topic, items)

        def mid_run(x):  # open actions of which some windows already ran
            return any(st.done > 0 for st in list(x.runner.engine.open.values()))

        wait_for(lambda: mid_run(a) or mid_run(b), 60, "a runner in the middle of a schedule")
        victim, survivor = (a, b) if mid_run(a) else (b, a)
        handed = set(victim.runner.engine.open)
        assert handed
        victim.halt()
        out = verdicts(broker, cfg.validation.results_topic, expect=16, timeout=90)
        wait_committed(broker, cfg, ends)
        out = verdicts(broker, cfg.validation.results_topic)  # anything late would show up now
        counts = Counter(k for k, _ in out)
        assert counts == {k: 1 for k in want}, counts
        assert {k: v["result"] for k, v in out} == want
        survivor_ids = {v["action_id"] for v in survivor.runner.published}
        assert handed <= survivor_ids  # the hand-over was re-evaluated by the survivor
    finally:
        a.halt()
        b.halt()


@pytest.mark.slow
def test_a_runner_killed_mid_window_ends_in_exactly_one_verdict(sim, broker, topic_prefix, tmp_path):
    """`tanium-connector run` is killed with SIGKILL after the action's first window published its
    event and before its last window ran; a second process takes the partition over and the action
    ends with exactly one verdict, its offset committed."""
    cfg = make_cfg(sim, broker, topic_prefix, query_time=0.2, query_interval=3)  # windows until t + 12 s
    v = cfg.validation
    topics = ("job_actions_topic", "results_topic", "events_topic", "suspicious_topic", "devices_topic", "group_id")
    pipeline = write_pipeline(
        tmp_path / "sv.toml",
        {
            "pipeline": {"name": "sv-kill", "mode": "validation", "shutdown_timeout": 10},
            "tanium": sim.settings(max_retries=1),
            "kafka": {"bootstrap_servers": broker.bootstrap, "linger_ms": 0},
            "metrics": {"enabled": False},
            "validation": {
                "query_time": 0.2,
                "query_interval": 3,
                "session_timeout": 6,  # the second process takes over 6 s after the kill
                **{k: getattr(v, k) for k in topics},
            },
        },
    )
    create_topic(broker, v.job_actions_topic, 1)
    first = Cli(["run", str(pipeline)], tmp_path / "first.log")
    try:
        wait_for(lambda: "partitions assigned" in first.logs(), 90, "the first process to join the group")
        h = f"kill-{uuid.uuid4().hex[:6]}"
        t = datetime.now(UTC) + 3 * S
        sim.inject(computer_name=h, alerted_at=t - S)  # in window 0, which runs at t
        ends = produce(broker, v.job_actions_topic, [action("k1", h, t)])
        verdicts(broker, v.events_topic, expect=1, timeout=60)
        first.kill9()
        assert read_topic(broker.bootstrap, v.results_topic, timeout=3) == []  # killed before the last window
    finally:
        first.stop()
    second = Cli(["run", str(pipeline)], tmp_path / "second.log")
    try:
        verdicts(broker, v.results_topic, expect=1, timeout=90)
        wait_committed(broker, cfg, ends, timeout=60)
        out = verdicts(broker, v.results_topic)
        assert [(k, x["result"]) for k, x in out] == [("k1", "detected")]
    finally:
        second.stop()
