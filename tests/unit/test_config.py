"""Pipeline files: every setting's default and every kind of validation error."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from connector.config import ConfigError, load_pipeline, parse_pipeline
from connector.fieldmap import DEFAULT_FIELD_MAP

KEY = "token-SECRET-abc123"


def base(**sections):
    raw = {"pipeline": {"name": "p1"}, "tanium": {"host": "tanium.example.com", "api_key": KEY}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def error_of(raw) -> str:
    with pytest.raises(ConfigError) as e:
        parse_pipeline(raw, "x.toml")
    msg = str(e.value)
    assert KEY not in msg
    assert msg.startswith("x.toml: ")
    return msg


def test_defaults_match_the_integration_settings():
    c = parse_pipeline(base())
    t, v = c.tanium, c.validation
    assert (t.protocol, t.port, t.verify_ssl, t.timeout, t.page_size, t.enrich_intel_docs, t.limit) == (
        "https",
        443,
        True,
        30,
        500,
        True,
        10000,
    )
    assert t.proxy is None and t.ca_bundle is None and t.poll_interval == 30
    assert (v.query_time, v.query_interval, v.delay_time) == (5, 30, 0)
    assert (v.correlation_query_enabled, v.correlation_query, v.correlation_query_interval) == (False, "", 5)
    assert v.discover_network_devices is True and v.save_suspicious_events is False
    assert v.event_time_adjustment == 0
    assert c.source.start_from == "24h"
    assert (c.enrich.cache_size, c.enrich.cache_ttl, c.enrich.concurrency) == (10000, 3600, 8)
    assert c.effective_field_map == DEFAULT_FIELD_MAP
    assert c.output.include_raw is True
    assert c.kafka is None and c.state.backend == "file"
    assert c.metrics.listen == "127.0.0.1:9464"
    assert t.base_url == "https://tanium.example.com"


def test_kafka_defaults():
    k = parse_pipeline(base(kafka={})).kafka
    assert k.topic == "tanium.threat-response.events"
    assert k.dlq_topic == "tanium.threat-response.events.dlq"
    assert k.bootstrap_servers == ["127.0.0.1:9092"]
    k = parse_pipeline(base(kafka={"topic": "a.b", "bootstrap_servers": "h1:9092, h2:9093"})).kafka
    assert k.dlq_topic == "a.b.dlq" and k.bootstrap_servers == ["h1:9092", "h2:9093"]


def test_a_producer_batch_is_never_larger_than_the_largest_request():
    from connector.kafka import producer_settings
    from connector.stream.confluent import confluent_settings

    # a broker whose message.max.bytes matches kafka.max_request_size refuses any bigger batch
    k = parse_pipeline(base(kafka={"max_request_size": 262144})).kafka
    assert k.batch_size > 262144  # the default batch size
    assert producer_settings(k)["batch_size"] == confluent_settings(k)["batch.size"] == 262144
    k = parse_pipeline(base(kafka={"batch_size": 65536})).kafka
    assert producer_settings(k)["batch_size"] == confluent_settings(k)["batch.size"] == 65536


@pytest.mark.parametrize(
    "section,key,value,expect",
    [
        ("tanium", "protocol", "ftp", "tanium.protocol = 'ftp': Input should be 'https' or 'http'"),
        ("tanium", "host", "https://tanium.example.com", "tanium.host"),
        ("tanium", "host", "tanium.example.com/api", "without scheme, port or path"),
        ("tanium", "host", "tanium.example.com:443", "without scheme, port or path"),
        ("tanium", "port", 0, "tanium.port = 0: Input should be greater than or equal to 1"),
        ("tanium", "port", 65536, "tanium.port = 65536: Input should be less than or equal to 65535"),
        ("tanium", "port", "443x", "tanium.port = '443x'"),
        ("tanium", "verify_ssl", "maybe", "tanium.verify_ssl = 'maybe'"),
        ("tanium", "timeout", 0, "tanium.timeout = 0: Input should be greater than 0"),
        ("tanium", "proxy", "socks5://p:1080", "http:// or https:// proxy URL"),
        ("tanium", "page_size", 501, "tanium.page_size = 501: Input should be less than or equal to 500"),
        ("tanium", "page_size", 0, "tanium.page_size = 0"),
        ("tanium", "enrich_intel_docs", "yes please", "tanium.enrich_intel_docs"),
        ("tanium", "limit", 0, "tanium.limit = 0"),
        (
            "tanium",
            "ca_bundle",
            "/nonexistent/ca.pem",
            "tanium.ca_bundle = '/nonexistent/ca.pem': is not a readable file",
        ),
        ("validation", "query_time", 0, "validation.query_time = 0"),
        ("validation", "query_interval", 0, "validation.query_interval = 0: Input should be greater than 0"),
        ("validation", "delay_time", -1, "validation.delay_time = -1"),
        ("validation", "correlation_query_interval", 0, "validation.correlation_query_interval"),
        ("validation", "correlation_query", "bogus=1", "unknown alert filter parameter 'bogus'"),
        ("validation", "discover_network_devices", "x", "validation.discover_network_devices"),
        ("validation", "save_suspicious_events", "x", "validation.save_suspicious_events"),
        ("validation", "event_time_adjustment", "soon", "validation.event_time_adjustment"),
        ("source", "start_from", "yesterday", "is not 'now', a duration"),
        ("enrich", "cache_size", 0, "enrich.cache_size"),
        ("kafka", "bootstrap_servers", "nohostport", "'nohostport' is not host:port"),
        ("kafka", "security_protocol", "TLS", "kafka.security_protocol"),
        ("metrics", "listen", "9464", "metrics.listen"),
        ("state", "backend", "redis", "Input should be 'file' or 'kafka'"),
    ],
)
def test_each_bad_value_is_named_with_what_is_allowed(section, key, value, expect):
    assert expect in error_of(base(**{section: {key: value}}))


def test_event_time_adjustment_may_be_negative():
    assert parse_pipeline(base(validation={"event_time_adjustment": -90})).validation.event_time_adjustment == -90


def test_missing_required_and_unknown_keys():
    assert "pipeline.name: required setting is missing" in error_of(
        {"pipeline": {}, "tanium": {"host": "h", "api_key": "k"}}
    )
    assert "tanium.host: required setting is missing" in error_of(
        {"pipeline": {"name": "p"}, "tanium": {"api_key": "k"}}
    )
    assert "tanium: required setting is missing" in error_of({"pipeline": {"name": "p"}})
    assert "tanium.hots: unknown setting" in error_of(base(tanium={"hots": "x"}))
    assert "nosuch: unknown setting" in error_of(base(nosuch={"a": 1}))


def test_api_key_exactly_one_of_key_or_file(tmp_path):
    raw = base()
    del raw["tanium"]["api_key"]
    assert "tanium.api_key: exactly one of tanium.api_key or tanium.api_key_file is required" in error_of(raw)
    keyfile = tmp_path / "key"
    keyfile.write_text(KEY + "\n")
    raw["tanium"]["api_key_file"] = str(keyfile)
    assert parse_pipeline(raw).tanium.api_key.get_secret_value() == KEY
    raw["tanium"]["api_key"] = "other"
    assert "exactly one" in error_of(raw)


def test_unreadable_or_empty_key_file(tmp_path):
    raw = base()
    del raw["tanium"]["api_key"]
    raw["tanium"]["api_key_file"] = str(tmp_path / "missing")
    assert "tanium.api_key_file: cannot read" in error_of(raw)
    (tmp_path / "empty").write_text("\n")
    raw["tanium"]["api_key_file"] = str(tmp_path / "empty")
    assert "is empty" in error_of(raw)


def test_env_interpolation_in_every_string(monkeypatch):
    monkeypatch.setenv("TKEY", KEY)
    monkeypatch.setenv("THOST", "tr.corp.local")
    c = parse_pipeline(base(tanium={"api_key": "${TKEY}", "host": "${THOST}"}, kafka={"topic": "x.${THOST}"}))
    assert c.tanium.api_key.get_secret_value() == KEY and c.tanium.host == "tr.corp.local"
    assert c.kafka.topic == "x.tr.corp.local"
    monkeypatch.delenv("TKEY")
    assert "tanium.api_key: environment variable ${TKEY} is not set" in error_of(base(tanium={"api_key": "${TKEY}"}))
    assert parse_pipeline(base(tanium={"api_key": "${TKEY:-fallback}"})).tanium.api_key.get_secret_value() == "fallback"


def test_field_map_array_string_form_and_errors():
    c = parse_pipeline(base(field_map={"description": "['msg_s','SyslogMessage']", "user": ["a.b", "c"]}))
    fm = c.effective_field_map
    assert fm["description"] == ["msg_s", "SyslogMessage"] and fm["user"] == ["a.b", "c"]
    assert fm["uid"] == DEFAULT_FIELD_MAP["uid"]
    assert "unknown field 'colour'" in error_of(base(field_map={"colour": ["x"]}))
    assert "is not a list such as" in error_of(base(field_map={"user": "['a',"}))
    assert "must be a list of non-empty column paths" in error_of(base(field_map={"user": [1]}))
    assert "field_map.user = ['a..b']: 'a..b' is not a column path" in error_of(base(field_map={"user": ["a..b"]}))


def test_correlation_query_needed_when_enabled_and_valid_form():
    assert "correlation_query: must be set" in error_of(base(validation={"correlation_query_enabled": True}))
    c = parse_pipeline(
        base(validation={"correlation_query_enabled": True, "correlation_query": "intelDocId=700&severity=high"})
    )
    assert c.validation.correlation_query == "intelDocId=700&severity=high"


def test_exactly_once_needs_kafka_state():
    assert "exactly-once" in error_of(base(pipeline={"delivery": "exactly-once"}))


def test_secrets_masked_in_repr_dump_and_errors():
    c = parse_pipeline(base(kafka={"sasl_plain_password": "kpass-XYZ"}))
    for text in (repr(c), str(c.tanium), repr(c.tanium), json.dumps(c.masked())):
        assert KEY not in text and "kpass-XYZ" not in text
    assert c.masked()["tanium"]["api_key"] == "***"
    assert c.masked()["kafka"]["sasl_plain_password"] == "***"


def test_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_pipeline(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[pipeline\nname=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_pipeline(bad)


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "connector.cli", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_validate_config_command_masks_and_exits_2_on_errors(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text(f'[pipeline]\nname = "p"\n[tanium]\nhost = "h.example"\napi_key = "{KEY}"\n')
    r = run_cli("validate-config", str(good))
    assert r.returncode == 0, r.stderr
    assert KEY not in r.stdout + r.stderr
    assert json.loads(r.stdout)["tanium"]["api_key"] == "***"
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[pipeline]\nname = "p"\n[tanium]\nhost = "h"\nport = 99999\napi_key = "{KEY}"\n')
    r = run_cli("validate-config", str(bad))
    assert r.returncode == 2
    assert f"{bad}: tanium.port = 99999" in r.stderr and "Traceback" not in r.stderr
    assert KEY not in r.stdout + r.stderr


def test_shipped_pipeline_files_are_valid(monkeypatch):
    monkeypatch.setenv("TANIUM_API_KEY", KEY)
    monkeypatch.setenv("KAFKA_PASSWORD", "x")
    from pathlib import Path

    files = sorted(Path(__file__).resolve().parents[2].joinpath("pipelines").glob("*.toml"))
    assert files
    for f in files:
        load_pipeline(f)
