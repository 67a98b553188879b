"""kafka.client = "confluent" (librdkafka): test_sink.py's KafkaSink tests run again with that client
(same delivery, back pressure, failure, shutdown and transaction behaviour), plus key placement and
a pipeline run end to end on the real broker."""

from __future__ import annotations

import uuid

import pytest

pytest.importorskip("confluent_kafka")

import test_sink  # noqa: E402
from helpers import read_topic  # noqa: E402
from test_sink import (  # noqa: E402, F401 (collected here again, with the confluent client)
    test_a_record_the_producer_refuses_fails_once_and_frees_its_slot,
    test_delivers_records_with_key_and_headers,
    test_delivery_timeout_is_a_failure_and_the_window_stops_there,
    test_send_blocks_at_max_unacked_until_the_broker_answers,
    test_send_timeout_without_room,
    test_stop_unblocks_send_and_close_fails_unanswered_records,
    test_transaction_methods_need_a_transactional_id,
    test_transaction_writes_events_and_checkpoint_together,
    test_transactions_fence_an_older_producer,
    test_unreachable_kafka_is_a_clear_error,
    test_unusable_settings_are_clear_errors,
)

from connector.config import KafkaSection, parse_pipeline  # noqa: E402
from connector.kafka import KeyPartitioner, make_producer  # noqa: E402
from connector.simulator import Simulator  # noqa: E402
from connector.stream.pipeline import StreamPipeline  # noqa: E402
from connector.stream.sink import KafkaSink  # noqa: E402


@pytest.fixture(autouse=True)
def confluent_client(monkeypatch):
    plain = test_sink.kafka_section
    monkeypatch.setattr(test_sink, "kafka_section", lambda bootstrap, **kw: plain(bootstrap, client="confluent", **kw))


def test_the_sink_really_uses_librdkafka(broker):
    from connector.stream.confluent import ConfluentProducer

    sink = KafkaSink(test_sink.kafka_section(broker.bootstrap))
    try:
        assert isinstance(sink._producer, ConfluentProducer)
    finally:
        sink.close(5)


def test_keys_land_on_the_partitions_kafka_python_picks(broker, topic_prefix):
    topic = f"{topic_prefix}.keys"
    plain = make_producer(KafkaSection(bootstrap_servers=broker.bootstrap, topic=topic))
    try:
        assert len(plain.partitions_for(topic)) > 1
        cluster = plain._metadata
        keys = [str(uuid.uuid4()).encode() for _ in range(60)]
        expected = {k: KeyPartitioner().partition(topic, k, k, None, None, cluster) for k in keys}
    finally:
        plain.close(5)
    sink = KafkaSink(test_sink.kafka_section(broker.bootstrap, linger_ms=0))
    try:
        for k in keys:
            assert sink.send(topic, k, b"v", [], lambda ok, exc: None)
        assert sink.flush(30)
    finally:
        sink.close(10)
    got = {r.key: r.partition for r in read_topic(broker.bootstrap, topic, expect=len(keys))}
    assert got == expected


def test_pipeline_publishes_every_alert_with_the_confluent_client(broker, topic_prefix, tmp_path):
    with Simulator(alerts=700, intel_docs=5, seed=3, history=3600) as sim:
        cfg = parse_pipeline(
            {
                "pipeline": {"name": topic_prefix},
                "tanium": {**sim.settings(), "page_size": 200},
                "source": {"start_from": "30d"},
                "state": {"path": str(tmp_path / "state")},
                "kafka": {
                    "bootstrap_servers": broker.bootstrap,
                    "topic": f"{topic_prefix}.events",
                    "client": "confluent",
                },
                "metrics": {"enabled": False},
            }
        )
        pipe = StreamPipeline(cfg, once=True)
        assert pipe.run() == 0
    s = pipe.summary
    assert s.published == 700 and s.delivery_failures == 0
    assert s.checkpoint["offset"] == 700
    records = read_topic(broker.bootstrap, f"{topic_prefix}.events", expect=700)
    assert len({r.key for r in records}) == 700


def test_confluent_client_without_the_package_is_a_clear_error(monkeypatch):
    import builtins

    from connector.config import ConfigError

    real_import = builtins.__import__

    def no_confluent(name, *args, **kw):
        if name == "confluent_kafka":
            raise ImportError(name)
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_confluent)
    with pytest.raises(ConfigError, match="confluent-kafka"):
        parse_pipeline(
            {"pipeline": {"name": "p"}, "tanium": {"host": "h", "api_key": "k"}, "kafka": {"client": "confluent"}}
        )
