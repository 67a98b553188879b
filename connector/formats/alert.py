"""What the standard formats read from an enriched alert: each value read once, type-checked, and
kept only when it fits the target type, so ocsf.py and ecs.py only arrange it.

Sources (see ../shared/reference/tanium-tr-api.md 3.3–3.4 and 5.2): the alert's top-level fields, the
decoded `details` (`match.properties` by match type, `finding`), the joined `intelDoc`, and the
normalized event (its `uid`, `event_time` after the event-time adjustment, `ingested_at` and
`normalization_warnings`).

Rules shared by both formats:
- text: a string that is not blank; anything else is left out.
- integers: int (not bool) or a string of ASCII digits, within the target's range.
- hashes: hexadecimal strings only (md5, sha1, sha256).
- IP addresses: valid IPv4/IPv6, canonical form (the normalizer's check); ports 0–65535.
- times: RFC 3339 with a time zone, or epoch seconds / milliseconds (the normalizer's rule).
- a process is `match.properties.process` (port matches) or `match.properties` itself when it
  has a `pid`, `args` or `name` (process matches); its `parent` chain is followed up to
  MAX_ANCESTRY levels, and a bare `ppid` becomes a parent with only a pid.
- a file at rest is `match.properties` when it has `fullpath` or a hash and no process shape.
- Fields that have no home in the target, or whose value fails its check, go to `leftovers()`
  under their Tanium names, so nothing the alert said is dropped silently; a value nested deeper
  than MAX_DEPTH levels goes as its JSON text, so the record stays readable by depth-limited parsers.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import orjson

from connector.stream.normalize import _ip_or_none, _port
from connector.timeutil import parse_ts

MAX_ANCESTRY = 8  # parent levels followed (the simulator and real alerts have 2–3)
MAX_DEPTH = 16  # leftover values nested deeper become JSON text
MAX_INT32, MAX_INT64 = 2**31 - 1, 2**63 - 1
_HEX = re.compile(r"[0-9A-Fa-f]+")
_EPOCH_DAY = datetime(1970, 1, 1).toordinal()
HASHES = ("md5", "sha1", "sha256")

# notes the client and the enricher leave on an alert (see connector/stream/normalize.py)
NOTES = (
    ("detailsError", "details_error"),
    ("enrichment_error", "enrichment_error"),
    ("encodingError", "encoding_error"),
)
_FINDING_EXTRA = ("hunt_id", "threat_id", "intel_id", "reporting_id", "domain", "source_name", "description")
_MATCH_EXTRA = ("hash", "source", "version")
_DOC_EXTRA = ("type", "sourceId", "labelIds", "platforms", "intrinsicId", "status")


def text(v: Any) -> str | None:
    return v if v.__class__ is str and v and not v.isspace() else None


def integer(v: Any, high: int = MAX_INT64) -> int | None:
    c = v.__class__
    if c is str and 0 < len(v) <= 19 and v.isascii() and v.isdigit():
        v = int(v)
    elif c is not int:
        return None
    return v if 0 <= v <= high else None


def hex_hash(v: Any) -> str | None:
    return v if v.__class__ is str and len(v) <= 128 and _HEX.fullmatch(v) else None


def ip(v: Any) -> str | None:
    return _ip_or_none(v)


def port(v: Any) -> int | None:
    try:
        return None if v is None or v.__class__ is bool else _port(v)
    except ValueError:
        return None


def _when(v: Any) -> datetime | None:
    c = v.__class__
    try:
        if c is str:
            s = v.strip()
            if s.isascii() and s.isdigit():
                return _epoch(int(s))
            try:
                dt = datetime.fromisoformat(s)
            except ValueError:
                dt = parse_ts(s)  # up to 9 fractional digits, lower-case z
            return dt.astimezone(UTC) if dt.tzinfo is not None else None
        if c is int or c is float:
            return _epoch(v)
    except (ValueError, OverflowError, OSError):
        pass
    return None


def _epoch(x: float) -> datetime:
    if abs(x) >= 1e11:  # milliseconds (1e11 s is the year 5138)
        x = x / 1000
    return datetime.fromtimestamp(x, UTC)


Stamp = tuple[int, str]  # (epoch milliseconds for OCSF, RFC 3339 UTC text for ECS)


def stamp(v: Any) -> Stamp | None:
    """A time value as both formats write it, or None when `v` is not a time."""
    dt = _when(v)
    if dt is None:
        return None
    seconds = (dt.toordinal() - _EPOCH_DAY) * 86400 + dt.hour * 3600 + dt.minute * 60 + dt.second
    ms = seconds * 1000 + dt.microsecond // 1000
    if v.__class__ is str and len(v) == 24 and v[23] == "Z" and v[19] == "." and v[10] == "T":
        return ms, v  # Tanium's own form is already the canonical text
    return ms, rfc3339(dt)


def rfc3339(dt: datetime) -> str:
    return (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:"
        f"{dt.second:02d}.{dt.microsecond // 1000:03d}Z"
    )


def basename(path: str) -> str | None:
    return path[max(path.rfind("/"), path.rfind("\\")) + 1 :] or None


def _dict(v: Any) -> dict:
    return v if v.__class__ is dict else {}


def _hashes(f: dict) -> tuple[tuple[str, str], ...]:
    """(algorithm, hex) of a file node: flat md5/sha1/sha256 or a nested `hash` object."""
    nested = f.get("hash")
    src: dict = nested if nested.__class__ is dict else f
    out = []
    for algo in HASHES:
        h = hex_hash(src.get(algo))
        if h:
            out.append((algo, h))
    return tuple(out)


class User:
    __slots__ = ("name", "domain")

    def __init__(self, raw: str):
        # "DOMAIN\\name" on Windows, a bare name elsewhere
        domain, sep, name = raw.rpartition("\\")
        self.name = text(name) or raw
        self.domain = text(domain) if sep and text(name) else None


class File:
    __slots__ = ("path", "name", "hashes", "size")

    def __init__(self, path: str | None, hashes: tuple, size: int | None = None, name: str | None = None):
        self.path, self.hashes, self.size = path, hashes, size
        self.name = basename(path) if path else name


class Process:
    __slots__ = ("pid", "name", "cmd", "file", "user", "start", "uid", "parent")

    def __init__(self, node: dict, depth: int = 0):
        self.pid = integer(node.get("pid"), MAX_INT32)
        self.name = text(node.get("name"))
        self.cmd = text(node.get("args"))
        f = _dict(node.get("file"))
        path = text(f.get("fullpath")) or text(f.get("path"))
        hashes = _hashes(f)
        # a process image without a path is named after the process
        self.file = File(path, hashes, name=self.name and basename(self.name)) if path or hashes else None
        user = text(node.get("user"))
        self.user = User(user) if user else None
        self.start = stamp(node.get("start_time"))
        self.uid = text(node.get("recorder_unique_id")) or text(node.get("recorder_table_id"))
        parent = node.get("parent")
        if parent.__class__ is dict and depth < MAX_ANCESTRY:
            self.parent: Process | None = Process(parent, depth + 1)
        else:
            ppid = integer(node.get("ppid"), MAX_INT32)
            self.parent = Process({"pid": ppid}) if ppid is not None else None


def _technique(t: Any) -> tuple[str, str | None] | None:
    if t.__class__ is not dict:
        return None
    tid = text(t.get("id"))
    return (tid.strip(), text(t.get("name"))) if tid else None


class Facts:
    """The checked values of one alert, read once for every standard format."""

    def __init__(self, alert: dict, event: dict):
        self.alert, self.event = alert, event
        # top-level fields both formats map, when their value passes its check; every other top-level
        # field (state, severity, updatedAt… too, for their original text) is a leftover
        mapped: set[str] = set()

        def top(key: str, check) -> Any:
            v = check(alert.get(key))
            if v is not None:
                mapped.add(key)
            return v

        self.guid = top("guid", text)
        self.uid: str = event["uid"]
        self.severity = text(alert.get("severity"))
        self.state = text(alert.get("state"))
        self.created = top("createdAt", stamp)
        self.updated = stamp(alert.get("updatedAt"))
        self.alerted_text = text(alert.get("alertedAt"))
        self.alerted = stamp(self.alerted_text)
        self.host = top("computerName", text)
        self.host_ip = top("computerIpAddress", ip)
        eid = top("eid", integer)
        self.host_id = str(eid) if eid is not None else None
        doc_id = top("intelDocId", integer)
        self.doc_id = str(doc_id) if doc_id is not None else None
        rev = top("intelDocRevisionId", integer)
        self.alert_type = text(alert.get("type"))
        self._mapped = mapped
        self._leftovers: dict | None = None

        details = _dict(alert.get("details"))
        match = _dict(details.get("match"))
        self.match, finding = match, _dict(details.get("finding"))
        self.finding = finding
        self.match_type = text(alert.get("matchType")) or text(match.get("type"))
        self.match_source = text(match.get("source"))
        self.first_seen = stamp(finding.get("first_seen"))
        self.last_seen = stamp(finding.get("last_seen"))
        self.system_info = _dict(finding.get("system_info"))

        props = _dict(match.get("properties"))
        node = props.get("process")
        if node.__class__ is not dict:
            node = props if ("pid" in props or "args" in props or "name" in props) else None
        self.process = Process(node) if node is not None else None
        self.user = self.process.user if self.process else None
        self.file = None
        if node is None and ("fullpath" in props or any(h in props for h in HASHES)):
            hashes = _hashes(props)
            path = text(props.get("fullpath")) or text(alert.get("path"))
            if path or hashes:
                self.file = File(path, hashes, integer(props.get("size")))
        self.src_ip, self.src_port = ip(props.get("local_ip")), port(props.get("local_port"))
        self.dst_ip, self.dst_port = ip(props.get("remote_ip")), port(props.get("remote_port"))

        doc = _dict(alert.get("intelDoc"))
        self.doc = doc
        self.doc_name = text(doc.get("name"))
        self.doc_desc = text(doc.get("description"))
        self.doc_type = text(doc.get("type"))
        if rev is None:
            rev = integer(doc.get("revisionId"))
        self.doc_version = str(rev) if rev is not None else None
        techniques = _dict(doc.get("mitreAttack")).get("techniques")
        seen: dict[str, str | None] = {}
        for t in techniques if techniques.__class__ is list else ():
            got = _technique(t)
            if got and got[0] not in seen:
                seen[got[0]] = got[1]
        self.techniques = tuple(seen.items())

        ingested = stamp(event["ingested_at"])
        assert ingested is not None  # the normalizer writes it
        self.ingested: Stamp = ingested
        self.event_time: Stamp = stamp(event.get("event_time")) or ingested

    @property
    def title(self) -> str:
        if self.doc_name:
            return self.doc_name
        return f"Threat Response alert: intel document {self.doc_id or 'unknown'}, {self.match_type or 'unknown'} match"

    @property
    def desc(self) -> str:
        if self.doc_desc:
            return self.doc_desc
        path = text(self.alert.get("path"))
        return f"{self.title} on {self.host or 'an unknown host'}" + (f": {path}" if path else "")

    def leftovers(self) -> dict:
        """Tanium fields with no home in the target formats (original names and values): built once
        per alert, a new top-level dict per call (the values inside are shared)."""
        if self._leftovers is None:
            self._leftovers = self._build_leftovers()
        return dict(self._leftovers)

    def _build_leftovers(self) -> dict:
        alert, mapped = self.alert, self._mapped
        out: dict[str, Any] = {
            "alert": {
                k: _bounded(v)
                for k, v in alert.items()
                if k not in mapped and k != "details" and k != "intelDoc" and k not in _NOTE_KEYS
            }
        }
        doc = {k: _bounded(self.doc[k]) for k in _DOC_EXTRA if k in self.doc}
        if doc:
            out["intel_doc"] = doc
        finding = {k: _bounded(self.finding[k]) for k in _FINDING_EXTRA if k in self.finding}
        if self.system_info:
            finding["system_info"] = _bounded(self.system_info)
        whats = self.finding.get("whats")
        if whats.__class__ is list and whats and whats[0].__class__ is dict and "additional_fields" in whats[0]:
            finding["additional_fields"] = _bounded(whats[0]["additional_fields"])  # process injection
        if finding:
            out["finding"] = finding
        match = {k: _bounded(self.match[k]) for k in _MATCH_EXTRA if k in self.match}
        if match:
            out["match"] = match
        for key, name in NOTES:
            if key in alert:
                out[name] = _bounded(alert[key])
        warnings = self.event.get("normalization_warnings")
        if warnings:
            out["normalization_warnings"] = list(warnings)
        return out


_NOTE_KEYS = frozenset(k for k, _ in NOTES)


def _too_deep(v: Any, levels: int) -> bool:
    c = v.__class__
    if c is dict:
        return levels == 0 or any(_too_deep(x, levels - 1) for x in v.values())
    if c is list:
        return levels == 0 or any(_too_deep(x, levels - 1) for x in v)
    return False


def _bounded(v: Any) -> Any:
    """`v`, or its JSON text when it nests deeper than MAX_DEPTH: consumers' JSON parsers limit depth
    (pydantic's to 200, serde_json's to 128), and a hostile field must not make the record unreadable."""
    if (v.__class__ is dict or v.__class__ is list) and _too_deep(v, MAX_DEPTH):
        try:
            return orjson.dumps(v).decode()
        except orjson.JSONEncodeError:
            return f"(a value nested deeper than {MAX_DEPTH} levels, too deep to encode)"
    return v
