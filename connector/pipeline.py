"""The stream pipeline: the one place where source → enrich → normalize → sink → checkpoint meet.

Threads: a source thread fetches pages into a small bounded queue while this thread enriches,
normalizes and publishes the previous page, so the stages overlap. Memory stays bounded: at most
QUEUE_PAGES pages wait, and the sink blocks once `kafka.max_unacked` records are unacknowledged,
which in turn stops the source (back pressure).

Delivery: every record (events and DLQ records alike) enters an AckWindow in read order; the
checkpoint moves only to the last record of the contiguous acknowledged prefix. When Kafka fails
to confirm a record, the pipeline stops reading, rewinds the source to the durable checkpoint and
reads again (at-least-once: records after the checkpoint may repeat, none are lost).
"""
from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from dataclasses import dataclass, field

import orjson

from connector import __version__
from connector.config import ConfigError
from connector.enrich import Enricher
from connector.normalize import NormalizeError, Normalizer, SCHEMA_VERSION, serialize
from connector.sink import AckWindow, DryRunSink, KafkaSink
from connector.source import AlertSource, Position
from connector.state import open_store
from connector.tanium import TaniumClient, TaniumError
from connector.timeutil import parse_start, parse_ts, utcnow

log = logging.getLogger(__name__)

QUEUE_PAGES = 4
_DONE = object()  # source finished (--once)


@dataclass
class Summary:
    fetched: int = 0
    published: int = 0
    dlq: int = 0
    delivery_failures: int = 0
    rewinds: int = 0
    checkpoint: dict | None = None
    intel_requests: int = 0
    cache_hits: int = 0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


class StreamPipeline:
    def __init__(self, cfg, *, metrics=None, dry_run: bool = False, once: bool = False,
                 since: str | None = None, out=None, client=None, sink=None, store=None):
        self.cfg = cfg
        self.metrics = metrics
        if metrics:
            metrics.init_from_config(cfg)
        self.dry_run, self.once = dry_run, once
        self.stop_event = threading.Event()
        self.summary = Summary()
        self.client = client or TaniumClient(cfg.tanium, metrics)
        if sink is None:
            if dry_run:
                sink = DryRunSink(out or sys.stdout)
            elif cfg.kafka is None:
                raise ConfigError(f"{cfg.pipeline.name}: the pipeline has no [kafka] section: add one, or use --dry-run")
            else:
                sink = KafkaSink(cfg.kafka, metrics)
        self.sink = sink
        self.store = store if store is not None else open_store(cfg)
        self.enricher = None
        if cfg.tanium.enrich_intel_docs:
            e = cfg.enrich
            self.enricher = Enricher(self.client.get_intel, e.cache_size, e.cache_ttl, e.negative_ttl,
                                     e.concurrency, metrics)
        self.normalizer = Normalizer(cfg.effective_field_map, cfg.pipeline.name,
                                     cfg.validation.event_time_adjustment, cfg.output.include_raw,
                                     cfg.tanium.host, metrics)
        self.source = AlertSource(self.client, cfg.tanium.page_size, cfg.tanium.limit, metrics)
        self.topic = cfg.kafka.topic if cfg.kafka else "dry-run"
        self.dlq_topic = cfg.kafka.dlq_topic if cfg.kafka else "dry-run.dlq"
        self.headers = [("schema_version", str(SCHEMA_VERSION).encode()),
                        ("pipeline", cfg.pipeline.name.encode()),
                        ("connector_version", __version__.encode())]
        self.since = since
        self.committed: dict | None = None
        self.tanium_ok = False
        self.last_commit = time.monotonic()
        self.window = AckWindow()
        self.delivery_failed = threading.Event()

    # ---- health -------------------------------------------------------------------------
    def readiness(self) -> tuple[bool, str]:
        if not self.tanium_ok:
            return False, "last Tanium call failed"
        ok, why = self.sink.health()
        if not ok:
            return False, why
        stale = max(60.0, 3 * self.cfg.tanium.poll_interval)
        if self.window.pending and time.monotonic() - self.last_commit > stale:
            return False, f"checkpoint has not moved for more than {stale:.0f}s"
        return True, "ready"

    def _report_ready(self) -> None:
        if self.metrics:
            self.metrics.ready.labels(self.metrics.pipeline).set(1 if self.readiness()[0] else 0)

    # ---- source thread ----------------------------------------------------------------------
    def _poll(self, pages: queue.Queue, stop: threading.Event) -> None:
        backoff = 1.0
        while not stop.is_set():
            try:
                for page in self.source.cycle():
                    self.tanium_ok = True
                    while not stop.is_set():
                        try:
                            pages.put(page, timeout=0.5)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                self.tanium_ok = True
                backoff = 1.0
                if self.metrics:
                    self.metrics.last_success.labels(self.metrics.pipeline).set(time.time())
                if self.source.hit_limit:
                    continue
                if self.once:
                    pages.put(_DONE)
                    return
                stop.wait(self.cfg.tanium.poll_interval)
            except TaniumError as e:
                self.tanium_ok = False
                log.error("Tanium poll failed: %s", e.message)
                if self.once:
                    self.summary.errors.append(e.message)
                    pages.put(_DONE)
                    return
                stop.wait(min(backoff, self.cfg.tanium.poll_interval))
                backoff = min(backoff * 2, 300)

    # ---- processing -------------------------------------------------------------------------
    def _process(self, page: list) -> None:
        m = self.metrics
        self.summary.fetched += len(page)
        if self.enricher:
            self.enricher.enrich([a for a, _ in page if isinstance(a, dict)])
        for alert, pos in page:
            seq = self.window.add(pos)
            try:
                event = self.normalizer.normalize(alert)
                value = serialize(event)
            except NormalizeError as e:
                self._to_dlq(alert, e.reason, seq)
                continue
            key = str(event.get("uid") or "").encode() or None
            self.sink.send(self.topic, key, value, self.headers, self._on_done(seq, "published"))
        if m:
            m.records_sent.labels(m.pipeline, "source").inc(len(page))

    def _to_dlq(self, alert, reason: str, seq: int) -> None:
        if self.metrics:
            self.metrics.dlq_records.labels(self.metrics.pipeline, reason.split(":")[0][:40]).inc()
        record = {"reason": reason, "pipeline": self.cfg.pipeline.name, "received_at": utcnow().isoformat(),
                  "raw": orjson.dumps(alert, option=orjson.OPT_NON_STR_KEYS, default=repr).decode()}
        self.sink.send(self.dlq_topic, None, orjson.dumps(record), self.headers + [("reason", reason.encode())],
                       self._on_done(seq, "dlq"))

    def _on_done(self, seq: int, kind: str):
        def done(ok: bool, exc: Exception | None = None) -> None:
            self.window.done(seq, ok)
            if ok:
                if kind == "dlq":
                    self.summary.dlq += 1
                else:
                    self.summary.published += 1
            else:
                self.summary.delivery_failures += 1
                self.delivery_failed.set()
                log.error("Kafka did not confirm a record (%s): %s", kind, exc)
        return done

    def _commit(self) -> None:
        pos: Position | None = self.window.committable()
        if pos is None or self.dry_run:
            return
        checkpoint = pos.to_checkpoint()
        if checkpoint == self.committed:
            return
        self.store.save(checkpoint)
        self.committed = checkpoint
        self.summary.checkpoint = checkpoint
        self.last_commit = time.monotonic()
        if self.metrics:
            self.metrics.checkpoint_commits.labels(self.metrics.pipeline).inc()
            if pos.created_at:
                self.metrics.checkpoint_ts.labels(self.metrics.pipeline).set(parse_ts(pos.created_at).timestamp())

    # ---- main loop --------------------------------------------------------------------------
    def run(self) -> int:
        checkpoint = None if self.since else self.store.load()
        self.committed = checkpoint
        self.summary.checkpoint = checkpoint
        start_at = parse_start(self.since or self.cfg.source.start_from)
        self.source.resume(checkpoint, start_at)
        log.info("pipeline %s starting from %s", self.cfg.pipeline.name,
                 f"checkpoint {checkpoint}" if checkpoint else f"createdAt >= {start_at.isoformat()}")
        while not self.stop_event.is_set():
            finished = self._session()
            if finished:
                break
            # Kafka failed a delivery: read again from the durable checkpoint
            self.summary.rewinds += 1
            log.warning("rewinding to checkpoint %s after a failed delivery", self.committed)
            self.source.resume(self.committed, start_at)
        self._shutdown()
        return 1 if self.summary.errors else 0

    def _session(self) -> bool:
        """Runs until stopped, finished (--once), or a delivery fails (returns False)."""
        self.window = AckWindow()
        self.delivery_failed = threading.Event()
        pages: queue.Queue = queue.Queue(maxsize=QUEUE_PAGES)
        stop_source = threading.Event()
        poller = threading.Thread(target=self._poll, args=(pages, stop_source), name="source", daemon=True)
        poller.start()
        finished = False
        try:
            while not self.stop_event.is_set() and not self.delivery_failed.is_set():
                try:
                    page = pages.get(timeout=0.5)
                except queue.Empty:
                    self._commit()
                    self._report_ready()
                    continue
                if page is _DONE:
                    finished = True
                    break
                self._process(page)
                self._commit()
                self._report_ready()
        finally:
            stop_source.set()
            poller.join(timeout=self.cfg.tanium.timeout + 5)
        if self.stop_event.is_set():
            # drain what was already fetched, so the checkpoint lands on the last delivered record
            while True:
                try:
                    page = pages.get_nowait()
                except queue.Empty:
                    break
                if page is not _DONE and not self.delivery_failed.is_set():
                    self._process(page)
            return True
        if finished:
            return True
        self.sink.flush(self.cfg.pipeline.shutdown_timeout)
        self._commit()
        return False

    def _shutdown(self) -> None:
        self.sink.flush(self.cfg.pipeline.shutdown_timeout)
        self._commit()
        self.sink.close(5)
        if self.enricher:
            self.enricher.close()
            stats = self.enricher.stats
            self.summary.intel_requests, self.summary.cache_hits = stats["requests"], stats["hits"]
        self.client.close()

    def stop(self) -> None:
        """Graceful: stop polling, drain, flush, commit. If Kafka keeps the drain blocked past
        most of shutdown_timeout, give up on the unsent records (they stay after the checkpoint)."""
        if self.stop_event.is_set():
            return
        self.stop_event.set()
        timer = threading.Timer(0.8 * self.cfg.pipeline.shutdown_timeout, self.sink.stop)
        timer.daemon = True
        timer.start()
