"""enrich: joins each alert's IntelDoc under `intelDoc`, as the API's `expand=intelDoc` would.

Cache: an in-memory LRU with per-entry expiry (cachetools TLRUCache) keyed by
(intelDocId, intelDocRevisionId). Found docs live `ttl` seconds, 404s `negative_ttl` seconds;
failed lookups are not cached, so the next page tries again.

Single flight: a doc being fetched is registered in `_inflight` (under the same lock as the cache),
so every alert that needs it, in this page or in a page another thread is enriching, waits for
that one fetch. The distinct missing docs of a page are fetched at the same time on a bounded
thread pool (`concurrency`).

Bound (`timeout`, the enrich.timeout setting): a page waits at most that long for its lookups. An
alert whose doc is not there by then goes on with an `enrichment_error` (normalize makes it a
warning); its lookup keeps running in the background and stays registered in `_inflight`, so later
alerts join it or find its result in the cache. A slow or rate-limited /intels thus delays alerts
by at most `timeout`, never by the client's whole retry sequence.

Stats and the cache_requests metric count one lookup per alert that needs a doc: `miss` = this
lookup started a fetch, `hit` = served from the cache or by joining a fetch already running,
`negative_hit` = a cached 404. `requests` = IntelDoc fetches issued (one per miss).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from cachetools import TLRUCache

from connector.metrics import NO_METRICS, Metrics
from connector.tanium import decode_intel_doc

_NOT_FOUND = object()  # cached value for a 404


def _describe(exc: BaseException) -> str:
    # TaniumError.message is the user-facing text (never holds the API key); others: type and text
    msg = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
    return msg if len(msg) <= 300 else msg[:297] + "..."


class Enricher:
    def __init__(
        self,
        fetch: Callable[[Any], dict | None],
        cache_size: int,
        ttl: float,
        negative_ttl: float,
        concurrency: int,
        metrics: Metrics = NO_METRICS,
        timer: Callable[[], float] = time.monotonic,
        timeout: float | None = None,
    ):
        if cache_size < 1 or concurrency < 1 or ttl <= 0 or negative_ttl < 0 or (timeout is not None and timeout <= 0):
            raise ValueError(
                "Enricher: cache_size and concurrency must be ≥ 1, ttl > 0, negative_ttl ≥ 0, timeout > 0 or None"
            )
        self._fetch = fetch
        self.timeout = timeout  # None: wait for every lookup to finish
        self._ttl, self._neg_ttl = float(ttl), float(negative_ttl)
        self._cache = TLRUCache(cache_size, self._ttu, timer=timer)
        self._lock = threading.Lock()
        self._inflight: dict[tuple, Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="enrich")
        self._counts = {"lookups": 0, "hits": 0, "misses": 0, "negative_hits": 0, "requests": 0, "errors": 0}
        p = metrics.pipeline
        self._m_hit = metrics.cache_requests.labels(p, "hit")
        self._m_miss = metrics.cache_requests.labels(p, "miss")
        self._m_neg = metrics.cache_requests.labels(p, "negative_hit")
        self._m_entries = metrics.cache_entries.labels(p)
        self._m_lookup = metrics.lookup_duration.labels(p)
        self._m_errors = metrics.enrich_errors.labels(p)
        self._m_in = metrics.records_received.labels(p, "enrich")
        self._m_out = metrics.records_sent.labels(p, "enrich")

    def _ttu(self, _key, value, now: float) -> float:
        return now + (self._neg_ttl if value is _NOT_FOUND else self._ttl)

    @property
    def stats(self) -> dict[str, int]:
        """lookups, hits, misses, negative_hits, requests (IntelDoc fetches), errors, entries."""
        with self._lock:
            return {**self._counts, "entries": len(self._cache)}

    def enrich(self, alerts: list) -> list:
        """Adds `intelDoc` (or an `enrichment_error` note) to each alert in place; returns `alerts`.
        Returns within `timeout` seconds (plus the cache work) whatever the lookups do."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        wanted: dict[tuple, list[dict]] = {}
        for alert in alerts:
            if not isinstance(alert, dict):
                continue  # normalize sends it to the dead-letter topic
            present = alert.get("intelDoc")
            if present is not None:  # expanded by the API already
                if isinstance(present, dict):
                    decode_intel_doc(present)
                continue
            doc_id = alert.get("intelDocId")
            if doc_id is None:
                continue
            rev = alert.get("intelDocRevisionId")
            if not _is_key(doc_id) or not (rev is None or _is_key(rev)):
                alert["enrichment_error"] = (
                    f"intelDocId {doc_id!r} / intelDocRevisionId {rev!r} is not an id (integer or text)"
                )[:300]
                continue
            wanted.setdefault((doc_id, rev), []).append(alert)

        hits = misses = neg = 0
        pending: list[tuple[tuple, Future]] = []
        with self._lock:
            for key, group in wanted.items():
                cached = self._cache.get(key)
                if cached is _NOT_FOUND:
                    neg += len(group)
                    _not_found(group, key)
                elif cached is not None:
                    hits += len(group)
                    for alert in group:
                        alert["intelDoc"] = cached
                else:
                    fut = self._inflight.get(key)
                    if fut is None:
                        fut = self._start(key)
                        misses += 1
                        hits += len(group) - 1
                    else:
                        hits += len(group)
                    pending.append((key, fut))
            c = self._counts
            c["lookups"] += hits + misses + neg
            c["hits"] += hits
            c["misses"] += misses
            c["requests"] += misses
            c["negative_hits"] += neg

        errors = 0
        if pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            wait([fut for _, fut in pending], timeout=left)
        for key, fut in pending:
            group = wanted[key]
            if not fut.done():  # still running: it fills the cache for later alerts
                errors += 1
                note = (
                    f"IntelDoc {key[0]} lookup did not finish within enrich.timeout = {self.timeout:g}s; "
                    "the alert goes without it, the lookup goes on for later alerts"
                )
                for alert in group:
                    alert["enrichment_error"] = note
                continue
            try:
                doc = fut.result()
            except Exception as e:  # noqa: BLE001 (any fetch failure: the alert flows on unenriched)
                errors += 1
                note = f"IntelDoc {key[0]} lookup failed: {_describe(e)}"
                for alert in group:
                    alert["enrichment_error"] = note
                continue
            if doc is None:
                _not_found(group, key)
            else:
                for alert in group:
                    alert["intelDoc"] = doc
        if errors:
            with self._lock:
                self._counts["errors"] += errors
        self._m_hit.inc(hits)
        self._m_miss.inc(misses)
        self._m_neg.inc(neg)
        if errors:
            self._m_errors.inc(errors)
        with self._lock:
            self._m_entries.set(len(self._cache))
        self._m_in.inc(len(alerts))
        self._m_out.inc(len(alerts))
        return alerts

    def _start(self, key: tuple) -> Future:
        """Called with the lock held: registers and submits the one fetch for `key`."""
        try:
            fut = self._pool.submit(self._load, key)
        except RuntimeError as e:  # pool shut down by close()
            fut = Future()
            fut.set_exception(RuntimeError(f"enricher is closed ({e})"))
            return fut
        self._inflight[key] = fut
        return fut

    def _load(self, key: tuple) -> dict | None:
        t0 = time.perf_counter()
        try:
            doc = self._fetch(key[0])
            if doc is not None and not isinstance(doc, dict):
                raise TypeError(f"expected an IntelDoc object, got {type(doc).__name__}")
        except BaseException:
            with self._lock:  # errors are not cached: the next lookup fetches again
                self._inflight.pop(key, None)
            raise
        finally:
            self._m_lookup.observe(time.perf_counter() - t0)
        if doc is not None:
            doc = decode_intel_doc(dict(doc))
        with self._lock:
            self._cache[key] = _NOT_FOUND if doc is None else doc
            self._inflight.pop(key, None)
        return doc

    def close(self) -> None:
        """Cancels queued lookups; one still running is not waited for (closing its client ends it)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _is_key(v) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, str) and bool(v.strip()))


def _not_found(group: list[dict], key: tuple) -> None:
    note = f"IntelDoc {key[0]} (revision {key[1]}) not found (404)"
    for alert in group:
        alert["enrichment_error"] = note
