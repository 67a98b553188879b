"""Security Validation: job actions and matching normalized events to them.

This module and windows.py (the query schedule) are the pure core (no I/O, no clock): `engine.py`
runs the shared alert queries, `runners.py` holds the file runner (`validate_file`) and
`kafka_runner.py` the Kafka one (`run_validation`). `check_start` takes the current time as an
argument.

Event time: the Normalizer already adds `validation.event_time_adjustment` to `event_time`; the
matcher compares that value as it is and never adds the adjustment again.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from connector.text import show
from connector.timeutil import format_ts, parse_ts, utcnow

ACTION_TYPES = ("host_cli", "network")
ACTION_KEYS = (
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
)
ACTOR_KEYS = ("hostnames", "ips")
EXPECTED_KEYS = ("file_hashes", "command_line_contains", "mitre_techniques")
_HASH = re.compile(r"^(?:[0-9a-fA-F]{32}|[0-9a-fA-F]{40}|[0-9a-fA-F]{64})$")
_TECHNIQUE = re.compile(r"^T\d{4}(?:\.\d{3})?$", re.IGNORECASE)
_HOSTNAME = re.compile(r"^[^\s/\\@]{1,255}$")
# the shape; parse_ts then rejects impossible dates (2026-02-30). The JSON Schema's pattern spells
# out the valid dates too, so that both accept the same strings.
_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ](?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d+)?([Zz]|[+-](?:[01]\d|2[0-3]):[0-5]\d)$"
)
MAX_ECHO = 65536  # bytes of a rejected input repeated in its rejection record


# ---------------------------------------------------------------------------------------------
# Job actions


@dataclass(frozen=True)
class Actor:
    hostnames: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.hostnames and not self.ips


@dataclass(frozen=True)
class Expected:
    file_hashes: tuple[str, ...] = ()  # lower-case hex
    command_line_contains: tuple[str, ...] = ()
    mitre_techniques: tuple[str, ...] = ()  # upper-case, e.g. T1059.001


@dataclass(frozen=True)
class JobAction:
    id: str
    job_id: str
    name: str
    type: str
    started_at: datetime
    ended_at: datetime | None = None
    source: Actor = Actor()
    destination: Actor = Actor()
    dest_port: int | None = None
    expected: Expected = Expected()
    raw: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class Rejection:
    """An invalid job action: `reason` names each bad field and what is allowed."""

    reason: str
    input: Any
    action_id: str | None = None

    def record(self, pipeline: str) -> dict:
        shown = self.input
        try:
            size = len(orjson.dumps(shown))
        except TypeError:
            shown, size = repr(shown), len(repr(shown))
        if size > MAX_ECHO:  # the results topic is no place for a megabyte of garbage
            text = shown if isinstance(shown, str) else orjson.dumps(shown).decode()
            shown = text[:MAX_ECHO] + f"… (truncated, {size} bytes)"
        return {
            "action_id": self.action_id,
            "result": "rejected",
            "reason": self.reason,
            "input": shown,
            "pipeline": pipeline,
            "decided_at": format_ts(utcnow()),
        }


def _ident(obj: dict, key: str, errors: list[str], required: bool = True) -> str | None:
    v = obj.get(key)
    if v is None:
        if required:
            errors.append(f"{key}: required (a non-empty string or integer)")
        return None
    if (
        isinstance(v, bool)
        or not isinstance(v, (str, int))
        or (isinstance(v, str) and not v.strip())
        or len(str(v)) > 200
    ):
        errors.append(f"{key}: must be a non-empty string (at most 200 characters) or an integer, got {show(v)}")
        return None
    return str(v).strip()


def _time(obj: dict, key: str, errors: list[str], required: bool) -> datetime | None:
    v = obj.get(key)
    if v is None:
        if required:
            errors.append(f"{key}: required (an RFC 3339 time such as 2026-01-31T12:00:00Z)")
        return None
    try:
        if not _RFC3339.match(v.strip()):
            raise ValueError(v)
        return parse_ts(v)
    except (ValueError, TypeError, AttributeError):
        errors.append(f"{key}: must be an RFC 3339 time with a time zone, such as 2026-01-31T12:00:00Z, got {show(v)}")
        return None


def _str_list(v: Any, key: str, errors: list[str], check, allowed: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if not isinstance(v, list):
        errors.append(f"{key}: must be a list of {allowed}, got {show(v)}")
        return ()
    out = []
    for i, item in enumerate(v):
        if not isinstance(item, str) or not item.strip() or not check(item.strip()):
            errors.append(f"{key}[{i}]: must be {allowed}, got {show(item)}")
        else:
            out.append(item.strip())
    return tuple(out)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _actor(obj: dict, key: str, errors: list[str]) -> Actor:
    v = obj.get(key)
    if v is None:
        return Actor()
    if not isinstance(v, dict):
        errors.append(f"{key}: must be an object with hostnames and ips lists, got {show(v)}")
        return Actor()
    for k in v:
        if k not in ACTOR_KEYS:
            errors.append(f"{key}.{k}: unknown field; allowed: {', '.join(ACTOR_KEYS)}")
    hosts = _str_list(
        v.get("hostnames"),
        f"{key}.hostnames",
        errors,
        lambda s: bool(_HOSTNAME.match(s)),
        "hostnames (no spaces, at most 255 characters)",
    )
    ips = _str_list(v.get("ips"), f"{key}.ips", errors, _is_ip, "IPv4 or IPv6 addresses")
    return Actor(hosts, tuple(str(ipaddress.ip_address(i)) for i in ips))


def _expected(obj: dict, errors: list[str]) -> Expected:
    v = obj.get("expected")
    if v is None:
        return Expected()
    if not isinstance(v, dict):
        errors.append(f"expected: must be an object with {', '.join(EXPECTED_KEYS)}, got {show(v)}")
        return Expected()
    for k in v:
        if k not in EXPECTED_KEYS:
            errors.append(f"expected.{k}: unknown field; allowed: {', '.join(EXPECTED_KEYS)}")
    hashes = _str_list(
        v.get("file_hashes"),
        "expected.file_hashes",
        errors,
        lambda s: bool(_HASH.match(s)),
        "MD5, SHA-1 or SHA-256 hex digests",
    )
    cmds = _str_list(
        v.get("command_line_contains"), "expected.command_line_contains", errors, lambda s: True, "non-empty strings"
    )
    techs = _str_list(
        v.get("mitre_techniques"),
        "expected.mitre_techniques",
        errors,
        lambda s: bool(_TECHNIQUE.match(s)),
        "MITRE ATT&CK technique ids such as T1059 or T1059.001",
    )
    return Expected(tuple(h.lower() for h in hashes), cmds, tuple(t.upper() for t in techs))


def parse_job_action(obj: Any) -> JobAction | Rejection:
    """A JSON object (already decoded) → JobAction, or a Rejection naming every bad field."""
    if not isinstance(obj, dict):
        return Rejection(
            "job action must be a JSON object with id, job_id, name, type, started_at, "
            f"source/destination; got {type(obj).__name__}",
            obj,
        )
    errors: list[str] = []
    for k in obj:
        if k not in ACTION_KEYS:
            errors.append(f"{k}: unknown field; allowed: {', '.join(ACTION_KEYS)}")
    action_id = _ident(obj, "id", errors)
    job_id = _ident(obj, "job_id", errors)
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        errors.append(f"name: required, a non-empty string; got {show(name)}")
    typ = obj.get("type")
    if typ not in ACTION_TYPES:
        errors.append(f"type: must be one of {', '.join(ACTION_TYPES)}; got {show(typ)}")
    started = _time(obj, "started_at", errors, required=True)
    ended = _time(obj, "ended_at", errors, required=False)
    if started and ended and ended < started:
        errors.append(f"ended_at: must not be before started_at ({obj['ended_at']} < {obj['started_at']})")
    source = _actor(obj, "source", errors)
    dest = _actor(obj, "destination", errors)
    port = obj.get("dest_port")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535):
        errors.append(f"dest_port: must be an integer from 0 to 65535; got {show(port)}")
        port = None
    expected = _expected(obj, errors)
    meta = obj.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        errors.append(f"metadata: must be an object; got {show(meta)}")
    if typ == "host_cli" and source.empty and dest.empty:
        errors.append(
            "source: a host_cli action needs at least one actor hostname or IP (source.hostnames / source.ips)"
        )
    if typ == "network":
        for key, actor in (("source", source), ("destination", dest)):
            if actor.empty:
                errors.append(f"{key}: a network action needs {key}.hostnames or {key}.ips")
    if errors:
        return Rejection("; ".join(errors), obj, action_id)
    # every check above records an error whenever it yields no value, so none is missing here
    assert action_id is not None and job_id is not None and started is not None
    assert isinstance(name, str) and isinstance(typ, str)
    return JobAction(action_id, job_id, name.strip(), typ, started, ended, source, dest, port, expected, obj)


def _span(seconds: float) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = float(f"{seconds / size:.3g}")
            return f"{n:g} {unit}{'' if n == 1 else 's'}"
    return f"{seconds:.0f} seconds"


def check_start(action: JobAction, now: datetime, max_clock_skew: float) -> Rejection | None:
    """A Rejection when `started_at` lies more than `max_clock_skew` minutes after `now`: a job
    action is sent when it starts, so a later start is a wrong clock or date, and waiting for it
    would hold the action (and in Kafka its partition's commit point) open for as long."""
    ahead = (action.started_at - now).total_seconds()
    if ahead <= max_clock_skew * 60:
        return None
    return Rejection(
        f"started_at: {format_ts(action.started_at)} is {_span(ahead)} ahead of this connector's clock "
        f"({format_ts(now)}); at most validation.max_clock_skew = {max_clock_skew:g} minutes ahead is accepted",
        action.raw,
        action.id,
    )


def parse_job_action_bytes(data: bytes | str) -> JobAction | Rejection:
    """A raw JSON text (a Kafka record value or a file line) → JobAction or Rejection."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        text = data.decode("utf-8", "replace") if isinstance(data, (bytes, bytearray)) else data
        return Rejection(f"not valid JSON ({e}); a job action is one JSON object", text)
    return parse_job_action(obj)


# ---------------------------------------------------------------------------------------------
# Matching


@dataclass
class Match:
    """Outcome for an event whose host identity matched an action: `matched` when every rule
    passed, otherwise a suspicious event with `failed` fields."""

    rules: list[str]
    failed: list[dict]

    @property
    def matched(self) -> bool:
        return not self.failed


def _norm_host(v: str) -> str:
    return v.strip().lower().rstrip(".")


def _ip(v: Any) -> str | None:
    if not isinstance(v, str):
        return None
    try:
        return str(ipaddress.ip_address(v.strip()))
    except ValueError:
        return None


def host_equal(a: str, b: str) -> bool:
    """Case-insensitive; an FQDN equals its short name both ways; two different FQDNs do not."""
    a, b = _norm_host(a), _norm_host(b)
    if a == b:
        return True
    if "." in a and "." in b:
        return False
    return a.split(".", 1)[0] == b.split(".", 1)[0]


def _values(event: dict, key: str) -> list[str]:
    v = event.get(key)
    if v is None or v == "":
        return []
    if isinstance(v, list):
        return [x for x in v if isinstance(x, str) and x.strip()]
    return [v] if isinstance(v, str) and v.strip() else []


def _side_match(event: dict, keys: tuple[str, ...], actor: Actor) -> list[str]:
    """Rules ('host:computer', 'ip:src_ip', …) by which the event fields `keys` name `actor`."""
    rules = []
    ips = set(actor.ips)
    for key in keys:
        for v in _values(event, key):
            ip = _ip(v)
            hit = ip in ips if ip else any(host_equal(v, h) for h in actor.hostnames)
            if hit:
                rules.append(f"{'ip' if ip else 'host'}:{key}")
                break
    return rules


HOST_KEYS = ("computer", "host", "additional_hosts", "src_ip", "dest_ip")
SRC_KEYS = ("src_ip", "computer", "host")  # the endpoint's own side of a connection
DST_KEYS = ("dest_ip",)


def _merge(a: Actor, b: Actor) -> Actor:
    return Actor(a.hostnames + b.hostnames, a.ips + b.ips)


def _port(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _markers(action: JobAction, event: dict, rules: list[str], failed: list[dict]) -> None:
    exp = action.expected
    if exp.file_hashes:
        have = {h.lower() for k in ("file_md5", "file_sha1", "file_sha256") for h in _values(event, k)}
        if not have:
            failed.append({"field": "file_hash", "reason": "missing", "expected": list(exp.file_hashes)})
        elif have & set(exp.file_hashes):
            rules.append("file_hash")
        else:
            failed.append(
                {"field": "file_hash", "reason": "mismatch", "expected": list(exp.file_hashes), "actual": sorted(have)}
            )
    if exp.command_line_contains:
        cmd = " ".join(_values(event, "command_line"))
        if not cmd:
            failed.append({"field": "command_line", "reason": "missing", "expected": list(exp.command_line_contains)})
        elif any(s.lower() in cmd.lower() for s in exp.command_line_contains):
            rules.append("command_line")
        else:
            failed.append(
                {
                    "field": "command_line",
                    "reason": "mismatch",
                    "expected": list(exp.command_line_contains),
                    "actual": cmd,
                }
            )
    if exp.mitre_techniques:
        tags = [t.upper() for t in _values(event, "mitre_techniques")]
        # an event tagged with a sub-technique (T1059.001) satisfies its parent (T1059)
        hit = [e for e in exp.mitre_techniques if any(t == e or t.startswith(e + ".") for t in tags)]
        if not tags:
            failed.append({"field": "mitre_techniques", "reason": "missing", "expected": list(exp.mitre_techniques)})
        elif hit:
            rules.append("mitre_technique")
        else:
            failed.append(
                {
                    "field": "mitre_techniques",
                    "reason": "mismatch",
                    "expected": list(exp.mitre_techniques),
                    "actual": tags,
                }
            )


def _side_failure(event: dict, keys: tuple[str, ...], field_name: str, actor: Actor) -> dict:
    present = [v for k in keys for v in _values(event, k)]
    if not present:
        return {"field": field_name, "reason": "missing", "expected": list(actor.hostnames + actor.ips)}
    return {"field": field_name, "reason": "mismatch", "expected": list(actor.hostnames + actor.ips), "actual": present}


def match_event(action: JobAction, event: dict) -> Match | None:
    """Host/IP identity, port and expected markers of one normalized event against one action.

    None: the event does not name the action's hosts at all (unrelated). Otherwise a Match whose
    `failed` list is empty (a matched event) or names the fields that failed (a suspicious event).
    The time check is the caller's (it knows the windows); `event_time` is used as normalized.
    """
    rules: list[str] = []
    failed: list[dict] = []
    if action.type == "host_cli":
        rules = _side_match(event, HOST_KEYS, _merge(action.source, action.destination))
        if not rules:
            return None
    else:
        src, dst = action.source, action.destination
        options = []
        for direction, a1, a2 in (("forward", src, dst), ("reversed", dst, src)):
            r1, r2 = _side_match(event, SRC_KEYS, a1), _side_match(event, DST_KEYS, a2)
            options.append(((bool(r1) and bool(r2), bool(r1) or bool(r2)), direction, a1, a2, r1, r2))
        # the direction with the best (both sides, one side) score; forward when they tie
        (both, one), direction, a1, a2, r1, r2 = max(options, key=lambda o: o[0])
        if not one:
            return None
        rules = [f"network:{direction}"] + r1 + r2
        if not r1:
            failed.append(_side_failure(event, SRC_KEYS, "src_ip", a1))
        if not r2:
            failed.append(_side_failure(event, DST_KEYS, "dest_ip", a2))
        if both and action.dest_port is not None:
            # seen from the destination host, the action's port is the local one (the event's src_port)
            port_field = "dest_port" if direction == "forward" else "src_port"
            seen = _port(event.get(port_field))
            if seen is not None:
                if seen == action.dest_port:
                    rules.append("dest_port")
                else:
                    failed.append(
                        {"field": port_field, "reason": "mismatch", "expected": action.dest_port, "actual": seen}
                    )
    _markers(action, event, rules, failed)
    return Match(rules, failed)


def event_time(event: dict) -> datetime | None:
    """The normalized (already adjusted) event time, or None when missing/unparseable."""
    value = event.get("event_time")
    if not isinstance(value, str):
        return None
    try:
        return parse_ts(value)
    except (ValueError, TypeError):
        return None


def identity_tokens(event: dict) -> set[str]:
    """Lookup keys for the action index: short host names and IPs the event mentions."""
    out = set()
    for key in HOST_KEYS:
        for v in _values(event, key):
            ip = _ip(v)
            out.add(ip if ip else _norm_host(v).split(".", 1)[0])
    return out


def action_tokens(action: JobAction) -> set[str]:
    a = _merge(action.source, action.destination)
    return {_norm_host(h).split(".", 1)[0] for h in a.hostnames} | set(a.ips)
