"""Query semantics of the simulated alerts list: filter classes, limits, `expand`, `sort`."""

from __future__ import annotations

from typing import Any

from connector.simulator.data import ALERT_FIELDS

TR_PATH = "/plugin/products/threat-response/api/v1"
MAX_LIMIT = 500
EXACT_FILTERS = {"state", "severity", "priority", "type", "matchType"}
NUMBER_FILTERS = {"intelDocId", "scanConfigId"}
CONTAINS_FILTERS = {"computerName", "computerIpAddress", "guid", "path", "details"}
DOC_FILTERS = {"intelType", "intelDocName", "intelSource", "labelName", "mitreId", "platform"}


class BadRequest(Exception):
    """A query the real server answers with 400."""


def expand_fields(params: list[tuple[str, str]]) -> set[str]:
    return {x.strip() for k, v in params if k == "expand" for x in v.split(",")}


def int_param(params: list[tuple[str, str]], name: str, default: int, low: int, high: int | None) -> int:
    vals = [v for k, v in params if k == name]
    if not vals:
        return default
    v = vals[-1].strip()
    if not v.lstrip("-").isdigit():
        raise BadRequest(f"{name} must be an integer, not {vals[-1]!r}")
    n = int(v)
    if n < low or (high is not None and n > high):
        raise BadRequest(
            f"{name} must be between {low} and {high}" if high is not None else f"{name} must be at least {low}"
        )
    return n


def sort_keys(params: list[tuple[str, str]]) -> list[tuple[str, bool]]:
    keys = []
    for k, v in params:
        if k != "sort":
            continue
        for col in v.split(","):
            col = col.strip()
            if not col:
                continue
            desc = col.startswith("-")
            col = col.lstrip("+-")
            if col not in ALERT_FIELDS or col == "details":
                columns = ", ".join(f for f in ALERT_FIELDS if f != "details")
                raise BadRequest(f"cannot sort by {col!r}; columns: {columns}")
            keys.append((col, desc))
    return keys


def natural_order(keys: list[tuple[str, bool]]) -> str | None:
    """'asc'/'desc' when the sort equals id order (ids increase with createdAt), else None."""
    if not keys:
        return "asc"
    cols = [c for c, _ in keys]
    if cols not in (["createdAt"], ["id"], ["createdAt", "id"]):
        return None
    dirs = {d for _, d in keys}
    if len(dirs) != 1:
        return None
    return "desc" if dirs.pop() else "asc"


def sort_value(v: Any) -> tuple:
    return (1, "") if v is None else (0, v)
