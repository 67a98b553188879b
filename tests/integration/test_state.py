"""Checkpoint stores: file (atomic replace, clear errors) and Kafka (compacted topic, any machine
resumes), and open_store's backend choice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from kafka import KafkaAdminClient, KafkaProducer

from connector.config import ConfigError, KafkaSection, parse_pipeline
from connector.stream.checkpoint import (
    CheckpointError,
    FileCheckpointStore,
    KafkaCheckpointStore,
    open_store,
)
from connector.timeutil import parse_ts
from connector.tools.embedded import free_port

# -- file ------------------------------------------------------------------------------------


def test_file_store_round_trip_latest_wins(tmp_path):
    d = tmp_path / "deep" / "state"
    store = FileCheckpointStore(d, "alerts")
    assert store.load() is None  # no directory yet: no checkpoint
    store.save({"created_at": "2026-01-01T00:00:00.000Z", "id": 7, "offset": 1})
    store.save({"created_at": "2026-01-02T00:00:00.000Z", "id": 9, "offset": 2})
    again = FileCheckpointStore(d, "alerts").load()  # a new process
    assert again["id"] == 9 and again["offset"] == 2 and again["created_at"] == "2026-01-02T00:00:00.000Z"
    parse_ts(again["saved_at"])
    assert json.loads((d / "alerts.json").read_text()) == again
    assert sorted(p.name for p in d.iterdir()) == ["alerts.json"]  # no temp files left


def test_file_store_pipelines_are_separate(tmp_path):
    FileCheckpointStore(tmp_path, "a").save({"id": 1})
    FileCheckpointStore(tmp_path, "b").save({"id": 2})
    assert FileCheckpointStore(tmp_path, "a").load()["id"] == 1
    assert FileCheckpointStore(tmp_path, "b").load()["id"] == 2


@pytest.mark.parametrize(
    "content, why",
    [
        ("{not json", "not valid JSON"),
        ("", "not valid JSON"),
        ("[1, 2]", "expected a JSON object, found list"),
        ("null", "expected a JSON object, found NoneType"),
    ],
)
def test_corrupt_file_is_a_clear_error_naming_it(tmp_path, content, why):
    (tmp_path / "p.json").write_text(content)
    with pytest.raises(CheckpointError) as e:
        FileCheckpointStore(tmp_path, "p").load()
    msg = str(e.value)
    assert str(tmp_path / "p.json") in msg and why in msg and "delete it" in msg


def test_unwritable_location_is_a_clear_error(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(CheckpointError) as e:
        FileCheckpointStore(blocker / "state", "p").save({"id": 1})
    assert str(blocker / "state" / "p.json") in str(e.value)


def test_unserializable_checkpoint_leaves_the_old_one(tmp_path):
    store = FileCheckpointStore(tmp_path, "p")
    store.save({"id": 1})
    with pytest.raises(TypeError):
        store.save({"id": object()})
    assert store.load()["id"] == 1


def test_bad_pipeline_name_for_a_file(tmp_path):
    for name in ("", "..", "a/b"):
        with pytest.raises(ValueError):
            FileCheckpointStore(tmp_path, name)


WRITER = textwrap.dedent("""
    import sys
    from connector.stream.checkpoint import FileCheckpointStore
    store = FileCheckpointStore(sys.argv[1], "p")
    pad = "x" * 300000  # big enough that a kill often lands mid-write
    i = 0
    while True:
        store.save({"i": i, "pad": pad})
        if i == 3:
            print("writing", flush=True)
        i += 1
""")


def test_kill_9_during_saves_never_leaves_a_torn_checkpoint(tmp_path):
    """Whatever moment the writer dies at, the file holds a complete checkpoint."""
    seen = []
    for round_ in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path)],
            stdout=subprocess.PIPE,
            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        )
        try:
            assert proc.stdout.readline() == b"writing\n"
            # let it run a little further each round so the kill lands at different points
            target = 4 + round_ * 3
            deadline = time.monotonic() + 30
            while FileCheckpointStore(tmp_path, "p").load()["i"] < target:
                assert time.monotonic() < deadline
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        cp = FileCheckpointStore(tmp_path, "p").load()
        assert cp["pad"] == "x" * 300000 and cp["i"] >= target
        seen.append(cp["i"])
    assert seen == sorted(seen)


# -- kafka -----------------------------------------------------------------------------------


def kafka(bootstrap: str) -> KafkaSection:
    return KafkaSection(bootstrap_servers=bootstrap)


def test_kafka_store_any_machine_resumes_and_latest_wins(broker, topic_prefix):
    topic = f"{topic_prefix}.state"
    first = KafkaCheckpointStore(kafka(broker.bootstrap), topic, "alerts")
    try:
        assert first.load() is None
        first.save({"created_at": "2026-01-01T00:00:00.000Z", "id": 1})
        first.save({"created_at": "2026-01-01T00:00:01.000Z", "id": 2})
    finally:
        first.close()
    other = KafkaCheckpointStore(kafka(broker.bootstrap), topic, "other-pipeline")
    other.save({"id": 99})
    other.close()

    machine_b = KafkaCheckpointStore(kafka(broker.bootstrap), topic, "alerts")  # nothing shared but Kafka
    try:
        got = machine_b.load()
        assert got["id"] == 2 and got["created_at"] == "2026-01-01T00:00:01.000Z"
        parse_ts(got["saved_at"])
        machine_b.save({"id": 3})
        assert KafkaCheckpointStore(kafka(broker.bootstrap), topic, "alerts").load()["id"] == 3
    finally:
        machine_b.close()


def test_kafka_store_topic_is_compacted_with_one_partition(broker, topic_prefix):
    topic = f"{topic_prefix}.state"
    store = KafkaCheckpointStore(kafka(broker.bootstrap), topic, "p")
    store.ensure_topic()
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        assert store.cleanup_policy(admin) == "compact"
        (desc,) = admin.describe_topics([topic])
        assert len(desc["partitions"]) == 1
    finally:
        admin.close()
    store.ensure_topic()  # idempotent: an existing topic is fine


def test_kafka_store_corrupt_value_is_a_clear_error(broker, topic_prefix):
    topic = f"{topic_prefix}.state"
    store = KafkaCheckpointStore(kafka(broker.bootstrap), topic, "p")
    store.ensure_topic()
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    producer.send(topic, key=b"p", value=b"[not an object").get(10)
    producer.close()
    with pytest.raises(CheckpointError) as e:
        store.load()
    assert topic in str(e.value) and "'p'" in str(e.value) and "not a JSON object" in str(e.value)


def test_kafka_store_tombstone_means_no_checkpoint(broker, topic_prefix):
    topic = f"{topic_prefix}.state"
    store = KafkaCheckpointStore(kafka(broker.bootstrap), topic, "p")
    store.save({"id": 1})
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    producer.send(topic, key=b"p", value=None).get(10)
    producer.close()
    assert store.load() is None
    store.close()


def test_kafka_store_unreachable_raises(tmp_path):
    port = free_port()
    store = KafkaCheckpointStore(kafka(f"127.0.0.1:{port}"), "state", "p", timeout=1)
    for op in (store.load, lambda: store.save({"id": 1})):
        with pytest.raises(CheckpointError) as e:
            op()
        assert f"127.0.0.1:{port}" in str(e.value)


def test_kafka_store_save_that_is_not_acknowledged_raises(proxied, topic_prefix):
    """A save whose record Kafka never confirms raises instead of pretending it is durable."""
    topic = f"{topic_prefix}.state"
    store = KafkaCheckpointStore(kafka(proxied.bootstrap), topic, "p", timeout=1.5)
    try:
        store.save({"id": 1})
        proxied.proxy.stall()
        with pytest.raises(CheckpointError, match="failed"):
            store.save({"id": 2})
    finally:
        proxied.proxy.resume()
        store.close()


# -- open_store ------------------------------------------------------------------------------


def base(**extra) -> dict:
    return {"pipeline": {"name": "alerts"}, "tanium": {"host": "t.example.com", "api_key": "k"}, **extra}


def test_open_store_file_backend(tmp_path):
    store = open_store(parse_pipeline(base(state={"path": str(tmp_path)})))
    assert isinstance(store.store, FileCheckpointStore) and store.store.file == tmp_path / "alerts.json"
    assert "alerts.json" in store.location


def test_open_store_kafka_backend(broker, topic_prefix):
    cfg = parse_pipeline(
        base(kafka={"bootstrap_servers": broker.bootstrap}, state={"backend": "kafka", "topic": f"{topic_prefix}.st"})
    )
    store = open_store(cfg)
    assert isinstance(store.store, KafkaCheckpointStore) and store.store.key == b"alerts"
    store.save({"created_at": "2026-01-31T12:00:00.000Z", "id": 5, "offset": 5})
    assert open_store(cfg).load()["id"] == 5
    store.save({"id": 6})  # not a position: the pipeline's view of the store refuses it
    with pytest.raises(CheckpointError, match="created_at and offset missing"):
        open_store(cfg).load()
    store.close()


def test_open_store_kafka_backend_needs_a_kafka_section():
    cfg = parse_pipeline(base(state={"backend": "kafka"}))
    with pytest.raises(ConfigError, match=r"\[kafka\] section"):
        open_store(cfg)
