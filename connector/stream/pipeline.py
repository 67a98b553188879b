"""The stream pipeline: the one place where source → enrich → normalize → sink → checkpoint meet.

Threads: a source thread fetches pages into a small bounded queue while this thread enriches,
normalizes and publishes the previous page, so the stages overlap. Memory stays bounded: at most
QUEUE_PAGES pages wait, and the sink blocks once `kafka.max_unacked` records are unacknowledged,
which in turn stops the source (back pressure).

Delivery: every record (events and DLQ records alike) enters an AckWindow in read order; the
checkpoint moves only to the last record of the contiguous acknowledged prefix. When Kafka fails
to confirm a record, the session ends and a new one reads again from the durable checkpoint
(at-least-once: records after the checkpoint may repeat, none are lost).

Sessions. A session is one pass of reading and delivering from the durable checkpoint; a failed
delivery (a rewind), a new HA term or a restart starts a new one. Design rule: a session owns its
state. A new session builds its own source cursor from the durable checkpoint, its own ack window,
page queue and stop flag; a callback or a page that belongs to an earlier session can neither move
nor confirm anything in the new one. A source thread still inside a slow Tanium request when its
session ends finishes against its own session's objects, which nobody reads any more, so nothing
waits for it (a shutdown is not held up by a hanging request); a Kafka acknowledgement that
arrives late lands in the window of the session that sent the record.

Records Kafka keeps refusing. Rewinds back off exponentially (`pipeline.rewind_backoff` doubling
up to `pipeline.rewind_backoff_max`), so a record that always fails cannot spin the pipeline and
Tanium. A failure that is the record's own (Kafka refused it: too large, invalid, not authorised;
not a timeout or a lost connection) counts as a delivery attempt of that record; after one, the
next session sends the records up to the refused ones one at a time, so a refusal is pinned on
the record itself and not on its batch-mates. After `pipeline.max_delivery_attempts` refusals the
record goes to the dead-letter topic with Kafka's error as the reason. If the dead-letter topic
refuses it too, the pipeline pauses at that record (the checkpoint stays before it, /readyz is
503, an error names the alert and both errors) and keeps retrying at the longest backoff: nothing
is skipped silently.

Checkpoint saves that fail (e.g. the Kafka store during a Kafka outage) are retried with backoff
while the pipeline keeps running and /readyz says why; the checkpoint only lags, so a restart
re-reads more, never less.

Shutdown (`stop()`): reading stops at once, what was already fetched is delivered, and the
checkpoint lands on the last contiguous acknowledged record, all within
`pipeline.shutdown_timeout`; records Kafka has not confirmed by then stay after the checkpoint.

Exactly-once (`pipeline.delivery = "exactly-once"`): each page is one Kafka transaction holding
its events, its DLQ records and the checkpoint of its last record (transactional_id
`tanium-connector.<pipeline name>`, so a restarted instance fences the old one and aborts its
open transaction). A transaction that fails is aborted and the source rewinds to the checkpoint
read back from Kafka, i.e. to the last committed transaction. A producer that Kafka reports fenced
(another instance initialised the same id) is never replaced, since a replacement would fence the
other in turn and the two would take turns for ever: without HA the process exits 1 with one line
naming the transactional id; with HA it stands by until it is elected anew.

HA (`ha.enabled`): the pipeline polls only while connector/stream/leader.py says this process is the
leader; on losing the lead it stops the source and the sink at once and stands by again. Each
term starts from the shared Kafka checkpoint, and ends before another process can lead: with
at-least-once delivery the records already handed to Kafka get their answers and the checkpoint
moves past them within the lease's margin, so the next leader re-reads at most what was still in
flight; with exactly-once delivery no page commits after the step-down.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime

import orjson
from kafka.errors import KafkaError

from connector import __version__
from connector.config import ConfigError
from connector.formats import FORMATS, SCHEMA_VERSIONS, encode, render_all
from connector.formats import Settings as FormatSettings
from connector.kafka import ProducerFenced, SinkError, is_fenced
from connector.stream.checkpoint import CheckpointError, open_store
from connector.stream.leader import LeaderElection, LeaderError, group_id, leader_topic
from connector.stream.normalize import (
    SCHEMA_VERSION,
    NormalizeError,
    serialize,
)
from connector.stream.sink import AckWindow, DryRunSink, KafkaSink, SinkStopped
from connector.stream.source import Position
from connector.stream.stages import build_source, build_stages
from connector.tanium import TaniumClient, TaniumError
from connector.timeutil import parse_start, parse_ts, utcnow

log = logging.getLogger(__name__)

QUEUE_PAGES = 4
CHECKPOINT_TIMEOUT = 30.0  # longest wait for one checkpoint save
CLOSE_RESERVE = 0.5  # seconds of the shutdown budget kept for closing the producer
RECORD_OVERHEAD = 16 * 1024  # key, headers and batch framing, kept free under kafka.max_request_size
DLQ_RAW_MAX = 256 * 1024  # a dead-letter record keeps at most this much of the raw record
_DONE = object()  # source finished (--once)
# an HA leader that steps down stops flushing this long before another process may lead, so that
# the checkpoint it then writes is in Kafka before the next leader reads it
STEP_DOWN_RESERVE = 0.25


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


# librdkafka's names for "the broker was not reached" (kafka-python marks those errors retriable)
_UNREACHED = ("_MSG_TIMED_OUT", "_TIMED_OUT", "_TRANSPORT", "_ALL_BROKERS_DOWN")


def refused(exc: Exception | None) -> bool:
    """True when Kafka refused the record itself (too large, invalid, not authorised): sending it
    again cannot help. False for timeouts, lost connections, Kafka out of reach and a stopping sink."""
    if exc is None or isinstance(exc, (SinkStopped, SinkError)) or getattr(exc, "retriable", False):
        return False
    return not str(exc).startswith(_UNREACHED)


def _error_text(exc: Exception | None) -> str:
    text, name = str(exc), type(exc).__name__
    return text if name in text else f"{name}: {text}"


def _describe(alert, pos: Position) -> str:
    """How log lines and /readyz name a record: its alert id and guid."""
    if isinstance(alert, dict):
        return f"alert id={alert.get('id')!r} guid={alert.get('guid')!r}"
    return f"a {type(alert).__name__} record after position {pos.to_checkpoint()}"


def _sort_key(pos: Position) -> tuple[str, int]:
    return pos.created_at or "", pos.id or 0


@dataclass
class _Failure:
    """A record Kafka did not confirm. `record` is its identity across sessions: its position's
    sort key and how many records before it in the session shared that position."""

    seq: int
    record: tuple
    kind: str
    error: str
    refused: bool


class _Session:
    """One pass of reading and delivering from the durable checkpoint (see "Sessions" above). Its
    source thread and its delivery callbacks touch only this object."""

    def __init__(self, source, started_from: dict | None, careful_until: tuple | None):
        self.source = source
        self.started_from = started_from
        self.window = AckWindow()
        self.pages: queue.Queue = queue.Queue(maxsize=QUEUE_PAGES)
        self.stop = threading.Event()  # the source thread stops reading
        self.failed = threading.Event()  # a delivery failed: the session ends
        # records up to this sort key are sent one at a time (the last session saw refusals there)
        self.careful_until = careful_until
        self.first_refused: _Failure | None = None  # in send order
        self.refused_until: tuple | None = None  # sort key of the last refused record
        self.retry_seq: int | None = None  # where the record under retry was sent in this session
        self._last: Position | None = None
        self._dup = 0
        self._lock = threading.Lock()

    def identity(self, pos: Position) -> tuple:
        """A record's identity across sessions (call in read order): its position's sort key and
        how many records before it in this session had the same position (a record that cannot
        be placed shares the position of the one before it)."""
        self._dup = self._dup + 1 if pos == self._last else 0
        self._last = pos
        return (*_sort_key(pos), self._dup)

    def fail(self, f: _Failure) -> bool:
        """Notes a failed record; True for the session's first failure to arrive."""
        with self._lock:
            first = not self.failed.is_set()
            if f.refused:
                if self.first_refused is None or f.seq < self.first_refused.seq:
                    self.first_refused = f
                if self.refused_until is None or f.record[:2] > self.refused_until:
                    self.refused_until = f.record[:2]
            self.failed.set()
        return first


class _Backoff:
    """Exponential: `initial`, doubling per next() up to `cap`; reset() starts over."""

    def __init__(self, initial: float, cap: float):
        self.initial, self.cap, self._next = initial, cap, initial

    def next(self) -> float:
        wait, self._next = self._next, min(self._next * 2, self.cap)
        return wait

    def reset(self) -> None:
        self._next = self.initial


@dataclass
class _Retry:
    """The record Kafka keeps refusing (kept across sessions by the processing thread)."""

    record: tuple | None = None
    attempts: int = 0
    what: str = ""  # alert id and guid, once the record was read again
    error: str = ""  # the topic's last refusal
    dlq_error: str = ""  # the dead-letter topic's last refusal


class StreamPipeline:
    def __init__(
        self,
        cfg,
        *,
        metrics=None,
        dry_run: bool = False,
        once: bool = False,
        since: str | None = None,
        out=None,
        client=None,
        sink=None,
        store=None,
    ):
        self.cfg = cfg
        self.metrics = metrics
        if metrics:
            metrics.init_from_config(cfg)
        self.dry_run, self.once = dry_run, once
        self.stop_event = threading.Event()
        self.summary = Summary()
        self.client = client or TaniumClient(cfg.tanium, metrics)
        self.exactly_once = cfg.pipeline.delivery == "exactly-once" and not dry_run
        # one id per pipeline: a restarted (or newly elected) instance fences the previous one
        self.transactional_id = f"tanium-connector.{cfg.pipeline.name}" if self.exactly_once else None
        ha = cfg.ha.enabled and not dry_run
        self.topic = cfg.kafka.topic if cfg.kafka else "dry-run"
        self.dlq_topic = cfg.kafka.dlq_topic if cfg.kafka else "dry-run.dlq"
        if sink is None:
            if dry_run:  # events on stdout, DLQ records in the log; a closed stdout ends the run
                sink = DryRunSink(out or sys.stdout, dlq_topic=self.dlq_topic, on_closed=self.stop)
            elif cfg.kafka is None:
                raise ConfigError(
                    f"{cfg.pipeline.name}: the pipeline has no [kafka] section: add one, or use --dry-run"
                )
            elif not ha:  # with HA, each term as leader opens its own sink (see _run_ha)
                sink = self._new_sink()
        self.sink = sink
        self.election = None
        if ha:
            self.election = LeaderElection(
                cfg.kafka,
                leader_topic(cfg.state.topic),
                group_id(cfg.pipeline.name),
                session_timeout_ms=cfg.ha.session_timeout_ms,
                heartbeat_interval_ms=cfg.ha.heartbeat_interval_ms,
                metrics=metrics,
                on_change=self._leadership,
            )
        self.store = store if store is not None else open_store(cfg)
        stages = build_stages(cfg, self.client, metrics)  # each session builds its own source
        self.enricher, self.normalizer = stages.enricher, stages.normalizer
        self.max_value = (cfg.kafka.max_request_size if cfg.kafka else 1024 * 1024) - RECORD_OVERHEAD
        self.headers = [
            ("schema_version", str(SCHEMA_VERSION).encode()),
            ("pipeline", cfg.pipeline.name.encode()),
            ("connector_version", __version__.encode()),
        ]
        # output formats (connector/formats): each alert becomes one record per format, on that
        # format's topic; the standard formats say which they are in a `format` header
        self.formats = cfg.output.formats
        self.format_settings = FormatSettings.of(cfg)
        topics = cfg.kafka.topics if cfg.kafka else {f: f"dry-run.{f}" for f in FORMATS[1:]}
        self.outputs = {"normalized": (self.topic, self.headers)}
        for fmt in FORMATS[1:]:
            version = SCHEMA_VERSIONS[fmt].encode()
            self.outputs[fmt] = (
                topics[fmt],
                [("format", fmt.encode()), ("schema_version", version), *self.headers[1:]],
            )
        self.since = since
        self.start_at = parse_start(since or cfg.source.start_from)
        self.committed: dict | None = None  # the durable checkpoint: what the store last saved
        self.tanium_ok = False
        self.last_commit = time.monotonic()
        self.session: _Session | None = None  # the current one
        self.delivery_failed = threading.Event()  # the current session's failure flag
        self.retry = _Retry()
        self.paused: str | None = None  # why the pipeline waits on a record nobody accepts
        self.save_error: str | None = None  # why the last checkpoint save failed
        p = cfg.pipeline
        self._rewind_backoff = _Backoff(p.rewind_backoff, p.rewind_backoff_max)
        self._save_backoff = _Backoff(1.0, 30.0)
        self._save_after = 0.0  # no checkpoint save before this (monotonic) time
        self._deadline: float | None = None  # set by stop(): the end of the shutdown budget
        self.last_poll = time.monotonic()  # liveness: the poll loop's last sign of progress
        self.fenced: ProducerFenced | None = None  # set when another instance took over the transactional id

    def _new_sink(self) -> KafkaSink:
        return KafkaSink(self.cfg.kafka, self.metrics, transactional_id=self.transactional_id)

    def _active(self) -> bool:
        """False while another process is the HA leader, or once another instance fenced this one's
        transactional producer: then nothing may poll or publish."""
        return self.fenced is None and (self.election is None or self.election.is_leader)

    def _leadership(self, leader: bool) -> None:
        # on the election thread: refuse every further record at once; the processing thread
        # sees _active() turn false and ends the term
        if not leader and self.sink is not None:
            self.sink.stop()

    # ---- health -------------------------------------------------------------------------
    def readiness(self) -> tuple[bool, str]:
        if self.fenced is not None:
            return True, "standing by: another process took over the transactional id"
        if not self._active():
            return True, "standing by: another process is the HA leader"
        if self.paused:
            return False, self.paused
        if self.save_error:
            return False, f"the checkpoint cannot be saved: {self.save_error}"
        if not self.tanium_ok:
            return False, "last Tanium call failed"
        if self.sink is None:
            return False, "opening the Kafka producer"
        ok, why = self.sink.health()
        if not ok:
            return False, why
        stale = max(60.0, 3 * self.cfg.tanium.poll_interval)
        session = self.session
        if session is not None and session.window.pending and time.monotonic() - self.last_commit > stale:
            return False, f"checkpoint has not moved for more than {stale:.0f}s"
        return True, "ready"

    def liveness(self) -> tuple[bool, str]:
        """False when the poll loop has made no progress (a poll attempt, or a wait for the
        processing stage to take a page) for cfg.liveness_bound seconds: the process is stuck and
        must be restarted. A standby (HA) process does not poll and is alive."""
        idle = time.monotonic() - self.last_poll
        bound = self.cfg.liveness_bound
        if self._active() and idle > bound:
            return False, f"no poll attempt for {idle:.0f}s (pipeline.liveness_timeout {bound:g}s)"
        return True, "ok"

    def _report_ready(self) -> None:
        ready = self.readiness()[0]  # also lets the sink notice a producer that went broken
        if self.metrics:
            self.metrics.ready.labels(self.metrics.pipeline).set(1 if ready else 0)

    # ---- source thread ----------------------------------------------------------------------
    def _poll(self, s: _Session) -> None:
        """Reads pages into the session's queue. After the session ended, a page still arriving
        (a slow request) moved only this session's cursor; it is dropped here."""
        backoff = 1.0
        while not s.stop.is_set() and self._active():
            self.last_poll = time.monotonic()
            try:
                for page in s.source.cycle():
                    if s.stop.is_set():
                        return
                    self.tanium_ok = True
                    while not s.stop.is_set() and self._active():
                        try:
                            s.pages.put(page, timeout=0.5)
                            break
                        except queue.Full:  # back pressure: Kafka's trouble (/readyz), not a stuck loop
                            self.last_poll = time.monotonic()
                            continue
                    if s.stop.is_set() or not self._active():
                        return
                self.tanium_ok = True
                backoff = 1.0
                if self.metrics:
                    self.metrics.last_success.labels(self.metrics.pipeline).set(time.time())
                if s.source.hit_limit:
                    continue
                if self.once:
                    s.pages.put(_DONE)
                    return
                s.stop.wait(self.cfg.tanium.poll_interval)
            except TaniumError as e:
                if s.stop.is_set():
                    return  # e.g. the client was closed at shutdown: nobody waits for this session
                self.tanium_ok = False
                log.error("Tanium poll failed: %s", e.message)
                if self.once:
                    self.summary.errors.append(e.message)
                    s.pages.put(_DONE)
                    return
                s.stop.wait(min(backoff, self.cfg.tanium.poll_interval))
                backoff = min(backoff * 2, 300)

    # ---- processing -------------------------------------------------------------------------
    def _records(self, page: list):
        """(alert, position, topic, key, value, headers, kind, final, created) per record of the page, in
        read order: one per output format of each alert, or one DLQ record; kind is "published" or
        "dlq"; `final` marks an alert's last record (the checkpoint may pass the alert only there);
        `created` is the alert's createdAt on that record (for the freshness histogram), else None."""
        m = self.metrics
        self.summary.fetched += len(page)
        if self.enricher:
            self.enricher.enrich([a for a, _ in page if isinstance(a, dict)])
        if m:
            m.records_sent.labels(m.pipeline, "source").inc(len(page))
        for alert, pos in page:
            try:
                event = self.normalizer.normalize(alert)
                docs = render_all(self.formats, alert, event, self.format_settings)
                values = [
                    self._fit(doc, serialize(doc)) if fmt == "normalized" else encode(fmt, doc, self.max_value)
                    for fmt, doc in zip(self.formats, docs, strict=True)
                ]
            except NormalizeError as e:
                yield (alert, pos, self.dlq_topic, None, *self._dlq_record(alert, e.reason), "dlq", True, None)
                continue
            key = str(event.get("uid") or "").encode() or None
            guid = alert.get("guid")
            guid_key = guid.encode() if isinstance(guid, str) and guid else key
            # every record of the alert carries its position, and only the last one is final: the
            # checkpoint passes the alert once all its formats are acknowledged
            last = len(values) - 1
            created = alert.get("createdAt") if isinstance(alert.get("createdAt"), str) else None
            for i, (fmt, value) in enumerate(zip(self.formats, values, strict=True)):
                topic, headers = self.outputs[fmt]
                final = i == last
                fkey = key if fmt == "normalized" else guid_key
                yield alert, pos, topic, fkey, value, headers, "published", final, created if final else None

    def _process(self, s: _Session, page: list) -> None:
        """Hands the page's records to Kafka under session `s`, until a delivery fails. Records up
        to the session's careful_until go one at a time, each waiting for its answer, so that a
        refusal names the very record."""
        r, most = self.retry, self.cfg.pipeline.max_delivery_attempts
        for alert, pos, topic, key, value, headers, kind, final, created in self._records(page):
            if s.failed.is_set():
                return  # the session ends; what follows is read again
            record = s.identity(pos)
            careful = s.careful_until is not None and record[:2] <= s.careful_until
            seq = s.window.add(pos, final)
            if record == r.record:
                s.retry_seq, r.what = seq, _describe(alert, pos)
                if r.attempts >= most and kind == "published":
                    reason = f"kafka: the topic {topic} refused the event {r.attempts} times: {r.error}"
                    topic, key, (value, headers), kind = self.dlq_topic, None, self._dlq_record(alert, reason), "dlq"
                    log.error("%s goes to the dead-letter topic %s: %s", r.what, topic, reason)
            answered = threading.Event() if careful else None
            self.sink.send(topic, key, value, headers, self._on_done(s, seq, kind, record, answered, created))
            if answered is not None:
                self._await(answered)

    def _await(self, answered: threading.Event) -> None:
        """Waits for one record's answer (the sink gives one within delivery_timeout_ms, or at
        once when it stops)."""
        limit = time.monotonic() + (self.cfg.kafka.delivery_timeout_ms / 1000 + 5 if self.cfg.kafka else 5)
        while not answered.wait(0.5) and time.monotonic() < limit and not self.stop_event.is_set():
            pass

    def _fit(self, event: dict, value: bytes) -> bytes:
        """Kafka refuses records over max_request_size, and a refused record would be re-read
        forever: an oversized event goes without `raw` (normalized fields intact, warning noted);
        if even that is too big, NormalizeError sends it to the DLQ."""
        if len(value) <= self.max_value:
            return value
        size = len(value)
        if event.get("raw") is not None:
            event["raw"] = None
            event["normalization_warnings"].append(
                f"raw: left out, the event was {size} bytes and kafka.max_request_size is "
                f"{self.max_value + RECORD_OVERHEAD}"
            )
            value = serialize(event)
        if len(value) > self.max_value:
            raise NormalizeError(
                f"too large: the event is {len(value)} bytes even without raw "
                f"(kafka.max_request_size {self.max_value + RECORD_OVERHEAD})"
            )
        return value

    def _dlq_record(self, alert, reason: str) -> tuple[bytes, list]:
        if self.metrics:
            self.metrics.dlq_records.labels(self.metrics.pipeline, reason.split(":")[0][:40]).inc()
        raw = orjson.dumps(alert, option=orjson.OPT_NON_STR_KEYS, default=repr).decode()
        keep = DLQ_RAW_MAX
        while True:  # as much of raw as Kafka takes (a record over max_request_size is refused every time)
            record = {
                "reason": reason,
                "pipeline": self.cfg.pipeline.name,
                "received_at": utcnow().isoformat(),
                "raw": raw[:keep],
                "raw_bytes": len(raw),
                "raw_truncated": len(raw) > keep,
            }
            value = orjson.dumps(record)
            if len(value) <= self.max_value or not keep:
                return value, self.headers + [("reason", reason.encode())]
            keep //= 2

    # ---- exactly-once -----------------------------------------------------------------------
    def _process_tx(self, page: list) -> None:
        """One transaction: the page's events and DLQ records plus the checkpoint of its last
        record. On a failure the transaction is aborted and delivery_failed set (→ rewind); when
        another producer fenced this one, the pipeline stops writing instead (_stop_writing)."""
        sink, failed, counts, last, created = self.sink, [], {"published": 0, "dlq": 0}, None, []

        def on_done(ok: bool, exc: Exception | None = None) -> None:
            if not ok:
                failed.append(exc)

        try:
            sink.begin()
            for _, pos, topic, key, value, headers, kind, _, created_at in self._records(page):
                last = pos
                counts[kind] += 1
                if created_at:
                    created.append(created_at)
                if not sink.send(topic, key, value, headers, on_done):
                    break
            if failed:
                raise SinkError(f"Kafka did not take a record: {failed[0]}") from failed[0]
            if not self._active():  # stepped down mid-page: nothing of this term commits any more
                self._abort()
                return
            checkpoint = last.to_checkpoint()
            sink.commit(records=[self.store.record(checkpoint)], timeout=self._tx_timeout())
        except (SinkError, CheckpointError, KafkaError) as e:
            if isinstance(e, ProducerFenced) or sink.fenced or is_fenced(e):
                self._stop_writing()
                return
            self.summary.delivery_failures += 1
            if self._active() and not self.stop_event.is_set():
                log.error("Kafka transaction failed, aborting it: %s", e)
            self._abort()
            self.delivery_failed.set()
            return
        for created_at in created:  # a transaction's events are delivered when it commits
            self._freshness(created_at)
        self.summary.published += counts["published"]
        self.summary.dlq += counts["dlq"]
        self._committed(checkpoint, last)

    def _tx_timeout(self) -> float:
        return self.cfg.kafka.delivery_timeout_ms / 1000 + 5

    def _abort(self) -> None:
        try:
            self.sink.abort(timeout=self._tx_timeout())
        except ProducerFenced:
            self._stop_writing()
        except (SinkError, KafkaError) as e:
            # a producer that cannot abort (timed out, broken) is replaced: the new one's
            # init_transactions aborts whatever the old one left open
            log.warning("could not abort the Kafka transaction (%s); opening a new producer", e)
            self._replace_sink()

    def _stop_writing(self) -> None:
        """Another instance initialised our transactional id: it is the writer now, and it aborted
        our open transaction. A new producer of ours would fence it in turn, and the two would take
        turns for ever; so this one stops writing: without HA the process exits (run() raises), with
        HA it stands by until it is elected again (_run_ha)."""
        then = (
            "standing by until elected again"
            if self.election
            else "stopping (run one instance per pipeline, or enable [ha] so that the others stand by)"
        )
        self.fenced = ProducerFenced(
            f"pipeline {self.cfg.pipeline.name}: another instance took over transactional.id "
            f"{self.transactional_id!r} and fenced this one's producer; {then}"
        )
        if self.election is not None:
            log.error("%s", self.fenced)
        self.sink.stop()

    def _replace_sink(self) -> None:
        old, self.sink = self.sink, None
        old.stop()
        try:
            old.close(1)
        except Exception as e:  # noqa: BLE001 (a broken producer; the new one takes over)
            log.debug("closing the old producer: %s", e)
        self.sink = self._open_sink()

    def _open_sink(self) -> KafkaSink | None:
        """A new sink, retried while Kafka refuses; None when stopped or no longer leader."""
        backoff = 1.0
        while not self.stop_event.is_set() and self._active():
            try:
                return self._new_sink()
            except SinkError as e:
                log.error("%s; retrying in %.0fs", e, backoff)
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, 30)
        return None

    def _reload(self) -> tuple[dict | None, bool]:
        """(checkpoint, ok) read back from the store, retried while Kafka fails."""
        backoff = 1.0
        while not self.stop_event.is_set() and self._active():
            try:
                return self.store.load(), True
            except CheckpointError as e:
                log.error("%s; retrying in %.0fs", e, backoff)
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, 30)
        return None, False

    def _on_done(
        self, s: _Session, seq: int, kind: str, record: tuple, answered: threading.Event | None, created_at: str | None
    ):
        """The delivery callback of one record: it reports to the session that sent the record,
        however late it arrives (see "Sessions")."""
        window = s.window

        def done(ok: bool, exc: Exception | None = None) -> None:
            first = False
            if not ok:  # first, so that nothing below can keep the failure from ending the session
                first = s.fail(_Failure(seq, record, kind, _error_text(exc), refused(exc)))
            window.done(seq, ok)
            if ok:
                if kind == "dlq":
                    self.summary.dlq += 1
                else:
                    self._freshness(created_at)
                    self.summary.published += 1
            else:
                self.summary.delivery_failures += 1
                # one line per session: an outage fails every record in flight
                if first and not isinstance(exc, SinkStopped):
                    log.error("Kafka did not confirm a record (%s): %s; the session ends", kind, exc)
            if answered is not None:
                answered.set()

        return done

    def _freshness(self, created_at: str | None) -> None:
        """Observes an event's freshness: seconds from its alert's createdAt to now (its ack)."""
        if self.metrics is None or not created_at:
            return
        try:  # Tanium's form; parse_ts takes any RFC 3339 time but costs 8x on this hot path
            when = datetime.fromisoformat(created_at)
        except ValueError:
            return
        if when.tzinfo is not None:
            self.metrics.freshness.labels(self.metrics.pipeline).observe(time.time() - when.timestamp())

    def _commit(self, s: _Session, timeout: float | None = None) -> None:
        """Saves the checkpoint of session `s`'s acknowledged prefix. A failed save is retried
        after a backoff (the pipeline goes on meanwhile); `timeout` (at shutdown) bounds the save
        and ignores the backoff."""
        pos: Position | None = s.window.committable()
        r = self.retry
        if r.record is not None and (
            (s.retry_seq is not None and s.window.confirmed(s.retry_seq))
            or (pos is not None and _sort_key(pos) > r.record[:2])  # passed it: e.g. Tanium pruned it meanwhile
        ):
            self._retry_done(s)
        if pos is None or self.dry_run or self.exactly_once:
            return
        checkpoint = pos.to_checkpoint()
        if checkpoint == self.committed or (timeout is None and time.monotonic() < self._save_after):
            return
        try:
            self.store.save(checkpoint, timeout=self._save_timeout() if timeout is None else timeout)
        except CheckpointError as e:
            wait = self._save_backoff.next()
            self._save_after = time.monotonic() + wait
            self.save_error = str(e)
            if self.metrics:
                self.metrics.checkpoint_errors.labels(self.metrics.pipeline).inc()
            log.error("%s; the checkpoint stays at %s, next try in %.0fs", e, self.committed, wait)
            return
        if self.save_error:
            log.info("checkpoint saved again (%s)", self.store.location)
            self.save_error = None
            self._save_backoff.reset()
        self._committed(checkpoint, pos)

    def _save_timeout(self) -> float:
        # a save never takes more than half the shutdown budget: a stop arriving meanwhile still
        # leaves time to flush and save the final checkpoint
        return min(CHECKPOINT_TIMEOUT, self.cfg.pipeline.shutdown_timeout / 2)

    def _retry_done(self, s: _Session) -> None:
        """The record under retry is through (to its topic or the dead-letter topic) or gone."""
        if self.paused:
            log.warning("the pipeline is past %s; it goes on", self.retry.what)
        self.retry, self.paused, s.retry_seq = _Retry(), None, None
        self._gauge("paused", 0)

    def _committed(self, checkpoint: dict, pos: Position) -> None:
        self.committed = checkpoint
        self.summary.checkpoint = checkpoint
        self.last_commit = time.monotonic()
        if self.metrics:
            self.metrics.checkpoint_commits.labels(self.metrics.pipeline).inc()
            if pos.created_at:
                self.metrics.checkpoint_ts.labels(self.metrics.pipeline).set(parse_ts(pos.created_at).timestamp())

    # ---- main loop --------------------------------------------------------------------------
    def run(self) -> int:
        if self.election is None:
            self._term()
        else:
            self._run_ha()
        self._shutdown()
        if self.fenced is not None and self.election is None:
            raise self.fenced  # the CLI prints it as the one error line and exits 1
        return 1 if self.summary.errors else 0

    def _term(self) -> bool:
        """Polls and publishes from the durable checkpoint until stopped, finished (--once) or
        the HA lead is lost. True when the pipeline is done (stopped or finished)."""
        self.last_poll = time.monotonic()  # a term starts polling afresh (after an HA standby)
        checkpoint = None if self.since else self.store.load()
        self.since = None  # a later HA term resumes from the shared checkpoint
        self.committed = checkpoint
        self.summary.checkpoint = checkpoint
        log.info(
            "pipeline %s starting from %s",
            self.cfg.pipeline.name,
            f"checkpoint {checkpoint}" if checkpoint else f"createdAt >= {self.start_at.isoformat()}",
        )
        careful = None
        while not self.stop_event.is_set() and self._active():
            s = self._begin_session(careful)
            if self._session(s):
                return True
            if self.stop_event.is_set() or not self._active() or not self._rewind(s):
                break
            careful = s.refused_until  # the next session sends up to there one record at a time
        return self.stop_event.is_set()

    def _begin_session(self, careful_until: tuple | None = None) -> _Session:
        """A new session: its own source cursor from the durable checkpoint, its own window."""
        source = build_source(self.cfg, self.client, self.metrics)
        source.resume(self.committed, self.start_at)
        s = self.session = _Session(source, self.committed, careful_until)
        self.delivery_failed = s.failed
        return s

    def _rewind(self, s: _Session) -> bool:
        """After session `s` failed a delivery: counts the attempt against the record Kafka
        refused, waits out the backoff, and (exactly-once) reloads the checkpoint. False when
        stopped meanwhile."""
        if self.committed != s.started_from:
            self._rewind_backoff.reset()  # the session made progress: not the same failure again
        self._count_attempt(s)
        wait = self._rewind_backoff.cap if self.paused else self._rewind_backoff.next()
        self.summary.rewinds += 1
        if self.metrics:
            self.metrics.rewinds.labels(self.metrics.pipeline).inc()
        log.warning("rewinding to checkpoint %s after a failed delivery; reading again in %.1fs", self.committed, wait)
        self._gauge("rewind_backoff", wait)
        self._wait(wait)
        self._gauge("rewind_backoff", 0)
        if self.stop_event.is_set() or not self._active():
            return False
        if self.exactly_once:  # the last committed transaction's checkpoint, as Kafka has it
            loaded, ok = self._reload()
            if not ok:
                return False
            if loaded is not None:
                self.committed = loaded
        return True

    def _count_attempt(self, s: _Session) -> None:
        """A refusal of the record itself counts as one of its delivery attempts (a timeout or a
        lost connection does not: Kafka was not reached). The dead-letter topic refusing a record
        that is out of attempts pauses the pipeline at it."""
        f = s.first_refused
        if f is None:
            return
        r, most = self.retry, self.cfg.pipeline.max_delivery_attempts
        if f.record != r.record:
            r = self.retry = _Retry(f.record)
        r.attempts += 1
        if f.kind == "dlq":
            r.dlq_error = f.error
        else:
            r.error = f.error
        what = r.what or f"the record after checkpoint {self.committed}"
        if f.kind == "published" and r.attempts < most:
            log.error("Kafka refused %s (attempt %d of %d): %s", what, r.attempts, most, f.error)
        elif f.kind == "published":
            log.error(
                "Kafka refused %s %d times (%s); it goes to the dead-letter topic next", what, r.attempts, f.error
            )
        elif r.attempts >= most:
            topic = f"the topic {self.topic} refused it ({r.error}) and " if r.error else ""
            self.paused = (
                f"paused at {what}: {topic}the dead-letter topic {self.dlq_topic} refused it too "
                f"({r.dlq_error}); the checkpoint stays before it, retrying every "
                f"{self._rewind_backoff.cap:g}s"
            )
            log.error("%s", self.paused)
            self._gauge("paused", 1)
        else:
            log.error("the dead-letter topic refused %s (attempt %d of %d): %s", what, r.attempts, most, f.error)

    def _wait(self, seconds: float) -> None:
        """Sleeps, waking early when stopped or no longer the HA leader."""
        end = time.monotonic() + seconds
        while not self.stop_event.is_set() and self._active() and (left := end - time.monotonic()) > 0:
            self.stop_event.wait(min(left, 0.5))

    def _gauge(self, name: str, value: float) -> None:
        if self.metrics:
            getattr(self.metrics, name).labels(self.metrics.pipeline).set(value)

    def _run_ha(self) -> None:
        try:
            self.election.start()
        except LeaderError as e:
            log.error("%s", e)
            self.summary.errors.append(str(e))
            return
        log.info("HA: pipeline %s waits to be elected (group %s)", self.cfg.pipeline.name, self.election.group)
        fenced_term = None  # the election term in which another instance fenced our producer
        try:
            while not self.stop_event.is_set():
                if not self.election.wait_leader(0.5):
                    self._report_ready()
                    continue
                term = self.election.terms
                if term == fenced_term:
                    # still the group's leader, but another producer owns the transactional id:
                    # write again only once elected anew, never fight over it
                    self._report_ready()
                    self.stop_event.wait(0.5)
                    continue
                self.fenced = None
                # in exactly-once mode this fences the previous leader's producer
                self.sink = self._open_sink()
                if self.sink is None:
                    continue
                done = False
                try:
                    done = self._term()
                except CheckpointError as e:  # Kafka trouble while loading: a new term tries again
                    log.error("%s", e)
                    self.stop_event.wait(1)
                if self.fenced is not None:
                    fenced_term = term
                elif not done and not self._active():
                    log.warning("HA: lost the lead; stopped polling and publishing, standing by")
                self._end_term()  # before leaving the group below: a standby takes over at once
                if done:
                    break
        finally:
            self.election.close()

    def _end_term(self) -> None:
        """Ends a term as leader, leaving the next leader as little to repeat as can be avoided.
        At-least-once: while no other process can have been given the lead yet
        (election.safe_until()), the records already handed to Kafka get their answers and the
        checkpoint moves past the confirmed ones; then the producer closes at once, dropping what
        it had not sent yet (read again after the checkpoint). So the next leader repeats at most
        what was still on the wire (kafka.max_unacked at most). Exactly-once: every page commits or
        aborts in _process_tx and none starts its commit after a step-down; the next leader's
        producer aborts a transaction left open, and fences this one's."""
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.stop()
            if not self.exactly_once:
                until = self.election.safe_until() - STEP_DOWN_RESERVE
                left = min(until - time.monotonic(), self.cfg.pipeline.shutdown_timeout)
                if left > 0:
                    sink.flush(left)
                left = min(until - time.monotonic(), self.cfg.pipeline.shutdown_timeout)
                if self.session is not None and (self.election.is_leader or left > 0):
                    self._commit(self.session, timeout=max(0.1, left))  # a failed save is logged there
            try:
                sink.close(0)
            except Exception as e:  # noqa: BLE001 (the producer of a finished term)
                log.debug("closing the producer of the last term: %s", e)
        self.session = None

    def _session(self, s: _Session) -> bool:
        """Runs session `s` until stopped, finished (--once), or a delivery fails (returns False)."""
        poller = threading.Thread(target=self._poll, args=(s,), name="source", daemon=True)
        poller.start()
        finished = False
        try:
            while not self.stop_event.is_set() and not s.failed.is_set() and self._active():
                try:
                    page = s.pages.get(timeout=0.5)
                except queue.Empty:
                    self._commit(s)
                    self._report_ready()
                    continue
                if page is _DONE:
                    finished = True
                    break
                if self.exactly_once:
                    self._process_tx(page)
                else:
                    self._process(s, page)
                self._commit(s)
                self._report_ready()
        finally:
            # no join: a source thread inside a slow request finishes against this session alone
            s.stop.set()
        if self.stop_event.is_set() and self.exactly_once:
            return True  # every processed page is committed; what waits is re-read next time
        if self.stop_event.is_set():
            # deliver what was already fetched, so the checkpoint lands on the last delivered record
            while not s.failed.is_set():
                try:
                    page = s.pages.get_nowait()
                except queue.Empty:
                    break
                if page is not _DONE:
                    self._process(s, page)
            return True
        if finished:
            return True
        if not self._active():
            return False  # lost the HA lead: no checkpoint from here on
        if not self.exactly_once:
            self.sink.flush(self.cfg.pipeline.shutdown_timeout)
            self._commit(s)
        return False

    def _shutdown(self) -> None:
        """Flush, final checkpoint, close: within what is left of shutdown_timeout after stop()."""
        s = self.session
        if self.sink is not None:
            if not self.exactly_once and self._active() and s is not None:
                self.sink.flush(max(0.0, self._left() - CLOSE_RESERVE))
                self._commit(s, timeout=max(0.1, self._left() - CLOSE_RESERVE))
            self.sink.close(max(0.0, self._left()))
        self.store.close(max(0.0, self._left()))
        if self.enricher:
            self.enricher.close()
            stats = self.enricher.stats
            self.summary.intel_requests, self.summary.cache_hits = stats["requests"], stats["hits"]
        self.client.close()

    def _left(self) -> float:
        """Seconds left of the shutdown budget (all of it when no stop() came, e.g. after --once)."""
        if self._deadline is None:
            return self.cfg.pipeline.shutdown_timeout
        return max(0.0, self._deadline - time.monotonic())

    def stop(self) -> None:
        """Graceful: stop polling, deliver what was fetched, flush, commit, all within
        shutdown_timeout. If Kafka keeps the delivery blocked past most of it, give up on the
        unsent records (they stay after the checkpoint)."""
        if self.stop_event.is_set():
            return
        self._deadline = time.monotonic() + self.cfg.pipeline.shutdown_timeout
        self.stop_event.set()
        timer = threading.Timer(0.8 * self.cfg.pipeline.shutdown_timeout, self._stop_sink)
        timer.daemon = True
        timer.start()

    def _stop_sink(self) -> None:
        if self.sink is not None:
            self.sink.stop()
