"""Shared fixtures: the real embedded broker (tansu) and helpers to read topics back."""
from __future__ import annotations

import time
import uuid

import pytest
from kafka import KafkaConsumer, TopicPartition

from connector.embedded import EmbeddedBroker


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    log = tmp_path_factory.mktemp("tansu") / "tansu.log"
    with EmbeddedBroker(log=str(log)) as b:
        yield b


@pytest.fixture
def topic_prefix():
    """Unique topic names per test: the session broker is shared."""
    return f"t{uuid.uuid4().hex[:10]}"


def read_topic(bootstrap: str, topic: str, expect: int | None = None, timeout: float = 30,
               isolation_level: str = "read_uncommitted"):
    """Every record of `topic` from the beginning up to its end offsets as seen now; with
    `expect`, keeps reading until that many arrived (or `timeout`)."""
    deadline = time.monotonic() + timeout
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             isolation_level=isolation_level)
    try:
        parts = consumer.partitions_for_topic(topic)
        while not parts and time.monotonic() < deadline:
            time.sleep(0.1)
            parts = consumer.partitions_for_topic(topic)
        if not parts:
            return []
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out = []
        while time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=200).values():
                out.extend(recs)
            if expect is not None:
                if len(out) >= expect:
                    break
            elif all(consumer.position(tp) >= end for tp, end in consumer.end_offsets(tps).items()):
                break
        return out
    finally:
        consumer.close()


@pytest.fixture
def sim():
    """A TR simulator on a free loopback port: 300 alerts over the last hour, 6 IntelDocs, seed 7.
    Faults and injected alerts are per test (`sim.faults`, `sim.inject(...)`)."""
    from connector.simulator import Simulator

    with Simulator(alerts=300, intel_docs=6, seed=7, history=3600) as s:
        yield s
