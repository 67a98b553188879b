"""enrich.timeout: an alert waits at most that long for its IntelDoc. A slow lookup (here: the
simulator rate-limits /intels with Retry-After, so the client waits between retries) lets the
alert go on with an `enrichment_error`, which normalize turns into a warning; the lookup goes on
in the background, so a later alert of the same doc is enriched from the cache."""

from __future__ import annotations

import time

import pytest
from helpers import wait_until

from connector.config import TaniumSection, parse_pipeline
from connector.stream.enrich import Enricher
from connector.stream.normalize import Normalizer
from connector.tanium import TaniumClient

TIMEOUT = 0.5  # enrich.timeout in these tests
RETRY_AFTER = "1"  # seconds the client waits after each 429 from /intels
RATE_LIMITS = 3  # 429s before /intels answers: the lookup takes about 3 s in all


@pytest.fixture
def slow_intels(sim):
    sim.faults.endpoints = {"intel"}
    sim.faults.rate_limit_next = RATE_LIMITS
    sim.faults.retry_after = RETRY_AFTER
    return sim


def enricher(sim, timeout=TIMEOUT):
    client = TaniumClient(TaniumSection(**sim.settings(max_retries=RATE_LIMITS + 1)))
    return Enricher(client.get_intel, cache_size=100, ttl=3600, negative_ttl=60, concurrency=4, timeout=timeout), client


def alerts_of_doc(sim, doc_id, n):
    found = [a for a in (sim.get_alert(i) for i in range(1, sim.alert_count + 1)) if a["intelDocId"] == doc_id]
    assert len(found) >= n
    return found[:n]


@pytest.mark.slow
def test_alert_waits_at_most_the_timeout_then_goes_with_an_enrichment_error(slow_intels):
    sim = slow_intels
    doc = sim.intel_doc_ids[0]
    first, later = alerts_of_doc(sim, doc, 2)
    e, client = enricher(sim)
    try:
        t0 = time.monotonic()
        e.enrich([first])
        waited = time.monotonic() - t0
        assert waited < TIMEOUT + 1.0, f"the alert waited {waited:.1f}s for its IntelDoc (enrich.timeout {TIMEOUT})"
        assert "intelDoc" not in first
        assert "enrich.timeout" in first["enrichment_error"] and str(doc) in first["enrichment_error"]
        event = Normalizer({}, "p").normalize(first)
        assert any(w.startswith("intelDoc: ") and "enrich.timeout" in w for w in event["normalization_warnings"])

        # the lookup goes on in the background: once it is done, the next alert of the doc is enriched
        wait_until(lambda: e.stats["entries"] == 1, timeout=10, what="the background IntelDoc lookup")
        assert sim.faults.served["rate_limit"] == RATE_LIMITS
        e.enrich([later])
        assert later["intelDoc"]["id"] == doc and "enrichment_error" not in later
        assert sim.stats["intel"] == RATE_LIMITS + 1, "one lookup in all, no second fetch"
        assert e.stats["requests"] == 1
    finally:
        e.close()
        client.close()


def test_alerts_of_a_page_share_one_deadline(slow_intels):
    """Several slow docs in one page: the page waits one timeout, not one per doc."""
    sim = slow_intels
    sim.faults.rate_limit_next = 2 * len(sim.intel_doc_ids)
    page = [alerts_of_doc(sim, doc, 1)[0] for doc in sim.intel_doc_ids]
    e, client = enricher(sim)
    try:
        t0 = time.monotonic()
        e.enrich(page)
        waited = time.monotonic() - t0
        assert waited < TIMEOUT + 1.0, f"the page waited {waited:.1f}s"
        assert all("enrich.timeout" in a["enrichment_error"] for a in page)
    finally:
        e.close()
        client.close()


def test_a_fast_lookup_is_not_affected(sim):
    doc = sim.intel_doc_ids[1]
    (alert,) = alerts_of_doc(sim, doc, 1)
    e, client = enricher(sim, timeout=5)
    try:
        e.enrich([alert])
        assert alert["intelDoc"]["id"] == doc and "enrichment_error" not in alert
    finally:
        e.close()
        client.close()


def test_close_does_not_wait_for_a_lookup_still_running(slow_intels):
    """Shutdown is not held up by a background lookup (its client is closed right after)."""
    sim = slow_intels
    (alert,) = alerts_of_doc(sim, sim.intel_doc_ids[0], 1)
    e, client = enricher(sim)
    e.enrich([alert])
    t0 = time.monotonic()
    e.close()
    client.close()
    assert time.monotonic() - t0 < 1.0


@pytest.mark.parametrize("value", [0, -1, "soon"])
def test_timeout_setting_is_checked(sim, value):
    from connector.config import ConfigError

    with pytest.raises(ConfigError, match="enrich.timeout"):
        parse_pipeline({"pipeline": {"name": "p"}, "tanium": sim.settings(), "enrich": {"timeout": value}})


def test_timeout_setting_default_and_wiring(sim):
    from connector.stream.stages import build_stages

    cfg = parse_pipeline({"pipeline": {"name": "p"}, "tanium": sim.settings()})
    assert cfg.enrich.timeout == 5
    cfg = parse_pipeline({"pipeline": {"name": "p"}, "tanium": sim.settings(), "enrich": {"timeout": 0.25}})
    client = TaniumClient(cfg.tanium)
    stages = build_stages(cfg, client)
    try:
        assert stages.enricher.timeout == 0.25
    finally:
        stages.enricher.close()
        client.close()
