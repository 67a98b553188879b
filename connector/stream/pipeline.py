"""The stream pipeline: the one place where source → enrich → normalize → sink → checkpoint meet.

Threads: a source thread fetches pages into a small bounded queue while this thread enriches,
normalizes and publishes the previous page, so the stages overlap. Memory stays bounded: at most
QUEUE_PAGES pages wait (their `details` still Tanium's text: one string per alert, decoded alert by
alert as the page is processed and given back its text once the alert's records are made), and the
sink blocks once `kafka.max_unacked` records are unacknowledged, which in turn stops the source (back
pressure). Processing a page and decoding a Tanium answer take the process's CPU slot
(connector/gate.py), so the pipelines of one process take turns; any wait inside (Kafka's room, an
IntelDoc, one record's answer) steps outside it.

Delivery: every record (events and DLQ records alike, and the update watermark's markers, which
have no Kafka record: stream/updates.py) enters an AckWindow in read order; the checkpoint moves
only to the last record of the contiguous acknowledged prefix. When Kafka fails
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

Shutdown (`stop()`): reading stops at once, the page being processed is handed to Kafka, Kafka's
answers are awaited and the checkpoint lands on the last contiguous acknowledged record, all within
`pipeline.shutdown_timeout`; records Kafka has not confirmed by then stay after the checkpoint, and
so do the pages fetched ahead and not yet sent (the next run, or the pipeline's next owner, reads
them again: sending them would make a stop of many busy pipelines take most of shutdown_timeout).

Exactly-once (`pipeline.delivery = "exactly-once"`): each page is one Kafka transaction with the
checkpoint of its last record; see connector/stream/transactions.py.

HA (`ha.enabled`): the pipeline polls only while this process is the elected leader; see
connector/stream/terms.py.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial

from connector.config import ConfigError
from connector.gate import CPU
from connector.kafka import ProducerFenced
from connector.metrics import NO_METRICS, Metrics
from connector.stream.checkpoint import CheckpointError, open_store
from connector.stream.leader import GroupMember, election_for
from connector.stream.records import Record, RecordMaker
from connector.stream.session import Backoff, Failure, Retry, Session, describe, error_text, refused, sort_key
from connector.stream.sink import DryRunSink, KafkaSink, SinkStopped
from connector.stream.source import Position
from connector.stream.stages import build_source, build_stages
from connector.stream.terms import Terms
from connector.stream.transactions import Transactions
from connector.stream.updates import MARK
from connector.tanium import TaniumClient, TaniumError
from connector.timeutil import parse_start, parse_ts

log = logging.getLogger(__name__)

CHECKPOINT_TIMEOUT = 30.0  # longest wait for one checkpoint save
CLOSE_RESERVE = 0.5  # seconds of the shutdown budget kept for closing the producer
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


class StreamPipeline(Transactions, Terms):
    def __init__(
        self,
        cfg,
        *,
        metrics: Metrics = NO_METRICS,
        dry_run: bool = False,
        once: bool = False,
        since: str | None = None,
        out=None,
        client=None,
        sink=None,
        store=None,
        member: GroupMember | None = None,
    ):
        self.cfg = cfg
        self.metrics = metrics
        metrics.init_from_config(cfg)
        self._m_freshness = metrics.freshness.labels(metrics.pipeline)  # observed per event: looked up once
        self.dry_run, self.once = dry_run, once
        self.stop_event = threading.Event()
        self.summary = Summary()
        self.client = client or TaniumClient(cfg.tanium, metrics)
        self.exactly_once = cfg.pipeline.delivery == "exactly-once" and not dry_run
        # one id per pipeline: a restarted (or newly elected) instance fences the previous one
        self.transactional_id = f"tanium-connector.{cfg.pipeline.name}" if self.exactly_once else None
        elected = (cfg.ha.enabled or cfg.fleet is not None) and not dry_run
        stages = build_stages(cfg, self.client, metrics)  # each session builds its own source
        self.enricher = stages.enricher
        self.records = RecordMaker(cfg, stages.enricher, stages.normalizer, metrics)
        if sink is None:
            if dry_run:  # events on stdout, DLQ records in the log; a closed stdout ends the run
                sink = DryRunSink(out or sys.stdout, dlq_topic=self.records.dlq_topic, on_closed=self.stop)
            elif cfg.kafka is None:
                raise ConfigError(
                    f"{cfg.pipeline.name}: the pipeline has no [kafka] section: add one, or use --dry-run"
                )
            elif not elected:  # when elected, each term as leader opens its own sink (see terms.py)
                sink = self._new_sink()
        self.sink = sink
        self.election = election_for(cfg, metrics, self._leadership, member) if elected else None
        self.term = 0  # the election term being served (terms.py)
        self.store = store if store is not None else open_store(cfg)
        self.since = since
        self.start_at = parse_start(since or cfg.source.start_from)
        self.committed: dict | None = None  # the durable checkpoint: what the store last saved
        self.tanium_ok = False
        self.last_commit = time.monotonic()
        self.session: Session | None = None  # the current one
        self.delivery_failed = threading.Event()  # the current session's failure flag
        self.retry = Retry()
        self.paused: str | None = None  # why the pipeline waits on a record nobody accepts
        self.save_error: str | None = None  # why the last checkpoint save failed
        p = cfg.pipeline
        self._rewind_backoff = Backoff(p.rewind_backoff, p.rewind_backoff_max)
        self._save_backoff = Backoff(1.0, 30.0)
        self._save_after = 0.0  # no checkpoint save before this (monotonic) time
        self._deadline: float | None = None  # set by stop(): the end of the shutdown budget
        self.last_poll = time.monotonic()  # liveness: the poll loop's last sign of progress
        self.fenced: ProducerFenced | None = None  # set when another instance took over the transactional id

    def _new_sink(self) -> KafkaSink:
        # at-least-once: the process's producer for these settings (stream/producers.py)
        return KafkaSink(self.cfg.kafka, self.metrics, transactional_id=self.transactional_id, shared=True)

    def _active(self) -> bool:
        """False while another process is the HA leader, once the term this process leads in has
        ended (even if a new one began: its producer was stopped), or once another instance fenced
        this one's transactional producer: then nothing may poll or publish."""
        e = self.election
        return self.fenced is None and (e is None or (e.is_leader and e.terms == self.term))

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
            if self.election is not None and self.election.refused:
                return True, "refused: not every worker of the fleet has this pipeline file"
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
        self.metrics.ready.labels(self.metrics.pipeline).set(1 if ready else 0)

    # ---- source thread ----------------------------------------------------------------------
    def _poll(self, s: Session) -> None:
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
    def _records(self, page: list) -> list[Record]:
        """The Kafka records of a page, in read order (see connector/stream/records.py)."""
        self.summary.fetched += len(page) - (page[-1][0] is MARK)  # a watermark marker is no alert
        return self.records.records(page)

    def _process(self, s: Session, page: list) -> None:
        """Hands the page's records to Kafka under session `s`, until a delivery fails. Records up
        to the session's careful_until go one at a time, each waiting for its answer, so that a
        refusal names the very record."""
        with CPU.slot():  # connector/gate.py: few threads at a time do CPU work
            self._process_page(s, page)

    def _process_page(self, s: Session, page: list) -> None:
        records = self._records(page)
        if not records:
            return
        # the page's records enter the window together, in read order (a failure ends the session
        # before the rest are sent: they stay behind the failed record, which the prefix never passes)
        first = s.window.add_page([r.position for r in records], [r.final for r in records])
        delivery = _Delivery(self, s, first, records)
        r, most = self.retry, self.cfg.pipeline.max_delivery_attempts
        for i, (alert, pos, topic, key, value, headers, kind, _, _) in enumerate(records):
            if s.failed.is_set():
                return  # the session ends; what follows is read again
            if kind == "mark":  # the update watermark (stream/updates.py): confirmed at once, in order
                s.window.done(first + i, True)
                continue
            record = delivery.idents[i] = s.identity(pos)
            careful = s.careful_until is not None and record[:2] <= s.careful_until
            if record == r.record:
                s.retry_seq, r.what = first + i, describe(alert, pos)
                if r.attempts >= most and kind == "published":
                    reason = f"kafka: the topic {topic} refused the event {r.attempts} times: {r.error}"
                    topic, key, delivery.kinds[i] = self.records.dlq_topic, None, "dlq"
                    value, headers = self.records.dlq_record(alert, reason)
                    log.error("%s goes to the dead-letter topic %s: %s", r.what, topic, reason)
            answered = delivery.answered[i] = threading.Event() if careful else None
            self.sink.send(topic, key, value, headers, partial(delivery.done, i))
            if answered is not None:
                with CPU.outside():
                    self._await(answered)

    def _await(self, answered: threading.Event) -> None:
        """Waits for one record's answer (the sink gives one within delivery_timeout_ms, or at
        once when it stops)."""
        limit = time.monotonic() + (self.cfg.kafka.delivery_timeout_ms / 1000 + 5 if self.cfg.kafka else 5)
        while not answered.wait(0.5) and time.monotonic() < limit and not self.stop_event.is_set():
            pass

    def _freshness(self, created_at: str | None) -> None:
        """Observes an event's freshness: seconds from its alert's createdAt to now (its ack)."""
        if not created_at:
            return
        try:  # Tanium's form; parse_ts takes any RFC 3339 time but costs 8x on this hot path
            when = datetime.fromisoformat(created_at)
        except ValueError:
            return
        if when.tzinfo is not None:
            self._m_freshness.observe(time.time() - when.timestamp())

    def _commit(self, s: Session, timeout: float | None = None) -> None:
        """Saves the checkpoint of session `s`'s acknowledged prefix. A failed save is retried
        after a backoff (the pipeline goes on meanwhile); `timeout` (at shutdown) bounds the save
        and ignores the backoff."""
        pos: Position | None = s.window.committable()
        r = self.retry
        if r.record is not None and (
            (s.retry_seq is not None and s.window.confirmed(s.retry_seq))
            or (pos is not None and sort_key(pos) > r.record[:2])  # passed it: e.g. Tanium pruned it meanwhile
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

    def _retry_done(self, s: Session) -> None:
        """The record under retry is through (to its topic or the dead-letter topic) or gone."""
        if self.paused:
            log.warning("the pipeline is past %s; it goes on", self.retry.what)
        self.retry, self.paused, s.retry_seq = Retry(), None, None
        self._gauge("paused", 0)

    def _committed(self, checkpoint: dict, pos: Position) -> None:
        self.committed = checkpoint
        self.summary.checkpoint = checkpoint
        self.last_commit = time.monotonic()
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

    def _begin_session(self, careful_until: tuple | None = None) -> Session:
        """A new session: its own source cursor from the durable checkpoint, its own window."""
        source = build_source(self.cfg, self.client, self.metrics)
        source.resume(self.committed, self.start_at)
        s = self.session = Session(source, self.committed, careful_until)
        self.delivery_failed = s.failed
        return s

    def _rewind(self, s: Session) -> bool:
        """After session `s` failed a delivery: counts the attempt against the record Kafka
        refused, waits out the backoff, and (exactly-once) reloads the checkpoint. False when
        stopped meanwhile."""
        if self.committed != s.started_from:
            self._rewind_backoff.reset()  # the session made progress: not the same failure again
        self._count_attempt(s)
        wait = self._rewind_backoff.cap if self.paused else self._rewind_backoff.next()
        self.summary.rewinds += 1
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

    def _count_attempt(self, s: Session) -> None:
        """A refusal of the record itself counts as one of its delivery attempts (a timeout or a
        lost connection does not: Kafka was not reached). The dead-letter topic refusing a record
        that is out of attempts pauses the pipeline at it."""
        f = s.first_refused
        if f is None:
            return
        r, most = self.retry, self.cfg.pipeline.max_delivery_attempts
        if f.record != r.record:
            r = self.retry = Retry(f.record)
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
            topic = f"the topic {self.records.topic} refused it ({r.error}) and " if r.error else ""
            self.paused = (
                f"paused at {what}: {topic}the dead-letter topic {self.records.dlq_topic} refused it too "
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
        getattr(self.metrics, name).labels(self.metrics.pipeline).set(value)

    def _session(self, s: Session) -> bool:
        """Runs session `s` until stopped, finished (--once), or a delivery fails (returns False)."""
        poller = threading.Thread(target=self._poll, args=(s,), name=f"source {self.cfg.pipeline.name}", daemon=True)
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
        if self.stop_event.is_set():
            return True  # pages only fetched lie after the checkpoint: the next run reads them again
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


class _Delivery:
    """The delivery callbacks of one page's records sent in one session: one object per page, the
    callback of record i is done(i, ...). It reports to the session that sent the records, however
    late it arrives (see "Sessions")."""

    __slots__ = ("pipe", "s", "first", "kinds", "created", "idents", "answered")

    def __init__(self, pipe: StreamPipeline, s: Session, first: int, records: list[Record]):
        self.pipe, self.s, self.first = pipe, s, first
        self.kinds = [r.kind for r in records]  # a record can turn into a DLQ record as it is sent
        self.created = [r.created for r in records]
        self.idents: list[tuple] = [()] * len(records)  # set as each record is sent
        self.answered: list[threading.Event | None] = [None] * len(records)

    def done(self, i: int, ok: bool, exc: Exception | None = None) -> None:
        s, pipe, seq, kind = self.s, self.pipe, self.first + i, self.kinds[i]
        first = False
        if not ok:  # first, so that nothing below can keep the failure from ending the session
            first = s.fail(Failure(seq, self.idents[i], kind, error_text(exc), refused(exc)))
        s.window.done(seq, ok)
        if ok:
            if kind == "dlq":
                pipe.summary.dlq += 1
            else:
                pipe._freshness(self.created[i])
                pipe.summary.published += 1
        else:
            pipe.summary.delivery_failures += 1
            # one line per session: an outage fails every record in flight
            if first and not isinstance(exc, SinkStopped):
                log.error("Kafka did not confirm a record (%s): %s; the session ends", kind, exc)
        answered = self.answered[i]
        if answered is not None:
            answered.set()
