"""Query semantics of the simulated alerts list: filter classes, limits, `expand`, `sort`."""

from __future__ import annotations

from typing import Any

from connector.simulator.catalogue import LABELS
from connector.simulator.clock import iso_ms
from connector.simulator.data import ALERT_FIELDS, Data

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


def updated_order(keys: list[tuple[str, bool]]) -> str | None:
    """'asc'/'desc' when the sort is updatedAt (then id) in one direction: the lifecycle index serves it."""
    cols = [c for c, _ in keys]
    if cols not in (["updatedAt"], ["updatedAt", "id"]) or len({d for _, d in keys}) != 1:
        return None
    return "desc" if keys[0][1] else "asc"


def sort_value(v: Any) -> tuple:
    return (1, "") if v is None else (0, v)


def list_intels(data: Data, params: list[tuple[str, str]]) -> tuple[list[dict], dict]:
    """A page of IntelDocs and its meta (totalCount, filteredCount)."""
    limit = int_param(params, "limit", 50, 0, MAX_LIMIT)
    offset = int_param(params, "offset", 0, 0, None)
    want: dict[str, list[str]] = {}
    for k, v in params:
        want.setdefault(k, []).append(v)
    out = []
    for d in data.docs:
        body = d.body(data.n_base)
        if "name" in want and not any(v.lower() in d.name.lower() for v in want["name"]):
            continue
        if "description" in want and not any(v.lower() in body["description"].lower() for v in want["description"]):
            continue
        if "type" in want and d.kind not in want["type"]:
            continue
        if "labelId" in want and not any(v.isdigit() and int(v) in d.labels for v in want["labelId"]):
            continue
        if "mitreTechniqueId" in want and not any(
            v.lower() in t.lower() for v in want["mitreTechniqueId"] for t in d.technique_ids
        ):
            continue
        out.append(body)
    return out[offset : offset + limit], {"totalCount": len(data.docs), "filteredCount": len(out)}


def intel_labels(data: Data, doc) -> list[dict]:
    """The labels of an IntelDoc, as GET .../intels/{id}/labels serves them."""
    return [
        {
            "id": i,
            "name": n,
            "description": f"{n} activity",
            "indicatorCount": 0,
            "signalCount": 3 + i,
            "createdAt": iso_ms(data.start_ms - 90 * 86_400_000 + i * 1000),
            "updatedAt": iso_ms(data.start_ms - 60 * 86_400_000 + i * 1000),
        }
        for i, n in LABELS
        if i in doc.labels
    ]
