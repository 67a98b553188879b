"""Timestamps: Tanium writes ISO-8601 UTC with milliseconds and `Z`; so do we."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_ts(value: str) -> datetime:
    """RFC 3339 / ISO-8601 with `Z` or an offset, 0–9 fractional digits → aware UTC datetime."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{value!r} is not a timestamp")
    v = value.strip().replace("z", "Z")
    if v.endswith("Z"):
        v = v[:-1] + "+00:00"
    m = re.match(r"^(.*T\d\d:\d\d:\d\d)(\.\d+)?(.*)$", v)
    if m and m.group(2) and len(m.group(2)) > 7:  # fromisoformat takes at most 6 digits
        v = m.group(1) + m.group(2)[:7] + m.group(3)
    dt = datetime.fromisoformat(v)
    if dt.tzinfo is None:
        raise ValueError(f"{value!r} has no time zone (add Z for UTC)")
    return dt.astimezone(UTC)


def format_ts(dt: datetime) -> str:
    """aware datetime → 2023-10-16T12:29:34.849Z"""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def parse_duration(value: str) -> float:
    m = _DURATION.match(value.strip())
    if not m:
        raise ValueError(f"{value!r} is not a duration such as 30s, 15m, 24h or 7d")
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if not math.isfinite(seconds):
        raise ValueError(f"{value!r} is too long a duration")
    return seconds


def parse_start(value: str, now: datetime | None = None) -> datetime:
    """`now`, a duration ago (`24h`, `7d`) or an RFC 3339 time."""
    now = now or datetime.now(UTC)
    v = value.strip()
    if v == "now":
        return now
    if _DURATION.match(v):
        try:
            return now - timedelta(seconds=parse_duration(v))
        except OverflowError:  # more days than timedelta holds, or before the year 1
            raise ValueError(f"{value!r} reaches back further than dates go; use a shorter duration") from None
    try:
        return parse_ts(v)
    except ValueError:
        raise ValueError(
            f"{value!r} is not 'now', a duration such as 24h or 7d, or an RFC 3339 time such as 2026-01-31T00:00:00Z"
        ) from None


def utcnow() -> datetime:
    return datetime.now(UTC)
