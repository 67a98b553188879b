"""The standard output formats (connector/formats) against the official schemas, their settings and
their records in the pipeline.

- OCSF: every Detection Finding validates through the official OCSF 1.7.0 schema that pydantic-ocsf
  bundles — its strict models (`DetectionFinding.model_validate_json(strict=True)`) and a walk of the
  schema itself that checks every attribute, at every level, belongs to its class or object (or to a
  profile named in metadata.profiles), has the attribute's type, regex, range and enum, and that
  required attributes are there (the models accept unknown attributes, so they cannot check that).
- ECS: every field name of every document exists in ECS 9.4.0's ecs_flat.yml (tests/data) or is
  under `tanium.*`; every value has the field's type; arrays only where the field is an array;
  allowed values of event.kind/category/type, with event.type expected by each category (plus
  "change" on the update event of an alert whose state changed).
- Both: every document validates against the JSON Schema the connector ships for it.
Inputs: a live 5,000-alert run of the simulator over HTTP through the real pipeline (dry run, every
match type, its garbage records and injected hostile alerts), generated hostile alerts, and the update
events (Update and Close) of simulator alerts of every match type and state.
"""

from __future__ import annotations

import io
import ipaddress
import re
from datetime import datetime
from functools import cache
from importlib import resources
from pathlib import Path

import ocsf as ocsf_package
import orjson
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from jsonschema import Draft202012Validator
from ocsf.v1_7_0.events import DetectionFinding

from connector.config import ConfigError, parse_pipeline
from connector.fieldmap import DEFAULT_FIELD_MAP
from connector.formats import FORMATS, Settings, encode, render, render_all
from connector.formats.ocsf import STATUS
from connector.simulator import GARBAGE_KINDS, Simulator
from connector.stream.normalize import NormalizeError, Normalizer, serialize
from connector.stream.pipeline import StreamPipeline
from connector.stream.sink import AckWindow
from connector.stream.source import Position

DATA = Path(__file__).resolve().parents[1] / "data"

# ---- OCSF 1.7.0: the official schema -------------------------------------------------------------

OCSF = orjson.loads((Path(ocsf_package.__file__).parent / "schemas" / "v1_7_0.json").read_bytes())
DICTIONARY = OCSF["dictionary"]["attributes"]
TYPES = OCSF["dictionary"]["types"]["attributes"]
# The bundled schema leaves profiles as `$include`s; their attributes, from the OCSF schema's
# profiles/host.json and profiles/security_control.json (types and enums come from the dictionary).
PROFILE_ATTRIBUTES = {
    "host": {"device", "actor"},
    "security_control": {
        "action",
        "action_id",
        "attacks",
        "authorizations",
        "confidence",
        "confidence_id",
        "confidence_score",
        "disposition",
        "disposition_id",
        "firewall_rule",
        "is_alert",
        "malware",
        "policy",
        "risk_details",
        "risk_level",
        "risk_level_id",
        "risk_score",
    },
}
_INT = {"integer_t": (-(2**31), 2**31 - 1), "long_t": (-(2**63), 2**63 - 1)}


@cache
def _attributes(table: str, name: str) -> dict[str, dict]:
    """Attributes of an event class or object, inherited ones first, each merged with the dictionary."""
    spec = OCSF[table][name]
    parent = spec.get("extends")
    out = dict(_attributes(table, parent)) if parent in OCSF[table] else {}
    for key, attr in spec.get("attributes", {}).items():
        if not key.startswith("$"):
            base = out.get(key, DICTIONARY.get(key, {}))
            out[key] = {**base, **attr}
            if "enum" in base and "enum" in attr:  # enums add up (as the schema compiler merges them)
                out[key]["enum"] = {**base["enum"], **attr["enum"]}
    return out


def _class_identity() -> dict:
    spec = OCSF["events"]["detection_finding"]
    category = OCSF["categories_meta"]["attributes"][OCSF["events"]["finding"]["category"]]
    class_uid = category["uid"] * 1000 + spec["uid"]
    return {"category_uid": category["uid"], "category_name": category["caption"], "class_uid": class_uid}


CLASS = _class_identity()


def _check_value(value, attr: dict, path: str, problems: list[str]) -> None:
    kind = attr.get("type", "string_t")
    if attr.get("is_array"):
        if not isinstance(value, list):
            problems.append(f"{path}: {value!r} is not an array")
            return
        items = [(v, f"{path}[{i}]") for i, v in enumerate(value)]
    else:
        items = [(value, path)]
    for v, p in items:
        if kind in ("object", "json_t"):  # OCSF's open object and JSON: anything goes
            continue
        if kind in OCSF["objects"]:
            if isinstance(v, dict):
                _check_object(v, _attributes("objects", kind), p, problems)
            else:
                problems.append(f"{p}: {v!r} is not a {kind} object")
            continue
        base, t = kind, TYPES.get(kind, {})
        while TYPES.get(base, {}).get("type"):
            base = TYPES[base]["type"]
        if base == "string_t":
            ok = isinstance(v, str)
        elif base in _INT:
            lo, hi = _INT[base]
            ok = isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi
        elif base == "float_t":
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        elif base == "boolean_t":
            ok = isinstance(v, bool)
        else:
            ok = False
        if not ok:
            problems.append(f"{p}: {v!r} is not {kind}")
            continue
        if "regex" in t and not re.search(t["regex"], v):
            problems.append(f"{p}: {v!r} does not match the {kind} pattern")
        if "max_len" in t and len(v) > t["max_len"]:
            problems.append(f"{p}: {v!r} is longer than {t['max_len']}")
        if "range" in t and not t["range"][0] <= v <= t["range"][1]:
            problems.append(f"{p}: {v!r} is outside {t['range']}")
        if "enum" in attr and str(v) not in attr["enum"]:
            problems.append(f"{p}: {v!r} is not one of {sorted(attr['enum'])}")


def _check_object(obj: dict, attrs: dict[str, dict], path: str, problems: list[str]) -> None:
    for key, value in obj.items():
        if key not in attrs:
            problems.append(f"{path}.{key}: not an attribute here")
        elif value is None:
            problems.append(f"{path}.{key}: null (leave the attribute out instead)")
        else:
            _check_value(value, attrs[key], f"{path}.{key}", problems)
    for key, attr in attrs.items():
        if attr.get("requirement") == "required" and key not in obj:
            problems.append(f"{path}.{key}: required attribute missing")


def ocsf_problems(value: bytes) -> list[str]:
    """Every way the record `value` departs from an OCSF 1.7.0 Detection Finding."""
    problems: list[str] = []
    try:
        DetectionFinding.model_validate_json(value, strict=True)
    except ValueError as e:
        problems.append(f"pydantic-ocsf: {e}")
    doc = orjson.loads(value)
    attrs = dict(_attributes("events", "detection_finding"))
    profiles = doc.get("metadata", {}).get("profiles", [])
    for profile in profiles:
        for key in PROFILE_ATTRIBUTES[profile]:
            attrs.setdefault(key, DICTIONARY[key])
    for key in ("category_uid", "class_uid", "type_uid"):  # checked against the class identity below
        attrs[key] = {k: v for k, v in attrs[key].items() if k != "enum"}
    _check_object(doc, attrs, "$", problems)
    activity = attrs["activity_id"]["enum"].get(str(doc.get("activity_id")), {}).get("caption")
    expected = {
        **CLASS,
        "class_name": OCSF["events"]["detection_finding"]["caption"],
        "type_uid": CLASS["class_uid"] * 100 + doc.get("activity_id", -1),
        "activity_name": activity,
        "type_name": f"{OCSF['events']['detection_finding']['caption']}: {activity}",
    }
    problems += [f"$.{k}: {doc.get(k)!r}, expected {v!r}" for k, v in expected.items() if doc.get(k) != v]
    if doc.get("metadata", {}).get("version") != "1.7.0":
        problems.append("$.metadata.version is not 1.7.0")
    return problems


# ---- ECS 9.4.0: ecs_flat.yml ---------------------------------------------------------------------------

ECS = yaml.load((DATA / "ecs-9.4.0-ecs_flat.yml").read_text(encoding="utf-8"), Loader=yaml.CSafeLoader)
_ECS_TEXT = {"keyword", "text", "wildcard", "constant_keyword", "match_only_text"}
_ECS_INT = {"long": 63, "integer": 31, "short": 15, "byte": 7}
_ECS_FLOAT = {"float", "scaled_float", "double", "half_float"}
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")


def _ecs_type_ok(kind: str, v) -> bool:
    if kind in _ECS_TEXT:
        return isinstance(v, str)
    if kind in _ECS_INT:
        bits = _ECS_INT[kind]
        return isinstance(v, int) and not isinstance(v, bool) and -(2**bits) <= v < 2**bits
    if kind in _ECS_FLOAT:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if kind == "boolean":
        return isinstance(v, bool)
    if kind == "date":
        if not (isinstance(v, str) and _RFC3339.fullmatch(v)):
            return False
        datetime.fromisoformat(v)  # a real date and time
        return True
    if kind == "ip":
        try:
            ipaddress.ip_address(v)
            return True
        except (TypeError, ValueError):
            return False
    if kind in ("object", "flattened", "nested"):
        return isinstance(v, (dict, list))
    return False


def ecs_problems(doc: dict) -> list[str]:
    """Every field of `doc` that ECS 9.4.0 does not define (outside tanium.*) or whose value has the
    wrong type."""
    problems: list[str] = []

    def walk(obj: dict, prefix: str) -> None:
        for key, value in obj.items():
            name = prefix + key
            if name == "tanium":
                continue
            field = ECS.get(name)
            if field is None:
                if isinstance(value, dict):
                    walk(value, name + ".")
                else:
                    problems.append(f"{name}: not an ECS field")
                continue
            values = value if isinstance(value, list) and field["type"] != "nested" else [value]
            if isinstance(value, list) and "array" not in field["normalize"] and field["type"] != "nested":
                problems.append(f"{name}: an array, but the field is not")
            for v in values:
                if not _ecs_type_ok(field["type"], v):
                    problems.append(f"{name}: {v!r} is not {field['type']}")
                allowed = field.get("allowed_values")
                if allowed and v not in {a["name"] for a in allowed}:
                    problems.append(f"{name}: {v!r} is not an allowed value")

    walk(doc, "")
    if "@timestamp" not in doc:
        problems.append("@timestamp: required field missing")
    expected = {a["name"]: set(a.get("expected_event_types", ())) for a in ECS["event.category"]["allowed_values"]}
    event = doc.get("event", {})
    # a state change of an alert is event.type "change" (besides "info"), which ECS lists for none of
    # the alert categories: its per-category lists are expectations, the allowed values above are the rule
    change = {"change"} if event.get("action") in ("updated", "closed") else set()
    for category in event.get("category", []):
        for t in event.get("type", []):
            if t not in expected.get(category, set()) | change:
                problems.append(f"event.type {t!r} is not expected for event.category {category!r}")
    if doc.get("ecs", {}).get("version") != "9.4.0":
        problems.append("ecs.version is not 9.4.0")
    return problems


# ---- the shipped JSON Schemas ------------------------------------------------------------------------------


def _shipped(name: str) -> Draft202012Validator:
    schema = orjson.loads(resources.files("connector").joinpath(f"schemas/{name}").read_bytes())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


SHIPPED = {"ocsf": _shipped("ocsf-detection-finding.schema.json"), "ecs": _shipped("ecs-alert.schema.json")}
EVENT_SCHEMA = _shipped("event.schema.json")


def problems_of(fmt: str, value: bytes, shipped: bool = True) -> list[str]:
    """The official schema's objections to a record, and with `shipped` the shipped schema's."""
    doc = orjson.loads(value)
    official = ocsf_problems(value) if fmt == "ocsf" else ecs_problems(doc)
    if not shipped:
        return official
    return official + [f"shipped schema: {e.message} at {e.json_path}" for e in SHIPPED[fmt].iter_errors(doc)]


def fmt_of(doc: dict) -> str:
    if "class_uid" in doc:
        return "ocsf"
    if "ecs" in doc:
        return "ecs"
    if "raw_truncated" in doc and "reason" in doc:
        return "dlq"
    return "normalized"


# ---- proof 1: a live run of the simulator, every record in every format ----------------------------------


class _Lines(io.TextIOBase):
    """The dry run's output, checked line by line as it is written (15,000 records stay out of memory)."""

    def __init__(self):
        self.records: list[tuple[str, dict]] = []  # (format, the parts the test looks at)
        self.problems: list[str] = []

    def write(self, text: str) -> int:
        for line in text.splitlines():
            value = line.encode()
            doc = orjson.loads(value)
            fmt = fmt_of(doc)
            if fmt in ("ocsf", "ecs"):
                # the official schemas check every record; the shipped ones (slow: jsonschema) every
                # 7th, and every generated hostile alert in the property test below
                shipped = len(self.records) % 7 == 0
                self.problems += [f"{fmt} {line[:80]}…: {p}" for p in problems_of(fmt, value, shipped)[:3]]
            self.records.append((fmt, _summary(fmt, doc)))
        return len(text)


def _summary(fmt: str, doc: dict) -> dict:
    if fmt == "normalized":
        return {"uid": doc["uid"], "match_type": doc["match_type"], "raw": doc.get("raw") is not None}
    if fmt == "ocsf":
        ev = (doc.get("evidences") or [{}])[0]
        return {
            "uid": doc["metadata"]["uid"],
            "guid": doc["finding_info"]["uid"],
            "raw": "raw_data" in doc,
            "evidence": sorted(ev),
            "enriched": "name" in doc["finding_info"]["analytic"],
        }
    if fmt == "ecs":
        return {"guid": doc["event"]["id"], "raw": "original" in doc["event"]}
    return {"reason": doc["reason"]}


def _inject_hostile(sim: Simulator) -> int:
    """Alerts whose values are wrong in every way the formats must survive; returns how many."""
    cases = [
        {"remote_ip": "not-an-ip", "local_port": "99999", "remote_port": -1, "match_type": "port"},
        {"local_ip": "fe80::1%eth0", "remote_ip": "2001:db8::7", "local_port": "443", "match_type": "port"},
        {"md5": "zz-not-hex", "sha1": 42, "sha256": None, "user": "", "args": "   "},
        {"size": "huge", "sha256": "A" * 64, "match_type": "file"},
        {"intel_doc_id": 99_999},  # no such IntelDoc: enrichment_error, fallback title
        {"severity": "catastrophic", "state": "dismissed", "priority": 7},
        {"severity": None, "state": None, "fields": {"guid": None, "computerIpAddress": "300.1.1.1"}},
        {"details": None},
        {"details": "not json"},
        {"details": {"match": None, "finding": {"system_info": {"os": 5, "platform": ["x"], "bits": "64"}}}},
        {"details": {"match": {"type": "process", "properties": {"pid": True, "parent": {"parent": "x"}}}}},
        {"details": {"match": {"properties": {"process": {"pid": 2**40, "ppid": "12", "start_time": "yesterday"}}}}},
        {"fields": {"createdAt": 1697459178, "alertedAt": "2023-10-16T12:26:51.123456789z", "eid": "x"}},
        {"fields": {"computerName": ["a", "b"], "intelDocId": "seven", "intelDocRevisionId": -3}},
        {"user": "CORP\\", "process_name": "C:\\Windows\\", "path": "\\\\server\\share\\"},
    ]
    for case in cases:
        sim.inject(**case)
    return len(cases)


@pytest.mark.slow
def test_every_record_of_a_live_run_validates_in_every_format(tmp_path):
    with Simulator(alerts=5000, intel_docs=24, seed=17, history=6 * 3600, revisions=2) as sim:
        hostile = _inject_hostile(sim)
        sim.faults.garbage_rate = 0.5
        sim.faults.garbage_per_page = len(GARBAGE_KINDS)
        sim.faults.huge_details_bytes = 1_500_000  # over kafka.max_request_size: published without raw
        cfg = parse_pipeline(
            {
                "pipeline": {"name": "formats"},
                "tanium": {**sim.settings(), "page_size": 500},
                "source": {"start_from": "7h"},
                "output": {"formats": ["normalized", "ocsf", "ecs"]},
                "state": {"path": str(tmp_path)},
            }
        )
        out = _Lines()
        pipe = StreamPipeline(cfg, once=True, dry_run=True, out=out)
        assert pipe.run() == 0
        garbage = dict.fromkeys(kind for kind, _ in sim.garbage_log)
    assert not out.problems, "\n".join(out.problems[:30])
    records = out.records
    published = [r for r in records if r[0] != "dlq"]
    # one record per format per alert, in the configured order
    assert [f for f, _ in published] == ["normalized", "ocsf", "ecs"] * (len(published) // 3)
    alerts = [published[i : i + 3] for i in range(0, len(published), 3)]
    assert len(alerts) >= 5000 + hostile
    assert set(garbage) == set(GARBAGE_KINDS)  # every kind of garbage was served
    for (_, n), (_, o), (_, e) in alerts:
        assert n["uid"] == o["uid"] and o["guid"] == e["guid"]
        assert n["raw"] == o["raw"] == e["raw"]  # here only the huge record outgrows the limit, in every format
    types = {n["match_type"] for (_, n), _, _ in alerts}
    assert {"process", "file", "port"} <= types
    evidence = {tuple(o["evidence"]) for _, (_, o), _ in alerts}
    assert ("dst_endpoint", "process", "src_endpoint", "user") in evidence  # port matches
    assert ("file",) in evidence and ("process", "user") in evidence  # file at rest, process
    assert any(not n["raw"] for (_, n), _, _ in alerts)  # the huge record went without raw
    assert any(not o["enriched"] for _, (_, o), _ in alerts)  # the unknown IntelDoc
    assert any(n["uid"].startswith("garbage-") for (_, n), _, _ in alerts)


# ---- proof 2: generated hostile alerts -----------------------------------------------------------------------

_NAMES = [
    "match",
    "properties",
    "process",
    "parent",
    "file",
    "fullpath",
    "path",
    "hash",
    "md5",
    "sha1",
    "sha256",
    "size",
    "pid",
    "ppid",
    "name",
    "args",
    "user",
    "start_time",
    "recorder_unique_id",
    "local_ip",
    "remote_ip",
    "local_port",
    "remote_port",
    "finding",
    "first_seen",
    "last_seen",
    "system_info",
    "os",
    "platform",
    "bits",
    "patch_level",
    "whats",
    "additional_fields",
]
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what a JSON decoder hands over
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
    | st.sampled_from(
        [
            "",
            " ",
            "10.1.2.3",
            "::1",
            "fe80::1%eth0",
            "443",
            "d41d8cd98f00b204e9800998ecf8427e",
            "2023-10-16T12:26:51.000Z",
            "2023-10-16T12:26:51+02:00",
            "1697459178054",
            "Windows",
            "linux",
            "CORP\\jdoe",
            "C:\\Windows\\x.exe",
            "T1059.001",
            "high",
            "critical",
            "resolved",
        ]
    )
)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(_NAMES), inner, max_size=6),
    max_leaves=30,
)
_top = st.fixed_dictionaries(
    {"id": st.integers(min_value=1, max_value=10**9)},
    optional={
        "guid": _scalars,
        "state": _scalars,
        "severity": _scalars,
        "createdAt": _scalars,
        "updatedAt": _scalars,
        "alertedAt": _scalars,
        "computerName": _scalars,
        "computerIpAddress": _scalars,
        "eid": _scalars,
        "intelDocId": _scalars,
        "intelDocRevisionId": _scalars,
        "matchType": _scalars,
        "path": _scalars,
        "type": _scalars,
        "details": _json,
        "intelDoc": st.dictionaries(
            st.sampled_from(["name", "description", "type", "revisionId", "mitreAttack", "labelIds"]),
            _json
            | st.fixed_dictionaries(
                {"techniques": st.lists(st.dictionaries(st.sampled_from(["id", "name"]), _scalars))}
            ),
        ),
        "enrichment_error": _scalars,
        "extra": _json,
    },
)
_NORMALIZER = Normalizer(DEFAULT_FIELD_MAP, "hostile", time_adjustment=-30)


@settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(alert=_top, include_raw=st.booleans())
def test_generated_hostile_alerts_render_valid_documents(alert, include_raw):
    try:
        event = _NORMALIZER.normalize(alert)
    except NormalizeError:
        return  # the DLQ's business, before any format
    s = Settings("hostile", include_raw, "tanium.example.com")
    for fmt, doc in zip(("ocsf", "ecs"), render_all(["ocsf", "ecs"], alert, event, s), strict=True):
        value = encode(fmt, doc, 10**7)
        assert problems_of(fmt, value) == [], orjson.loads(value)


# ---- the mapping rules, on the reference alert -------------------------------------------------------------

DETAILS = {
    "match": {
        "hash": "17914125682699366401",
        "type": "process",
        "source": "recorder",
        "version": 1,
        "properties": {
            "pid": 9080,
            "args": '"msedge.exe" --no-startup-window',
            "file": {
                "md5": "d193ea4b8d102d020c02dc45af23ff0d",
                "sha1": "469e259b884043aedac879a96356fb741f82daa8",
                "sha256": "9ba39dd15eff718ff357db346d0fda3a12c9dbb216511cbb41050fb0d6b3d9c9",
                "fullpath": "C:\\Program Files (x86)\\Microsoft\\Edge\\Application\\msedge.exe",
            },
            "name": "msedge.exe",
            "user": "hostname\\sample",
            "start_time": "2023-10-13T14:46:31.000Z",
            "recorder_unique_id": "3994044258139188996",
            "parent": {
                "pid": 700,
                "name": "explorer.exe",
                "ppid": 4,
                "file": {"fullpath": "C:\\Windows\\explorer.exe"},
            },
        },
    },
    "finding": {
        "first_seen": "2023-10-16T12:26:51.000Z",
        "last_seen": "2023-10-16T12:27:51.000Z",
        "threat_id": "901388892329936882",
        "system_info": {
            "os": "Microsoft Windows 11 Pro",
            "bits": 64,
            "platform": "Windows",
            "patch_level": "10.0.22621.0.0",
        },
    },
}


def reference_alert(**top) -> dict:
    alert = {
        "id": 2,
        "eid": 1003,
        "state": "unresolved",
        "type": "detect.match",
        "guid": "00000000-0000-0000-114a-7429237cffc5",
        "priority": "high",
        "severity": "info",
        "details": orjson.loads(orjson.dumps(DETAILS)),
        "intelDocId": 700,
        "intelDocRevisionId": 3,
        "computerName": "Hostname",
        "computerIpAddress": "10.0.0.7",
        "matchType": "process",
        "alertedAt": "2023-10-16T12:26:51.000Z",
        "createdAt": "2023-10-16T12:29:34.849Z",
        "updatedAt": "2023-10-16T12:38:03.968Z",
        "intelDoc": {
            "id": 700,
            "name": "Testing eicar",
            "description": "Detects the EICAR test file.",
            "type": "tanium-signal",
            "revisionId": 3,
            "mitreAttack": {
                "techniques": [{"id": "T1059.001", "name": "Command and Scripting Interpreter: PowerShell"}]
            },
        },
    }
    alert.update(top)
    return alert


def both(alert: dict, include_raw: bool = False, adjust: float = 0) -> tuple[dict, dict]:
    event = Normalizer(DEFAULT_FIELD_MAP, "p1", time_adjustment=adjust, include_raw=include_raw).normalize(alert)
    ocsf, ecs = render_all(["ocsf", "ecs"], alert, event, Settings("p1", include_raw, "tanium.example.com"))
    for fmt, doc in (("ocsf", ocsf), ("ecs", ecs)):
        assert problems_of(fmt, encode(fmt, doc, 10**6)) == []
    return ocsf, ecs


@pytest.mark.parametrize("action", ["updated", "closed"])
def test_update_events_validate_in_every_format(action):
    """The update event of an alert whose state changed (connector/stream/updates.py), for simulator
    alerts of every match type and state: OCSF activity Update or Close with the new status, ECS
    event.type change, normalized event_action — each against the official and the shipped schemas."""
    with Simulator(alerts=200, intel_docs=12, seed=5, history=3600) as sim:
        alerts = [orjson.loads(orjson.dumps(sim.get_alert(i))) for i in range(1, 201)]
    normalizer = Normalizer(DEFAULT_FIELD_MAP, "p1", include_raw=True)
    settings, activity = Settings("p1", True, "tanium.example.com"), {"updated": 2, "closed": 3}[action]
    for alert in alerts:
        alert["details"] = orjson.loads(alert["details"])
        event = normalizer.normalize(alert)
        docs = render_all(FORMATS, alert, event, settings, action)
        for fmt, doc in zip(FORMATS, docs, strict=True):
            if fmt == "normalized":  # no official schema: the shipped one
                problems = [e.message for e in EVENT_SCHEMA.iter_errors(orjson.loads(serialize(doc)))]
            else:
                problems = problems_of(fmt, encode(fmt, doc, 10**6))
            assert problems == [], (fmt, alert["id"])
        normalized, ocsf, ecs = docs
        assert normalized["event_action"] == action
        assert (ocsf["activity_id"], ocsf["type_uid"], ocsf["status"]) == (
            activity,
            200400 + activity,
            STATUS[alert["state"]][1],
        )
        assert ecs["event"]["type"] == ["info", "change"] and ecs["event"]["action"] == action
    assert {a["matchType"] for a in alerts} == {"process", "file", "port"}
    assert {a["state"] for a in alerts} == {"unresolved", "inprogress", "resolved", "suppressed"}


def test_ocsf_carries_every_field_the_mapping_names():
    o, _ = both(reference_alert(), adjust=60)
    fi = o["finding_info"]
    assert (o["class_uid"], o["category_uid"], o["type_uid"], o["activity_id"]) == (2004, 2, 200401, 1)
    assert fi["uid"] == "00000000-0000-0000-114a-7429237cffc5"
    assert (fi["title"], fi["desc"]) == ("Testing eicar", "Detects the EICAR test file.")
    assert fi["analytic"] == {
        "uid": "700",
        "name": "Testing eicar",
        "desc": "Detects the EICAR test file.",
        "type_id": 1,
        "type": "Rule",
        "category": "tanium-signal",
        "version": "3",
    }
    assert fi["attacks"] == [
        {
            "technique": {
                "uid": "T1059",
                "name": "Command and Scripting Interpreter",
                "src_url": "https://attack.mitre.org/techniques/T1059/",
            },
            "sub_technique": {
                "uid": "T1059.001",
                "name": "PowerShell",
                "src_url": "https://attack.mitre.org/techniques/T1059/001/",
            },
        }
    ]
    assert o["attacks"] == fi["attacks"]  # security_control profile: duplicated, as the class asks
    assert fi["created_time"] == 1697459374849 and fi["modified_time"] == 1697459883968
    assert (fi["first_seen_time"], fi["last_seen_time"]) == (1697459211000, 1697459271000)
    assert o["time"] == 1697459211000 + 60_000  # the event time after the event-time adjustment
    assert (o["severity_id"], o["severity"], o["status_id"], o["status"]) == (1, "Informational", 1, "New")
    assert o["is_alert"] is True
    assert o["device"] == {
        "type_id": 0,
        "type": "Unknown",
        "hostname": "Hostname",
        "ip": "10.0.0.7",
        "uid": "1003",
        "os": {
            "name": "Microsoft Windows 11 Pro",
            "type_id": 100,
            "type": "Windows",
            "version": "10.0.22621.0.0",
            "cpu_bits": 64,
        },
    }
    (ev,) = o["evidences"]
    p = ev["process"]
    assert (p["pid"], p["name"], p["cmd_line"], p["uid"]) == (
        9080,
        "msedge.exe",
        '"msedge.exe" --no-startup-window',
        "3994044258139188996",
    )
    assert p["file"]["path"].endswith("msedge.exe") and p["file"]["name"] == "msedge.exe"
    assert [h["algorithm_id"] for h in p["file"]["hashes"]] == [1, 2, 3]
    assert p["created_time"] == 1697208391000
    assert p["parent_process"] == {
        "pid": 700,
        "name": "explorer.exe",
        "file": {"name": "explorer.exe", "path": "C:\\Windows\\explorer.exe", "type_id": 1, "type": "Regular File"},
        "parent_process": {"pid": 4},
    }
    assert ev["user"] == p["user"] == {"name": "sample", "domain": "hostname"}
    m = o["metadata"]
    assert m["product"] == {"name": "Threat Response", "vendor_name": "Tanium"} and m["version"] == "1.7.0"
    assert (m["uid"], m["original_time"], m["tenant_uid"]) == (fi["uid"], "2023-10-16T12:26:51.000Z", "p1")
    assert m["profiles"] == ["host", "security_control"]
    assert "raw_data" not in o
    # fields with no OCSF home, under their Tanium names
    assert o["unmapped"]["alert"]["priority"] == "high" and o["unmapped"]["alert"]["id"] == 2
    assert o["unmapped"]["finding"]["threat_id"] == "901388892329936882"
    assert "guid" not in o["unmapped"]["alert"] and "details" not in o["unmapped"]["alert"]


def test_ecs_carries_every_field_the_mapping_names():
    _, e = both(reference_alert(), include_raw=True)
    ev = e["event"]
    assert (ev["kind"], ev["category"], ev["type"]) == ("alert", ["intrusion_detection", "process"], ["info"])
    assert ev["id"] == "00000000-0000-0000-114a-7429237cffc5" and ev["dataset"] == "tanium.threat_response"
    assert (ev["created"], ev["start"], ev["end"]) == (
        "2023-10-16T12:29:34.849Z",
        "2023-10-16T12:26:51.000Z",
        "2023-10-16T12:27:51.000Z",
    )
    assert (ev["severity"], ev["risk_score"]) == (1, 0.0)
    assert orjson.loads(ev["original"])["guid"] == ev["id"]  # include_raw
    assert e["@timestamp"] == "2023-10-16T12:26:51.000Z" and e["ecs"] == {"version": "9.4.0"}
    assert e["rule"] == {
        "id": "700",
        "name": "Testing eicar",
        "description": "Detects the EICAR test file.",
        "category": "tanium-signal",
        "version": "3",
    }
    assert e["threat"] == {
        "framework": "MITRE ATT&CK",
        "technique": {
            "id": ["T1059"],
            "name": ["Command and Scripting Interpreter"],
            "reference": ["https://attack.mitre.org/techniques/T1059/"],
            "subtechnique": {
                "id": ["T1059.001"],
                "name": ["PowerShell"],
                "reference": ["https://attack.mitre.org/techniques/T1059/001/"],
            },
        },
    }
    assert e["host"]["name"] == "Hostname" and e["host"]["ip"] == ["10.0.0.7"] and e["host"]["os"]["type"] == "windows"
    p = e["process"]
    assert (p["pid"], p["name"], p["executable"]) == (
        9080,
        "msedge.exe",
        DETAILS["match"]["properties"]["file"]["fullpath"],
    )
    assert p["hash"]["sha256"] == DETAILS["match"]["properties"]["file"]["sha256"]
    assert p["parent"] == {"pid": 700, "name": "explorer.exe", "executable": "C:\\Windows\\explorer.exe"}
    assert e["user"] == {"name": "sample", "domain": "hostname"}
    assert e["related"]["hosts"] == ["Hostname"] and e["related"]["user"] == ["sample"]
    assert len(e["related"]["hash"]) == 3
    assert e["observer"]["vendor"] == "Tanium" and e["observer"]["hostname"] == "tanium.example.com"
    assert e["tanium"]["alert"]["state"] == "unresolved"


def test_network_and_file_matches():
    port = reference_alert(matchType="port")
    port["details"]["match"] = {
        "type": "port",
        "properties": {
            "process": {"pid": 6460, "name": "agentbeat.exe", "ppid": 2536, "user": "NT AUTHORITY\\SYSTEM"},
            "local_ip": "67.43.156.65",
            "remote_ip": "81.2.69.203",
            "local_port": 63123,
            "remote_port": "443",
        },
    }
    o, e = both(port)
    (ev,) = o["evidences"]
    assert ev["src_endpoint"] == {"ip": "67.43.156.65", "port": 63123}
    assert ev["dst_endpoint"] == {"ip": "81.2.69.203", "port": 443}
    assert ev["process"]["parent_process"] == {"pid": 2536}
    assert e["source"] == {"ip": "67.43.156.65", "port": 63123} and e["destination"]["port"] == 443
    assert e["event"]["category"] == ["intrusion_detection", "network"]
    assert set(e["related"]["ip"]) == {"10.0.0.7", "67.43.156.65", "81.2.69.203"}
    at_rest = reference_alert(matchType="file", path="/tmp/verybadvirus.vrs")
    at_rest["details"]["match"] = {
        "type": "file",
        "properties": {"md5": "02addf15dea00c97050cc5f08d095e65", "size": "69", "fullpath": "/tmp/verybadvirus.vrs"},
    }
    o, e = both(at_rest)
    assert o["evidences"] == [
        {
            "file": {
                "name": "verybadvirus.vrs",
                "path": "/tmp/verybadvirus.vrs",
                "type_id": 1,
                "type": "Regular File",
                "size": 69,
                "hashes": [{"algorithm_id": 1, "algorithm": "MD5", "value": "02addf15dea00c97050cc5f08d095e65"}],
            }
        }
    ]
    assert e["file"] == {
        "path": "/tmp/verybadvirus.vrs",
        "name": "verybadvirus.vrs",
        "size": 69,
        "hash": {"md5": "02addf15dea00c97050cc5f08d095e65"},
    }
    assert e["event"]["category"] == ["malware", "file"] and "process" not in e


@pytest.mark.parametrize(
    "severity, ocsf_severity, ecs_severity",
    [
        ("info", (1, "Informational"), (1, 0.0)),
        ("low", (2, "Low"), (2, 21.0)),
        ("medium", (3, "Medium"), (3, 47.0)),
        ("High", (4, "High"), (4, 73.0)),
        ("critical", (5, "Critical"), (5, 99.0)),
        ("catastrophic", (99, "catastrophic"), None),
        (None, (0, "Unknown"), None),
    ],
)
def test_severity_map(severity, ocsf_severity, ecs_severity):
    o, e = both(reference_alert(severity=severity))
    assert (o["severity_id"], o["severity"]) == ocsf_severity
    assert ((e["event"]["severity"], e["event"]["risk_score"]) if "severity" in e["event"] else None) == ecs_severity


@pytest.mark.parametrize(
    "state, status",
    [
        ("unresolved", (1, "New")),
        ("inprogress", (2, "In Progress")),
        ("suppressed", (3, "Suppressed")),
        ("resolved", (4, "Resolved")),
        ("dismissed", (99, "dismissed")),
        (None, None),
    ],
)
def test_state_map(state, status):
    o, e = both(reference_alert(state=state))
    assert ((o["status_id"], o["status"]) if "status_id" in o else None) == status
    assert e["tanium"]["alert"]["state"] == state  # ECS has no state field: the Tanium value


def test_an_alert_without_its_intel_doc_gets_fallback_text_and_says_why():
    alert = reference_alert(enrichment_error="IntelDoc 700: HTTP 503")
    del alert["intelDoc"]
    o, e = both(alert)
    title = "Threat Response alert: intel document 700, process match"
    assert o["finding_info"]["title"] == o["message"] == e["message"] == title
    assert o["finding_info"]["desc"] == f"{title} on Hostname"
    assert o["finding_info"]["analytic"] == {"uid": "700", "type_id": 1, "type": "Rule", "version": "3"}
    assert "attacks" not in o["finding_info"] and "threat" not in e
    assert o["unmapped"]["enrichment_error"] == e["tanium"]["enrichment_error"] == "IntelDoc 700: HTTP 503"
    assert e["rule"] == {"id": "700", "version": "3"}


def test_values_that_fail_their_check_stay_under_their_tanium_name():
    o, e = both(reference_alert(computerIpAddress="300.1.1.1", eid="x", guid=""))
    assert "ip" not in o["device"] and "ip" not in e["host"]
    assert o["unmapped"]["alert"]["computerIpAddress"] == e["tanium"]["alert"]["computerIpAddress"] == "300.1.1.1"
    assert o["unmapped"]["alert"]["eid"] == "x" and o["unmapped"]["alert"]["guid"] == ""
    uid = o["metadata"]["uid"]  # the normalizer's uid (no usable guid: the id)
    assert o["finding_info"]["uid"] == e["event"]["id"] == uid == "2"


def test_raw_data_only_with_include_raw():
    o, e = both(reference_alert(), include_raw=True)
    assert orjson.loads(o["raw_data"])["id"] == 2 and o["raw_data"] == e["event"]["original"]
    o, e = both(reference_alert(), include_raw=False)
    assert "raw_data" not in o and "original" not in e["event"]


def test_an_oversized_document_goes_without_the_raw_alert_or_to_the_dlq():
    alert = reference_alert()
    alert["details"]["match"]["blob"] = "A" * 200_000  # unmapped: only the raw alert holds it
    event = Normalizer(DEFAULT_FIELD_MAP, "p1").normalize(alert)
    s = Settings("p1", True, "")
    o = orjson.loads(encode("ocsf", render("ocsf", alert, event, s), 100_000))
    assert "raw_data" not in o and o["metadata"]["is_truncated"] is True and o["metadata"]["untruncated_size"] > 200_000
    assert o["unmapped"]["normalization_warnings"][-1].startswith("raw: left out, the ocsf record was")
    e = orjson.loads(encode("ecs", render("ecs", alert, event, s), 100_000))
    assert "original" not in e["event"] and e["tanium"]["normalization_warnings"][-1].startswith("raw: left out")
    assert "normalization_warnings" not in event["normalization_warnings"]  # the shared list is not touched
    huge = reference_alert()
    huge["details"]["match"]["properties"]["args"] = "B" * 200_000  # a mapped field: no way to shrink it
    event = Normalizer(DEFAULT_FIELD_MAP, "p1").normalize(huge)
    with pytest.raises(NormalizeError, match="^too large: the ecs record is"):
        encode("ecs", render("ecs", huge, event, s), 100_000)


def _mutated(doc: dict, path: str, value) -> dict:
    doc = orjson.loads(orjson.dumps(doc))
    *parents, last = path.split(".")
    target = doc
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value
    return doc


_DELETE = object()


@pytest.mark.parametrize(
    "path, value, problem",
    [
        ("evidences.0.process.parent_process.colour", "red", "colour: not an attribute here"),
        ("colour", "red", "$.colour: not an attribute here"),
        ("evidences.0.process.pid", "9080", "is not integer_t"),
        ("device.ip", "10.0.0.300", "does not match the ip_t pattern"),
        ("evidences.0.process.file.hashes.0.value", "xyz", "does not match the file_hash_t pattern"),
        ("status_id", 7, "is not one of"),
        ("severity", "High", "Inconsistent severity_id=1"),
        ("finding_info.uid", _DELETE, "finding_info.uid: required attribute missing"),
        ("class_uid", 2005, "class_uid must be 2004"),
        ("device.hostname", None, "null"),
    ],
)
def test_the_ocsf_checks_catch_departures(path, value, problem):
    o, _ = both(reference_alert())
    found = ocsf_problems(orjson.dumps(_mutated(o, path, value)))
    assert any(problem in p for p in found), found


@pytest.mark.parametrize(
    "path, value, problem",
    [
        ("process.colour", "red", "process.colour: not an ECS field"),
        ("process.pid", "9080", "process.pid: '9080' is not long"),
        ("rule.id", 700, "rule.id: 700 is not keyword"),
        ("event.id", ["a"], "event.id: an array, but the field is not"),
        ("event.kind", "incident", "event.kind: 'incident' is not an allowed value"),
        ("event.type", ["creation"], "event.type 'creation' is not expected for event.category 'intrusion_detection'"),
        ("event.created", "2023-10-16 12:29", "event.created: '2023-10-16 12:29' is not date"),
        ("host.ip", ["10.0.0.300"], "host.ip: '10.0.0.300' is not ip"),
        ("@timestamp", _DELETE, "@timestamp: required field missing"),
    ],
)
def test_the_ecs_checks_catch_departures(path, value, problem):
    _, e = both(reference_alert())
    found = ecs_problems(_mutated(e, path, value))
    assert any(problem in p for p in found), found


# ---- configuration ---------------------------------------------------------------------------------------


def _cfg(**sections):
    return parse_pipeline({"pipeline": {"name": "p"}, "tanium": {"host": "h", "api_key": "k"}, **sections})


def test_formats_default_to_the_normalized_event_and_topics_follow_kafka_topic():
    cfg = _cfg(kafka={"topic": "tr"})
    assert cfg.output.formats == ["normalized"]
    assert cfg.kafka.topics == {"ocsf": "tr.ocsf", "ecs": "tr.ecs"}
    cfg = _cfg(output={"formats": ["ecs", "ocsf"]}, kafka={"topic": "tr", "topics": {"ecs": "siem.alerts"}})
    assert cfg.output.formats == ["ecs", "ocsf"] and cfg.kafka.topics == {"ecs": "siem.alerts", "ocsf": "tr.ocsf"}


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"output": {"formats": []}}, "output.formats = []: needs at least one format; allowed: normalized, ocsf, ecs"),
        (
            {"output": {"formats": ["cef"]}},
            "output.formats = ['cef']: unknown format 'cef'; allowed: normalized, ocsf, ecs",
        ),
        ({"output": {"formats": "ocsf"}}, "output.formats = 'ocsf': must be a list of format names"),
        ({"output": {"formats": ["ecs", "ecs"]}}, "'ecs' listed twice; each format is published once"),
        ({"output": {"format": "ocsf"}}, "output.format: unknown setting"),
        ({"kafka": {"topics": {"normalized": "x"}}}, "kafka.topics: normalized events go to kafka.topic"),
        ({"kafka": {"topics": {"cef": "x"}}}, "kafka.topics: unknown format 'cef'; allowed: ocsf, ecs"),
        ({"kafka": {"topics": {"ocsf": "a b"}}}, "kafka.topics: ocsf = 'a b' is not a topic name"),
        ({"kafka": {"topics": "x"}}, "kafka.topics = 'x': Input should be a valid dictionary"),
        ({"kafka": {"topic": "t", "topics": {"ocsf": "t"}}}, "kafka.topics.ocsf = 't': 't' is also kafka.topic"),
        ({"kafka": {"topics": {"ecs": "d", "ocsf": "d"}}}, "kafka.topics.ecs = 'd': 'd' is also kafka.topics.ocsf"),
        ({"kafka": {"dlq_topic": "d", "topics": {"ecs": "d"}}}, "kafka.topics.ecs = 'd': 'd' is also kafka.dlq_topic"),
    ],
)
def test_configuration_errors_name_the_setting_and_what_is_allowed(sections, message):
    with pytest.raises(ConfigError) as e:
        _cfg(**sections)
    assert message in str(e.value)
    assert "Traceback" not in str(e.value)


# ---- the pipeline: one record per format, and the checkpoint waits for all of an alert's records ---------


def _pipeline(formats):
    """A pipeline whose _records gets its pages directly: no Tanium, Kafka or checkpoint store."""
    cfg = parse_pipeline(
        {
            "pipeline": {"name": "p"},
            "tanium": {"host": "h", "api_key": "k", "enrich_intel_docs": False},
            "output": {"formats": formats},
            "kafka": {"topic": "tr", "topics": {"ocsf": "tr-ocsf"}},
        }
    )
    return StreamPipeline(cfg, client=object(), sink=object(), store=object())


def _page(n: int, start: int = 1) -> list:
    page = []
    for i in range(start, start + n):
        alert = reference_alert(id=i, guid=f"guid-{i}", createdAt=f"2023-10-16T12:00:{i % 60:02d}.000Z")
        page.append((alert, Position(alert["createdAt"], i, i)))
    return page


def test_each_alert_is_one_record_per_format_keyed_by_guid():
    page = _page(2) + [(42, Position("2023-10-16T12:00:02.000Z", 2, 2))]  # not an object: DLQ
    records = list(_pipeline(["ocsf", "normalized", "ecs"])._records(page))
    # (alert, position, topic, key, value, headers, kind, final, created)
    assert [(r[2], r[3], r[6]) for r in records] == [
        ("tr-ocsf", b"guid-1", "published"),
        ("tr", b"guid-1", "published"),
        ("tr.ecs", b"guid-1", "published"),
        ("tr-ocsf", b"guid-2", "published"),
        ("tr", b"guid-2", "published"),
        ("tr.ecs", b"guid-2", "published"),
        ("tr.dlq", None, "dlq"),
    ]
    assert [r[1].id for r in records] == [1, 1, 1, 2, 2, 2, 2]  # every record carries its alert's position
    assert [r[7] for r in records] == [False, False, True, False, False, True, True]  # the alert's last is final
    assert [r[8] for r in records] == [None, None, page[0][0]["createdAt"], None, None, page[1][0]["createdAt"], None]
    headers = [dict(r[5]) for r in records]
    assert headers[0]["format"] == b"ocsf" and headers[0]["schema_version"] == b"1.7.0"
    assert headers[2]["format"] == b"ecs" and headers[2]["schema_version"] == b"9.4.0"
    assert "format" not in headers[1] and headers[1]["schema_version"] == b"1.0"  # unchanged
    assert [fmt_of(orjson.loads(r[4])) for r in records] == ["ocsf", "normalized", "ecs"] * 2 + ["dlq"]


def test_normalized_alone_publishes_what_it_did_before():
    records = list(_pipeline(["normalized"])._records(_page(3)))
    assert [(r[1].id, r[2], r[3], r[7]) for r in records] == [
        (1, "tr", b"guid-1", True),
        (2, "tr", b"guid-2", True),
        (3, "tr", b"guid-3", True),
    ]


class CheckpointWaitsForEveryFormat(RuleBasedStateMachine):
    """Model: the records of pages (three formats per alert, some alerts dead-lettered) enter an
    AckWindow in order and are acknowledged in any order, some failing. Guarantee: the position
    the checkpoint may move to never passes an alert one of whose records is not acknowledged."""

    pipe = _pipeline(["normalized", "ocsf", "ecs"])

    def __init__(self):
        super().__init__()
        self.window = AckWindow()
        self.pending: dict[int, int] = {}  # seq → its alert's id
        self.records_of: dict[int, set] = {}  # alert id → its seqs
        self.acked: set[int] = set()

    @rule(n=st.integers(min_value=1, max_value=5), bad=st.booleans())
    def read_page(self, n, bad):
        page = _page(n, max(self.records_of, default=0) + 1)
        if bad:  # an alert that cannot be normalized: one DLQ record
            page[-1] = ({"id": "x"}, page[-1][1])
        owners = [p.id for a, p in page for _ in range(1 if a == {"id": "x"} else 3)]
        records = list(self.pipe._records(page))
        assert len(records) == len(owners)
        for record, alert in zip(records, owners, strict=True):
            seq = self.window.add(record[1], record[7])
            self.records_of.setdefault(alert, set()).add(seq)
            self.pending[seq] = alert

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def acknowledge(self, data):
        seq = data.draw(st.sampled_from(sorted(self.pending)))
        ok = data.draw(st.integers(0, 9)) > 0  # mostly successes, so the prefix moves
        del self.pending[seq]
        self.window.done(seq, ok)
        if ok:
            self.acked.add(seq)

    @invariant()
    def checkpoint_passes_only_fully_acknowledged_alerts(self):
        pos = self.window.committable()
        if pos is not None:
            for alert, seqs in self.records_of.items():
                if alert <= pos.id:
                    assert seqs <= self.acked, f"the checkpoint at alert {pos.id} passes alert {alert}"

    @invariant()
    def all_acknowledged_means_the_checkpoint_is_at_the_last_alert(self):
        if self.records_of and not self.pending and not self.window.failed:
            assert self.window.committable().id == max(self.records_of)


test_checkpoint_waits_for_every_format = CheckpointWaitsForEveryFormat.TestCase
test_checkpoint_waits_for_every_format.settings = settings(
    max_examples=60, stateful_step_count=25, derandomize=True, deadline=None
)


def test_each_format_topic_has_a_zero_delivery_failures_series_from_the_start():
    from connector.metrics import Metrics

    cfg = _cfg(output={"formats": ["normalized", "ocsf"]}, kafka={"topic": "tr"})
    m = Metrics("p")
    m.init_from_config(cfg)
    text = m.render().decode()
    for topic in ("tr", "tr.dlq", "tr.ocsf"):
        assert f'tanium_connector_sink_delivery_failures_total{{pipeline="p",topic="{topic}"}} 0.0' in text
    assert 'topic="tr.ecs"' not in text  # not configured
