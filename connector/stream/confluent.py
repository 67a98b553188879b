"""kafka.client = "confluent": librdkafka's producer (confluent-kafka) for KafkaSink.

Why: kafka-python builds every record batch in Python on the caller's interpreter, about 100 µs of
CPU per 7 KB event under the GIL, which the pipeline's own work (decode, normalize) then waits for;
librdkafka does it in C on its own threads. KafkaSink keeps all its bookkeeping (back pressure,
exactly one on_done per record, health, the AckWindow behind the checkpoint, transactions): this
class only stands in for the part of kafka-python's KafkaProducer the sink calls.

Delivery reports: librdkafka runs callbacks only inside poll(), so a thread of ours polls, as
kafka-python's I/O thread does. Settings map one to one (acks=all, idempotence, linger, batch size,
compression, delivery and request timeouts, security); keyed records are placed by murmur2 as the
Java client and kafka-python place them, so a key lands on the same partition with either client.
Every failure is a `ConfluentError`, a kafka.errors.KafkaError, so callers handle both clients alike.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable

from kafka.errors import KafkaError

from connector.config import KafkaSection
from connector.gate import CPU
from connector.kafka import FENCED_CODES, SinkError, check_timeouts, describe_servers

log = logging.getLogger(__name__)
LIBRDKAFKA_LOG = logging.getLogger("kafka.librdkafka")  # under "kafka": the CLI's level for it applies

Done = Callable[[bool, "Exception | None"], None]


class ConfluentError(KafkaError):
    """A librdkafka error; str() is its name and description."""

    def __init__(self, text: str, code: int | None = None, retriable: bool = False, fatal: bool = False):
        super().__init__(text)
        self.code, self.retriable, self.fatal = code, retriable, fatal

    @classmethod
    def of(cls, err, what: str = "") -> ConfluentError:
        """From a confluent_kafka.KafkaError (or a KafkaException wrapping one)."""
        args = getattr(err, "args", ())  # KafkaException wraps a KafkaError; KafkaError has no args
        err = args[0] if args and hasattr(args[0], "name") else err
        if not hasattr(err, "name"):
            return cls(f"{what}{err}")
        return cls(f"{what}{err.name()}: {err.str()}", err.code(), err.retriable(), err.fatal())


def confluent_settings(kafka: KafkaSection, transactional_id: str | None = None) -> dict:
    """librdkafka settings equivalent to sink.producer_settings (kafka-python)."""
    conf = {
        "bootstrap.servers": ",".join(kafka.bootstrap_servers),
        "client.id": kafka.client_id,
        "security.protocol": kafka.security_protocol.lower(),
        "acks": "all",
        "enable.idempotence": True,
        "compression.type": kafka.compression,
        "linger.ms": kafka.linger_ms,
        "batch.size": min(kafka.batch_size, kafka.max_request_size),  # librdkafka wants batch <= request
        "message.max.bytes": kafka.max_request_size,
        "message.timeout.ms": kafka.delivery_timeout_ms,
        "request.timeout.ms": min(30000, kafka.delivery_timeout_ms - kafka.linger_ms),
        # the sink bounds un-acknowledged records itself; librdkafka's queue must hold them all
        "queue.buffering.max.messages": max(100_000, kafka.max_unacked + 1000),
        # the Java client's (and kafka-python's) placement of keyed records
        "partitioner": "murmur2_random",
        "logger": LIBRDKAFKA_LOG,
    }
    if transactional_id:
        conf["transactional.id"] = transactional_id
        # librdkafka refuses a delivery timeout longer than the transaction timeout
        conf["transaction.timeout.ms"] = max(60000, kafka.delivery_timeout_ms)
    if kafka.sasl_mechanism:
        conf["sasl.mechanism"] = kafka.sasl_mechanism
        conf["sasl.username"] = kafka.sasl_plain_username or ""
        if kafka.sasl_plain_password is not None:
            conf["sasl.password"] = kafka.sasl_plain_password.get_secret_value()
    for ours, theirs in (
        ("ssl_cafile", "ssl.ca.location"),
        ("ssl_certfile", "ssl.certificate.location"),
        ("ssl_keyfile", "ssl.key.location"),
    ):
        if getattr(kafka, ours):
            conf[theirs] = getattr(kafka, ours)
    if kafka.ssl_password is not None:
        conf["ssl.key.password"] = kafka.ssl_password.get_secret_value()
    return conf


_FENCED = (90, 47, -150)  # PRODUCER_FENCED, INVALID_PRODUCER_EPOCH, _FATAL


def _ignore(ok: bool, exc: Exception | None) -> None:
    pass


class ConfluentProducer:
    """The KafkaProducer methods KafkaSink uses, on librdkafka. `produce` reports through `done`."""

    def __init__(self, kafka: KafkaSection, transactional_id: str | None = None, max_block_ms: int = 10000):
        from confluent_kafka import KafkaException, Producer

        check_timeouts(kafka)
        self._kafka_exception = KafkaException
        self._timeout = kafka.delivery_timeout_ms / 1000
        self._transactional = bool(transactional_id)
        self._fatal = False
        self.fenced = False  # a newer producer took over the transactional id (see KafkaSink.fenced)
        self._conf = {**confluent_settings(kafka, transactional_id), "error_cb": self._error}
        self._new = lambda: Producer(self._conf)
        try:
            self._p = self._new()
        except (KafkaException, ValueError, TypeError) as e:
            raise SinkError(
                f"cannot start the Kafka producer (confluent) for {describe_servers(kafka)}: {ConfluentError.of(e)}"
            ) from None
        try:  # as kafka-python's bootstrap: fail at start, not at the first record
            self._p.list_topics(timeout=max_block_ms / 1000)
        except KafkaException:
            self._p.purge()
            raise SinkError(
                f"cannot reach Kafka at {describe_servers(kafka)}: no broker answered within "
                f"{max_block_ms / 1000:g}s (check kafka.bootstrap_servers, kafka.security_protocol "
                "and the SASL/SSL settings)"
            ) from None
        self._closed = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="kafka-confluent-poll", daemon=True)
        self._poller.start()

    def _error(self, err) -> None:
        if err.fatal():
            self._fatal = True
            self.fenced = self.fenced or err.code() in FENCED_CODES
        log.log(logging.ERROR if err.fatal() else logging.DEBUG, "confluent producer: %s", ConfluentError.of(err))

    def _poll(self) -> None:
        while not self._closed.is_set():
            try:
                self._p.poll(0.1)
                if self._fatal and not self._transactional:
                    self._renew()
            except self._kafka_exception as e:
                # poll() raises librdkafka's fatal error (a fenced transactional producer): the
                # transaction calls report it to the sink; keep serving delivery reports meanwhile
                err = ConfluentError.of(e)
                if err.fatal:
                    self._fatal = True
                    self.fenced = self.fenced or err.code in FENCED_CODES
                    self._closed.wait(0.1)
                else:
                    log.warning("confluent producer: %s", err)
            except Exception:  # a failing callback must not stop delivery reports for good
                log.exception("confluent producer: delivery report handling failed")

    def _renew(self) -> None:
        """A fatal error (e.g. the idempotent producer fenced after expired records: a broker
        without KIP-360 epoch bumps answers so) leaves the instance unusable for good; librdkafka's
        advice is a new one. Records still in the old one are reported as not delivered. (A
        transactional producer is replaced by the pipeline instead, after its abort fails.)"""
        old, self._p = self._p, self._new()
        self._fatal = False
        log.warning("confluent producer: replaced after a fatal error; its undelivered records are reported failed")
        old.purge()
        old.poll(0)
        old.close()

    def produce(self, topic: str, key: bytes | None, value: bytes | None, headers: list, done: Done) -> None:
        """Queues one record; `done(ok, exc)` follows from the poll thread. Raises ConfluentError when
        librdkafka refuses the record (then `done` is never called)."""

        def report(err, _msg) -> None:
            if err is not None and err.code() in _FENCED:
                self._fatal = True  # the idempotent producer cannot go on (see _renew)
            done(err is None, None if err is None else ConfluentError.of(err))

        while True:
            try:
                self._p.produce(topic, value, key, headers=headers, on_delivery=report)
                return
            except BufferError:  # librdkafka's queue is full: wait for reports to free it
                if self._closed.is_set():
                    raise ConfluentError("the producer is closed") from None
                with CPU.outside():
                    self._p.poll(0.05)
            except self._kafka_exception as e:
                err = ConfluentError.of(e)
                if err.code is not None and "MSG_SIZE_TOO_LARGE" in str(err):
                    raise ConfluentError(
                        f"the record is {len(value or b'')} bytes, larger than the producer "
                        f"accepts (kafka.max_request_size; {err.args[0]})",
                        err.code,
                    ) from None
                raise err from None

    def send(self, topic: str, value: bytes | None = None, key: bytes | None = None, headers=None) -> None:
        """kafka-python's send() without a future: for records whose outcome the transaction decides."""
        self.produce(topic, key, value, list(headers or []), _ignore)

    def flush(self, timeout: float | None = None) -> None:
        self._p.flush(-1 if timeout is None else max(0.0, timeout))

    def close(self, timeout: float | None = None) -> None:
        """Stops polling; records still queued after `timeout` seconds are dropped (KafkaSink has
        already reported them as not delivered)."""
        if timeout:
            self._p.flush(timeout)
        self._closed.set()
        self._poller.join(5)
        self._p.purge()
        self._p.poll(0)
        with warnings.catch_warnings():  # "abort failed during close": a fenced producer's open transaction
            warnings.simplefilter("ignore", RuntimeWarning)
            self._p.close()

    # -- transactions ----------------------------------------------------------------------------

    def _call(self, what: str, fn, *args) -> None:
        try:
            fn(*args)
        except self._kafka_exception as e:
            err = ConfluentError.of(e, f"{what}: ")
            self.fenced = self.fenced or err.code in FENCED_CODES
            raise err from None

    def init_transactions(self) -> None:
        self._call("init_transactions", self._p.init_transactions, self._timeout)

    def begin_transaction(self) -> None:
        self._call("begin_transaction", self._p.begin_transaction)

    def commit_transaction(self, timeout: float | None = None) -> None:
        self._call("commit_transaction", self._p.commit_transaction, self._timeout if timeout is None else timeout)

    def abort_transaction(self, timeout: float | None = None) -> None:
        self._call("abort_transaction", self._p.abort_transaction, self._timeout if timeout is None else timeout)
