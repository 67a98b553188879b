"""The field map: which alert columns feed each normalized field, and the one check of a map.

A candidate is a dotted path into the alert, including the decoded `details` and the joined
`intelDoc`: `details.match.properties.user`. An integer segment indexes a list (`whats.0`, `-1`
for the last item; on an object it is the key "0"); `name[0]` is the same as `name.0`. `[]`
after a segment (`techniques[]`) or as a segment collects a list: the rest of the path is
applied to every item and the present values are gathered (nested `[]` flatten).

`check_field_map` is the one validation of a user's map (the config loader and the normalizer
both call it): known fields only, each a list of candidate paths, or the Security Validation
integration's string form "['msg_s','SyslogMessage']".
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from typing import Any

from connector.text import show

Getter = Callable[[Any], Any]

_P = "details.match.properties"
# Normalized field → candidate source columns, first present non-empty value wins.
DEFAULT_FIELD_MAP: dict[str, list[str]] = {
    "uid": ["guid", "id"],
    "event_time": ["alertedAt", "details.finding.first_seen", "createdAt"],
    "description": ["intelDoc.name", "path", "matchType"],
    "computer": ["computerName"],
    "host": ["computerName"],
    "additional_hosts": ["computerName", "computerIpAddress", f"{_P}.local_ip", f"{_P}.remote_ip"],
    "src_ip": [f"{_P}.local_ip", "computerIpAddress"],
    "src_port": [f"{_P}.local_port"],
    "dest_ip": [f"{_P}.remote_ip", "computerIpAddress"],
    "dest_port": [f"{_P}.remote_port"],
    "user": [f"{_P}.user", f"{_P}.process.user"],
    "process": [f"{_P}.name", f"{_P}.process.name"],
    "command_line": [f"{_P}.args", f"{_P}.process.args"],
    "file_path": [f"{_P}.fullpath", f"{_P}.file.fullpath", f"{_P}.process.file.fullpath", "path"],
    "file_md5": [f"{_P}.md5", f"{_P}.file.md5", f"{_P}.process.file.md5"],
    "file_sha1": [f"{_P}.sha1", f"{_P}.file.sha1", f"{_P}.process.file.sha1"],
    "file_sha256": [f"{_P}.sha256", f"{_P}.file.sha256", f"{_P}.process.file.sha256"],
    "signature_id": ["intelDocId"],
    "signature": ["intelDoc.name"],
    "severity": ["severity"],
    "priority": ["priority"],
    "state": ["state"],
    "match_type": ["matchType", "details.match.type"],
    "mitre_techniques": ["intelDoc.mitreAttack.techniques[].id"],
    "url": [],
    "domain": [],
    "email_sender": [],
    "email_recipient": [],
    "email_subject": [],
}


class FieldMapError(ValueError):
    """A field map entry is unusable; str() names the field, the candidate and what is allowed."""


# ---- path compilation ------------------------------------------------------------------------

_PATH_HELP = (
    "dotted names, integer list indexes and '[]' to collect a list, "
    "e.g. details.match.properties.user or intelDoc.mitreAttack.techniques[].id"
)
_SEGMENT = re.compile(r"([^\[\]]*)((?:\[-?\d*\])*)")
_INDEX = re.compile(r"-?\d+")
_EACH = ("each",)


def path_ops(path: str) -> list[tuple]:
    """ "a.b[0][]" → [("key", "a"), ("key", "b"), ("idx", 0, "0"), ("each",)]"""
    if not isinstance(path, str) or not path.strip():
        raise ValueError("empty column path")
    ops: list[tuple] = []
    for seg in path.strip().split("."):
        m = _SEGMENT.fullmatch(seg)
        if not m or (not m.group(1) and not m.group(2)):
            raise ValueError(f"bad segment {seg!r}")
        name, brackets = m.group(1), m.group(2)
        if name:
            ops.append(("idx", int(name), name) if _INDEX.fullmatch(name) else ("key", name))
        for b in re.findall(r"\[(-?\d*)\]", brackets):
            if b == "":
                ops.append(_EACH)
            elif b == "-":
                raise ValueError(f"bad index in {seg!r}")
            else:
                ops.append(("idx", int(b), b))
    return ops


def _index(obj, n: int, key: str):
    if isinstance(obj, list):
        try:
            return obj[n]
        except IndexError:
            return None
    if isinstance(obj, dict):
        return obj.get(key)
    return None


def _walker(ops: list[tuple]) -> Getter:
    if all(op[0] == "key" for op in ops):
        keys = tuple(op[1] for op in ops)
        if len(keys) == 1:
            (k,) = keys

            def get1(obj):
                try:
                    return obj.get(k)
                except AttributeError:  # not an object
                    return None

            return get1

        def get(obj):
            try:
                for k in keys:
                    obj = obj.get(k)
                return obj
            except AttributeError:  # reached null or a non-object
                return None

        return get

    steps = tuple(ops)

    def walk(obj):
        for op in steps:
            if op[0] == "key":
                obj = obj.get(op[1]) if isinstance(obj, dict) else None
            else:
                obj = _index(obj, op[1], op[2])
            if obj is None:
                return None
        return obj

    return walk


def compile_path(path: str) -> Getter:
    """A candidate column → a function alert → value (None when absent). Raises ValueError."""
    try:
        ops = path_ops(path)
    except ValueError as e:
        raise ValueError(f"{path!r} is not a column path ({e}); use {_PATH_HELP}") from None
    return compile_ops(ops)


def compile_ops(ops: list[tuple]) -> Getter:
    if _EACH not in ops:
        return _walker(ops)
    cut = ops.index(_EACH)
    head = _walker(ops[:cut]) if cut else (lambda obj: obj)
    rest = ops[cut + 1 :]
    tail = compile_ops(rest) if rest else None
    flatten = _EACH in rest

    def collect(obj):
        v = head(obj)
        if v is None:
            return None
        out = []
        for item in v if isinstance(v, list) else (v,):
            if tail is not None:
                item = tail(item)
            if is_empty(item):
                continue
            if flatten and isinstance(item, list):
                out.extend(item)
            else:
                out.append(item)
        return out

    return collect


def is_empty(v) -> bool:
    if v is None:
        return True
    c = v.__class__
    if c is str:
        return not v or v.isspace()
    if c is list or c is dict:
        return not v
    return False


def check_field_map(value: Any) -> dict[str, list[str]]:
    """The map as {field: [candidate, …]}, every path compiled once; FieldMapError names the
    field, the value and what is allowed."""
    if not isinstance(value, dict):
        raise FieldMapError("must be a table of field = [candidate, …]")
    out = {}
    for field, cands in value.items():
        if field not in DEFAULT_FIELD_MAP:
            raise FieldMapError(f"unknown field {field!r}; allowed: {', '.join(DEFAULT_FIELD_MAP)}")
        if isinstance(cands, str):  # the integration's string form "['msg_s','SyslogMessage']"
            try:
                cands = ast.literal_eval(cands.strip()) if cands.strip().startswith("[") else [cands]
            except (ValueError, SyntaxError, MemoryError, RecursionError):  # the last two: absurd nesting
                raise FieldMapError(f"{field}: {cands[:200]!r} is not a list such as \"['a','b.c']\"") from None
        if not isinstance(cands, (list, tuple)) or not all(isinstance(c, str) and c.strip() for c in cands):
            raise FieldMapError(f"{field}: must be a list of non-empty column paths, got {show(cands)}")
        out[field] = [c.strip() for c in cands]
        for c in out[field]:
            try:
                compile_path(c)
            except ValueError as e:
                raise FieldMapError(f"{field}: {e}") from None
    return out
