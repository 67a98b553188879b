"""Exactly-once mode on the real broker (tansu): transactions, fencing, the committed view, and
the 20-kill crash test.

About tansu 0.6.0 and read_committed: it writes COMMIT/ABORT markers into the log and stops
read_committed fetches at the first open transaction (last stable offset), but its Fetch answers
carry no `aborted_transactions`, so kafka-python's read_committed consumer shows records of
aborted transactions (real Kafka fills that list from the same markers); and after a producer is
fenced during a network outage its last stable offset can stick behind committed transactions. `read_committed_log`
(connector/stream/checkpoint.py) applies the markers itself, so it gives what a read_committed consumer of a
correct broker sees; the tests check that view, and check kafka-python's consumer separately
(xfail on tansu).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys

import pytest
from helpers import Cli, Running, make_cfg, read_topic, stream_sections, wait_until, write_pipeline

from connector.config import KafkaSection
from connector.kafka import ProducerFenced
from connector.metrics import Metrics
from connector.simulator import Simulator
from connector.stream.checkpoint import (
    KafkaCheckpointStore,
    open_store,
    read_committed_log,
)
from connector.stream.pipeline import StreamPipeline
from connector.stream.sink import KafkaSink


def kafka(bootstrap, **kw) -> KafkaSection:
    return KafkaSection(bootstrap_servers=bootstrap, linger_ms=0, **kw)


def values(records) -> list[bytes]:
    return [r.value for r in records]


def alert_ids(records) -> list[int]:
    return [json.loads(r.value)["raw"]["id"] for r in records]


def eo_cfg(sim, bootstrap, prefix, tmp_path, **over):
    over.setdefault("pipeline", {})["delivery"] = "exactly-once"
    over.setdefault("state", {}).update({"backend": "kafka", "topic": f"{prefix}.state"})
    return make_cfg(sim, bootstrap, prefix, tmp_path, **over)


# ---- the committed view ------------------------------------------------------------------------

_OPEN_TX = """
import sys
from connector.config import KafkaSection
from connector.kafka import ProducerFenced
from connector.stream.sink import KafkaSink
sink = KafkaSink(KafkaSection(bootstrap_servers=sys.argv[1], linger_ms=0), transactional_id=sys.argv[2])
sink.begin()
sink.send(sys.argv[3], b"k", b"killed-open", [], lambda ok, e: None)
sink.flush(30)
print("sent", flush=True)
sys.stdin.read()  # hold the transaction open until killed
"""


def test_committed_view_follows_markers_and_a_killed_instance_is_aborted_by_its_successor(broker, topic_prefix):
    """Committed and non-transactional records count; aborted and open ones do not (the broker's
    read_committed consumer also holds back what follows an open transaction). A process killed
    -9 inside a transaction leaves it open; the next producer with the same transactional id
    aborts it."""
    topic, tid = f"{topic_prefix}.v", f"{topic_prefix}-tx"
    k = kafka(broker.bootstrap)
    plain = KafkaSink(k)
    sink = KafkaSink(k, transactional_id=tid)
    try:
        plain.send(topic, b"k", b"plain", [], lambda ok, e: None)
        assert plain.flush(30)
        sink.begin()
        sink.send(topic, b"k", b"committed", [], lambda ok, e: None)
        sink.commit()
        sink.begin()
        sink.send(topic, b"k", b"aborted", [], lambda ok, e: None)
        sink.flush(30)
        sink.abort()
    finally:
        sink.close(5)
    assert values(read_committed_log(k, topic)) == [b"plain", b"committed"]

    zombie = subprocess.Popen(
        [sys.executable, "-c", _OPEN_TX, broker.bootstrap, tid, topic], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert zombie.stdout.readline() == b"sent\n"
        zombie.kill()
        zombie.wait(10)
    finally:
        zombie.stdin.close()
        zombie.stdout.close()
    # the record is in the log (read_uncommitted) but, its transaction open, not committed
    assert b"killed-open" in values(read_topic(broker.bootstrap, topic, expect=3))
    after = KafkaSink(k)
    try:  # written behind the open transaction: held back by the last stable offset
        after.send(topic, b"k", b"behind-open", [], lambda ok, e: None)
        assert after.flush(30)
    finally:
        after.close(5)
    assert values(read_committed_log(k, topic)) == [b"plain", b"committed", b"behind-open"]
    assert b"behind-open" not in values(read_topic(broker.bootstrap, topic, isolation_level="read_committed"))

    successor = KafkaSink(k, transactional_id=tid)  # init_transactions aborts the killed one's
    try:
        successor.begin()
        successor.send(topic, b"k", b"successor", [], lambda ok, e: None)
        successor.commit()
    finally:
        successor.close(5)
    assert values(read_committed_log(k, topic)) == [b"plain", b"committed", b"behind-open", b"successor"]
    # tansu now serves past the aborted transaction, but still shows its records
    seen = values(read_topic(broker.bootstrap, topic, isolation_level="read_committed"))
    assert b"successor" in seen and b"behind-open" in seen
    assert b"aborted" in seen and b"killed-open" in seen, (
        "tansu started hiding aborted records: drop read_committed_log's caveat in the README and the xfail below"
    )


def test_checkpoint_of_an_aborted_transaction_is_never_loaded(broker, topic_prefix):
    k = kafka(broker.bootstrap)
    store = KafkaCheckpointStore(k, f"{topic_prefix}.state", "p", transactional=True)
    sink = KafkaSink(k, transactional_id=f"{topic_prefix}-cp")
    try:
        sink.begin()
        sink.commit(records=[store.record({"id": 1})])
        sink.begin()
        sink.send(f"{topic_prefix}.ev", b"k", b"v", [], lambda ok, e: None)
        sink.flush(30)
        topic, key, value = store.record({"id": 2})
        sink._producer.send(topic, key=key, value=value).get(30)  # in the open transaction
        sink.abort()
    finally:
        sink.close(5)
    assert store.load()["id"] == 1
    # the plain reader (at-least-once stores) takes tansu's read_committed at its word
    assert KafkaCheckpointStore(k, f"{topic_prefix}.state", "p").load()["id"] == 2


# ---- the pipeline ------------------------------------------------------------------------------


def test_each_page_is_one_transaction_with_its_checkpoint(broker, topic_prefix, tmp_path):
    with Simulator(alerts=1000, intel_docs=5, seed=21, history=3600) as sim:
        cfg = eo_cfg(sim, broker.bootstrap, topic_prefix, tmp_path, tanium={"page_size": 100})
        pipe = StreamPipeline(cfg, once=True, metrics=Metrics(topic_prefix))
        assert pipe.transactional_id == f"tanium-connector.{topic_prefix}"
        assert pipe.run() == 0
        assert pipe.summary.published == 1000 and pipe.summary.rewinds == 0
    events = read_committed_log(cfg.kafka, cfg.kafka.topic)
    assert sorted(alert_ids(events)) == list(range(1, 1001))
    checkpoints = [
        json.loads(r.value) for r in read_committed_log(cfg.kafka, cfg.state.topic) if r.key == topic_prefix.encode()
    ]
    # one checkpoint per page (100 records, then 99 new ones after the one-record overlap),
    # each on the page's last record
    assert [c["id"] for c in checkpoints] == [100 + 99 * i for i in range(10)] + [1000]
    assert open_store(cfg).load()["id"] == 1000
    assert (
        f'tanium_connector_checkpoint_commits_total{{pipeline="{topic_prefix}"}} 11.0' in pipe.metrics.render().decode()
    )


# ---- kill -9 twenty times ------------------------------------------------------------------------

TANSU_READ_COMMITTED = (
    "tansu 0.6.0 sends no aborted_transactions in Fetch answers, so kafka-python's "
    "read_committed consumer also returns the records of transactions that a killed "
    "instance left open and its successor aborted; a correct broker hides them"
)


@pytest.fixture(scope="module")
def crash_run(broker, tmp_path_factory):
    """The stream CLI in exactly-once mode (Kafka checkpoint), SIGKILLed 20 times against a live
    simulator and restarted each time; then live creation stops and a `--once` run drains.
    Kill points (seeded): a random moment; just after a transaction committed (the commit counter
    moved); inside a transaction (records handed to Kafka, not yet acknowledged: mid-page); while
    an alerts request is on the wire."""
    from test_reliability import KILL_KINDS, kill_and_restart, stop_live

    from connector.tools.embedded import free_port

    tmp_path = tmp_path_factory.mktemp("eo-crash")
    name = f"eo{random.Random().randrange(16**8):08x}"
    rng = random.Random(9_2024)
    kinds = [k for k in KILL_KINDS for _ in range(5)]
    rng.shuffle(kinds)
    with Simulator(alerts=1500, intel_docs=12, seed=23, history=3600, live_rate=60) as sim:
        port = free_port()
        cfg_file = write_pipeline(
            tmp_path / "p.toml",
            stream_sections(
                name,
                sim,
                broker.bootstrap,
                tmp_path / "state",
                metrics_port=port,
                pipeline={"delivery": "exactly-once"},
                state={"backend": "kafka", "topic": f"{name}.state"},
                tanium={"page_size": 40, "limit": 400},
                kafka={"linger_ms": 40, "max_unacked": 30},
            ),
        )
        store = KafkaCheckpointStore(kafka(broker.bootstrap), f"{name}.state", name, transactional=True)
        kills, counts, checkpoints, logs = kill_and_restart(
            sim, cfg_file, tmp_path, port, store, kinds, rng, poll_timeout=60
        )
        created = stop_live(sim)
        drain = Cli(["--log-format", "json", "run", str(cfg_file), "--once"], tmp_path / "drain.log")
        code, _ = drain.wait(180)
        logs.append(drain.logs())
        assert code == 0, drain.logs()[-3000:]
    k = kafka(broker.bootstrap)
    committed = alert_ids(read_committed_log(k, f"{name}.events"))
    consumer_view = alert_ids(
        read_topic(broker.bootstrap, f"{name}.events", isolation_level="read_committed", timeout=90)
    )
    everything = alert_ids(read_topic(broker.bootstrap, f"{name}.events", timeout=90))
    figures = {
        "kills": kills,
        "kill_points": counts,
        "alerts": created,
        "committed_events": len(committed),
        "committed_duplicates": len(committed) - len(set(committed)),
        "records_in_log": len(everything),
        "aborted_records_in_log": len(everything) - len(committed),
        "kafka_python_read_committed_duplicates": len(consumer_view) - len(set(consumer_view)),
        "checkpoints_after_each_kill": checkpoints,
    }
    print(f"\nEXACTLY-ONCE CRASH FIGURES: {json.dumps(figures)}")
    (tmp_path / "figures.json").write_text(json.dumps(figures, indent=2))
    return {
        "name": name,
        "created": created,
        "committed": committed,
        "consumer_view": consumer_view,
        "store": store,
        "checkpoints": checkpoints,
        "logs": logs,
        "figures": figures,
    }


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kill_9_twenty_times_every_alert_committed_exactly_once(crash_run, broker):
    created, committed = crash_run["created"], crash_run["committed"]
    assert crash_run["figures"]["kills"] == 20
    missing = set(range(1, created + 1)) - set(committed)
    assert not missing, f"{len(missing)} alerts lost, e.g. {sorted(missing)[:10]}"
    dupes = len(committed) - len(set(committed))
    assert dupes == 0, f"{dupes} alerts committed more than once"
    assert sorted(committed) == list(range(1, created + 1))
    # what kafka-python's read_committed consumer shows beyond that on tansu is exactly the
    # records of aborted transactions (see TANSU_READ_COMMITTED)
    figures = crash_run["figures"]
    assert set(crash_run["consumer_view"]) == set(committed)
    assert figures["kafka_python_read_committed_duplicates"] == figures["aborted_records_in_log"]
    assert crash_run["store"].load()["id"] == created
    cps = crash_run["checkpoints"]
    assert cps == sorted(cps), f"the committed checkpoint went backwards: {cps}"
    assert cps[-1] > 1500, "the killed runs made progress"
    assert read_topic(broker.bootstrap, f"{crash_run['name']}.events.dlq", timeout=2) == []
    for text in crash_run["logs"]:
        assert "Traceback" not in text


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason=TANSU_READ_COMMITTED)
def test_kill_9_twenty_times_read_committed_consumer_sees_each_alert_once(crash_run):
    view = crash_run["consumer_view"]
    assert sorted(view) == list(range(1, crash_run["created"] + 1))


def test_a_failed_transaction_is_aborted_and_the_pipeline_rewinds(proxied, proxy, topic_prefix, tmp_path):
    """The broker black-holed mid-run: the open transaction cannot commit, so it is aborted (or
    its producer replaced, whose successor aborts it); once the broker answers again the source
    rewinds to the committed checkpoint and every alert is committed exactly once."""
    with Simulator(alerts=3000, intel_docs=5, seed=41, history=3600) as sim:
        cfg = eo_cfg(
            sim,
            proxied.bootstrap,
            topic_prefix,
            tmp_path,
            tanium={"page_size": 50},
            kafka={"delivery_timeout_ms": 3000},
        )
        with Running(cfg) as run:
            wait_until(lambda: run.committed_offset() >= 500, timeout=60, what="a first commits")
            proxy.stall()
            wait_until(lambda: run.pipe.summary.delivery_failures > 0, timeout=60, what="a failed transaction")
            proxy.resume()
            wait_until(lambda: run.committed_offset() == 3000, timeout=120, what="everything after the outage")
            assert run.pipe.summary.rewinds >= 1
    committed = alert_ids(read_committed_log(cfg.kafka, cfg.kafka.topic))
    assert sorted(committed) == list(range(1, 3001))
    assert open_store(cfg).load()["id"] == 3000
    # kafka-python's read_committed consumer may stall on tansu here: its last stable offset can
    # stick behind the transaction the fenced producer had open (see the module docstring)


# ---- two instances of one pipeline ---------------------------------------------------------------


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_a_fenced_producer_says_so(broker, topic_prefix, client):
    """Once another producer initialised the same transactional id, the older one's transaction
    calls raise ProducerFenced (with either client), not the plain failure after which the
    pipeline would open a new producer and fence the newer one in turn; the newer one is unharmed."""
    k = kafka(broker.bootstrap, client=client, delivery_timeout_ms=10000)
    tid, topic = f"{topic_prefix}-tx", f"{topic_prefix}.v"
    old = KafkaSink(k, transactional_id=tid)
    new = KafkaSink(k, transactional_id=tid)
    try:
        with pytest.raises(ProducerFenced, match=tid):
            old.begin()
            old.send(topic, b"k", b"old", [], lambda ok, e: None)
            old.commit(timeout=10)
        assert old.fenced and not new.fenced
        with pytest.raises(ProducerFenced):
            old.abort(timeout=10)
        new.begin()
        new.send(topic, b"k", b"new", [], lambda ok, e: None)
        new.commit(timeout=10)
    finally:
        old.close(1)
        new.close(1)
    assert values(read_committed_log(k, topic)) == [b"new"]


PRODUCER_READY = "transactional producer ready"


def test_a_fenced_instance_stops_and_the_instance_that_fenced_it_goes_on(broker, topic_prefix, tmp_path):
    """Two instances of the same exactly-once pipeline without HA: B's producer fences A's. A stops
    writing and exits 1 with one line naming the transactional.id and that another instance took
    over; it never opens a new producer (that would fence B in turn, and the two would take turns
    for ever), so each instance initialises its transactions once, B delivers every alert, and
    the committed view holds each alert exactly once.

    A has caught up when B starts, so it learns of the fence from its next transaction's first
    request. (tansu answers a fenced producer's commit by closing the connection instead of with
    PRODUCER_FENCED, so there a fence that lands inside a commit looks like a broker outage.)"""
    name = topic_prefix
    with Simulator(alerts=200, intel_docs=5, seed=43, history=3600) as sim:
        cfg_file = write_pipeline(
            tmp_path / "p.toml",
            stream_sections(
                name,
                sim,
                broker.bootstrap,
                tmp_path / "state",
                pipeline={"delivery": "exactly-once"},
                state={"backend": "kafka", "topic": f"{name}.state"},
                tanium={"page_size": 50},
                kafka={"delivery_timeout_ms": 10000},
            ),
        )
        store = KafkaCheckpointStore(kafka(broker.bootstrap), f"{name}.state", name, transactional=True)
        args = ["--log-format", "json", "run", str(cfg_file)]
        a = Cli(args, tmp_path / "a.log")
        b = None
        try:
            wait_until(lambda: (store.load() or {}).get("id") == 200, timeout=60, what="A to deliver the history")
            b = Cli(args, tmp_path / "b.log")
            wait_until(lambda: PRODUCER_READY in b.logs(), timeout=60, what="B's producer, which fences A's")
            for _ in range(60):  # new alerts, read by both instances
                sim.inject()
            code, _ = a.wait(60)
            assert code == 1, a.logs()[-3000:]
            last = a.logs().strip().splitlines()[-1]
            assert last.startswith("error: ") and f"'tanium-connector.{name}'" in last, last
            assert "another instance took over" in last, last
            assert b.alive, b.logs()[-3000:]
            for _ in range(60):
                sim.inject()
            created = sim.alert_count
            wait_until(lambda: (store.load() or {}).get("id") == created, timeout=60, what="B to deliver everything")
            b.proc.send_signal(signal.SIGTERM)
            code, _ = b.wait(60)
            assert code == 0, b.logs()[-3000:]
            logs = {"a": a.logs(), "b": b.logs()}
        finally:
            a.stop()
            if b is not None:
                b.stop()
    assert logs["a"].count(PRODUCER_READY) == 1 and logs["b"].count(PRODUCER_READY) == 1, "no producer re-opened"
    assert "Traceback" not in logs["a"] + logs["b"]
    committed = alert_ids(read_committed_log(kafka(broker.bootstrap), f"{name}.events"))
    assert sorted(committed) == list(range(1, created + 1)), "every alert committed exactly once"
