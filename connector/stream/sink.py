"""Kafka sink (kafka-python producer, or librdkafka's with kafka.client = "confluent": see
confluent.py), the confirmation window and the dry-run sink. The producer itself may be shared
with other pipelines of the process (producers.py); everything below is per sink.

Back pressure: kafka-python queues records without any bound (no buffer memory limit since
2.1.5), so the sink counts records handed to the producer and not yet acknowledged; `send`
blocks while `kafka.max_unacked` are outstanding. A stalled broker therefore stops the caller
instead of growing memory.

Every `send` ends in exactly one `on_done(ok, exc)` call: from kafka-python's callback or
errback (on its I/O thread, so keep on_done short), or at once when the record could not be
handed over (producer error, stop, timeout), or from `close()` for records Kafka never
answered. `ok=False` always means "not known to be delivered": the checkpoint must not pass it.
on_done must not call send(): on the I/O thread a full window would block it for good.

`AckWindow` turns those out-of-order outcomes into a checkpoint position: the last record of
the contiguous prefix (in send order) that Kafka confirmed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TextIO

from kafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError

from connector.config import KafkaSection
from connector.gate import CPU
from connector.kafka import ProducerFenced, SinkError, describe_servers, is_fenced, make_producer
from connector.metrics import NO_METRICS, Metrics
from connector.stream import producers

log = logging.getLogger(__name__)

OnDone = Callable[[bool, "Exception | None"], None]


class SinkStopped(Exception):
    """The record was not delivered because the sink is stopping or closed."""


class _Record:
    """A record handed to the producer; its bound methods are kafka-python's callback and errback."""

    __slots__ = ("sink", "seq", "topic", "on_done", "t0")

    def __init__(self, sink: KafkaSink, topic: str, on_done: OnDone):
        self.sink, self.seq, self.topic, self.on_done, self.t0 = sink, -1, topic, on_done, 0.0

    def acked(self, _metadata) -> None:
        self.sink._complete(self.seq, True, None)

    def failed(self, exc: Exception) -> None:
        self.sink._complete(self.seq, False, exc)

    def outcome(self, ok: bool, exc: Exception | None) -> None:  # ConfluentProducer's report
        self.sink._complete(self.seq, ok, exc)


class KafkaSink:
    """One idempotent (optionally transactional) producer with a bound on un-acknowledged records;
    a kafka-python producer that went broken (see `_broken`) is replaced at the next record.

    `stall_after`: seconds without any acknowledgement while records wait before `healthy`
    turns false (a broker that stopped answering is noticed long before delivery_timeout_ms).
    `shared`: use the process's producer for these settings (producers.py; not with a
    transactional_id).
    """

    def __init__(
        self,
        kafka: KafkaSection,
        metrics: Metrics = NO_METRICS,
        transactional_id: str | None = None,
        *,
        stall_after: float = 10.0,
        max_block_ms: int = 10000,
        shared: bool = False,
    ):
        self.kafka = kafka
        self.metrics = metrics
        self.transactional_id = transactional_id
        self.stall_after = stall_after
        self._max = kafka.max_unacked
        self._cond = threading.Condition()
        self._pending: dict[int, _Record] = {}
        self._seq = 0
        self._blocked = 0
        self._stopping = False
        self._closed = False
        self._known_topics: set[str] = set()  # topics a record was handed over for (metadata known)
        self._failed_since_flush = 0
        self._last_ack = time.monotonic()
        self._last_fail: float | None = None
        self._busy_since = 0.0
        self._last_error = ""
        # label lookups cost more than the increments: once here, not per record
        p = metrics.pipeline
        self._m_received = metrics.records_received.labels(p, "sink")
        self._m_sent = metrics.records_sent.labels(p, "sink")
        # read when scraped: no gauge update per record
        metrics.inflight.labels(p).set_function(lambda: len(self._pending))
        self._m_produce = metrics.produce_duration.labels(p)
        if kafka.client == "confluent":
            from connector.stream.confluent import ConfluentProducer

            def make() -> Any:
                return ConfluentProducer(kafka, transactional_id, max_block_ms)

            self._produce = self._produce_confluent
        else:

            def make() -> Any:
                return make_producer(kafka, transactional_id=transactional_id, max_block_ms=max_block_ms)

            self._produce = self._produce_kafka_python
        # see producers.py: the pipelines of a process share one, unless transactional
        shared = shared and not transactional_id
        self._handle = producers.acquire(kafka, make, max_block_ms) if shared else producers.Producer(make)
        if transactional_id:
            try:
                # fences any older producer with the same id and aborts its open transaction
                self._producer.init_transactions()
            except KafkaError as e:
                producers.release(self._handle, 0)
                raise SinkError(
                    f"cannot initialise Kafka transactions (transactional_id "
                    f"{transactional_id!r}) on {describe_servers(kafka)}: {e}"
                ) from None
            log.info(
                "transactional producer ready (transactional.id %r); any older one with this id is fenced",
                transactional_id,
            )

    # -- sending ---------------------------------------------------------------------------

    def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: list[tuple[str, bytes]],
        on_done: OnDone,
        timeout: float | None = None,
    ) -> bool:
        """Hand one record to Kafka; blocks while `max_unacked` records are outstanding.

        Returns True when the producer took the record (on_done follows later), False when it
        did not (on_done(False, exc) has already been called): the sink is stopping, `timeout`
        seconds passed without room, or the producer refused the record.
        """
        rec = _Record(self, topic, on_done)
        self._m_received.inc()
        if len(self._pending) < self._max:  # (a hint: only this sink's sender adds records)
            refused = self._admit(rec, timeout)
        else:
            with CPU.outside():  # waiting for Kafka: no CPU slot held meanwhile (connector/gate.py)
                refused = self._admit(rec, timeout)
        if refused is not None:
            self._notify(rec, False, refused)
            return False
        try:
            if topic in self._known_topics:
                self._produce(topic, key, value, headers, rec)
            else:  # the first record to a topic may wait up to max_block_ms for its metadata
                with CPU.outside():
                    self._produce(topic, key, value, headers, rec)
                self._known_topics.add(topic)
        except Exception as e:  # noqa: BLE001 (metadata timeout, record too large, closed producer, bad types)
            log.warning("Kafka refused a record for topic %s: %s", topic, e)
            self._known_topics.discard(topic)
            self._complete(rec.seq, False, e)
            return False
        return True

    def _admit(self, rec: _Record, timeout: float | None) -> Exception | None:
        """Waits for room and takes `rec` into the pending records; or why it cannot."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._blocked += 1
            try:
                while len(self._pending) >= self._max and not self._stopping:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        break
                    self._cond.wait(left)
            finally:
                self._blocked -= 1
            if self._stopping:
                return SinkStopped("the sink is closing; record not sent")
            if len(self._pending) >= self._max:
                return KafkaTimeoutError(f"no room among {self._max} un-acknowledged records within {timeout}s")
            rec.seq = self._seq
            self._seq += 1
            rec.t0 = time.monotonic()
            if not self._pending:
                self._busy_since = rec.t0
            self._pending[rec.seq] = rec
            return None

    def _produce_kafka_python(self, topic: str, key, value: bytes, headers, rec: _Record) -> None:
        if self._broken():
            self._renew()
        future = self._producer.send(topic, value=value, key=key, headers=headers)
        future.add_callback(rec.acked)
        future.add_errback(rec.failed)

    def _produce_confluent(self, topic: str, key, value: bytes, headers, rec: _Record) -> None:
        self._producer.produce(topic, key, value, headers, rec.outcome)

    @property
    def _producer(self) -> Any:
        return self._handle.producer

    def _broken(self) -> str | None:
        """Why the producer can deliver nothing any more (producers.broken), or None."""
        return None if self.transactional_id else producers.broken(self._producer)

    def _renew(self) -> None:
        """A new producer in place of a broken one (SinkError when Kafka cannot be reached)."""
        old = self._producer
        why = producers.broken(old)
        if why is not None:
            self._handle.renew(old, why)

    def _complete(self, seq: int, ok: bool, exc: Exception | None) -> None:
        # dict.pop is atomic: of kafka's callback and close()'s give-up, the one that pops the record
        # reports it, so exactly once. A success takes the lock only to wake a waiter: a send()
        # waiting for room counted itself in _blocked (under the lock, before it looked for room),
        # and a flush() waits for _pending to empty.
        rec = self._pending.pop(seq, None)
        if rec is None:  # already failed by close()
            return
        now = time.monotonic()
        if ok:
            self._last_ack = now
            if self._blocked or not self._pending:
                with self._cond:
                    self._cond.notify_all()
            self._m_produce.observe(now - rec.t0)
        else:
            with self._cond:
                self._last_fail = now
                self._failed_since_flush += 1
                self._last_error = f"{type(exc).__name__}: {exc}"
                self._cond.notify_all()
        self._notify(rec, ok, exc)

    def _notify(self, rec: _Record, ok: bool, exc: Exception | None) -> None:
        m = self.metrics
        if ok:
            self._m_sent.inc()
        elif not isinstance(exc, SinkStopped):  # giving up at shutdown is not a Kafka failure
            m.delivery_failures.labels(m.pipeline, rec.topic).inc()
        try:
            rec.on_done(ok, exc)
        except Exception:
            log.exception("delivery callback failed")

    # -- state -----------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Records sent and not yet acknowledged or failed."""
        with self._cond:
            return len(self._pending)

    @property
    def blocked(self) -> int:
        """Callers currently inside send() (waiting for room, or just passing through)."""
        with self._cond:
            return self._blocked

    def health(self) -> tuple[bool, str]:
        """(ok, reason): false after a failed delivery not followed by a success, while records
        wait and Kafka acknowledged nothing for `stall_after` seconds, or while the producer is
        broken (then its waiting records are failed at once: it would hold them for good; the
        next record gets a new producer)."""
        broken = self._broken()
        if broken:
            self._give_up(KafkaConnectionError(f"the Kafka producer {broken}"))
            return False, f"the Kafka producer {broken}; the next record gets a new one"
        with self._cond:
            now = time.monotonic()
            if self._last_fail is not None and self._last_fail >= self._last_ack:
                return False, f"last Kafka delivery failed ({self._last_error})"
            if self._pending and now - max(self._last_ack, self._busy_since) > self.stall_after:
                return False, (
                    f"Kafka acknowledged nothing for {now - max(self._last_ack, self._busy_since):.0f}s "
                    f"with {len(self._pending)} records waiting"
                )
            return True, "kafka ok"

    @property
    def healthy(self) -> bool:
        return self.health()[0]

    def stop(self) -> None:
        """Give up on sending: wakes every send() blocked on back pressure; they and later sends
        return False with on_done(False, SinkStopped). A graceful shutdown instead stops feeding
        the sink, then flush(), commit the checkpoint, close()."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Send lingering records and wait for all outcomes. True when nothing is pending and no
        delivery failed since the previous flush()."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            # a shared producer's flush would also wait for the other pipelines' records; this
            # sink's own ones leave within linger_ms anyway
            if not self._handle.shared:
                self._producer.flush(timeout)
        except KafkaTimeoutError:
            pass
        except KafkaError as e:
            log.warning("Kafka flush failed: %s", e)
        with self._cond:
            self._cond.wait_for(
                lambda: not self._pending, None if deadline is None else max(0.0, deadline - time.monotonic())
            )
            ok = not self._pending and not self._failed_since_flush
            self._failed_since_flush = 0
        return ok

    def close(self, timeout: float | None = 30) -> None:
        """Stop, flush for up to `timeout` seconds, close the producer; records still without an
        answer then get on_done(False, SinkStopped). A second close() does nothing."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
        self.stop()
        deadline = time.monotonic() + (timeout if timeout is not None else 30)
        drained = self.flush(max(0.0, deadline - time.monotonic()))
        self._give_up(SinkStopped("closed before Kafka acknowledged the record"))  # before the producer's own errors
        producers.release(self._handle, max(0.0, deadline - time.monotonic()) if drained else 0)

    def _give_up(self, exc: Exception) -> None:
        """Every record still waiting gets on_done(False, exc)."""
        with self._cond:
            left = list(self._pending)
        for seq in left:
            self._complete(seq, False, exc)

    # -- transactions (exactly-once mode) --------------------------------------------------

    @property
    def fenced(self) -> bool:
        """True once Kafka said a newer producer took over this sink's transactional id (then every
        later transaction call raises ProducerFenced)."""
        if self.kafka.client == "confluent":
            return self._producer.fenced
        # kafka-python keeps the fatal error in its transaction manager; its later calls only
        # raise a generic KafkaError that names it
        return is_fenced(getattr(getattr(self._producer, "_transaction_manager", None), "last_error", None))

    def begin(self) -> None:
        self._require_tx()
        try:
            self._producer.begin_transaction()
        except KafkaError as e:
            raise self._tx_error("begin", e) from e

    def commit(self, records: Sequence[tuple[str, bytes | None, bytes]] = (), timeout: float = 60) -> None:
        """Write `records` (e.g. the checkpoint, see KafkaCheckpointStore.record) inside the open
        transaction, then commit it. Raises SinkError if the commit failed or did not finish
        within `timeout` seconds; then abort() (or exit: a restarted producer aborts it). Raises
        ProducerFenced (a SinkError), here and from begin() and abort(), once another producer
        initialised the same transactional id: this one can never write again."""
        self._require_tx()
        for topic, key, value in records:
            try:
                self._producer.send(topic, value=value, key=key)
            except KafkaError as e:
                raise self._tx_error(f"write to {topic}", e) from e
        self._run_bounded(self._tx_call("commit_transaction", timeout), "commit", timeout)

    def abort(self, timeout: float = 60) -> None:
        self._require_tx()
        self._run_bounded(self._tx_call("abort_transaction", timeout), "abort", timeout)

    def _tx_call(self, name: str, timeout: float) -> Callable[[], None]:
        fn = getattr(self._producer, name)
        if self.kafka.client == "confluent":  # librdkafka takes the bound itself, so no call outlives it
            return lambda: fn(timeout)
        return fn

    def _require_tx(self) -> None:
        if not self.transactional_id:
            raise SinkError("transactions need a KafkaSink created with a transactional_id")

    def _tx_error(self, what: str, error: BaseException) -> SinkError:
        if self.fenced or is_fenced(error):
            return ProducerFenced(
                f"another producer took over transactional.id {self.transactional_id!r}: this one was "
                f"fenced (Kafka refused its transaction {what})"
            )
        return SinkError(f"Kafka transaction {what} failed: {type(error).__name__}: {error}")

    def _run_bounded(self, fn: Callable[[], None], what: str, timeout: float) -> None:
        # kafka-python waits for commit/abort without a time limit; a black-holed broker must
        # not hang the pipeline, so run it aside and give up after `timeout`
        err: list[BaseException] = []

        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread)
                err.append(e)

        t = threading.Thread(target=run, name=f"kafka-{what}", daemon=True)
        t.start()
        t.join(timeout)
        if t.is_alive():
            if self.fenced:
                raise self._tx_error(what, TimeoutError())
            raise SinkError(f"Kafka transaction {what} did not finish within {timeout:g}s")
        if err:
            raise self._tx_error(what, err[0]) from err[0]


class AckWindow:
    """Confirmation window: which position the checkpoint may advance to.

    `add(position, final)` (or `add_page` for several) in send order returns a sequence number;
    `done(seq, ok)` in any order; `committable()` is the position of the last final record of the
    contiguous prefix of successful acknowledgements (an alert published in several formats is
    several records of one position, and only its last is final: the checkpoint passes the alert
    once all of them are confirmed). A failed record stays at the head for good: the checkpoint never
    passes it (the pipeline re-reads from the checkpoint with a new window). Sequence numbers start at
    0 in every window, so an outcome must reach the window its record was added to: the pipeline binds
    each record's callback to its session's window.

    Records not yet passed are three parallel lists indexed by seq - base (no object or dict entry
    per record); the passed front is cut off once it is the larger half.
    """

    COMPACT_AT = 4096  # passed records kept before the lists are cut

    def __init__(self):
        self._lock = threading.Lock()
        self._base = 0  # seq of the lists' first entry
        self._head = 0  # index of the first record not passed
        self._positions: list = []
        self._finals: list[bool] = []
        self._states: list[bool | None] = []  # None: waiting, True: acknowledged, False: failed
        self._committable: Hashable | None = None
        self._failures = 0

    def add(self, position, final: bool = True) -> int:
        with self._lock:
            self._positions.append(position)
            self._finals.append(final)
            self._states.append(None)
            return self._base + len(self._states) - 1

    def add_page(self, positions: Sequence, finals: Sequence[bool]) -> int:
        """add() of each (position, final) in order; returns the first one's sequence number (the
        others follow it)."""
        with self._lock:
            first = self._base + len(self._states)
            self._positions += positions
            self._finals += finals
            self._states += [None] * len(positions)
            return first

    def done(self, seq: int, ok: bool) -> None:
        with self._lock:
            i, states = seq - self._base, self._states
            if not self._head <= i < len(states) or states[i] is not None:
                raise ValueError(f"AckWindow.done: sequence {seq} is unknown or already done")
            states[i] = bool(ok)
            if not ok:
                self._failures += 1
                return
            if i != self._head:
                return  # behind a gap: the prefix does not move
            end, last_final, finals = len(states), -1, self._finals
            while i < end and states[i] is True:
                if finals[i]:
                    last_final = i
                i += 1
            if last_final >= 0:
                self._committable = self._positions[last_final]
            self._head = i
            if i >= self.COMPACT_AT and 2 * i >= end:
                del self._positions[:i], self._finals[:i], self._states[:i]
                self._base += i
                self._head = 0

    def committable(self):
        """Position of the last record of the acknowledged prefix, or None if there is none."""
        with self._lock:
            return self._committable

    def confirmed(self, seq: int) -> bool:
        """True once record `seq` is in the acknowledged prefix."""
        with self._lock:
            return seq < self._base + self._head

    @property
    def failed(self) -> bool:
        """True once any record failed: the prefix is stuck and the pipeline must re-read."""
        with self._lock:
            return self._failures > 0

    @property
    def pending(self) -> int:
        """Records not yet passed by the prefix (waiting, failed, or acked behind a gap)."""
        with self._lock:
            return len(self._states) - self._head


class DryRunSink:
    """Prints each event's value as one line on `stream` and acknowledges it at once. Records for
    `dlq_topic` are logged (stderr) as warnings instead, so `stream` carries events only. When the
    reader of `stream` goes away (`… | head`), later records are dropped and `on_closed` is called:
    a closed output is a normal end of a dry run."""

    transactional_id = None

    def __init__(
        self,
        stream: TextIO,
        metrics: Metrics = NO_METRICS,
        dlq_topic: str | None = None,
        on_closed: Callable[[], None] | None = None,
    ):
        self.stream = stream
        self.metrics = metrics
        self.dlq_topic = dlq_topic
        self.on_closed = on_closed
        self.closed = False
        self._lock = threading.Lock()

    def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: list[tuple[str, bytes]],
        on_done: OnDone,
        timeout: float | None = None,
    ) -> bool:
        m = self.metrics
        m.records_received.labels(m.pipeline, "sink").inc()
        line = value.decode("utf-8", "replace").replace("\n", " ")
        if topic == self.dlq_topic:
            log.warning("dry run: dead-letter record for %s: %s", topic, line)
        else:
            self._write(line + "\n")
        m.records_sent.labels(m.pipeline, "sink").inc()
        on_done(True, None)
        return True

    def _write(self, text: str) -> None:
        with self._lock:
            if self.closed:
                return
            try:
                self.stream.write(text)
            except BrokenPipeError:
                self._reader_gone()

    def _reader_gone(self) -> None:
        """Called with the lock held when the reader closed the output."""
        self.closed = True
        try:  # the interpreter flushes stdout at exit: let that go to /dev/null, not fail again
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self.stream.fileno())
            os.close(null)
        except (OSError, ValueError):  # not a file (a test's StringIO)
            pass
        log.info("dry run: the reader of the output went away; stopping")
        if self.on_closed:
            self.on_closed()

    pending = 0
    blocked = 0
    healthy = True

    def health(self) -> tuple[bool, str]:
        return True, "dry run"

    def flush(self, timeout: float | None = None) -> bool:
        with self._lock:
            if not self.closed:
                try:
                    self.stream.flush()
                except BrokenPipeError:
                    self._reader_gone()
        return True

    def stop(self) -> None:
        pass

    def close(self, timeout: float | None = None) -> None:
        self.flush()
