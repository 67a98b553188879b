"""Edges of the stream pipeline on the real broker and the simulator: a slow IntelDoc endpoint does
not hold alerts back (enrich.timeout), and the pipeline's liveness and freshness figures."""

from __future__ import annotations

import json

from helpers import Running, ids_of, make_cfg, read_topic, wait_until

RETRY_AFTER = 5  # seconds: every first /intels request is answered 429 with this Retry-After


def test_slow_intel_docs_do_not_hold_alerts_back(broker, sim, topic_prefix, tmp_path):
    """Every doc's first lookup is rate limited for 5 s; enrich.timeout is 0.5 s. All 300 alerts are
    published before any lookup has finished (so none waited for one), each carries the
    enrichment warning, and an alert that arrives later is enriched from the background lookup."""
    docs = len(sim.intel_doc_ids)
    sim.faults.endpoints = {"intel"}
    sim.faults.rate_limit_next = docs
    sim.faults.retry_after = str(RETRY_AFTER)
    cfg = make_cfg(sim, broker.bootstrap, topic_prefix, tmp_path, enrich={"timeout": 0.5})
    with Running(cfg) as run:
        wait_until(lambda: run.pipe.summary.published == 300, timeout=RETRY_AFTER, what="300 alerts published")
        assert run.pipe.enricher.stats["entries"] == 0, "published before any IntelDoc lookup finished"
        wait_until(lambda: run.pipe.enricher.stats["entries"] == docs, timeout=30, what="the background lookups")
        late = sim.inject(intel_doc_id=sim.intel_doc_ids[0])
        wait_until(lambda: run.pipe.summary.published == 301, what="the later alert published")
    records = read_topic(broker.bootstrap, cfg.kafka.topic, expect=301)
    assert sorted(ids_of(records)) == list(range(1, 302))
    events = {e["raw"]["id"]: e for e in (json.loads(r.value) for r in records)}
    for i in range(1, 301):
        warnings = events[i]["normalization_warnings"]
        assert any(w.startswith("intelDoc: ") and "enrich.timeout" in w for w in warnings), (i, warnings)
        assert "intelDoc" not in events[i]["raw"]
    later = events[late["id"]]
    assert later["raw"]["intelDoc"]["id"] == sim.intel_doc_ids[0] and later["normalization_warnings"] == []
    assert sim.stats["intel"] == 2 * docs, "one 429 and one answer per doc: no lookup was started twice"
