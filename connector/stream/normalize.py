"""normalize: applies the field map to an enriched alert and builds the output event.

Field map rules (every normalized field → a list of candidate columns; the path syntax is in
connector/fieldmap.py):
- The first candidate whose value is present and non-empty wins; empty = missing, null, "",
  whitespace only, [] or {}. 0 and false are values. `additional_hosts` instead gathers every
  value of all its candidates (deduplicated, first-seen order).
- A single-valued field that receives a list takes the list's first non-empty item.
- Types are checked after the choice (no fall-back to the next candidate): a value that fails
  is set to null and described in `normalization_warnings` (and counted in
  normalize_warnings{field}). Every field of DEFAULT_FIELD_MAP is always in the event: null when
  nothing matched, [] for the two list fields, so consumers see one stable shape.
  - text fields: strings; integers and floats become their decimal text (signature_id "700"),
    booleans "true"/"false"; objects are rejected.
  - src_port, dest_port: integers 0–65535; digit strings ("443") are accepted.
  - src_ip: an IPv4/IPv6 address, emitted in canonical form (IPv6 zone ids such as %eth0 are
    refused). dest_ip: the same, or a hostname (letters, digits, '-', '_', dots; ≤ 255 characters).
  - event_time: RFC 3339 with a time zone (or epoch seconds / milliseconds as a number or digit
    string), plus `time_adjustment` seconds, emitted as UTC `2023-10-16T12:26:51.000Z`.
  - uid: text; when no candidate gives one it is synthesized as the sha256 (hex) of the alert's
    id, guid, computerName, alertedAt, intelDocId and findingId, so a replay gets the same uid.
  - mitre_techniques, additional_hosts: lists of strings, deduplicated.

The map is compiled once into one generated function (see _Compiler): no path parsing, no regex
on the hot path. Records that cannot be normalized at all raise NormalizeError (the pipeline sends
them to the dead-letter topic): not an object, neither `id` nor `guid`, `id` not an integer (or
digit string), `guid` not a string; `serialize()` raises it too for an event JSON cannot hold.
Its reason starts with a short code before ':' ("not an object", "no id", "bad id",
"not serializable"), usable as a metric label.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

import orjson

from connector import __version__
from connector.fieldmap import (
    DEFAULT_FIELD_MAP,
    FieldMapError,
    Getter,
    check_field_map,
    compile_ops,
    is_empty,
    path_ops,
)
from connector.metrics import NO_METRICS, Metrics
from connector.text import json_type, show
from connector.timeutil import parse_ts

SCHEMA_VERSION = "1.0"
OBSERVER_VENDOR, OBSERVER_PRODUCT = "Tanium", "Threat Response"


class NormalizeError(Exception):
    """The record cannot become an event; `reason` is "<code>: <details>"."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
        self.code = reason.split(":", 1)[0]


# ---- value checks (each returns the clean value or raises ValueError) ---------------------------


class _Bad(ValueError):
    pass


def _text(v) -> str:
    c = v.__class__
    if c is str:
        return v
    if c is int or c is float:
        return str(v)
    if c is bool:
        return "true" if v else "false"
    if isinstance(v, str):
        return str(v)
    raise _Bad


def _port(v) -> int:
    c = v.__class__
    if c is int:
        n = v
    elif c is str:
        s = v.strip()
        if not (0 < len(s) <= 5 and s.isascii() and s.isdigit()):
            raise _Bad
        n = int(s)
    elif c is float and v.is_integer():
        n = int(v)
    else:
        raise _Bad
    if 0 <= n <= 65535:
        return n
    raise _Bad


_IP_CACHE: dict[str, str | None] = {}  # the same few host IPs repeat on every page


def _ip_or_none(v) -> str | None:
    if v.__class__ is not str or len(v) > 100:  # the longest IPv6 text is 45 characters
        return None
    if v in _IP_CACHE:
        return _IP_CACHE[v]
    try:
        ip = str(ipaddress.ip_address(v.strip()))
    except ValueError:
        ip = None
    if ip and "%" in ip:  # an IPv6 zone id only means something on the host that wrote it
        ip = None
    if len(_IP_CACHE) >= 4096:
        _IP_CACHE.clear()
    _IP_CACHE[v] = ip
    return ip


def _ip(v) -> str:
    ip = _ip_or_none(v)
    if ip is None:
        raise _Bad
    return ip


_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
HOSTNAME_RE = rf"(?![0-9.]+$){_LABEL}(?:\.{_LABEL})*\.?"
_HOSTNAME = re.compile(HOSTNAME_RE)


def _dest(v) -> str:
    ip = _ip_or_none(v)
    if ip is not None:
        return ip
    if v.__class__ is str:
        s = v.strip()
        if len(s) <= 255 and _HOSTNAME.fullmatch(s):
            return s
    raise _Bad


def _fmt(dt: datetime) -> str:
    return (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:"
        f"{dt.second:02d}.{dt.microsecond // 1000:03d}Z"
    )


def _time_check(adjust: float) -> Callable[[Any], str]:
    delta = timedelta(seconds=adjust)

    def check(v) -> str:
        c = v.__class__
        if c is str:
            s = v.strip()
            if s.isascii() and s.isdigit():
                dt = _epoch(int(s))
            else:
                if not delta and len(s) == 24 and s[23] == "Z" and s[19] == "." and s[10] == "T" and s.isascii():
                    datetime.fromisoformat(s)  # validates; the text is already canonical
                    return s
                try:
                    dt = datetime.fromisoformat(s)
                except ValueError:
                    dt = parse_ts(s)  # lower-case z and other spellings it accepts
                if dt.tzinfo is None:
                    raise _Bad
                if dt.utcoffset():
                    dt = dt.astimezone(UTC)
        elif c is int or c is float:
            dt = _epoch(v)
        else:
            raise _Bad
        return _fmt(dt + delta if delta else dt)

    return check


def _epoch(x: float) -> datetime:
    if abs(x) >= 1e11:  # milliseconds (1e11 s is the year 5138)
        x = x / 1000
    return datetime.fromtimestamp(x, UTC)


_MESSAGES = {
    "text": "is not a text value",
    "port": "is not an integer 0–65535",
    "ip": "is not an IPv4 or IPv6 address",
    "dest": "is not an IP address or a hostname of at most 255 characters",
    "time": "is not an RFC 3339 time with a time zone (such as 2023-10-16T12:26:51.000Z)",
}
_KINDS = {"src_port": "port", "dest_port": "port", "src_ip": "ip", "dest_ip": "dest", "event_time": "time"}
_CHECK_ERRORS = (ValueError, TypeError, OverflowError, OSError)


# ---- output helpers ----------------------------------------------------------------------------

_now_cache: tuple[int, str] = (0, "")


def _now() -> str:
    """Current UTC time as 2023-10-16T12:29:34.849Z; the seconds part is formatted once a second."""
    global _now_cache
    t = time.time()
    sec = int(t)
    cached = _now_cache
    if cached[0] != sec:
        cached = _now_cache = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return f"{cached[1]}.{int((t - sec) * 1000):03d}Z"


_UID_FIELDS = ("id", "guid", "computerName", "alertedAt", "intelDocId", "findingId")


def synthesize_uid(alert: dict) -> str:
    """Deterministic uid from stable alert fields (the same alert always gets the same uid)."""
    parts = [alert.get(k) for k in _UID_FIELDS]
    try:
        data = orjson.dumps(parts, option=orjson.OPT_NON_STR_KEYS, default=repr)
    except orjson.JSONEncodeError:
        data = repr(parts).encode("utf-8", "backslashreplace")
    return hashlib.sha256(data).hexdigest()


def serialize(event: dict) -> bytes:
    """The event as JSON bytes; NormalizeError if it cannot be encoded (e.g. nesting > 254 levels)."""
    try:
        return orjson.dumps(event)
    except orjson.JSONEncodeError as e:
        raise NormalizeError(f"not serializable: {e}") from None


def load_event_schema() -> dict:
    """The JSON Schema (draft 2020-12) of the output event, shipped in connector/schemas."""
    return orjson.loads(resources.files("connector").joinpath("schemas/event.schema.json").read_bytes())


# ---- the normalizer ----------------------------------------------------------------------------


def _pick1(x):
    """A candidate's value for a single-valued field: None if empty, a list's first non-empty item."""
    if x is None:
        return None
    c = x.__class__
    if c is list:
        for item in x:
            if not is_empty(item):
                return item
        return None
    return None if is_empty(x) else x


class _Compiler:
    """Turns the field map into the source of one straight-line function `fields(alert, ev, warnings)`.

    Why generated code: normalize runs once per alert, and a loop over ~30 fields × candidates with a
    call per path costs ~3× more than straight-line code in which each shared path prefix
    (details → match → properties …) is looked up once per alert. Every key appears in the source
    only as a repr() literal, so no map content can change the code's meaning. Paths with list
    indexes or `[]` call their compiled accessor (compile_path) instead.
    """

    def __init__(self):
        self.lines: list[str] = ["def fields(alert, ev, warnings):"]
        self.prefixes: dict[tuple, str] = {}
        self.getters: list[Getter] = []

    def _prefix(self, keys: tuple) -> str:
        """Variable holding the object at `keys` (a dict) or None; emitted once, parents first."""
        var = self.prefixes.get(keys)
        if var is None:
            if len(keys) == 1:
                src = f"alert.get({keys[0]!r})"
            else:
                parent = self._prefix(keys[:-1])
                src = f"{parent}.get({keys[-1]!r}) if {parent} is not None else None"
            var = self.prefixes[keys] = f"p{len(self.prefixes)}"
            self.head.append(f"    {var} = {src}")
            self.head.append(f"    if not isinstance({var}, dict): {var} = None")
        return var

    def expr(self, path: str) -> str:
        ops = path_ops(path)
        if all(op[0] == "key" for op in ops):
            keys = tuple(op[1] for op in ops)
            if len(keys) == 1:
                return f"alert.get({keys[0]!r})"
            p = self._prefix(keys[:-1])
            return f"({p}.get({keys[-1]!r}) if {p} is not None else None)"
        self.getters.append(compile_ops(ops))
        return f"_G[{len(self.getters) - 1}](alert)"

    def build(self, paths: dict[str, list[str]]) -> str:
        self.head: list[str] = []
        body: list[str] = []
        for field in DEFAULT_FIELD_MAP:
            f = repr(field)
            exprs = [self.expr(c) for c in paths.get(field, [])]
            if field == "additional_hosts":  # every value of every candidate, deduplicated in order
                body.append("    h = {}")
                for e in exprs:
                    body.append(f"    x = {e}")
                    body.append("    if x.__class__ is str and x and not x.isspace(): h[x] = None")
                    body.append(f"    elif not is_empty(x): h.update(dict.fromkeys(_to_list({f}, x, warnings)))")
                body.append(f"    ev[{f}] = list(h)")
                continue
            body.append("    x = None")
            for e in exprs:
                body.append("    if x is None:")
                body.append(f"        x = {e}")
                if field == "mitre_techniques":
                    body.append("        if is_empty(x): x = None")
                else:  # a non-blank string wins at once; anything else goes through _pick1
                    body.append("        if x.__class__ is not str or not x or x.isspace(): x = _pick1(x)")
            if field == "mitre_techniques":
                body.append(f"    ev[{f}] = [] if x is None else _to_list({f}, x, warnings)")
            elif field == "uid":
                body.append(f"    ev[{f}] = x if x.__class__ is str else _uid(x, alert, warnings)")
            elif _KINDS.get(field, "text") == "text":
                body.append(f"    ev[{f}] = x if x is None or x.__class__ is str else _check({f}, x, warnings)")
            else:
                body.append(f"    ev[{f}] = None if x is None else _check({f}, x, warnings)")
        self.lines += self.head + body
        return "\n".join(self.lines) + "\n"


# notes the client and the enricher leave on an alert → normalization warning prefixes
_NOTES = (("detailsError", "details"), ("enrichment_error", "intelDoc"), ("encodingError", "encoding"))


class Normalizer:
    def __init__(
        self,
        field_map: dict[str, list[str]],
        pipeline: str,
        time_adjustment: float = 0,
        include_raw: bool = True,
        observer_host: str = "",
        metrics: Metrics = NO_METRICS,
    ):
        try:
            paths = check_field_map(field_map)
        except FieldMapError as e:
            raise FieldMapError(f"field map: {e}") from None
        time_check = _time_check(float(time_adjustment))
        checks = {"text": _text, "port": _port, "ip": _ip, "dest": _dest, "time": time_check}
        self._checks = {f: (checks[_KINDS.get(f, "text")], _MESSAGES[_KINDS.get(f, "text")]) for f in DEFAULT_FIELD_MAP}
        compiler = _Compiler()
        self.source = compiler.build(paths)  # kept for debugging: print(normalizer.source)
        namespace: dict[str, Any] = {
            "_G": tuple(compiler.getters),
            "_pick1": _pick1,
            "is_empty": is_empty,
            "_to_list": self._to_list,
            "_uid": self._uid,
            "_check": self._check,
        }
        exec(compile(self.source, "<field map>", "exec"), namespace)  # noqa: S102 (see _Compiler)
        self._fields: Callable[[Any, dict, list], None] = namespace["fields"]
        self.include_raw = include_raw
        self._observer = {
            "vendor": OBSERVER_VENDOR,
            "product": OBSERVER_PRODUCT,
            "host": observer_host or "",
            "integration": pipeline,
        }
        self._m = metrics
        self._m_warn: dict[str, Any] = {}
        p = metrics.pipeline
        self._m_in = metrics.records_received.labels(p, "normalize")
        self._m_out = metrics.records_sent.labels(p, "normalize")

    def normalize(self, alert: Any) -> dict:
        """The output event for `alert`; NormalizeError when the record cannot be normalized."""
        self._m_in.inc()
        event = self._event(alert)
        self._m_out.inc()
        return event

    def normalize_each(self, alerts: Iterable) -> Iterator[dict | NormalizeError]:
        """normalize() of each alert, one at a time as the caller asks for the next (so that it can
        finish with an alert before the next is normalized), with the NormalizeError in place of the
        event of an alert that cannot be normalized; the stage's counters move once, when the
        iteration ends or is closed."""
        n = failed = 0
        try:
            for alert in alerts:
                n += 1
                try:
                    event: dict | NormalizeError = self._event(alert)
                except NormalizeError as e:
                    event = e
                    failed += 1
                yield event
        finally:
            self._m_in.inc(n)
            self._m_out.inc(n - failed)

    def _event(self, alert: Any) -> dict:
        try:
            _check_record(alert)
        except NormalizeError as e:
            self._m.records_dropped.labels(self._m.pipeline, "normalize", e.code).inc()
            raise
        warnings: list[str] = []
        if "detailsError" in alert or "enrichment_error" in alert or "encodingError" in alert:
            for key, label in _NOTES:
                note = alert.get(key)
                if note is not None:
                    warnings.append(f"{label}: {note if isinstance(note, str) else show(note)}"[:400])
        ev: dict[str, Any] = {}
        self._fields(alert, ev, warnings)
        ev["observer"] = self._observer.copy()
        ev["connector"] = {"version": __version__}
        ev["schema_version"] = SCHEMA_VERSION
        ev["ingested_at"] = _now()
        ev["normalization_warnings"] = warnings
        if self.include_raw:
            ev["raw"] = alert
        return ev

    def _check(self, field: str, v, warnings: list[str]):
        check, message = self._checks[field]
        try:
            return check(v)
        except _CHECK_ERRORS:
            self._warn(warnings, field, f"{field}: {show(v)} {message}")
            return None

    def _uid(self, v, alert: dict, warnings: list[str]) -> str:
        if v is not None:
            v = self._check("uid", v, warnings)
        return synthesize_uid(alert) if v is None else v

    def _to_list(self, field: str, v, warnings: list[str]) -> list[str]:
        out: dict[str, None] = {}
        for item in v if isinstance(v, list) else (v,):
            if is_empty(item):
                continue
            try:
                out[_text(item)] = None
            except _CHECK_ERRORS:
                self._warn(warnings, field, f"{field}: {show(item)} {_MESSAGES['text']}")
        return list(out)

    def _warn(self, warnings: list[str], field: str, text: str) -> None:
        warnings.append(text)
        child = self._m_warn.get(field)
        if child is None:
            child = self._m_warn[field] = self._m.normalize_warnings.labels(self._m.pipeline, field)
        child.inc()


def _check_record(alert: Any) -> None:
    if not isinstance(alert, dict):
        raise NormalizeError(f"not an object: the record is {json_type(alert)}, a JSON object is expected")
    id_, guid = alert.get("id"), alert.get("guid")
    if isinstance(id_, str) and not id_.strip():
        id_ = None
    if id_ is not None and not (
        (isinstance(id_, int) and not isinstance(id_, bool))
        or (isinstance(id_, str) and id_.strip().isdigit() and id_.isascii())
    ):
        raise NormalizeError(f"bad id: id {show(id_)} is not an integer")
    if guid is not None and not isinstance(guid, str):
        raise NormalizeError(f"bad id: guid {show(guid)} is not a string")
    if id_ is None and is_empty(guid):
        raise NormalizeError("no id: the record has neither an id nor a guid")
