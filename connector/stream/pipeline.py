"""The stream pipeline: the one place where source → enrich → normalize → sink → checkpoint meet.

Threads: a source thread fetches pages into a small bounded queue while this thread enriches,
normalizes and publishes the previous page, so the stages overlap. Memory stays bounded: at most
QUEUE_PAGES pages wait, and the sink blocks once `kafka.max_unacked` records are unacknowledged,
which in turn stops the source (back pressure).

Delivery: every record (events and DLQ records alike) enters an AckWindow in read order; the
checkpoint moves only to the last record of the contiguous acknowledged prefix. When Kafka fails
to confirm a record, the pipeline stops reading, rewinds the source to the durable checkpoint and
reads again (at-least-once: records after the checkpoint may repeat, none are lost).

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
from connector.stream.sink import AckWindow, DryRunSink, KafkaSink
from connector.stream.source import Position
from connector.stream.stages import build_stages
from connector.tanium import TaniumClient, TaniumError
from connector.timeutil import parse_start, parse_ts, utcnow

log = logging.getLogger(__name__)

QUEUE_PAGES = 4
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
        stages = build_stages(cfg, self.client, metrics)
        self.source, self.enricher, self.normalizer = stages.source, stages.enricher, stages.normalizer
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
        self.committed: dict | None = None
        self.tanium_ok = False
        self.last_commit = time.monotonic()
        self.window = AckWindow()
        self.delivery_failed = threading.Event()
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
        if not self.tanium_ok:
            return False, "last Tanium call failed"
        if self.sink is None:
            return False, "opening the Kafka producer"
        ok, why = self.sink.health()
        if not ok:
            return False, why
        stale = max(60.0, 3 * self.cfg.tanium.poll_interval)
        if self.window.pending and time.monotonic() - self.last_commit > stale:
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
        if self.metrics:
            self.metrics.ready.labels(self.metrics.pipeline).set(1 if self.readiness()[0] else 0)

    # ---- source thread ----------------------------------------------------------------------
    def _poll(self, pages: queue.Queue, stop: threading.Event) -> None:
        backoff = 1.0
        while not stop.is_set() and self._active():
            self.last_poll = time.monotonic()
            try:
                for page in self.source.cycle():
                    self.tanium_ok = True
                    while not stop.is_set() and self._active():
                        try:
                            pages.put(page, timeout=0.5)
                            break
                        except queue.Full:  # back pressure: Kafka's trouble (/readyz), not a stuck loop
                            self.last_poll = time.monotonic()
                            continue
                    if stop.is_set() or not self._active():
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
    def _records(self, page: list):
        """(position, topic, key, value, headers, kind, created) per record of the page, in read order:
        one per output format of each alert, or one DLQ record; kind is "published" or "dlq";
        `created` is the alert's createdAt on the record that completes a published alert (for the
        freshness histogram), else None."""
        m = self.metrics
        self.summary.fetched += len(page)
        if self.enricher:
            self.enricher.enrich([a for a, _ in page if isinstance(a, dict)])
        prev = None  # position of the previous record of this page
        for alert, pos in page:
            try:
                event = self.normalizer.normalize(alert)
                docs = render_all(self.formats, alert, event, self.format_settings)
                values = [
                    self._fit(doc, serialize(doc)) if fmt == "normalized" else encode(fmt, doc, self.max_value)
                    for fmt, doc in zip(self.formats, docs, strict=True)
                ]
            except NormalizeError as e:
                yield (pos, self.dlq_topic, None, *self._dlq_record(alert, e.reason), "dlq", None)
                prev = pos
                continue
            key = str(event.get("uid") or "").encode() or None
            guid = alert.get("guid")
            guid_key = guid.encode() if isinstance(guid, str) and guid else key
            # Every record of the alert enters the ack window, but only its last one carries the
            # alert's position: the others carry the previous record's (None on a page's first alert,
            # which the checkpoint never moves to), so the checkpoint passes the alert only once all
            # its formats are acknowledged.
            last = len(values) - 1
            created = alert.get("createdAt") if isinstance(alert.get("createdAt"), str) else None
            for i, (fmt, value) in enumerate(zip(self.formats, values, strict=True)):
                topic, headers = self.outputs[fmt]
                at, done = (pos, created) if i == last else (prev, None)
                yield at, topic, key if fmt == "normalized" else guid_key, value, headers, "published", done
            prev = pos
        if m:
            m.records_sent.labels(m.pipeline, "source").inc(len(page))

    def _process(self, page: list) -> None:
        for pos, topic, key, value, headers, kind, created in self._records(page):
            seq = self.window.add(pos)
            self.sink.send(topic, key, value, headers, self._on_done(seq, kind, created))

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
        record = {
            "reason": reason,
            "pipeline": self.cfg.pipeline.name,
            "received_at": utcnow().isoformat(),
            "raw": raw[:DLQ_RAW_MAX],
            "raw_bytes": len(raw),
            "raw_truncated": len(raw) > DLQ_RAW_MAX,
        }
        return orjson.dumps(record), self.headers + [("reason", reason.encode())]

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
            for pos, topic, key, value, headers, kind, created_at in self._records(page):
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

    def _on_done(self, seq: int, kind: str, created_at: str | None):
        def done(ok: bool, exc: Exception | None = None) -> None:
            self.window.done(seq, ok)
            if ok:
                if kind == "dlq":
                    self.summary.dlq += 1
                else:
                    self._freshness(created_at)
                    self.summary.published += 1
            else:
                self.summary.delivery_failures += 1
                self.delivery_failed.set()
                log.error("Kafka did not confirm a record (%s): %s", kind, exc)

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

    def _commit(self) -> None:
        pos: Position | None = self.window.committable()
        if pos is None or self.dry_run or self.exactly_once:
            return
        checkpoint = pos.to_checkpoint()
        if checkpoint == self.committed:
            return
        self.store.save(checkpoint)
        self._committed(checkpoint, pos)

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
        self.start_at = parse_start(self.since or self.cfg.source.start_from)
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
        start_at = self.start_at
        self.source.resume(checkpoint, start_at)
        log.info(
            "pipeline %s starting from %s",
            self.cfg.pipeline.name,
            f"checkpoint {checkpoint}" if checkpoint else f"createdAt >= {start_at.isoformat()}",
        )
        while not self.stop_event.is_set() and self._active():
            finished = self._session()
            if finished:
                return True
            if self.stop_event.is_set() or not self._active():
                break
            # Kafka failed a delivery: read again from the durable checkpoint
            self.summary.rewinds += 1
            if self.exactly_once:  # the last committed transaction's checkpoint, as Kafka has it
                loaded, ok = self._reload()
                if not ok:
                    break
                if loaded is not None:
                    self.committed = loaded
            log.warning("rewinding to checkpoint %s after a failed delivery", self.committed)
            self.source.resume(self.committed, start_at)
        return self.stop_event.is_set()

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
                if self.election.is_leader or time.monotonic() < until:
                    try:
                        self._commit()
                    except CheckpointError as e:
                        log.error("HA: the checkpoint of the last term was not saved: %s", e)
            try:
                sink.close(0)
            except Exception as e:  # noqa: BLE001 (the producer of a finished term)
                log.debug("closing the producer of the last term: %s", e)
        self.window = AckWindow()

    def _session(self) -> bool:
        """Runs until stopped, finished (--once), or a delivery fails (returns False)."""
        self.window = AckWindow()
        self.delivery_failed = threading.Event()
        pages: queue.Queue = queue.Queue(maxsize=QUEUE_PAGES)
        stop_source = threading.Event()
        poller = threading.Thread(target=self._poll, args=(pages, stop_source), name="source", daemon=True)
        poller.start()
        finished = False
        process = self._process_tx if self.exactly_once else self._process
        try:
            while not self.stop_event.is_set() and not self.delivery_failed.is_set() and self._active():
                try:
                    page = pages.get(timeout=0.5)
                except queue.Empty:
                    self._commit()
                    self._report_ready()
                    continue
                if page is _DONE:
                    finished = True
                    break
                process(page)
                self._commit()
                self._report_ready()
        finally:
            stop_source.set()
            poller.join(timeout=self.cfg.tanium.timeout + 5)
        if self.stop_event.is_set() and self.exactly_once:
            return True  # every processed page is committed; what waits is re-read next time
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
        if not self._active():
            return False  # lost the HA lead: no checkpoint from here on
        if not self.exactly_once:
            self.sink.flush(self.cfg.pipeline.shutdown_timeout)
            self._commit()
        return False

    def _shutdown(self) -> None:
        if self.sink is not None:
            if not self.exactly_once and self._active():
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
        timer = threading.Timer(0.8 * self.cfg.pipeline.shutdown_timeout, self._stop_sink)
        timer.daemon = True
        timer.start()

    def _stop_sink(self) -> None:
        if self.sink is not None:
            self.sink.stop()
