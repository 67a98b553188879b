"""The stream pipeline end to end: TR simulator over HTTP → pipeline → real broker (tansu)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import jsonschema
import pytest
from helpers import Running, ids_of, make_cfg, read_topic, wait_until

from connector.metrics import HealthServer, Metrics
from connector.simulator import Simulator
from connector.stream.checkpoint import FileCheckpointStore
from connector.stream.normalize import load_event_schema
from connector.stream.pipeline import StreamPipeline


def test_live_run_with_late_arrivals_lands_exactly_once(broker, topic_prefix, tmp_path):
    """5,000 alerts: 3,000 history, then 2,000 live, 20% of them late (alertedAt hours back)."""
    with Simulator(
        alerts=3000, intel_docs=15, seed=11, live_rate=400, live_total=2000, late_fraction=0.2, history=3600
    ) as sim:
        cfg = make_cfg(sim, broker.bootstrap, topic_prefix, tmp_path, tanium={"page_size": 200})
        with Running(cfg) as run:
            wait_until(lambda: sim.live_created == 2000, what="the simulator's live alerts")
            wait_until(lambda: run.committed_offset() == 5000, what="checkpoint at 5000")
        late = [
            a
            for a in (sim.get_alert(i) for i in range(3001, 5001))
            if a["createdAt"] > a["alertedAt"] and (time_of(a["createdAt"]) - time_of(a["alertedAt"])) > 600
        ]
        assert len(late) > 200, "the simulator produced late arrivals"
        records = read_topic(broker.bootstrap, cfg.kafka.topic, expect=5000)
        ids = ids_of(records)
        assert sorted(ids) == list(range(1, 5001))  # every alert, exactly once
        assert run.pipe.summary.published == 5000 and run.pipe.summary.dlq == 0
        assert {r.key.decode() for r in records} == {json.loads(r.value)["uid"] for r in records}
        headers = dict(records[0].headers)
        assert headers["pipeline"] == topic_prefix.encode() and headers["schema_version"]
        # IntelDoc requests never exceed the distinct (doc, revision) pairs seen
        pairs = {(a["intelDocId"], a["intelDocRevisionId"]) for a in map(sim.get_alert, range(1, 5001))}
        assert sim.stats["intel"] <= len(pairs)
        # every event validates against the published schema
        validator = jsonschema.Draft202012Validator(load_event_schema(), format_checker=jsonschema.FormatChecker())
        for r in records[::7]:
            validator.validate(json.loads(r.value))


def time_of(ts):
    from connector.timeutil import parse_ts

    return parse_ts(ts).timestamp()


def test_restart_resumes_from_checkpoint_without_gaps(broker, topic_prefix, tmp_path):
    with Simulator(alerts=4000, intel_docs=10, seed=3, history=3600) as sim:
        # a small per-cycle limit so the first run stops part-way through
        cfg = make_cfg(
            sim, broker.bootstrap, topic_prefix, tmp_path, tanium={"page_size": 100, "limit": 300, "poll_interval": 5}
        )
        with Running(cfg) as first:
            wait_until(lambda: first.committed_offset() >= 1000, what="first run checkpoint ≥ 1000")
            sim.faults.latency = 1.0  # slow the server so the stop lands part-way through
        sim.faults.latency = 0
        saved = FileCheckpointStore(cfg.state.path, cfg.pipeline.name).load()
        assert saved["offset"] >= 1000 and saved["id"] == saved["offset"]
        assert saved["offset"] < 4000, "the first run must stop part-way for this test to mean anything"
        sim.inject(computer_name="late-host.corp.local", alerted_at="2020-01-01T00:00:00Z")  # alert 4001
        second = StreamPipeline(cfg, once=True)
        assert second.run() == 0
        ids = ids_of(read_topic(broker.bootstrap, cfg.kafka.topic, expect=4001))
        assert set(ids) == set(range(1, 4002))
        # only records after the checkpoint may repeat (graceful stop: none)
        assert len(ids) - len(set(ids)) == 0
        assert second.committed["id"] == 4001


def test_malformed_records_go_to_the_dlq_with_reason(broker, topic_prefix, tmp_path):
    with Simulator(alerts=400, intel_docs=5, seed=5, history=3600) as sim:
        cfg = make_cfg(sim, broker.bootstrap, topic_prefix, tmp_path, tanium={"page_size": 40})
        assert StreamPipeline(cfg, once=True).run() == 0  # a first run sets the checkpoint
        for _ in range(100):
            sim.inject()
        sim.faults.garbage_kinds = ("non_object", "wrong_types")  # a guid-only record is still an event
        sim.faults.garbage_next = 3
        pipe = StreamPipeline(cfg, once=True, metrics=Metrics(topic_prefix))
        assert pipe.run() == 0
        assert len(sim.garbage_log) == 3
        dlq = read_topic(broker.bootstrap, cfg.kafka.dlq_topic, expect=3)
        assert len(dlq) == 3 and pipe.summary.dlq == 3
        for r in dlq:
            doc = json.loads(r.value)
            assert doc["reason"] and doc["pipeline"] == topic_prefix and "raw" in doc
            assert dict(r.headers)["reason"].decode() == doc["reason"]
        events = read_topic(broker.bootstrap, cfg.kafka.topic, expect=500)
        assert sorted(ids_of(events)) == list(range(1, 501))  # the stream went on
        text = pipe.metrics.render().decode()
        assert f'tanium_connector_dlq_records_total{{pipeline="{topic_prefix}"' in text


def test_back_pressure_bounds_what_is_held_when_the_broker_stalls(proxied, proxy, topic_prefix, tmp_path):
    with Simulator(alerts=20000, intel_docs=5, seed=9, history=3600) as sim:
        cfg = make_cfg(
            sim, proxied.bootstrap, topic_prefix, tmp_path, tanium={"page_size": 100}, kafka={"max_unacked": 300}
        )
        with Running(cfg) as run:
            wait_until(lambda: run.committed_offset() > 0, what="first delivery")
            proxy.stall()
            sink = run.pipe.sink
            wait_until(lambda: sink.blocked > 0, what="send() to block on max_unacked")
            held_before = run.pipe.summary.fetched - run.pipe.summary.published
            # while stalled, the source cannot run ahead: queue pages + one page in hand + unacked
            bound = 300 + (4 + 2) * 100
            for _ in range(20):
                wait_until(lambda: sink.blocked > 0, what="still blocked")
                held = run.pipe.summary.fetched - run.pipe.summary.published
                assert held <= bound, f"{held} records held while Kafka is stalled (bound {bound})"
            assert held_before <= bound
            assert sim.stats["alerts"] < 20000 / 100, "polling stopped instead of reading everything"
            proxy.resume()
            wait_until(lambda: run.committed_offset() == 20000, timeout=120, what="all delivered after resume")
        ids = ids_of(read_topic(proxied.bootstrap, cfg.kafka.topic, expect=20000, timeout=60))
        assert set(ids) == set(range(1, 20001))


def test_start_from_finds_the_first_alert_by_binary_search(broker, topic_prefix, tmp_path):
    with Simulator(alerts=3000, intel_docs=5, seed=2, history=10 * 3600) as sim:
        cfg = make_cfg(sim, broker.bootstrap, topic_prefix, tmp_path, source={"start_from": "1h"})
        out = io.StringIO()
        pipe = StreamPipeline(cfg, once=True, dry_run=True, out=out)
        threshold = time.time() - 3600
        assert pipe.run() == 0
        events = [json.loads(x) for x in out.getvalue().splitlines()]
        expect = [i for i in range(1, 3001) if time_of(sim.get_alert(i)["createdAt"]) >= threshold]
        got = [e["raw"]["id"] for e in events]
        assert abs(len(expect) - len(got)) <= 2 and set(got) <= set(range(expect[0] - 2, 3001))
        assert 250 < len(got) < 350  # ~1/10 of the history
        assert sim.stats["alerts"] < 20  # log2(3000) probes + a page, not a scan of all 30 pages
        assert FileCheckpointStore(cfg.state.path, cfg.pipeline.name).load() is None  # dry run commits nothing


def test_metrics_families_and_health_endpoints(broker, topic_prefix, tmp_path):
    with Simulator(alerts=500, intel_docs=5, seed=4, history=3600) as sim:
        cfg = make_cfg(sim, broker.bootstrap, topic_prefix, tmp_path)
        with Running(cfg) as run:
            server = HealthServer(run.metrics, "127.0.0.1:0", run.pipe.readiness).start()
            try:
                wait_until(lambda: run.committed_offset() == 500, what="500 delivered")
                wait_until(lambda: run.pipe.readiness()[0], what="ready")
                base = f"http://127.0.0.1:{server.port}"
                text = urllib.request.urlopen(base + "/metrics").read().decode()
                assert urllib.request.urlopen(base + "/healthz").status == 200
                assert urllib.request.urlopen(base + "/readyz").status == 200
            finally:
                server.stop()
    for family in (
        "records_received_total",
        "records_sent_total",
        "source_requests_total",
        "source_request_duration_seconds_bucket",
        "source_retries_total",
        "source_rate_limited_seconds_total",
        "enrich_cache_requests_total",
        "enrich_cache_entries",
        "enrich_lookup_duration_seconds_bucket",
        "sink_produce_duration_seconds_bucket",
        "sink_inflight_records",
        "sink_delivery_failures_total",
        "checkpoint_timestamp_seconds",
        "last_success_timestamp_seconds",
        "build_info",
        "dlq_records_total",
        "ready",
    ):
        assert f"tanium_connector_{family}" in text, family
    sent = [
        line
        for line in text.splitlines()
        if line.startswith("tanium_connector_records_sent_total") and 'stage="sink"' in line
    ]
    assert sent and float(sent[0].split()[-1]) == 500


def test_sigterm_exits_0_with_checkpoint_on_last_delivered_record(broker, topic_prefix, tmp_path):
    with Simulator(alerts=2000, intel_docs=5, seed=8, history=3600, live_rate=100) as sim:
        state = tmp_path / "state"
        cfg_file = tmp_path / "p.toml"
        cfg_file.write_text(f"""
[pipeline]
name = "{topic_prefix}"
[tanium]
protocol = "http"
host = "127.0.0.1"
port = {sim.port}
api_key = "${{TKEY}}"
poll_interval = 0.2
[source]
start_from = "30d"
[kafka]
bootstrap_servers = "{broker.bootstrap}"
topic = "{topic_prefix}.events"
[state]
path = "{state}"
[metrics]
listen = "127.0.0.1:0"
""")
        env = {**os.environ, "TKEY": sim.api_key}
        proc = subprocess.Popen(
            [sys.executable, "-m", "connector.cli", "--log-level", "debug", "run", str(cfg_file)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        store = FileCheckpointStore(state, topic_prefix)
        try:
            wait_until(lambda: (store.load() or {}).get("offset", 0) > 2000, what="live alerts delivered")
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()[-2000:]
        checkpoint = store.load()
        ids = ids_of(read_topic(broker.bootstrap, f"{topic_prefix}.events", expect=checkpoint["offset"]))
        assert max(ids) == checkpoint["id"]  # checkpoint on the last delivered record, nothing after it
        assert sorted(set(ids)) == list(range(1, checkpoint["id"] + 1))
        assert sim.api_key.encode() not in err  # debug logs included


@pytest.mark.parametrize("page_size", [1, 7])
def test_paging_boundaries_have_no_gaps_or_duplicates(page_size, broker, topic_prefix, tmp_path):
    with Simulator(alerts=60, intel_docs=3, seed=6, history=600) as sim:
        cfg = make_cfg(sim, broker.bootstrap, topic_prefix, tmp_path, tanium={"page_size": page_size, "limit": 25})
        out = io.StringIO()
        assert StreamPipeline(cfg, once=True, dry_run=True, out=out).run() == 0
        got = [json.loads(x)["raw"]["id"] for x in out.getvalue().splitlines()]
        assert got == list(range(1, 61))


def test_events_too_large_for_kafka_lose_raw_or_go_to_the_dlq_and_the_stream_goes_on(broker, topic_prefix, tmp_path):
    """Kafka refuses records over max_request_size (1 MiB here). An alert with 2 MB of unmapped
    details is published without `raw` (its normalized fields intact, a warning says why); one whose
    mapped field alone is 2 MB goes to the DLQ with a reason and a truncated raw; both are passed,
    so the alerts after them arrive and the checkpoint moves on (a refused record would be re-read
    forever)."""
    with Simulator(alerts=50, intel_docs=3, seed=12, history=3600) as sim:
        cfg = make_cfg(
            sim,
            broker.bootstrap,
            topic_prefix,
            tmp_path,
            field_map={"description": ["details.match.note", "intelDoc.name"]},
        )
        assert StreamPipeline(cfg, once=True).run() == 0
        big_raw = sim.inject(details={"match": {"type": "file", "blob": "A" * 2_000_000}})
        big_field = sim.inject(details={"match": {"type": "file", "note": "B" * 2_000_000}})
        for _ in range(20):
            sim.inject()
        pipe = StreamPipeline(cfg, once=True)
        assert pipe.run() == 0
        assert pipe.summary.rewinds == 0 and pipe.summary.dlq == 1
        assert pipe.committed["id"] == 72
    events = {
        json.loads(r.value)["uid"]: json.loads(r.value)
        for r in read_topic(broker.bootstrap, cfg.kafka.topic, expect=71)
    }
    assert len(events) == 71
    slim = events[big_raw["guid"]]
    assert slim["raw"] is None and any(w.startswith("raw: left out") for w in slim["normalization_warnings"])
    assert slim["computer"] == big_raw["computerName"]
    dlq = read_topic(broker.bootstrap, cfg.kafka.dlq_topic, expect=1)
    doc = json.loads(dlq[0].value)
    assert doc["reason"].startswith("too large") and doc["raw_truncated"] is True
    assert len(dlq[0].value) < 1024 * 1024 and str(big_field["id"]) in doc["raw"][:200]


def test_pipelines_of_one_process_share_one_producer_unless_exactly_once(broker, topic_prefix, tmp_path):
    """Two at-least-once pipelines in one process publish through one producer and each delivers all
    of its alerts exactly once; an exactly-once pipeline keeps its own transactional producer."""
    with Simulator(alerts=700, intel_docs=5, seed=3) as one, Simulator(alerts=500, intel_docs=5, seed=4) as two:
        a = make_cfg(one, broker.bootstrap, f"{topic_prefix}-a", tmp_path, tanium={"page_size": 100})
        b = make_cfg(two, broker.bootstrap, f"{topic_prefix}-b", tmp_path, tanium={"page_size": 100})
        eo = make_cfg(
            two,
            broker.bootstrap,
            f"{topic_prefix}-eo",
            tmp_path,
            pipeline={"delivery": "exactly-once"},
            state={"backend": "kafka", "topic": f"{topic_prefix}-eo.state"},
        )
        with Running(a) as ra, Running(b) as rb:
            assert ra.pipe.sink._producer is rb.pipe.sink._producer
            wait_until(lambda: ra.committed_offset() == 700 and rb.committed_offset() == 500, what="both checkpoints")
            transactional = StreamPipeline(eo, once=True)
            assert transactional.sink._producer is not ra.pipe.sink._producer
            assert transactional.run() == 0
    assert sorted(ids_of(read_topic(broker.bootstrap, a.kafka.topic, expect=700))) == list(range(1, 701))
    assert sorted(ids_of(read_topic(broker.bootstrap, b.kafka.topic, expect=500))) == list(range(1, 501))
