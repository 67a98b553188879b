"""What Kafka already holds for validation (earlier verdicts, published devices): reads kept apart from the runner."""

from __future__ import annotations

import logging
import time

import orjson

from connector.kafka import SinkError, client_settings, murmur2

log = logging.getLogger(__name__)
FINAL = ("detected", "missed")  # the verdicts given once per action id


def key_partition(key: str, partitions) -> int:
    """The partition a record keyed `key` goes to (murmur2, as every client of the connector and the
    Java client place keyed records)."""
    ordered = sorted(partitions)
    return ordered[(murmur2(key.encode("utf-8")) & 0x7FFFFFFF) % len(ordered)]


class VerdictLedger:
    """Which actions already have a verdict on the results topic (the check is described in kafka_runner)."""

    def __init__(self, kafka, topic: str):
        from kafka import KafkaConsumer, TopicPartition

        self._tp = TopicPartition
        self.topic = topic
        self.consumer = KafkaConsumer(**client_settings(kafka), group_id=None, enable_auto_commit=False)

    def published(self, since: dict[str, int], timeout: float = 30) -> set[str]:
        """The action ids among `since` (id → earliest time in ms its verdict can carry) that have
        a detected/missed verdict: reads the partition each id's verdict is keyed to, from that time."""
        parts = self.consumer.partitions_for_topic(self.topic)
        if not parts or not since:
            return set()
        start: dict[int, int] = {}
        for aid, ms in since.items():
            p = key_partition(aid, parts)
            start[p] = max(0, min(start.get(p, ms), ms))
        tps = [self._tp(self.topic, p) for p in sorted(start)]
        self.consumer.assign(tps)
        starts = self.consumer.offsets_for_times({tp: start[tp.partition] for tp in tps})
        ends = self.consumer.end_offsets(tps)
        for tp in tps:
            found = starts.get(tp)
            self.consumer.seek(tp, found.offset if found is not None else ends[tp])
        seen: set[str] = set()
        deadline = time.monotonic() + timeout
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {self.topic} to check for earlier verdicts took over {timeout:.0f}s")
            batch = self.consumer.poll(timeout_ms=200)
            # done only after an empty poll at the end: some brokers (tansu) report the end offset
            # of a multi-record batch too low, so the end offsets alone could stop the scan early
            if not batch and all(self.consumer.position(tp) >= ends[tp] for tp in tps):
                break
            for recs in batch.values():
                for r in recs:
                    key = r.key.decode("utf-8", "replace") if r.key else None
                    if key in since:
                        try:
                            if orjson.loads(r.value).get("result") in FINAL:
                                seen.add(key)
                        except (orjson.JSONDecodeError, AttributeError):
                            pass
        return seen

    def close(self) -> None:
        self.consumer.close()


def known_devices(kafka, topic: str) -> set[str]:
    """The devices published so far: the devices topic (compacted, keyed by device; created if
    missing), read at start so that each device is published once across restarts."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    from connector.stream.checkpoint import CheckpointError, read_committed_log

    admin = KafkaAdminClient(**client_settings(kafka), request_timeout_ms=10000, bootstrap_timeout_ms=10000)
    try:
        brokers = len(admin.describe_cluster().get("brokers") or []) or 1
        admin.create_topics([NewTopic(topic, 1, min(3, brokers), topic_configs={"cleanup.policy": "compact"})])
        log.info("created devices topic %s (compacted)", topic)
    except TopicAlreadyExistsError:
        pass
    finally:
        admin.close()
    try:
        records = read_committed_log(kafka, topic)
    except CheckpointError as e:
        raise SinkError(f"cannot read the devices topic {topic}: {e}") from None
    return {r.key.decode("utf-8", "replace") for r in records if r.key and r.value is not None}
