"""The Kafka producer behind a KafkaSink, alone or shared by the pipelines of one process.

Why share: a process running many pipelines (connector/stream/fleet.py) would otherwise hold a
producer per pipeline, each with its own I/O thread, buffers and broker connections; busy, those
threads take turns at one GIL and the process spends its time switching between them. So the sinks
of at-least-once pipelines whose producer settings are equal share one producer (`acquire`):
equal are the [kafka] connection and security settings, client id, client library, batching,
compression and timeouts, not the topics or `max_unacked`. Each sink keeps all of its own
bookkeeping (its un-acknowledged records and their bound, its callbacks, health and stop), so
sharing changes no delivery rule. Exactly-once pipelines keep a producer each: a
transactional.id is one pipeline's. The Kafka checkpoint stores of a process share another one
(linger 0, since a save waits for its acknowledgement).

What sharing costs: a Kafka error that breaks the producer (kafka-python's idempotent producer treats
any record the broker refuses as fatal, see `broken`) breaks it for every pipeline that shares it.
The next record of any of them replaces it (`renew`); the records the old one held are reported
failed, so those pipelines re-read from their checkpoints: nothing is lost, some records are
delivered twice. A pipeline given its own `kafka.client_id` gets a producer of its own.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from kafka.producer.transaction_manager import TransactionState
from pydantic import SecretStr

from connector.config import KafkaSection
from connector.kafka import close_producer

log = logging.getLogger(__name__)

# the KafkaSection fields a producer is built from (kafka.producer_settings, confluent_settings)
_PRODUCER_FIELDS = (
    "client",
    "bootstrap_servers",
    "client_id",
    "security_protocol",
    "sasl_mechanism",
    "sasl_plain_username",
    "sasl_plain_password",
    "ssl_cafile",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_password",
    "compression",
    "linger_ms",
    "batch_size",
    "delivery_timeout_ms",
    "max_request_size",
)


class Producer:
    """A producer and its users. `producer` is read at each use: `renew` may replace it."""

    def __init__(self, make: Callable[[], Any], key: str | None = None):
        self._make = make
        self.key = key  # None: not shared
        self.producer = make()
        self.users = 1
        self._lock = threading.Lock()

    @property
    def shared(self) -> bool:
        return self.key is not None

    def renew(self, old: Any, why: str) -> None:
        """Replaces `old` by a new producer, unless another user already did (raises SinkError when
        Kafka cannot be reached); the old one's undelivered records are reported failed."""
        with self._lock:
            if self.producer is not old:
                return
            self.producer = self._make()
        log.warning("Kafka producer replaced: the old one %s; its undelivered records are reported failed", why)
        close_producer(old, 0)


def broken(producer: Any) -> str | None:
    """Why a (kafka-python, non-transactional) producer can deliver nothing any more, or None.
    Two dead ends of kafka-python 3.0.12's idempotent producer: any non-retriable batch error (the
    broker refused a record: too large, invalid, not authorised) is classified fatal, so it fails
    every later record; and a batch that expired after it was sent makes it drop its producer id
    without ever asking for a new one, so it holds every later record. (A transactional producer is
    replaced by the pipeline after its abort fails; librdkafka's is replaced by ConfluentProducer.)"""
    tm = getattr(producer, "_transaction_manager", None)
    if tm is None or tm.is_transactional():
        return None
    if tm.has_fatal_error():
        return f"failed fatally ({tm.last_error})"
    if not tm.has_producer_id() and tm._current_state == TransactionState.READY:
        return "lost its producer id"
    return None


_lock = threading.Lock()
_shared: dict[str, Producer] = {}


def _key(kafka: KafkaSection, extra: tuple) -> str:
    # a different password is a different producer; the key is a digest so no secret sits in it
    values = [getattr(kafka, name) for name in _PRODUCER_FIELDS]
    plain = [v.get_secret_value() if isinstance(v, SecretStr) else v for v in values]
    return hashlib.sha256(repr((extra, plain)).encode()).hexdigest()


def acquire(kafka: KafkaSection, make: Callable[[], Any], *extra: Any) -> Producer:
    """The process's producer for these settings and `extra` (what `make` sets beyond them, e.g.
    the sinks' max_block_ms, or "checkpoint"), made by `make()` if there is none yet."""
    key = _key(kafka, extra)
    with _lock:  # held while a first producer starts: a second user waits for it instead of making its own
        p = _shared.get(key)
        if p is None:
            p = _shared[key] = Producer(make, key)
        else:
            p.users += 1
        return p


def release(p: Producer, timeout: float) -> None:
    """One user less; the last one closes the producer within about `timeout` seconds."""
    with _lock:
        p.users -= 1
        last = p.users == 0
        if last and p.key is not None:
            del _shared[p.key]
    if last:
        close_producer(p.producer, timeout)
