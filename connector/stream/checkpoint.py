"""Checkpoint stores: where a pipeline's durable position lives between runs.

The checkpoint is a JSON object from the pipeline (a source Position: {"created_at", "id",
"offset"}, with update tracking also `updates`, the watermark of connector/stream/updates.py); the
store adds `saved_at`. The stores themselves treat it as opaque; open_store()
wraps them in a PositionStore whose load() rejects a checkpoint with a missing or wrong field.
Two backends:
- file: one JSON file per pipeline in `state.path`, replaced atomically (temp file in the same
  directory, fsync, rename, fsync of the directory), so a crash leaves the old or the new
  checkpoint, never a torn one.
- kafka: a compacted single-partition topic keyed by pipeline name, so any machine can resume
  the pipeline; `load()` reads to the end offset (read_committed) and keeps the last value.

Exactly-once mode writes the checkpoint inside the pipeline's Kafka transaction, so the store
must never return a checkpoint of an aborted transaction. A broker hides those from
read_committed consumers through the `aborted_transactions` list of its Fetch answer; tansu
0.6.0 leaves that list empty, although it does write the COMMIT/ABORT markers into the log; and
after a producer is fenced during a network outage its last stable offset can stay behind
transactions that did commit, stalling read_committed fetches. `read_committed_log` therefore
reads the whole log and decides from the markers themselves (a transactional batch counts once
its producer's next marker of the same epoch is COMMIT), which is what a broker's index encodes,
so it is right on any broker.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError, for_code
from kafka.protocol.consumer.fetch import FetchRequest
from kafka.record.memory_records import MemoryRecords

from connector.config import ConfigError, KafkaSection
from connector.kafka import SinkError, client_settings, describe_servers, make_producer
from connector.stream import producers
from connector.stream.source import Position
from connector.stream.updates import Watermark
from connector.timeutil import format_ts, utcnow

log = logging.getLogger(__name__)


class CheckpointError(Exception):
    """A checkpoint cannot be read or written; str() names the file or topic and what to do."""


class CheckpointStore(Protocol):
    location: str

    def load(self) -> dict | None: ...

    def save(self, checkpoint: dict, timeout: float | None = None) -> None: ...

    def close(self, timeout: float = 5) -> None: ...


def _encode(checkpoint: dict) -> dict:
    if not isinstance(checkpoint, dict):
        raise TypeError(f"a checkpoint must be a dict, not {type(checkpoint).__name__}")
    return {**checkpoint, "saved_at": format_ts(utcnow())}


class FileCheckpointStore:
    def __init__(self, path: str | os.PathLike, pipeline: str):
        if not pipeline or pipeline in (".", "..") or "/" in pipeline or os.sep in pipeline:
            raise ValueError(f"pipeline name {pipeline!r} cannot be used as a file name")
        self.dir = Path(path)
        self.pipeline = pipeline
        self.file = self.dir / f"{pipeline}.json"
        self.location = f"file {self.file}"

    def load(self) -> dict | None:
        try:
            text = self.file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(
                f"cannot read checkpoint file {self.file}: {getattr(e, 'strerror', None) or e}"
            ) from None
        try:
            data = json.loads(text)
        except ValueError as e:
            data, why = None, f"not valid JSON ({e})"
        else:
            why = f"expected a JSON object, found {type(data).__name__}"
        if not isinstance(data, dict):
            raise CheckpointError(
                f"checkpoint file {self.file} is corrupt: {why}; fix it, or delete it to "
                "start again from source.start_from"
            )
        return data

    def save(self, checkpoint: dict, timeout: float | None = None) -> None:
        """Replaces the file atomically (`timeout` is for the interface: a local write is not bounded)."""
        text = json.dumps(_encode(checkpoint), indent=2, sort_keys=True) + "\n"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{self.pipeline}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.file)
            except BaseException:
                with suppress(OSError):
                    os.unlink(tmp)
                raise
            # the rename itself is durable only once the directory entry is on disk
            dfd = os.open(self.dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            raise CheckpointError(f"cannot write checkpoint file {self.file}: {e.strerror or e}") from None

    def close(self, timeout: float = 5) -> None:
        pass


class KafkaCheckpointStore:
    """`transactional`: checkpoints are written inside Kafka transactions (exactly-once mode);
    load() then decides from the log's transaction markers (read_committed_log)."""

    def __init__(
        self, kafka: KafkaSection, topic: str, pipeline: str, timeout: float = 30, transactional: bool = False
    ):
        self.kafka = kafka
        self.transactional = transactional
        self.topic = topic
        self.pipeline = pipeline
        self.key = pipeline.encode("utf-8")
        self.timeout = timeout
        self.location = f"kafka topic {topic} key {pipeline!r}"
        self._producer: producers.Producer | None = None
        self._topic_ready = False

    def _where(self) -> str:
        return f"checkpoint topic {self.topic} on {describe_servers(self.kafka)}"

    def ensure_topic(self) -> None:
        """Create the topic (compacted, 1 partition) if it is missing; warn if it exists uncompacted."""
        if self._topic_ready:
            return
        try:
            admin = KafkaAdminClient(
                **client_settings(self.kafka),
                request_timeout_ms=int(self.timeout * 1000),
                bootstrap_timeout_ms=int(self.timeout * 1000),
            )
        except (KafkaError, OSError) as e:
            raise CheckpointError(f"cannot reach Kafka for the {self._where()}: {e}") from None
        try:
            brokers = len(admin.describe_cluster().get("brokers") or []) or 1
            try:
                admin.create_topics(
                    [NewTopic(self.topic, 1, min(3, brokers), topic_configs={"cleanup.policy": "compact"})]
                )
                log.info("created checkpoint topic %s (compacted)", self.topic)
            except TopicAlreadyExistsError:
                policy = self.cleanup_policy(admin)
                if policy is not None and "compact" not in policy:
                    log.warning(
                        "checkpoint topic %s has cleanup.policy=%s, not compact: retention may "
                        "delete the latest checkpoint",
                        self.topic,
                        policy,
                    )
        except KafkaError as e:
            raise CheckpointError(f"cannot prepare the {self._where()}: {e}") from None
        finally:
            admin.close()
        self._topic_ready = True

    def cleanup_policy(self, admin: KafkaAdminClient) -> str | None:
        res = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, self.topic)], config_filter="all")
        entry = res.get("topic", {}).get(self.topic, {}).get("cleanup.policy")
        return entry.get("value") if entry else None

    def load(self) -> dict | None:
        self.ensure_topic()
        last = self._last_committed() if self.transactional else self._last_read()
        if last is None or last.value is None:  # never saved, or a tombstone (reset)
            return None
        try:
            data = json.loads(last.value)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise CheckpointError(
                f"the checkpoint for {self.pipeline!r} at offset {last.offset} of the "
                f"{self._where()} is not a JSON object; save a new one or delete it"
            )
        return data

    def _last_committed(self) -> LogRecord | None:
        try:
            records = read_committed_log(self.kafka, self.topic, self.timeout)
        except CheckpointError as e:
            raise CheckpointError(f"cannot read the {self._where()}: {e}") from None
        return next((r for r in reversed(records) if r.key == self.key), None)

    def _last_read(self):
        deadline = time.monotonic() + self.timeout
        try:
            consumer = KafkaConsumer(
                **client_settings(self.kafka),
                group_id=None,
                enable_auto_commit=False,
                isolation_level="read_committed",
                request_timeout_ms=int(self.timeout * 1000) + 1000,
                bootstrap_timeout_ms=int(self.timeout * 1000),
                fetch_max_wait_ms=100,
            )
        except (KafkaError, OSError) as e:
            raise CheckpointError(f"cannot reach Kafka to read the {self._where()}: {e}") from None
        last = None
        try:
            parts = consumer.partitions_for_topic(self.topic)
            while not parts and time.monotonic() < deadline:
                time.sleep(0.1)
                parts = consumer.partitions_for_topic(self.topic)
            if not parts:
                raise CheckpointError(f"the {self._where()} has no partitions")
            tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            end = consumer.end_offsets(tps)
            while any(consumer.position(tp) < end[tp] for tp in tps):
                if time.monotonic() > deadline:
                    raise CheckpointError(f"reading the {self._where()} did not reach its end within {self.timeout:g}s")
                for records in consumer.poll(timeout_ms=200).values():
                    for r in records:
                        if r.key == self.key:
                            last = r
        except KafkaError as e:
            raise CheckpointError(f"cannot read the {self._where()}: {e}") from None
        finally:
            consumer.close()
        return last

    def record(self, checkpoint: dict) -> tuple[str, bytes, bytes]:
        """(topic, key, value) of this checkpoint, for KafkaSink.commit(records=…) in exactly-once mode."""
        self.ensure_topic()
        return self.topic, self.key, json.dumps(_encode(checkpoint), sort_keys=True).encode("utf-8")

    def save(self, checkpoint: dict, timeout: float | None = None) -> None:
        """Writes the checkpoint and waits for Kafka's acknowledgement (up to `timeout` seconds,
        default the store's); raises CheckpointError if not. The stores of a process share one
        producer (stream/producers.py). A record of a failed save may still land later, before any
        later save's (one partition, one idempotent producer: in order). A producer gone broken
        (kafka-python's, after a record expired in flight, holds every later one) is replaced
        before the next save."""
        wait = self.timeout if timeout is None else timeout
        topic, key, value = self.record(checkpoint)
        try:
            if self._producer is None:
                # bounded by this save's wait too: opening it means reaching Kafka
                block = max(1, int(wait * 1000))
                self._producer = producers.acquire(
                    self.kafka, lambda: make_producer(self.kafka, linger_ms=0, max_block_ms=block), "checkpoint"
                )
            producer = self._producer.producer
            if why := producers.broken(producer):  # e.g. a save's record expired in flight: it would hold the rest
                self._producer.renew(producer, why)
                producer = self._producer.producer
            producer.send(topic, key=key, value=value).get(timeout=wait)
        except SinkError as e:
            raise CheckpointError(f"cannot save the checkpoint: {e}") from None
        except KafkaError as e:
            raise CheckpointError(
                f"saving the checkpoint to the {self._where()} failed: {type(e).__name__}: {e}"
            ) from None

    def close(self, timeout: float = 5) -> None:
        if self._producer is not None:
            producers.release(self._producer, timeout)
            self._producer = None


@dataclass(frozen=True)
class LogRecord:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list


_ABORT, _COMMIT = 0, 1
_FETCH_BYTES = 32 * 1024 * 1024


def read_committed_log(kafka: KafkaSection, topic: str, timeout: float = 30) -> list[LogRecord]:
    """Every non-transactional record of `topic` and every record of a committed transaction, in
    (partition, offset) order. Records of transactions still open are left out (a broker's
    read_committed consumer would also hold back what follows them until they end).

    Reads raw record batches (kafka-python's protocol classes, through an admin client's
    connection) and applies the transaction markers found in the log; see the module docstring
    for why the broker's own filtering is not trusted."""
    deadline = time.monotonic() + timeout
    try:
        admin = KafkaAdminClient(
            **client_settings(kafka), request_timeout_ms=int(timeout * 1000), bootstrap_timeout_ms=int(timeout * 1000)
        )
    except (KafkaError, OSError) as e:
        raise CheckpointError(f"cannot reach Kafka at {describe_servers(kafka)} to read {topic}: {e}") from None
    try:
        meta = admin.describe_topics([topic])[0]
        if meta["error_code"]:
            raise CheckpointError(
                f"cannot read topic {topic} on {describe_servers(kafka)}: {for_code(meta['error_code']).__name__}"
            )
        out: list[LogRecord] = []
        for part in sorted(meta["partitions"], key=lambda p: p["partition_index"]):
            out.extend(_read_partition(admin, topic, part["partition_index"], part["leader_id"], deadline))
        return out
    except KafkaError as e:
        raise CheckpointError(f"cannot read topic {topic} on {describe_servers(kafka)}: {e}") from None
    finally:
        admin.close()


def _read_partition(
    admin: KafkaAdminClient, topic: str, partition: int, leader: int, deadline: float
) -> list[LogRecord]:
    FT = FetchRequest.FetchTopic
    offset = 0
    # producer id -> [(epoch, records)] written since that producer's last marker
    open_tx: dict[int, list[tuple[int, list[LogRecord]]]] = {}
    done: list[LogRecord] = []
    while True:
        if time.monotonic() > deadline:
            raise CheckpointError(f"reading {topic}[{partition}] did not reach its end in time")
        req = FetchRequest(
            # min_bytes=1: tansu answers min_bytes=0 with no partition at all
            replica_id=-1,
            max_wait_ms=50,
            min_bytes=1,
            max_bytes=_FETCH_BYTES,
            isolation_level=0,  # to the high watermark: the markers decide, not the broker's LSO
            session_id=0,
            session_epoch=-1,
            forgotten_topics_data=[],
            rack_id="",
            max_version=11,
            topics=[
                FT(
                    topic=topic,
                    partitions=[
                        FT.FetchPartition(
                            partition=partition,
                            fetch_offset=offset,
                            partition_max_bytes=_FETCH_BYTES,
                            log_start_offset=-1,
                            current_leader_epoch=-1,
                        )
                    ],
                )
            ],
        )

        async def fetch():
            return await admin._manager.send(req, node_id=leader)  # noqa: B023 (awaited at once)

        resp = admin._manager.run(fetch)
        data = next((p for t in resp.responses for p in t.partitions if p.partition_index == partition), None)
        if data is None:  # tansu leaves out a partition that has nothing to send
            return sorted(done, key=lambda r: r.offset)
        if data.error_code:
            err = for_code(data.error_code)
            if err.__name__ == "OffsetOutOfRangeError" and offset == 0:
                offset = max(0, data.log_start_offset)  # compaction/retention moved the start
                continue
            raise CheckpointError(f"reading {topic}[{partition}] at offset {offset}: {err.__name__}")
        records = MemoryRecords(data.records) if data.records else None
        batches = 0
        while records is not None and (batch := records.next_batch()) is not None:
            batches += 1
            offset = batch.next_offset
            if batch.is_control_batch:
                commit = int.from_bytes(next(iter(batch)).key[2:4], "big") == _COMMIT
                epoch, keep = batch.producer_epoch, []
                for e, rows in open_tx.pop(batch.producer_id, []):
                    if e > epoch:
                        keep.append((e, rows))
                    elif e == epoch and commit:
                        done.extend(rows)
                    # an older epoch was fenced: its writes never commit
                if keep:
                    open_tx[batch.producer_id] = keep
                continue
            rows = [LogRecord(partition, r.offset, r.key, r.value, list(r.headers)) for r in batch]
            if batch.is_transactional:
                open_tx.setdefault(batch.producer_id, []).append((batch.producer_epoch, rows))
            else:
                done.extend(rows)
        if not batches:
            # the end of the log; what is still open is not committed
            return sorted(done, key=lambda r: r.offset)


class PositionStore:
    """A pipeline's store: load() also checks that the checkpoint is a source Position, so a
    hand-edited checkpoint with a missing or wrong field is a CheckpointError naming it."""

    def __init__(self, store: CheckpointStore):
        self.store = store
        self.location = store.location

    def load(self) -> dict | None:
        data = self.store.load()
        if data is not None:
            try:
                Position.from_checkpoint(data)
                if "updates" in data:
                    Watermark.from_checkpoint(data["updates"])
            except ValueError as e:
                raise CheckpointError(
                    f"the checkpoint in {self.location} is invalid: {e}; fix it, or delete it to start "
                    "again from source.start_from"
                ) from None
        return data

    def save(self, checkpoint: dict, timeout: float | None = None) -> None:
        self.store.save(checkpoint, timeout)

    def record(self, checkpoint: dict) -> tuple[str, bytes, bytes]:
        """The checkpoint as a Kafka record, for a transaction (Kafka store only)."""
        return self.store.record(checkpoint)  # type: ignore[attr-defined]  # the Kafka store: exactly-once needs it

    def close(self, timeout: float = 5) -> None:
        self.store.close(timeout)


def open_store(cfg) -> CheckpointStore:
    """The checkpoint store chosen by cfg.state for pipeline cfg.pipeline.name."""
    if cfg.state.backend == "kafka":
        if cfg.kafka is None:
            raise ConfigError('state.backend = "kafka" needs a [kafka] section with bootstrap_servers')
        return PositionStore(
            KafkaCheckpointStore(
                cfg.kafka, cfg.state.topic, cfg.pipeline.name, transactional=cfg.pipeline.delivery == "exactly-once"
            )
        )
    return PositionStore(FileCheckpointStore(cfg.state.path, cfg.pipeline.name))
