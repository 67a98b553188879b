"""Delivery under failure, on the real broker (tansu behind a proxy) and the TR simulator over HTTP:
rewinds while alerts keep arriving, late acknowledgements and slow Tanium requests that outlive
their session, a record Kafka always refuses, SIGTERM during a hanging Tanium request, and a Kafka
outage with the checkpoint in Kafka.

The broker of this module refuses chosen records: its schema registry (a folder of `<topic>.json`
JSON schemas) makes it answer INVALID_RECORD for records that do not match, as a broker refuses
an oversized or unauthorised record. Its proxy can black-hole the broker, also at the moment a
client sends given bytes (a request to the checkpoint topic), so an outage starts mid-request.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest
from helpers import (
    Cli,
    Running,
    StallProxy,
    broker_behind_proxy,
    ids_of,
    make_cfg,
    metric,
    read_topic,
    scrape,
    stream_sections,
    wait_until,
    write_pipeline,
)
from test_reliability import stop_live

from connector.config import KafkaSection
from connector.gate import CPU
from connector.simulator import Simulator
from connector.stream.checkpoint import FileCheckpointStore, KafkaCheckpointStore
from connector.stream.pipeline import StreamPipeline
from connector.stream.sink import KafkaSink
from connector.tools.embedded import free_port


class TripProxy(StallProxy):
    """A StallProxy that black-holes itself when a client sends bytes containing `trip`: the
    request carrying them is held, so the outage begins in the middle of that request."""

    trip: bytes | None = None

    def seen(self, data: bytes, from_client: bool) -> None:
        if from_client and self.trip and self.trip in data:
            self.trip = None
            self.stall()


@pytest.fixture(scope="module")
def kafka(tmp_path_factory):
    """A broker behind a TripProxy, with a schema registry in `.schemas` (see the module docstring)."""
    home = tmp_path_factory.mktemp("delivery-broker")
    (home / "schema").mkdir()
    args = ("--schema-registry", "file://./schema")
    with broker_behind_proxy(tmp_path_factory, "tansu-delivery", TripProxy, args, cwd=home) as b:
        b.schemas = home / "schema"
        yield b


@pytest.fixture
def link(kafka):
    """The proxy; healed after each test."""
    yield kafka.proxy
    kafka.proxy.trip = None
    kafka.proxy.resume()


def refuse(kafka, topic: str, value_schema: dict) -> None:
    """The broker answers INVALID_RECORD to records of `topic` whose JSON value fails `value_schema`."""
    (kafka.schemas / f"{topic}.json").write_text(json.dumps({"type": "object", "properties": {"value": value_schema}}))


def refuse_alert(kafka, topic: str, alert_id: int) -> None:
    refuse(
        kafka, topic, {"type": "object", "properties": {"raw": {"properties": {"id": {"not": {"const": alert_id}}}}}}
    )


def dlq_alert_ids(records) -> list[int]:
    return [json.loads(json.loads(r.value)["raw"])["id"] for r in records]


def source_received(run) -> float:
    return metric(run.metrics.render().decode(), "records_received_total", stage="source") or 0


# ---- (a) a failed delivery while alerts keep arriving ---------------------------------------------


def test_a_failed_delivery_rewinds_and_every_alert_arrives_while_alerts_keep_coming(
    kafka, link, topic_prefix, tmp_path
):
    """Live alerts; the broker is black-holed for longer than kafka.delivery_timeout_ms, so records
    fail and the pipeline rewinds while new alerts keep arriving. After the broker heals every
    alert the simulator created is in the topic and the checkpoint is on the last."""
    with Simulator(alerts=50, intel_docs=3, seed=51, history=3600, live_rate=30) as sim:
        cfg = make_cfg(
            sim,
            kafka.bootstrap,
            topic_prefix,
            tmp_path,
            pipeline={"shutdown_timeout": 1, "rewind_backoff": 0.2, "rewind_backoff_max": 1},
            kafka={"delivery_timeout_ms": 1500},
        )
        with Running(cfg) as run:
            wait_until(lambda: run.committed_offset() >= 50, what="the history delivered")
            link.stall()
            wait_until(lambda: run.pipe.summary.rewinds >= 1, timeout=30, what="a rewind during the outage")
            link.resume()
            created = stop_live(sim)
            wait_until(lambda: run.committed_offset() == created, timeout=60, what="everything delivered")
    ids = ids_of(read_topic(kafka.bootstrap, cfg.kafka.topic, expect=created))
    assert set(ids) == set(range(1, created + 1))
    assert run.pipe.committed["id"] == created


# ---- (b) late acknowledgements after a rewind whose flush timed out -------------------------------


def test_late_acks_after_a_rewind_whose_flush_timed_out_reach_only_the_session_that_sent_the_records(
    kafka, link, topic_prefix, tmp_path, caplog
):
    """Driven step by step through the pipeline's own session functions. Session 1 delivers and
    commits alerts 1-5, then the broker is black-holed while it sends at least 10 more alerts and
    then a dead-letter record whose topic's metadata cannot be fetched: that record fails, so
    session 1 ends, and its flush times out with those alerts still in flight. Session 2 re-reads
    from the checkpoint and sends 6-20, its sequence numbers starting at 0 again. When the broker comes
    back, Kafka acknowledges session 1's records late: they land in session 1's window, not on
    session 2's records with the same sequence numbers; session 2's checkpoint moves with its own
    acknowledgements only, every alert arrives, and no delivery callback fails."""
    with Simulator(alerts=20, intel_docs=3, seed=57, history=3600) as sim:
        cfg = make_cfg(
            sim,
            kafka.bootstrap,
            topic_prefix,
            tmp_path,
            pipeline={"shutdown_timeout": 0.5, "rewind_backoff": 0.01, "rewind_backoff_max": 0.01},
            tanium={"page_size": 5, "enrich_intel_docs": False},
            kafka={"delivery_timeout_ms": 30000},  # records in flight outlive the outage
        )
        sink = KafkaSink(cfg.kafka, max_block_ms=1000)  # a send waits 1 s for topic metadata
        pipe = StreamPipeline(cfg, sink=sink)
        try:
            s1 = pipe._begin_session()
            pages = s1.source.cycle()
            pipe._process(s1, next(pages))
            assert sink.flush(10)
            pipe._commit(s1)
            assert pipe.committed["id"] == 5
            link.stall()
            in_flight = []
            while len(in_flight) < 10:
                page = next(pages)
                pipe._process(s1, page)
                in_flight += [alert["id"] for alert, _ in page]
            pipe._process(s1, [("not an alert", page[-1][1])])
            assert s1.failed.is_set() and sink.pending == len(in_flight)
            # the end of a failed session, as the pipeline does it
            assert not sink.flush(cfg.pipeline.shutdown_timeout)
            pipe._commit(s1)
            assert pipe._rewind(s1)
            s2 = pipe._begin_session(s1.refused_until)
            for page in s2.source.cycle():
                pipe._process(s2, page)
            assert s2.window.pending == 15 and sink.pending == 15 + len(in_flight)
            link.resume()
            wait_until(lambda: sink.pending == 0, timeout=30, what="Kafka to answer every record")
            assert s1.window.committable().id == in_flight[-1], "the late acknowledgements reached session 1's window"
            assert s2.window.committable().id == 20 and s2.window.pending == 0
            pipe._commit(s2)
            assert pipe.committed["id"] == 20
        finally:
            pipe.stop()
            sink.close(5)
    assert "delivery callback failed" not in caplog.text
    ids = ids_of(read_topic(kafka.bootstrap, cfg.kafka.topic, expect=20))
    assert set(ids) == set(range(1, 21))


# ---- (c) a Tanium request that hangs past the session change --------------------------------------


def test_a_tanium_request_hanging_past_the_session_change_does_not_move_the_next_sessions_cursor(
    kafka, link, topic_prefix, tmp_path
):
    """The broker is black-holed while 300 new alerts are read, and then the poller's next Tanium
    request hangs (every attempt times out, tanium.timeout = 2 s) while the undelivered records
    fail and the session ends. The next session re-reads from the checkpoint, slowly (0.2 s a
    page); the old session's request then succeeds. Its page moves only its own session's cursor:
    every alert reaches the topic."""
    with Simulator(alerts=100, intel_docs=3, seed=52, history=3600) as sim:
        cfg = make_cfg(
            sim,
            kafka.bootstrap,
            topic_prefix,
            tmp_path,
            pipeline={"shutdown_timeout": 1, "rewind_backoff": 0.1, "rewind_backoff_max": 0.5},
            tanium={"page_size": 10, "timeout": 2, "max_retries": 8, "enrich_intel_docs": False},
            kafka={"delivery_timeout_ms": 1500, "max_unacked": 1000},
        )
        with Running(cfg) as run:
            wait_until(lambda: run.committed_offset() == 100, what="the history delivered")
            link.stall()
            for _ in range(300):
                sim.inject()
            wait_until(lambda: source_received(run) >= 400, what="the new alerts read")
            sim.faults.endpoints, sim.faults.stall_seconds, sim.faults.stall_next = {"alerts"}, 30, 6
            wait_until(lambda: run.pipe.summary.rewinds >= 1, timeout=30, what="the session to end")
            hung = sim.faults.served["stall"]
            assert hung >= 1, "no Tanium request was hanging when the session ended"
            sim.faults.stall_next, sim.faults.latency = 0, 0.2
            link.resume()
            wait_until(lambda: run.committed_offset() == 400, timeout=60, what="everything delivered")
    ids = ids_of(read_topic(kafka.bootstrap, cfg.kafka.topic, expect=400))
    missing = set(range(1, 401)) - set(ids)
    assert not missing, f"{len(missing)} alerts lost, e.g. {sorted(missing)[:10]}"


# ---- (d) a record Kafka always refuses ------------------------------------------------------------


def test_a_record_kafka_always_refuses_goes_to_the_dlq_after_a_bounded_number_of_backed_off_attempts(
    kafka, link, topic_prefix, tmp_path, caplog
):
    """The broker refuses alert 12's event (INVALID_RECORD) every time. The pipeline re-reads with
    a growing wait between rewinds (seen in tanium_connector_rewind_backoff_seconds), pins the
    refusal on alert 12 itself (its batch-mates are delivered), and after
    pipeline.max_delivery_attempts = 3 refusals sends it to the dead-letter topic with Kafka's
    error as the reason; the stream goes on. Rewinds and Tanium requests stay few."""
    refuse_alert(kafka, f"{topic_prefix}.events", 12)
    with Simulator(alerts=30, intel_docs=3, seed=53, history=3600) as sim:
        cfg = make_cfg(
            sim,
            kafka.bootstrap,
            topic_prefix,
            tmp_path,
            pipeline={"max_delivery_attempts": 3, "rewind_backoff": 0.2, "rewind_backoff_max": 1},
            tanium={"page_size": 10},
        )
        backoffs = []

        def delivered() -> bool:
            backoffs.append(metric(run.metrics.render().decode(), "rewind_backoff_seconds"))
            return run.committed_offset() == 30

        with Running(cfg) as run:
            wait_until(delivered, timeout=30, what="the stream past the refused alert")
            text = run.metrics.render().decode()
        poison = sim.get_alert(12)
        requests = sim.stats["alerts"]
    rewinds = run.pipe.summary.rewinds
    # a first refusal may be pinned on a batch-mate; then alert 12 alone, max_delivery_attempts times
    assert 3 <= rewinds <= 4, rewinds
    assert metric(text, "rewinds_total") == rewinds
    assert max(backoffs) > 0 and metric(text, "rewind_backoff_seconds") == 0
    assert requests <= 15 * (rewinds + 1), f"{requests} Tanium requests for {rewinds} rewinds"
    events = ids_of(read_topic(kafka.bootstrap, cfg.kafka.topic, expect=29))
    assert set(events) == set(range(1, 31)) - {12}
    dlq = read_topic(kafka.bootstrap, cfg.kafka.dlq_topic, expect=1)
    assert dlq_alert_ids(dlq) == [12]
    reason = json.loads(dlq[0].value)["reason"]
    assert reason.startswith("kafka: ") and "refused the event 3 times" in reason and "InvalidRecordError" in reason
    assert f"alert id=12 guid={poison['guid']!r} goes to the dead-letter topic" in caplog.text


def test_a_dead_letter_record_fits_within_kafka_max_request_size(kafka, link, topic_prefix, tmp_path):
    """kafka.max_request_size = 64 KiB and an alert whose mapped field alone is 200 KB: its event
    cannot fit, and its dead-letter record keeps only as much of the raw alert as fits, so Kafka
    takes it and the stream goes on (a dead-letter record over the limit would be refused every
    time)."""
    with Simulator(alerts=5, intel_docs=3, seed=58, history=3600) as sim:
        big = sim.inject(details={"match": {"type": "file", "note": "B" * 200_000}})
        sim.inject()
        cfg = make_cfg(
            sim,
            kafka.bootstrap,
            topic_prefix,
            tmp_path,
            field_map={"description": ["details.match.note", "intelDoc.name"]},
            kafka={"max_request_size": 65536},
        )
        with Running(cfg, once=True) as run:
            wait_until(lambda: run.code is not None, timeout=30, what="the --once run to finish")
    assert run.code == 0 and run.pipe.committed["id"] == 7 and run.pipe.summary.rewinds == 0
    dlq = read_topic(kafka.bootstrap, cfg.kafka.dlq_topic, expect=1)
    doc = json.loads(dlq[0].value)
    assert doc["reason"].startswith("too large") and doc["raw_truncated"] is True
    assert len(dlq[0].value) <= 65536 and str(big["id"]) in doc["raw"][:200]


def test_when_the_dead_letter_topic_refuses_the_record_too_the_pipeline_pauses_at_it(
    kafka, link, topic_prefix, tmp_path, caplog
):
    """The broker refuses alert 12's event and every dead-letter record. After
    max_delivery_attempts the pipeline pauses at alert 12: /readyz is 503 naming it, an error line
    names the alert (id and guid) and both Kafka errors, tanium_connector_paused is 1, the
    checkpoint stays on alert 11 and it keeps retrying at the longest backoff only."""
    refuse_alert(kafka, f"{topic_prefix}.events", 12)
    refuse(kafka, f"{topic_prefix}.events.dlq", {"not": {}})
    with Simulator(alerts=30, intel_docs=3, seed=54, history=3600) as sim:
        cfg = make_cfg(
            sim,
            kafka.bootstrap,
            topic_prefix,
            tmp_path,
            pipeline={"max_delivery_attempts": 2, "rewind_backoff": 0.1, "rewind_backoff_max": 0.5},
            tanium={"page_size": 10},
        )
        with Running(cfg) as run:
            wait_until(lambda: run.pipe.paused, timeout=30, what="the pipeline to pause")
            ready, why = run.pipe.readiness()
            poison = sim.get_alert(12)
            assert not ready and why.startswith(f"paused at alert id=12 guid={poison['guid']!r}"), why
            assert metric(run.metrics.render().decode(), "paused") == 1
            rewinds, t0 = run.pipe.summary.rewinds, time.monotonic()
            while time.monotonic() - t0 < 2:  # sampled: it holds still at alert 12
                assert run.pipe.committed["id"] == 11
                time.sleep(0.1)
            assert run.pipe.summary.rewinds - rewinds <= 2 / 0.5 + 1
    paused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("paused at alert id=12")]
    assert paused, caplog.text[-3000:]
    assert f"the topic {topic_prefix}.events refused it ([Error 87] InvalidRecordError" in paused[0]
    assert f"the dead-letter topic {topic_prefix}.events.dlq refused it too ([Error 87] InvalidRecordError" in paused[0]
    assert (FileCheckpointStore(tmp_path / "state", topic_prefix).load())["id"] == 11


# ---- (e) SIGTERM while a Tanium request hangs -----------------------------------------------------


def test_sigterm_while_a_tanium_request_hangs_exits_within_shutdown_timeout(kafka, link, topic_prefix, tmp_path):
    """`run` with shutdown_timeout = 3 s and tanium.timeout = 30 s; after the history is delivered
    the next alerts request hangs (the simulator holds it for 20 s). SIGTERM then ends the process
    within shutdown_timeout + 1 s, exit 0, with the checkpoint on the last delivered alert."""
    with Simulator(alerts=200, intel_docs=3, seed=55, history=3600) as sim:
        state = tmp_path / "state"
        cfg_file = write_pipeline(
            tmp_path / "p.toml",
            stream_sections(
                topic_prefix, sim, kafka.bootstrap, state, pipeline={"shutdown_timeout": 3}, tanium={"timeout": 30}
            ),
        )
        store = FileCheckpointStore(state, topic_prefix)
        cli = Cli(["--log-format", "json", "run", str(cfg_file)], tmp_path / "run.log")
        try:
            wait_until(lambda: (store.load() or {}).get("offset") == 200, what="the history delivered")
            sim.faults.endpoints, sim.faults.stall_seconds, sim.faults.stall_next = {"alerts"}, 20, 1
            wait_until(lambda: sim.faults.served["stall"] == 1, what="an alerts request to hang")
            t0 = time.monotonic()
            cli.proc.send_signal(signal.SIGTERM)
            code = cli.proc.wait(30)
            took = time.monotonic() - t0
        finally:
            cli.stop()
    assert code == 0, cli.logs()[-3000:]
    assert took <= 3 + 1, f"SIGTERM took {took:.1f}s with shutdown_timeout = 3"
    assert "Traceback" not in cli.logs()
    assert store.load()["id"] == 200
    assert set(ids_of(read_topic(kafka.bootstrap, f"{topic_prefix}.events", expect=200))) == set(range(1, 201))


def test_a_stop_sends_no_page_that_was_only_fetched_and_the_next_run_reads_it(kafka, topic_prefix, tmp_path):
    """While the first page waits for an IntelDoc (the simulator holds the request; enrich.timeout
    = 3 s), the source fetches the pages after it into the queue. stop() then lets the first page be
    sent and answered and the checkpoint land on its last alert; the pages only fetched are not sent
    (with many busy pipelines in one worker, sending them all took most of shutdown_timeout). The
    next run reads them again: every alert arrives once."""
    with Simulator(alerts=100, intel_docs=3, seed=58, history=3600) as sim:
        cfg = make_cfg(sim, kafka.bootstrap, topic_prefix, tmp_path, tanium={"page_size": 10}, enrich={"timeout": 3})
        sim.faults.endpoints, sim.faults.stall_seconds, sim.faults.stall_next = {"intel", "intels"}, 5, 1
        with Running(cfg) as run:
            wait_until(lambda: sim.faults.served["stall"] == 1, what="the first page's IntelDoc request to hang")
            wait_until(lambda: source_received(run) >= 50, what="the source to fetch the pages after the first")
            run.pipe.stop()
            run.thread.join(30)
        assert run.code == 0 and run.pipe.committed["id"] == 10
        assert sorted(ids_of(read_topic(kafka.bootstrap, cfg.kafka.topic, expect=10))) == list(range(1, 11))
        with Running(cfg) as run:
            wait_until(lambda: run.committed_offset() == 100, what="the rest delivered by the next run")
    assert sorted(ids_of(read_topic(kafka.bootstrap, cfg.kafka.topic, expect=100))) == list(range(1, 101))


# ---- (f) a Kafka outage with the checkpoint in Kafka ----------------------------------------------


def test_kafka_outage_with_the_kafka_checkpoint_store_keeps_running_and_catches_up(kafka, link, topic_prefix, tmp_path):
    """state.backend = "kafka", live alerts. The broker is black-holed the moment a checkpoint
    write is on its way, and stays so for 8 s. The process keeps running, /readyz turns 503
    saying the checkpoint cannot be saved (within a few seconds: a save waits at most half of
    shutdown_timeout), Tanium is still polled. After the broker heals, /readyz is 200 again,
    every alert arrives, the checkpoint catches up, and SIGTERM exits 0."""
    state_topic = f"{topic_prefix}.state"
    with Simulator(alerts=100, intel_docs=3, seed=56, history=3600, live_rate=20) as sim:
        port = free_port()
        cfg_file = write_pipeline(
            tmp_path / "p.toml",
            stream_sections(
                topic_prefix,
                sim,
                kafka.bootstrap,
                tmp_path / "state",
                metrics_port=port,
                pipeline={"shutdown_timeout": 4, "rewind_backoff": 0.5, "rewind_backoff_max": 2},
                kafka={"delivery_timeout_ms": 3000},
                state={"backend": "kafka", "topic": state_topic},
            ),
        )
        cli = Cli(["--log-format", "json", "run", str(cfg_file)], tmp_path / "run.log")
        try:
            wait_until(lambda: (metric(scrape(port)[1], "checkpoint_commits_total") or 0) >= 2, what="checkpoints")
            wait_until(lambda: scrape(port, "/readyz")[0] == 200, what="ready")
            link.trip = state_topic.encode()
            wait_until(lambda: link.trip is None, timeout=30, what="a checkpoint write to black-hole")
            t0 = time.monotonic()
            wait_until(lambda: scrape(port, "/readyz")[0] == 503, timeout=6, what="/readyz 503")
            assert "checkpoint cannot be saved" in scrape(port, "/readyz")[1]
            polls = sim.stats["alerts"]
            while time.monotonic() - t0 < 8:  # the rest of the outage, sampled
                assert cli.alive, cli.logs()[-3000:]
                assert scrape(port, "/readyz")[0] == 503
                time.sleep(0.5)  # sampling interval, not a synchronisation
            assert sim.stats["alerts"] > polls, "Tanium is still polled during the outage"
            link.resume()
            wait_until(lambda: scrape(port, "/readyz")[0] == 200, timeout=60, what="ready again after healing")
            created = stop_live(sim)
            store = KafkaCheckpointStore(KafkaSection(bootstrap_servers=kafka.bootstrap), state_topic, topic_prefix)
            wait_until(lambda: (store.load() or {}).get("id") == created, timeout=60, what="the checkpoint caught up")
        finally:
            cli.proc.terminate()
            code, _ = cli.wait(30)
        assert code == 0, cli.logs()[-3000:]
        assert "Traceback" not in cli.logs()
    ids = ids_of(read_topic(kafka.bootstrap, f"{topic_prefix}.events", expect=created))
    assert set(ids) == set(range(1, created + 1))


# ---- pipelines of one process sharing a producer ---------------------------------------------------


def test_a_record_kafka_refuses_in_one_pipeline_loses_nothing_of_another_sharing_its_producer(
    kafka, link, topic_prefix, tmp_path
):
    """Two at-least-once pipelines in one process share a producer. The broker refuses alert 7 of
    pipeline A every time, which breaks kafka-python's idempotent producer for both: B's records in
    flight fail with it. A sends alert 7 to its dead-letter topic after max_delivery_attempts and
    delivers the rest; B re-reads what failed and delivers every alert (some twice, none lost)."""
    a_name, b_name = f"{topic_prefix}-a", f"{topic_prefix}-b"
    refuse_alert(kafka, f"{a_name}.events", 7)
    settings = {"pipeline": {"max_delivery_attempts": 3, "rewind_backoff": 0.2, "rewind_backoff_max": 1}}
    with (
        Simulator(alerts=40, intel_docs=3, seed=61, history=3600) as sim_a,
        Simulator(alerts=300, intel_docs=3, seed=62, history=3600, live_rate=40) as sim_b,
    ):
        a = make_cfg(sim_a, kafka.bootstrap, a_name, tmp_path, tanium={"page_size": 10}, **settings)
        b = make_cfg(sim_b, kafka.bootstrap, b_name, tmp_path, tanium={"page_size": 50}, **settings)
        with Running(a) as run_a, Running(b) as run_b:
            first = run_a.pipe.sink._producer
            assert run_b.pipe.sink._producer is first
            wait_until(lambda: run_a.committed_offset() == 40, timeout=60, what="A past the refused alert")
            created = stop_live(sim_b)
            wait_until(lambda: run_b.committed_offset() == created, timeout=60, what="B's alerts delivered")
            # the refusals broke the shared producer; both pipelines went on with one replacement
            assert run_a.pipe.sink._producer is run_b.pipe.sink._producer is not first
    assert set(ids_of(read_topic(kafka.bootstrap, a.kafka.topic, expect=39))) == set(range(1, 41)) - {7}
    assert dlq_alert_ids(read_topic(kafka.bootstrap, a.kafka.dlq_topic, expect=1)) == [7]
    assert set(ids_of(read_topic(kafka.bootstrap, b.kafka.topic, expect=created))) == set(range(1, created + 1))


def test_a_send_waiting_for_its_topics_metadata_holds_no_cpu_slot(kafka, link, topic_prefix):
    """While one pipeline's first record to a topic waits for the topic's metadata (the broker is
    black-holed here), another pipeline's CPU work gets the process's CPU slot (connector/gate.py)."""
    sink = KafkaSink(KafkaSection(bootstrap_servers=kafka.bootstrap), max_block_ms=3000)
    returned = threading.Event()

    def first_record():
        with CPU.slot():
            sink.send(f"{topic_prefix}.new-topic", None, b"{}", [], lambda ok, exc: None)
            returned.set()  # still inside the slot

    try:
        link.stall()
        sender = threading.Thread(target=first_record, daemon=True)
        sender.start()
        wait_until(lambda: sink.pending == 1 or returned.is_set(), timeout=10, what="the record handed to the sink")
        with CPU.slot():
            assert not returned.is_set(), "the slot came only after the send gave up waiting for metadata"
        link.resume()
        sender.join(10)
    finally:
        link.resume()
        sink.close(5)
