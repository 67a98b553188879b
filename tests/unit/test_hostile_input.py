"""Property tests: hostile input to the config loader, the field-map string form and the
job-action parser yields a valid result or the documented clear error, never another exception.

(The field-map engine itself — any alert through any compiled map — is covered by the property
tests in test_normalize.py; here: field maps as they arrive through the config loader, including
the integration's string form parsed from text.)
"""

from __future__ import annotations

import string
from datetime import UTC

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connector import config as config_module
from connector.config import ConfigError, PipelineConfig, load_pipeline, parse_pipeline
from connector.fieldmap import DEFAULT_FIELD_MAP
from connector.stream.normalize import Normalizer
from connector.validation.rules import (
    JobAction,
    Rejection,
    parse_job_action,
    parse_job_action_bytes,
)

KEY = "tok-PROPERTY-SECRET-7c1f"
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# every section and key the loader knows, so generated input often hits real settings
SECTIONS = {
    name: list(field.annotation.model_fields) if hasattr(field.annotation, "model_fields") else []
    for name, field in PipelineConfig.model_fields.items()
}
SECTIONS["kafka"] = list(config_module.KafkaSection.model_fields)
ALL_KEYS = sorted({k for keys in SECTIONS.values() for k in keys})

# what tomllib can produce: strings, 64-bit integers, floats (inf/nan too), booleans, dates and
# times (naive and aware), arrays and tables
scalars = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "",
            " ",
            "${HOME}",
            "${NOPE_UNSET_VAR}",
            "${X:-dflt}",
            "127.0.0.1:9092",
            "https",
            "http",
            "kafka",
            "file",
            "0",
            "-1",
            "24h",
            "now",
            "9" * 30 + "d",
            "[]",
            "['a', 'b.c']",
            "['" + "x" * 5 + "'",
            "[" * 300,
            "exactly-once",
        ]
    ),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.booleans(),
    st.datetimes(),
    st.datetimes(timezones=st.just(UTC)),
    st.dates(),
    st.times(),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
keys = st.one_of(st.sampled_from(ALL_KEYS), st.text(max_size=12))
sections = st.dictionaries(keys, values, max_size=6)


def _base() -> dict:
    return {
        "pipeline": {"name": "p1"},
        "tanium": {"host": "tanium.example.com", "api_key": KEY},
        "kafka": {"bootstrap_servers": "127.0.0.1:9092"},
    }


def _check(raw) -> PipelineConfig | None:
    """The loader's contract: a PipelineConfig, or ConfigError whose every line names the source."""
    try:
        cfg = parse_pipeline(raw, "hostile.toml")
    except ConfigError as e:
        text = str(e)
        assert text.startswith("hostile.toml: ") and len(text) > 15
        assert KEY not in text
        return None
    assert isinstance(cfg, PipelineConfig)
    assert KEY not in repr(cfg) and KEY not in str(cfg.masked())
    return cfg


@pytest.mark.slow
@SETTINGS
@given(
    raw=st.dictionaries(
        st.one_of(st.sampled_from(sorted(SECTIONS)), st.text(max_size=10)), st.one_of(sections, values), max_size=8
    )
)
def test_any_toml_shaped_document(raw):
    _check(raw)


@SETTINGS
@given(changes=st.lists(st.tuples(st.sampled_from(sorted(SECTIONS)), keys, values), min_size=1, max_size=4))
def test_a_valid_pipeline_with_hostile_changes(changes):
    raw = _base()
    for section, key, value in changes:
        if not isinstance(raw.get(section), dict):
            raw[section] = {}
        raw[section][key] = value
    cfg = _check(raw)
    if cfg is not None and cfg.tanium.api_key.get_secret_value() == KEY:
        assert cfg.tanium.host and cfg.kafka is not None


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=400) | st.text(max_size=400).map(str.encode))
def test_any_file_content(data, tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "p.toml"
    path.write_bytes(data)
    try:
        load_pipeline(path)
    except ConfigError as e:
        assert str(e).startswith(str(path))


# ---- field maps through the loader --------------------------------------------------------------

list_text = st.one_of(
    st.text(max_size=60).map(lambda s: "[" + s),
    st.lists(st.text(alphabet=string.printable, max_size=12), max_size=4).map(repr),
    st.builds(lambda n, s: "[" + s * n + "1]", st.integers(1, 50_000), st.sampled_from(["[", "(", "-", "1+", "{"])),
)


@SETTINGS
@given(
    fm=st.dictionaries(
        st.sampled_from(sorted(DEFAULT_FIELD_MAP)) | st.text(max_size=8), st.one_of(list_text, values), max_size=3
    )
)
def test_field_maps_through_the_loader(fm):
    raw = _base()
    raw["field_map"] = fm
    cfg = _check(raw)
    if cfg is not None:  # an accepted map compiles and runs
        event = Normalizer(cfg.effective_field_map, "p1").normalize({"id": 1, "guid": "g", "details": {}})
        assert event["uid"]


def test_absurd_nesting_in_the_string_form_is_a_clear_error():
    for text in ("[" + "-" * 100_000 + "1]", "[" + "1+" * 100_000 + "1]", "[" * 100_000):
        raw = _base()
        raw["field_map"] = {"user": text}
        with pytest.raises(ConfigError) as e:
            parse_pipeline(raw, "x.toml")
        assert "field_map.user" in str(e.value) and len(str(e.value)) < 1000


@pytest.mark.parametrize("value", ["99999999999999d", "9" * 400 + "s", "1000000d"])
def test_start_from_too_far_back_is_a_clear_error(value):
    raw = _base()
    raw["source"] = {"start_from": value}
    with pytest.raises(ConfigError) as e:
        parse_pipeline(raw, "x.toml")
    msg = str(e.value)
    assert "source.start_from" in msg and ("shorter" in msg or "too long" in msg) and len(msg) < 1000


# ---- job actions --------------------------------------------------------------------------------

# what orjson decodes: 64-bit integers, finite floats, strings, booleans, null, arrays, objects
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
    st.sampled_from(
        [
            "2026-01-31T12:00:00Z",
            "2026-01-31T12:00:00+02:00",
            "2026-13-45T99:99:99Z",
            "0000-01-01T00:00:00Z",
            "9999-12-31T23:59:59Z",
            "10.0.0.1",
            "::1",
            "fe80::1%eth0",
            "host_cli",
            "network",
            "T1059.001",
            "a" * 64,
        ]
    ),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=15,
)
action_keys = st.sampled_from(
    [
        "id",
        "job_id",
        "name",
        "type",
        "started_at",
        "ended_at",
        "source",
        "destination",
        "dest_port",
        "expected",
        "metadata",
        "hostnames",
        "ips",
        "file_hashes",
        "command_line_contains",
        "mitre_techniques",
    ]
) | st.text(max_size=8)


def _valid_action() -> dict:
    return {
        "id": "a1",
        "job_id": "j1",
        "name": "x",
        "type": "host_cli",
        "started_at": "2026-01-31T12:00:00Z",
        "source": {"hostnames": ["h1"], "ips": ["10.0.0.1"]},
    }


def _check_action(result):
    assert isinstance(result, (JobAction, Rejection))
    if isinstance(result, Rejection):
        assert isinstance(result.reason, str) and result.reason
        record = result.record("p1")  # what is published to the results topic must serialize
        assert len(orjson.dumps(record)) < 200_000
    return result


@SETTINGS
@given(obj=json_values)
def test_any_json_value_is_a_job_action_or_a_rejection(obj):
    _check_action(parse_job_action(obj))


@SETTINGS
@given(
    changes=st.lists(st.tuples(action_keys, json_values), min_size=1, max_size=4),
    nested=st.lists(
        st.tuples(st.sampled_from(["source", "destination", "expected"]), action_keys, json_values), max_size=3
    ),
)
def test_a_valid_job_action_with_hostile_changes(changes, nested):
    obj = _valid_action()
    for k, v in changes:
        obj[k] = v
    for outer, k, v in nested:
        if not isinstance(obj.get(outer), dict):
            obj[outer] = {}
        obj[outer][k] = v
    result = _check_action(parse_job_action(obj))
    if isinstance(result, JobAction):
        assert result.type in ("host_cli", "network") and result.started_at.tzinfo is not None
    # the same object as bytes (as it arrives from Kafka or a file) gives the same answer
    try:
        data = orjson.dumps(obj)
    except TypeError:
        return
    assert type(_check_action(parse_job_action_bytes(data))) is type(result)


@SETTINGS
@given(data=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_any_bytes_are_a_job_action_or_a_rejection(data):
    _check_action(parse_job_action_bytes(data))
