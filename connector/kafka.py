"""Kafka client settings and the producer factory every part of the connector uses (the sink, the
checkpoint store, the HA election, validation, check, bench): one place for security settings,
bounded start-up, and the partitioner that places keyed records as the Java client does."""

from __future__ import annotations

import logging
import random
import struct
import threading
from collections.abc import Callable
from typing import Any

from kafka import KafkaProducer, codec
from kafka.errors import KafkaError, KafkaTimeoutError, ProducerFencedError
from kafka.partitioner.abc import Partitioner

from connector.config import KafkaSection

log = logging.getLogger(__name__)

_COMPRESSION = {"none": None, "gzip": "gzip", "snappy": "snappy", "lz4": "lz4", "zstd": "zstd"}
_EXTRA_PACKAGE = {
    "snappy": ("python-snappy", codec.has_snappy),
    "lz4": ("lz4", codec.has_lz4),
    "zstd": ("zstandard", codec.has_zstd),
}


class SinkError(Exception):
    """The sink cannot work (Kafka unreachable at start, unusable settings); str() is for the user."""


class ProducerFenced(SinkError):
    """Another producer initialised the same transactional id: this one may never write again.
    Replacing it would fence the other in turn, so the owner stops writing instead."""


# error codes that mean "a newer producer with this transactional id exists": the broker's
# PRODUCER_FENCED and librdkafka's _FENCED. Not INVALID_PRODUCER_EPOCH: a broker also answers that
# after aborting a transaction that outlived transaction.timeout.ms, which the clients recover from
# (kafka-python turns a real fence found that way into ProducerFencedError, librdkafka into _FENCED).
FENCED_CODES = frozenset({ProducerFencedError.errno, -144})


def is_fenced(error: BaseException | None) -> bool:
    """True when `error` (or what it wraps) says another producer took over the transactional id:
    kafka-python's ProducerFencedError, or a librdkafka error (ConfluentError) with one of
    FENCED_CODES."""
    seen = 0
    while error is not None and seen < 5:
        if isinstance(error, ProducerFencedError):
            return True
        if getattr(error, "code", None) in FENCED_CODES:
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def client_settings(kafka: KafkaSection) -> dict:
    """Connection and security settings shared by every kafka-python client of the connector."""
    out: dict[str, Any] = {
        "bootstrap_servers": list(kafka.bootstrap_servers),
        "client_id": kafka.client_id,
        "security_protocol": kafka.security_protocol,
    }
    if kafka.sasl_mechanism:
        out["sasl_mechanism"] = kafka.sasl_mechanism
        out["sasl_plain_username"] = kafka.sasl_plain_username
        if kafka.sasl_plain_password is not None:
            out["sasl_plain_password"] = kafka.sasl_plain_password.get_secret_value()
    for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        if getattr(kafka, name):
            out[name] = getattr(kafka, name)
    if kafka.ssl_password is not None:
        out["ssl_password"] = kafka.ssl_password.get_secret_value()
    return out


_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """The Java client's murmur2 (as kafka-python's, same results) at half its cost: the 4-byte words
    are unpacked in one call instead of assembled byte by byte."""
    length = len(data)
    h = 0x9747B28C ^ length
    n = length >> 2
    if n:
        for k in struct.unpack_from(f"<{n}I", data):
            k = (k * _M) & _MASK
            h = ((h * _M) & _MASK) ^ (((k ^ (k >> 24)) * _M) & _MASK)
    rest = length & 3
    if rest:
        base = length - rest
        if rest == 3:
            h ^= data[base + 2] << 16
        if rest >= 2:
            h ^= data[base + 1] << 8
        h = ((h ^ data[base]) * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    return h ^ (h >> 15)


class KeyPartitioner(Partitioner):
    """kafka-python's DefaultPartitioner (keyed records: murmur2 of the key, as the Java client, so
    a key lands where every other client puts it; no key: a random available partition) without
    its per-record costs: it built a set of every topic name and hashed in pure Python byte by byte
    (~10 µs of ~100 µs per record on the send path)."""

    def partition(self, topic, key, serialized_key, value, serialized_value, cluster):
        parts = cluster.partitions_for_topic(topic)
        if parts is None:
            raise ValueError(f"Topic {topic} not found in ClusterMetadata")
        if serialized_key is None:
            available = cluster.available_partitions_for_topic(topic)
            return random.choice(sorted(available or parts))
        if len(parts) == 1:
            for p in parts:
                return p
        ordered = sorted(parts)
        return ordered[(murmur2(serialized_key) & 0x7FFFFFFF) % len(ordered)]


def describe_servers(kafka: KafkaSection) -> str:
    return f"{','.join(kafka.bootstrap_servers)} ({kafka.security_protocol})"


def check_timeouts(kafka: KafkaSection) -> None:
    if kafka.delivery_timeout_ms < kafka.linger_ms + 1000:
        raise SinkError(
            f"kafka.delivery_timeout_ms = {kafka.delivery_timeout_ms} must be at least "
            f"kafka.linger_ms + 1000 (= {kafka.linger_ms + 1000})"
        )


def producer_settings(kafka: KafkaSection, transactional_id: str | None = None, max_block_ms: int = 10000) -> dict:
    check_timeouts(kafka)
    if kafka.compression in _EXTRA_PACKAGE and not _EXTRA_PACKAGE[kafka.compression][1]():
        raise SinkError(
            f"kafka.compression = {kafka.compression!r} needs the Python package "
            f"{_EXTRA_PACKAGE[kafka.compression][0]!r}, which is not installed; install it "
            "or use 'gzip' or 'none'"
        )
    return {
        **client_settings(kafka),
        # explicit, so kafka-python raises on a conflicting setting instead of silently
        # dropping idempotence
        "acks": "all",
        "enable_idempotence": True,
        "transactional_id": transactional_id,
        "compression_type": _COMPRESSION[kafka.compression],
        "linger_ms": kafka.linger_ms,
        # a batch is one record batch to the broker, which refuses one over its message.max.bytes
        # (matched by max_request_size)
        "batch_size": min(kafka.batch_size, kafka.max_request_size),
        "delivery_timeout_ms": kafka.delivery_timeout_ms,
        "max_request_size": kafka.max_request_size,
        # kafka-python requires delivery_timeout >= linger + request_timeout
        "request_timeout_ms": min(30000, kafka.delivery_timeout_ms - kafka.linger_ms),
        # bounds send() waiting for topic metadata, and start-up waiting for a broker
        "max_block_ms": max_block_ms,
        "bootstrap_timeout_ms": max_block_ms,
        "metrics_enabled": False,
        "partitioner": KeyPartitioner(),
    }


def bounded_start(make: Callable[[], object], kafka: KafkaSection, seconds: float):
    """`make()` (a kafka-python client constructor) with a deadline. kafka-python 3.0.12 bounds the
    TCP connect and the API-version exchange by bootstrap_timeout_ms, but not a TLS handshake that
    never completes (security_protocol SSL against a plaintext listener, a hung TLS terminator):
    the constructor would wait forever. A client that arrives after the deadline is closed."""
    lock = threading.Lock()
    finished = threading.Event()
    state: dict = {"abandoned": False}

    def run():
        try:
            client, error = make(), None
        except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread)
            client, error = None, e
        with lock:
            if not state["abandoned"]:
                state["client"], state["error"] = client, error
                finished.set()
                return
        if client is not None:
            try:
                client.close()  # type: ignore[attr-defined]  # every kafka-python client has close()
            except Exception:  # noqa: BLE001 (nobody is waiting for it any more)
                pass

    threading.Thread(target=run, name="kafka-start", daemon=True).start()
    finished.wait(seconds)
    with lock:
        if not finished.is_set():
            state["abandoned"] = True
            raise SinkError(
                f"cannot reach Kafka at {describe_servers(kafka)}: no answer within {seconds:g}s "
                "while connecting (a TLS handshake that never completes looks like this: check that "
                "kafka.security_protocol matches the listener, and the port)"
            )
    if state["error"] is not None:
        raise state["error"]
    return state["client"]


def close_producer(producer, timeout: float) -> None:
    """Closes a producer within about `timeout` seconds. kafka-python's close() flushes first and
    raises instead of force-closing when records are stuck (Kafka unreachable): then its I/O thread
    is forced down, giving those records up, so the process can exit."""
    try:
        producer.close(timeout)
    except KafkaTimeoutError:
        sender = getattr(producer, "_sender", None)
        if sender is not None:
            sender.force_close()
            sender.join(1.0)
        try:  # now it can mark itself closed (else its __del__ complains later)
            producer.close(0)
        except KafkaError:
            pass
    except KafkaError as e:
        log.warning("closing the Kafka producer: %s", e)


def make_producer(kafka: KafkaSection, **overrides) -> KafkaProducer:
    """A KafkaProducer with the connector's settings; start-up failures become SinkError."""
    settings = {
        **producer_settings(kafka, overrides.pop("transactional_id", None), overrides.pop("max_block_ms", 10000)),
        **overrides,
    }
    try:
        return bounded_start(lambda: KafkaProducer(**settings), kafka, settings["max_block_ms"] / 1000 + 5)
    except KafkaTimeoutError:
        raise SinkError(
            f"cannot reach Kafka at {describe_servers(kafka)}: no broker answered within "
            f"{settings['max_block_ms'] / 1000:g}s (check kafka.bootstrap_servers, "
            "kafka.security_protocol and the SASL/SSL settings)"
        ) from None
    except (KafkaError, RuntimeError, ValueError, OSError) as e:
        raise SinkError(f"cannot start the Kafka producer for {describe_servers(kafka)}: {e}") from None
