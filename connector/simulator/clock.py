"""The simulator's times: epoch milliseconds, written as Tanium writes them (2023-10-16T12:29:34.849Z)."""

from __future__ import annotations

import functools
import time
from datetime import datetime

from connector.timeutil import parse_ts


@functools.lru_cache(maxsize=8192)
def _iso_second(s: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s))


def iso_ms(ms: int) -> str:
    """epoch milliseconds → 2023-10-16T12:29:34.849Z"""
    s, m = divmod(ms, 1000)
    return f"{_iso_second(s)}.{m:03d}Z"


def to_ms(value: datetime | str | float | int) -> int:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"{value!r} has no time zone")
        return int(value.timestamp() * 1000)
    if isinstance(value, str):
        return int(parse_ts(value).timestamp() * 1000)
    return int(value * 1000)  # epoch seconds


def now_ms() -> int:
    return time.time_ns() // 1_000_000
