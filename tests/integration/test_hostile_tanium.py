"""A hostile Tanium server: the simulator's faults against the running stream pipeline.

What counts as a "bad record" (evidence: connector/stream/normalize.py docstring and `_check_record`,
and the client contract for `details` in connector/tanium.py):
- bad, dead-letter topic with a reason: records that cannot become an event at all —
  `non_object` ("not an object") and `wrong_types` (id "x7": "bad id").
- an event, flagged: `missing_id` carries a guid, which is a valid identity by design (uid =
  guid); `deep_nesting` has undecodable `details` (kept as text, warning "details: … not valid
  JSON"); `invalid_utf8` has its bad bytes replaced with U+FFFD and the record flagged
  (`encodingError`, and a normalization warning).
- `huge_details` (10 MB): a real alert Kafka cannot take (producer max_request_size 1 MB). It
  belongs in the dead-letter topic with a reason; see the xfail test at the end for what happens.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
from helpers import Running, make_cfg, metric, read_topic, wait_until

from connector.simulator import Simulator

DLQ_REASON = {"non_object": "not an object", "wrong_types": "bad id"}
EVENT_KINDS = ("missing_id", "deep_nesting", "invalid_utf8")


def _sum(text: str, family: str, **labels) -> float:
    return metric(text, family, **labels) or 0.0


def _warmed(sim, broker, prefix, tmp_path, **tanium):
    """A running pipeline that already holds a checkpoint, so no probe page (whose extra
    records are never processed) is ever served with faults; and without the update scan, whose
    pages' records the creation cursor handles instead (it passes over those it cannot place), so
    every garbage record served reaches the pipeline's output."""
    cfg = make_cfg(
        sim,
        broker.bootstrap,
        prefix,
        tmp_path,
        tanium={"page_size": 50, "timeout": 3, "max_retries": 3, **tanium},
        source={"track_updates": False},
    )
    run = Running(cfg).__enter__()
    try:
        wait_until(lambda: run.committed_offset() == sim.alert_count, what="the history delivered")
    except AssertionError:
        run.__exit__(None, None, None)
        raise
    return cfg, run


@pytest.mark.slow
def test_transport_faults_storms_resets_stalls_malformed_pages(broker, topic_prefix, tmp_path):
    """429 storms longer than max_retries (Retry-After: 1), 5xx bursts, resets mid-body, stalls of
    30 s (tanium.timeout is 3 s) and truncated JSON pages while 600 new alerts arrive: the pipeline
    keeps running, every alert arrives exactly once, and the client's counters match what the
    simulator inflicted."""
    with Simulator(alerts=500, intel_docs=6, seed=31, history=3600) as sim:
        cfg, run = _warmed(sim, broker, topic_prefix, tmp_path)
        try:
            f = sim.faults
            f.endpoints = {"alerts"}
            f.retry_after = "1"
            f.rate_limit_next = 6  # 4 attempts fail (max_retries = 3), the poll backs off, then 2 more
            f.error_next = 5
            f.reset_next = 3
            f.stall_next = 2
            f.stall_seconds = 30
            f.malformed_next = 2
            for _ in range(600):
                sim.inject()
            wait_until(lambda: run.committed_offset() == 1100, timeout=120, what="every alert after the storm")
            assert run.thread.is_alive()
            assert not any((f.rate_limit_next, f.error_next, f.reset_next, f.stall_next, f.malformed_next)), (
                "every fault was served"
            )
        finally:
            run.__exit__(None, None, None)
        assert run.code == 0
        text = run.metrics.render().decode()
        served = sim.faults.served
        assert served == Counter(rate_limit=6, error=5, reset=3, stall=2, malformed=2)
        assert _sum(text, "source_requests_total", endpoint="alerts", code_class="429") == 6
        assert _sum(text, "source_requests_total", endpoint="alerts", code_class="5xx") == 5
        # a reset mid-body and a read timeout are both transport errors
        assert _sum(text, "source_requests_total", endpoint="alerts", code_class="error") == 3 + 2
        # every request the simulator saw, the client counted (malformed pages are 2xx)
        assert _sum(text, "source_requests_total", endpoint="alerts") == sim.stats["alerts"]
        # Retry-After honoured: every 429 retry waited exactly the 1 s the server asked for
        retries_429 = _sum(text, "source_retries_total", reason="429")
        assert 0 < retries_429 < 6 and _sum(text, "source_rate_limited_seconds_total") == retries_429 * 1.0
        assert _sum(text, "source_retries_total", reason="network") >= 1
        assert run.pipe.summary.dlq == 0 and run.pipe.summary.delivery_failures == 0
    ids = [json.loads(r.value)["raw"]["id"] for r in read_topic(broker.bootstrap, cfg.kafka.topic, expect=1100)]
    assert sorted(ids) == list(range(1, 1101))


def test_garbage_records_go_to_the_dlq_and_counters_match(broker, topic_prefix, tmp_path):
    """Pages with garbage records (every kind but the 10 MB one, two per page on half the pages)
    mixed with 429s, 5xx and a stall: no crash, no alert lost, each bad record in the DLQ with its
    reason, the flagged ones delivered as events with their warning, and the summary and metrics
    counters equal what the simulator served (`sim.garbage_log`)."""
    with Simulator(alerts=300, intel_docs=6, seed=32, history=3600) as sim:
        cfg, run = _warmed(sim, broker, topic_prefix, tmp_path)
        try:
            published0 = run.pipe.summary.published
            f = sim.faults
            f.garbage_kinds = ("non_object", "missing_id", "wrong_types", "deep_nesting", "invalid_utf8")
            f.garbage_per_page = 2
            f.garbage_rate = 0.5
            f.rate_limit_rate = 0.1
            f.retry_after = "0"
            f.error_rate = 0.1
            f.stall_next = 1
            f.stall_seconds = 30
            for _ in range(500):
                sim.inject()
            wait_until(lambda: run.committed_offset() == 800, timeout=120, what="every alert")
            f.garbage_rate = f.rate_limit_rate = f.error_rate = 0
            # alert pages are fetched one at a time: once another request starts, the garbage of
            # the previous one is logged, and no more comes
            n = sim.stats["alerts"]
            wait_until(lambda: sim.stats["alerts"] > n, what="a request without garbage")
            kinds = Counter(k for k, _ in sim.garbage_log)
            n_bad = sum(kinds[k] for k in DLQ_REASON)
            n_flagged = sum(kinds[k] for k in EVENT_KINDS)
            assert n_bad >= 4 and n_flagged >= 4, kinds
            s = run.pipe.summary
            wait_until(
                lambda: s.dlq >= n_bad and s.published >= published0 + 500 + n_flagged,
                what="every garbage record served to be handled",
            )
            assert run.thread.is_alive()
        finally:
            run.__exit__(None, None, None)
        assert run.code == 0
        assert s.dlq == n_bad and s.published == published0 + 500 + n_flagged
        assert s.fetched == 800 + n_bad + n_flagged
        text = run.metrics.render().decode()
        for kind, reason in DLQ_REASON.items():
            assert _sum(text, "dlq_records_total", reason=reason) == kinds[kind], kind
            assert _sum(text, "records_dropped_total", stage="normalize", reason=reason) == kinds[kind], kind
        assert _sum(text, "dlq_records_total") == n_bad
        assert _sum(text, "sink_delivery_failures_total") == 0
        assert _sum(text, "source_requests_total", code_class="429") == sim.faults.served["rate_limit"]
        assert _sum(text, "source_requests_total", code_class="5xx") == sim.faults.served["error"]
        assert sim.faults.served["garbage"] >= 1

    dlq = read_topic(broker.bootstrap, cfg.kafka.dlq_topic, expect=n_bad)
    reasons = Counter(json.loads(r.value)["reason"].split(":")[0] for r in dlq)
    assert reasons == Counter({DLQ_REASON[k]: kinds[k] for k in DLQ_REASON})
    for r in dlq:
        doc = json.loads(r.value)
        assert dict(r.headers)["reason"].decode() == doc["reason"] and doc["raw"]
        assert doc["pipeline"] == topic_prefix
    events = [json.loads(r.value) for r in read_topic(broker.bootstrap, cfg.kafka.topic, expect=800 + n_flagged)]
    flagged = [e for e in events if str(e["raw"].get("guid", "")).startswith("garbage-")]
    real = sorted(e["raw"]["id"] for e in events if e not in flagged)
    assert real == list(range(1, 801)), "every real alert exactly once"
    assert len(flagged) == n_flagged
    by_kind = Counter()
    for e in flagged:
        raw, warnings = e["raw"], e["normalization_warnings"]
        if "id" not in raw:
            by_kind["missing_id"] += 1
            assert e["uid"] == raw["guid"]
        elif "nested" in raw:
            by_kind["deep_nesting"] += 1
            assert any(w.startswith("details: details is not valid JSON") for w in warnings), warnings
        else:
            by_kind["invalid_utf8"] += 1
            assert "\ufffd" in raw["computerName"] and raw["encodingError"]
            assert any(w.startswith("encoding:") for w in warnings), warnings
    assert by_kind == Counter({k: kinds[k] for k in EVENT_KINDS})
