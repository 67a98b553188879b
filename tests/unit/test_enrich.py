"""Enricher: single-flight, (id, revision) key, TTL/LRU/negative cache, errors never drop an alert."""

from __future__ import annotations

import threading
import time

import pytest

from connector.metrics import Metrics
from connector.stream.enrich import Enricher


class Clock:
    """A cache timer the test advances instead of sleeping."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


class Intels:
    """A counting fetch function: doc ids in `missing` are 404s, in `failing` raise."""

    def __init__(self, missing=(), failing=(), gate: threading.Event | None = None):
        self.calls: list = []
        self.missing, self.failing = set(missing), set(failing)
        self.gate = gate
        self.lock = threading.Lock()

    def __call__(self, doc_id):
        with self.lock:
            self.calls.append(doc_id)
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never opened"
        if doc_id in self.failing:
            raise ConnectionError(f"intel {doc_id}: connection reset")
        if doc_id in self.missing:
            return None
        return {
            "id": doc_id,
            "name": f"Intel {doc_id}",
            "revisionId": 1,
            "mitreAttack": {"techniques": [{"id": "T1204", "name": "User Execution"}]},
        }


def alerts(n, docs, rev=1):
    return [{"id": i, "guid": f"g-{i}", "intelDocId": docs[i % len(docs)], "intelDocRevisionId": rev} for i in range(n)]


def make(fetch, clock=None, **kw):
    args = dict(cache_size=100, ttl=3600, negative_ttl=60, concurrency=4)
    args.update(kw)
    return Enricher(fetch, timer=clock or Clock(), **args)


def wait_for(cond, timeout=10):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_one_fetch_per_doc_for_a_page():
    fetch = Intels()
    e = make(fetch)
    page = alerts(100, [1, 2, 3, 4, 5])
    out = e.enrich(page)
    assert out is page
    assert sorted(fetch.calls) == [1, 2, 3, 4, 5]
    assert all(a["intelDoc"]["id"] == a["intelDocId"] for a in page)
    assert "enrichment_error" not in page[0]
    s = e.stats
    assert (s["lookups"], s["misses"], s["requests"], s["hits"]) == (100, 5, 5, 95)
    e.enrich(alerts(50, [1, 2, 3, 4, 5]))
    assert len(fetch.calls) == 5
    assert e.stats["hits"] == 145
    e.close()


def test_single_flight_across_threads():
    gate = threading.Event()
    fetch = Intels(gate=gate)
    e = make(fetch, concurrency=8)
    pages = [alerts(100, [1, 2, 3, 4, 5]) for _ in range(8)]
    threads = [threading.Thread(target=e.enrich, args=(p,)) for p in pages]
    for t in threads:
        t.start()
    # every thread has registered its lookups (and is waiting on the fetches) before any fetch returns
    wait_for(lambda: e.stats["lookups"] == 800)
    gate.set()
    for t in threads:
        t.join(10)
    assert sorted(fetch.calls) == [1, 2, 3, 4, 5]
    assert all(a["intelDoc"]["id"] == a["intelDocId"] for p in pages for a in p)
    e.close()


def test_distinct_docs_are_fetched_concurrently_within_the_bound():
    barrier = threading.Barrier(3, timeout=10)  # breaks (→ errors) unless 3 fetches overlap
    active, peak, lock = [0], [0], threading.Lock()

    def fetch(doc_id):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            if doc_id <= 3:
                barrier.wait()
            return {"id": doc_id}
        finally:
            with lock:
                active[0] -= 1

    e = make(fetch, concurrency=3)
    page = alerts(30, list(range(1, 10)))
    e.enrich(page)
    assert not [a for a in page if "enrichment_error" in a]
    assert peak[0] == 3
    e.close()


def test_revision_is_part_of_the_key():
    fetch = Intels()
    e = make(fetch)
    e.enrich(alerts(4, [7], rev=1) + alerts(4, [7], rev=2))
    assert fetch.calls == [7, 7]
    e.enrich(alerts(3, [7], rev=2))
    assert fetch.calls == [7, 7]
    e.enrich(alerts(1, [7], rev=None))
    assert fetch.calls == [7, 7, 7]


def test_ttl_expiry_refetches():
    clock = Clock()
    fetch = Intels()
    e = make(fetch, clock, ttl=300)
    e.enrich(alerts(2, [1]))
    clock.advance(299)
    e.enrich(alerts(2, [1]))
    assert fetch.calls == [1]
    clock.advance(2)
    page = e.enrich(alerts(2, [1]))
    assert fetch.calls == [1, 1]
    assert page[0]["intelDoc"]["id"] == 1


def test_lru_eviction_at_cache_size():
    fetch = Intels()
    e = make(fetch, cache_size=2)
    e.enrich(alerts(1, [1]))
    e.enrich(alerts(1, [2]))
    e.enrich(alerts(1, [1]))  # 1 is now the most recently used
    e.enrich(alerts(1, [3]))  # evicts 2
    assert fetch.calls == [1, 2, 3]
    assert e.stats["entries"] == 2
    e.enrich(alerts(1, [1]))
    assert fetch.calls == [1, 2, 3]
    e.enrich(alerts(1, [2]))
    assert fetch.calls == [1, 2, 3, 2]


def test_not_found_is_cached_briefly():
    clock = Clock()
    fetch = Intels(missing={9})
    e = make(fetch, clock, negative_ttl=60)
    page = e.enrich(alerts(3, [9]))
    assert fetch.calls == [9]
    assert all("intelDoc" not in a and "not found" in a["enrichment_error"] for a in page)
    again = e.enrich(alerts(3, [9]))
    assert fetch.calls == [9]
    assert "not found" in again[0]["enrichment_error"]
    assert e.stats["negative_hits"] == 3
    clock.advance(61)
    e.enrich(alerts(1, [9]))
    assert fetch.calls == [9, 9]


def test_negative_ttl_zero_caches_nothing():
    fetch = Intels(missing={9})
    e = make(fetch, negative_ttl=0)
    e.enrich(alerts(1, [9]))
    e.enrich(alerts(1, [9]))
    assert fetch.calls == [9, 9]


def test_errors_are_noted_not_cached_and_the_alert_flows_on():
    fetch = Intels(failing={4})
    e = make(fetch)
    page = alerts(6, [4, 5])
    out = e.enrich(page)
    assert len(out) == 6
    bad = [a for a in out if a["intelDocId"] == 4]
    good = [a for a in out if a["intelDocId"] == 5]
    assert all("intelDoc" not in a for a in bad)
    assert all(
        a["enrichment_error"] == "IntelDoc 4 lookup failed: ConnectionError: intel 4: connection reset" for a in bad
    )
    assert all(a["intelDoc"]["id"] == 5 and "enrichment_error" not in a for a in good)
    assert e.stats["errors"] == 1
    fetch.failing.clear()
    again = e.enrich(alerts(2, [4]))
    assert fetch.calls.count(4) == 2
    assert again[0]["intelDoc"]["id"] == 4


def test_user_facing_message_of_client_errors_is_used():
    class TaniumLikeError(Exception):
        def __init__(self, message):
            super().__init__("internal detail")
            self.message = message

    def fetch(doc_id):
        raise TaniumLikeError("Tanium answered 503 after 5 attempts")

    page = make(fetch).enrich(alerts(1, [1]))
    assert page[0]["enrichment_error"] == "IntelDoc 1 lookup failed: Tanium answered 503 after 5 attempts"


def test_a_reply_that_is_not_an_object_is_an_error():
    page = make(lambda doc_id: ["not", "a", "doc"]).enrich(alerts(1, [1]))
    assert "expected an IntelDoc object, got list" in page[0]["enrichment_error"]


def test_pass_through_cases():
    fetch = Intels()
    e = make(fetch)
    expanded = {"id": 1, "intelDocId": 3, "intelDocRevisionId": 1, "intelDoc": {"id": 3, "name": "x"}}
    no_doc = {"id": 2, "intelDocId": None}
    bare = {"id": 3}
    junk = ["not", "an", "alert"]
    bad_key = {"id": 4, "intelDocId": {"x": 1}}
    out = e.enrich([expanded, no_doc, bare, junk, bad_key])
    assert fetch.calls == []
    assert out[0]["intelDoc"] == {"id": 3, "name": "x"}
    assert out[1] == {"id": 2, "intelDocId": None}
    assert out[2] == {"id": 3}
    assert out[3] == ["not", "an", "alert"]
    assert "is not an id" in out[4]["enrichment_error"]


def test_json_string_fields_are_decoded():
    docs = {
        1: {"id": 1, "mitreAttack": '{"techniques": [{"id": "T1134.002"}]}', "compiled": '{"terms": []}'},
        2: {"id": 2, "mitreAttack": None, "compiled": None},
        3: {"id": 3, "mitreAttack": "get_doc_test", "compiled": "{broken"},
    }
    page = make(lambda i: docs[i]).enrich(alerts(3, [1, 2, 3]))
    by = {a["intelDocId"]: a["intelDoc"] for a in page}
    assert by[1]["mitreAttack"] == {"techniques": [{"id": "T1134.002"}]}
    assert by[1]["compiled"] == {"terms": []}
    assert by[2]["mitreAttack"] is None and by[2]["compiled"] is None
    assert by[3]["mitreAttack"] == "get_doc_test" and by[3]["compiled"] == "{broken"
    expanded = {"id": 9, "intelDocId": 1, "intelDoc": {"id": 1, "mitreAttack": '{"techniques": []}'}}
    make(lambda i: None).enrich([expanded])
    assert expanded["intelDoc"]["mitreAttack"] == {"techniques": []}


def test_metrics():
    m = Metrics("enrich-test")
    fetch = Intels(missing={8}, failing={9})
    e = Enricher(fetch, 100, 3600, 60, 4, m, timer=Clock())
    e.enrich(alerts(10, [1, 2]) + alerts(2, [8]) + alerts(3, [9]))
    e.enrich(alerts(2, [8]))

    def val(name, **labels):
        return m.registry.get_sample_value("tanium_connector_" + name, {"pipeline": "enrich-test", **labels})

    assert val("enrich_cache_requests_total", result="miss") == 4
    assert val("enrich_cache_requests_total", result="hit") == 8 + 1 + 2
    assert val("enrich_cache_requests_total", result="negative_hit") == 2
    assert val("enrich_errors_total") == 1
    assert val("enrich_cache_entries") == 3
    assert val("enrich_lookup_duration_seconds_count") == 4
    assert val("records_received_total", stage="enrich") == 17
    assert val("records_sent_total", stage="enrich") == 17


def test_closed_enricher_notes_an_error_instead_of_raising():
    e = make(Intels())
    e.close()
    page = e.enrich(alerts(1, [1]))
    assert "enricher is closed" in page[0]["enrichment_error"]


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="cache_size"):
        Enricher(Intels(), 0, 10, 1, 1)
