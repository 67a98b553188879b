"""Security Validation core: job-action parsing and schema, the query schedule, the matcher."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.validation.rules import (
    JobAction,
    Rejection,
    host_equal,
    match_event,
    parse_job_action,
    parse_job_action_bytes,
)
from connector.validation.windows import Schedule, query_windows

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "connector/schemas/job_action.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
T = datetime(2026, 3, 2, 12, 0, 0, tzinfo=UTC)


def action(**over) -> dict:
    base = {
        "id": "a1",
        "job_id": "j1",
        "name": "Mimikatz credential dump",
        "type": "host_cli",
        "started_at": "2026-03-02T12:00:00Z",
        "source": {"hostnames": ["WS-FIN-0001.corp.local"], "ips": ["10.20.1.11"]},
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def parsed(**over) -> JobAction:
    a = parse_job_action(action(**over))
    assert isinstance(a, JobAction), a
    return a


# ---- job actions -------------------------------------------------------------------------------


def test_valid_action_parses_with_all_fields():
    a = parsed(
        id=1001,
        job_id=77,
        ended_at="2026-03-02T12:00:05+00:00",
        dest_port=443,
        destination={"hostnames": ["srv-app-0002"], "ips": ["2001:db8::0001"]},
        expected={
            "file_hashes": ["D41D8CD98F00B204E9800998ECF8427E"],
            "command_line_contains": ["sekurlsa"],
            "mitre_techniques": ["t1003.001"],
        },
        metadata={"vid": "A101-123"},
    )
    assert a.id == "1001" and a.job_id == "77" and a.started_at == T
    assert a.ended_at == T + timedelta(seconds=5)
    assert a.destination.ips == ("2001:db8::1",)
    assert a.expected.file_hashes == ("d41d8cd98f00b204e9800998ecf8427e",)
    assert a.expected.mitre_techniques == ("T1003.001",)
    assert VALIDATOR.is_valid(action(id=1001, job_id=77, dest_port=443, metadata={"vid": "A101-123"}))


INVALID = [
    (action(id=None), "id: required"),
    (action(id=""), "id: must be a non-empty string"),
    (action(id=True), "id: must be a non-empty string"),
    (action(job_id=None), "job_id: required"),
    (action(name="  "), "name: required"),
    (action(type="email"), "type: must be one of host_cli, network; got 'email'"),
    (action(started_at="12:00"), "started_at: must be an RFC 3339 time"),
    (action(started_at="2026-03-02T12:00:00"), "started_at: must be an RFC 3339 time"),
    (action(started_at="2026-02-30T12:00:00Z"), "started_at: must be an RFC 3339 time"),
    (action(started_at="2025-02-29T12:00:00Z"), "started_at: must be an RFC 3339 time"),
    (action(started_at="2026-03-02T24:00:00Z"), "started_at: must be an RFC 3339 time"),
    (action(started_at="2026-03-02T12:00:00+02:60"), "started_at: must be an RFC 3339 time"),
    (action(started_at=None), "started_at: required"),
    (action(ended_at="2026-03-02T11:00:00Z"), "ended_at: must not be before started_at"),
    (action(source={"hostnames": "ws1"}), "source.hostnames: must be a list of hostnames"),
    (action(source={"ips": ["10.0.0.300"]}), "source.ips[0]: must be IPv4 or IPv6 addresses, got '10.0.0.300'"),
    (action(source={"hosts": ["ws1"]}), "source.hosts: unknown field; allowed: hostnames, ips"),
    (action(source={}), "source: a host_cli action needs at least one actor hostname or IP"),
    (action(type="network"), "destination: a network action needs destination.hostnames or destination.ips"),
    (action(dest_port=70000), "dest_port: must be an integer from 0 to 65535; got 70000"),
    (action(dest_port="443"), "dest_port: must be an integer from 0 to 65535"),
    (action(expected={"file_hashes": ["xyz"]}), "expected.file_hashes[0]: must be MD5, SHA-1 or SHA-256"),
    (action(expected={"mitre_techniques": ["Credential Dumping"]}), "expected.mitre_techniques[0]: must be MITRE"),
    (action(expected={"hashes": []}), "expected.hashes: unknown field"),
    (action(colour="red"), "colour: unknown field; allowed: id, job_id"),
]


@pytest.mark.parametrize("obj,message", INVALID, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(INVALID)])
def test_invalid_actions_are_rejected_with_the_field_and_what_is_allowed(obj, message):
    r = parse_job_action(obj)
    assert isinstance(r, Rejection)
    assert message in r.reason
    assert r.input == obj  # the record carries the input
    if "ended_at" not in message:  # ordering of two times is beyond JSON Schema
        assert not VALIDATOR.is_valid(obj), "the published JSON Schema must reject it too"


two_digits = st.integers(0, 99).map(lambda n: f"{n:02d}")
timestamps = st.builds(
    lambda year,
    month,
    day,
    sep,
    h,
    m,
    sec,
    frac,
    zone,
    pad: f"{pad}{year:04d}-{month}-{day}{sep}{h}:{m}:{sec}{frac}{zone}{pad}",
    st.sampled_from([0, 1, 1900, 2000, 2023, 2024, 2026, 2100, 2400, 9999]),
    two_digits,
    two_digits,
    st.sampled_from("Tt _"),
    two_digits,
    two_digits,
    two_digits,
    st.sampled_from(["", ".5", ".123456789", "."]),
    st.one_of(
        st.sampled_from(["Z", "z", ""]),
        st.builds(lambda sign, h, m: f"{sign}{h}:{m}", st.sampled_from("+-"), two_digits, two_digits),
    ),
    st.sampled_from(["", " "]),
)


@settings(max_examples=1500, derandomize=True, database=None)
@given(
    t=st.one_of(
        timestamps,
        timestamps.map(lambda t: t.replace("-0", "-1", 1)),
        st.dates().map(lambda d: f"{d.isoformat()}T12:00:00Z"),
    )
)
def test_parser_and_schema_accept_the_same_timestamps(t):
    """For started_at, the JSON Schema (a pattern; no format checker needed) and the parser agree
    on every string: impossible dates (2026-02-30, 2025-02-29), hours, minutes and offsets."""
    assert isinstance(parse_job_action(action(started_at=t)), JobAction) == VALIDATOR.is_valid(action(started_at=t))


def test_rejection_lists_every_bad_field_and_keeps_the_id():
    r = parse_job_action(action(type="nope", dest_port=-1))
    assert isinstance(r, Rejection) and r.action_id == "a1"
    assert "type:" in r.reason and "dest_port:" in r.reason
    rec = r.record("p1")
    assert rec["result"] == "rejected" and rec["action_id"] == "a1" and rec["input"]["dest_port"] == -1


def test_huge_rejected_input_is_truncated_in_the_record():
    r = parse_job_action_bytes(b'{"id": "a", "junk": "' + b"x" * 200_000 + b'"')
    rec = r.record("p")
    assert "not valid JSON" in rec["reason"] and len(rec["input"]) < 70_000 and "truncated" in rec["input"]


def test_non_object_and_bad_json_are_rejected_not_raised():
    assert "must be a JSON object" in parse_job_action([1, 2]).reason
    r = parse_job_action_bytes(b'{"id": "a1", ')
    assert isinstance(r, Rejection) and "not valid JSON" in r.reason and r.input == '{"id": "a1", '
    assert isinstance(parse_job_action_bytes(json.dumps(action()).encode()), JobAction)


def test_network_action_needs_both_actors_and_schema_agrees():
    good = action(type="network", destination={"ips": ["10.9.9.9"]}, dest_port=445)
    assert isinstance(parse_job_action(good), JobAction) and VALIDATOR.is_valid(good)
    bad = action(type="network", source={"hostnames": []}, destination={"ips": ["10.9.9.9"]})
    assert isinstance(parse_job_action(bad), Rejection) and not VALIDATOR.is_valid(bad)


def test_shipped_examples_are_valid_per_parser_and_schema():
    path = Path(__file__).resolve().parents[2] / "pipelines/examples/job-actions.jsonl"
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    assert len(lines) >= 4
    for ln in lines:
        obj = json.loads(ln)
        assert isinstance(parse_job_action(obj), JobAction), ln
        VALIDATOR.validate(obj)


# ---- schedule ----------------------------------------------------------------------------------


def hms(dt: datetime) -> str:
    return dt.strftime("%H:%M:%S")


DOC_WINDOWS = [
    ("11:55:00", "12:00:00"),
    ("11:55:30", "12:00:30"),
    ("11:56:00", "12:01:00"),
    ("11:56:30", "12:01:30"),
    ("11:57:00", "12:02:00"),
    ("11:57:30", "12:02:30"),
    ("11:58:00", "12:03:00"),
    ("11:58:30", "12:03:30"),
    ("11:59:00", "12:04:00"),
    ("11:59:30", "12:04:30"),
    ("12:00:00", "12:05:00"),
]


def test_documented_window_example_literally():
    """Q = 5, I = 30 s, D = 0, T = 12:00:00 → 11 windows 11:55:00–12:00:00 … 12:00:00–12:05:00,
    each run at its end; with D = 10 the same windows, the first run at 12:10:00."""
    ws = query_windows(T, query_time=5, query_interval=30, delay_time=0)
    assert [(hms(w.start), hms(w.end)) for w in ws] == DOC_WINDOWS
    assert [hms(w.run_at) for w in ws] == [e for _, e in DOC_WINDOWS]
    delayed = query_windows(T, query_time=5, query_interval=30, delay_time=10)
    assert [(hms(w.start), hms(w.end)) for w in delayed] == DOC_WINDOWS
    assert [hms(w.run_at) for w in delayed] == [
        "12:10:00",
        "12:10:30",
        "12:11:00",
        "12:11:30",
        "12:12:00",
        "12:12:30",
        "12:13:00",
        "12:13:30",
        "12:14:00",
        "12:14:30",
        "12:15:00",
    ]


def test_final_window_when_interval_does_not_divide_query_time():
    ws = query_windows(T, query_time=5, query_interval=45)
    assert len(ws) == 8  # k = 0 … 6 plus the final one
    assert (hms(ws[-2].start), hms(ws[-2].end)) == ("11:59:30", "12:04:30")
    assert (hms(ws[-1].start), hms(ws[-1].end), hms(ws[-1].run_at)) == ("12:00:00", "12:05:00", "12:05:00")
    assert all(w.run_at >= w.end for w in ws)


def test_windows_never_run_before_they_close_and_have_width_q():
    for q, i, d in [(5, 30, 0), (0.1, 1, 0), (3, 7, 2), (1, 120, 0), (2.5, 0.5, 0)]:
        ws = query_windows(T, q, i, d)
        assert all(w.run_at >= w.end and w.end - w.start == timedelta(minutes=q) for w in ws)
        assert ws[0].start == T - timedelta(minutes=q) and ws[-1].end == T + timedelta(minutes=q)


def test_due_counts_and_first_covering_window():
    s = Schedule.of(T, 5, 30, 10)
    assert s.due_until(T + timedelta(minutes=9, seconds=59)) == 0
    assert s.due_until(T + timedelta(minutes=10)) == 1
    assert s.due_until(T + timedelta(minutes=12, seconds=29)) == 5
    assert s.due_until(T + timedelta(hours=1)) == 11
    # 11:56:10 is in windows 2 … 10? no: windows k with start ≤ t ≤ end → k = 0 … 2
    w = s.first_covering(T - timedelta(minutes=3, seconds=50), 0, 11)
    assert w.index == 0
    w = s.first_covering(T - timedelta(minutes=3, seconds=50), 1, 11)
    assert w.index == 1
    assert s.first_covering(T - timedelta(minutes=3, seconds=50), 3, 11) is None
    assert s.first_covering(T + timedelta(minutes=5, seconds=1), 0, 11) is None
    assert s.first_covering(T + timedelta(minutes=5), 0, 11).index == 10


# ---- matcher -----------------------------------------------------------------------------------


def ev(**fields) -> dict:
    base = {"uid": "u1", "event_time": "2026-03-02T12:00:10.000Z"}
    base.update(fields)
    return base


@pytest.mark.parametrize(
    "a,b,same",
    [
        ("WS-FIN-0001.corp.local", "ws-fin-0001.CORP.local", True),
        ("ws-fin-0001", "WS-FIN-0001.corp.local", True),
        ("ws-fin-0001.corp.local", "ws-fin-0001", True),
        ("ws-fin-0001.corp.local.", "ws-fin-0001.corp.local", True),
        ("ws-fin-0001.corp.local", "ws-fin-0001.other.local", False),
        ("ws-fin-0001", "ws-fin-0002", False),
    ],
)
def test_host_equality_fqdn_and_short_both_ways(a, b, same):
    assert host_equal(a, b) is same


def test_host_cli_matches_by_hostname_fqdn_short_ip_and_additional_hosts():
    a = parsed()
    assert match_event(a, ev(computer="ws-fin-0001")).rules == ["host:computer"]
    assert match_event(a, ev(host="WS-FIN-0001.CORP.LOCAL")).rules == ["host:host"]
    assert match_event(a, ev(computer="other", src_ip="10.20.1.11")).rules == ["ip:src_ip"]
    assert match_event(a, ev(dest_ip="10.20.1.11")).rules == ["ip:dest_ip"]
    assert match_event(a, ev(computer="other", additional_hosts=["x", "ws-fin-0001.corp.local"])).matched
    assert match_event(a, ev(additional_hosts=["10.20.1.11"])).rules == ["ip:additional_hosts"]
    assert match_event(a, ev(computer="ws-fin-0002", src_ip="10.20.1.12")) is None
    short = parsed(source={"hostnames": ["ws-fin-0001"]})
    assert match_event(short, ev(computer="ws-fin-0001.corp.local")).matched


def net_action(**over):
    return parsed(
        type="network",
        source={"hostnames": ["msv-src"], "ips": ["10.1.0.5"]},
        destination={"hostnames": ["msv-dst.corp.local"], "ips": ["10.2.0.9"]},
        **over,
    )


def test_network_matches_forward_and_reversed_with_ports():
    a = net_action(dest_port=445)
    fwd = match_event(a, ev(src_ip="10.1.0.5", dest_ip="10.2.0.9", dest_port=445, src_port=51000))
    assert fwd.matched and fwd.rules[0] == "network:forward" and "dest_port" in fwd.rules
    # seen from the destination endpoint: local side is the destination actor, local port 445
    rev = match_event(a, ev(computer="msv-dst", src_ip="10.2.0.9", dest_ip="10.1.0.5", src_port=445, dest_port=51000))
    assert rev.matched and rev.rules[0] == "network:reversed" and "dest_port" in rev.rules
    no_port = match_event(a, ev(src_ip="10.1.0.5", dest_ip="10.2.0.9"))
    assert no_port.matched and "dest_port" not in no_port.rules  # compared only when both sides have one
    bad = match_event(a, ev(src_ip="10.1.0.5", dest_ip="10.2.0.9", dest_port=80))
    assert not bad.matched and bad.failed == [
        {"field": "dest_port", "reason": "mismatch", "expected": 445, "actual": 80}
    ]
    by_name = match_event(net_action(), ev(computer="MSV-SRC.corp.local", dest_ip="msv-dst"))
    assert by_name.matched and by_name.rules == ["network:forward", "host:computer", "host:dest_ip"]


def test_reversed_direction_port_mismatch_names_the_event_field_compared():
    """Seen from the destination endpoint the action's port is the event's src_port: a mismatch
    there is reported as src_port."""
    rev = match_event(
        net_action(dest_port=445), ev(src_ip="10.2.0.9", dest_ip="10.1.0.5", src_port=8445, dest_port=51000)
    )
    assert not rev.matched and rev.rules[0] == "network:reversed"
    assert rev.failed == [{"field": "src_port", "reason": "mismatch", "expected": 445, "actual": 8445}]


def test_network_one_side_only_is_suspicious_with_the_failed_field():
    a = net_action()
    missing = match_event(a, ev(src_ip="10.1.0.5"))
    assert not missing.matched
    assert missing.failed[0]["field"] == "dest_ip" and missing.failed[0]["reason"] == "missing"
    wrong = match_event(a, ev(src_ip="10.1.0.5", dest_ip="203.0.113.7"))
    assert wrong.failed[0] == {
        "field": "dest_ip",
        "reason": "mismatch",
        "expected": ["msv-dst.corp.local", "10.2.0.9"],
        "actual": ["203.0.113.7"],
    }
    assert match_event(a, ev(src_ip="10.9.9.9", dest_ip="203.0.113.7")) is None


def test_expected_markers_hash_substring_technique():
    a = parsed(
        expected={
            "file_hashes": ["A" * 32, "b" * 64],
            "command_line_contains": ["SEKURLSA::"],
            "mitre_techniques": ["T1003"],
        }
    )
    good = match_event(
        a,
        ev(
            computer="ws-fin-0001",
            file_md5="a" * 32,
            command_line="mimikatz sekurlsa::logonpasswords",
            mitre_techniques=["T1003.001"],
        ),
    )
    assert good.matched and good.rules == ["host:computer", "file_hash", "command_line", "mitre_technique"]
    assert match_event(
        a, ev(computer="ws-fin-0001", file_sha256="B" * 64, command_line="x sekurlsa::y", mitre_techniques=["T1003"])
    ).matched
    bad = match_event(a, ev(computer="ws-fin-0001", file_md5="c" * 32, mitre_techniques=["T1059"]))
    assert [(f["field"], f["reason"]) for f in bad.failed] == [
        ("file_hash", "mismatch"),
        ("command_line", "missing"),
        ("mitre_techniques", "mismatch"),
    ]
    # parent technique does not satisfy an expected sub-technique
    sub = parsed(expected={"mitre_techniques": ["T1003.001"]})
    assert not match_event(sub, ev(computer="ws-fin-0001", mitre_techniques=["T1003"])).matched


def test_matcher_uses_event_time_as_normalized():
    """The matcher never reads event_time (time is the engine's window check) — so the adjustment
    the Normalizer applied cannot be applied a second time here."""
    a = parsed()
    assert match_event(a, ev(computer="ws-fin-0001", event_time="1999-01-01T00:00:00.000Z")).matched


def test_timing_settings_defaults_and_bounds():
    from connector.config import ConfigError, parse_pipeline

    def cfg(**validation):
        return parse_pipeline(
            {
                "pipeline": {"name": "p", "mode": "validation"},
                "tanium": {"host": "h", "api_key": "k"},
                "validation": validation,
            }
        ).validation

    v = cfg()
    assert (v.max_clock_skew, v.max_lateness, v.session_timeout) == (5, 0.5, 10)
    for key, bad in (("max_clock_skew", -1), ("max_lateness", 61), ("session_timeout", 5)):
        with pytest.raises(ConfigError, match=f"validation.{key} = {bad}"):
            cfg(**{key: bad})
