"""Security Validation query windows (reference security-validation.md 8.2).

With action start T, query time Q minutes, interval I seconds and delay D minutes, query k covers
[T − Q + k·I, T + k·I] for k = 0 … N, N = Q·60 / I, plus a final window [T, T + Q] when I does not
divide Q·60; query k runs at T + D + k·I, i.e. at its window end plus D, so never before the window
has closed. Times are kept in integer microseconds so that 0.1-minute or 0.5-second settings do not
drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from connector.timeutil import format_ts

_US = timedelta(microseconds=1)


@dataclass(frozen=True)
class Window:
    index: int
    start: datetime
    end: datetime
    run_at: datetime

    def covers(self, t: datetime) -> bool:
        return self.start <= t <= self.end

    def describe(self) -> dict:
        return {"index": self.index, "start": format_ts(self.start), "end": format_ts(self.end)}


def _us(td: timedelta) -> int:
    return td // _US


@dataclass(frozen=True)
class Schedule:
    """The windows of one action, computed on demand (an action can have many windows)."""

    started_at: datetime
    query_us: int
    interval_us: int
    delay_us: int

    @classmethod
    def of(cls, started_at: datetime, query_time: float, query_interval: float, delay_time: float) -> Schedule:
        q, i, d = round(query_time * 60e6), round(query_interval * 1e6), round(delay_time * 60e6)
        if q <= 0 or i <= 0 or d < 0:
            raise ValueError("query_time and query_interval must be > 0 and delay_time ≥ 0")
        return cls(started_at, q, i, d)

    @property
    def regular(self) -> int:
        """N + 1: windows k = 0 … N."""
        return self.query_us // self.interval_us + 1

    @property
    def count(self) -> int:
        return self.regular + (1 if self.query_us % self.interval_us else 0)

    def window(self, k: int) -> Window:
        if not 0 <= k < self.count:
            raise IndexError(k)
        t = self.started_at
        if k < self.regular:
            end = t + _US * (k * self.interval_us)
        else:  # the final window ending at T + Q
            end = t + _US * self.query_us
        return Window(k, end - _US * self.query_us, end, end + _US * self.delay_us)

    def windows(self) -> list[Window]:
        return [self.window(k) for k in range(self.count)]

    @property
    def first_start(self) -> datetime:
        return self.started_at - _US * self.query_us

    @property
    def last_end(self) -> datetime:
        return self.started_at + _US * self.query_us

    def due_until(self, now: datetime) -> int:
        """Number of windows whose run time is ≤ now (windows run in index order)."""
        elapsed = _us(now - self.started_at) - self.delay_us
        if elapsed < 0:
            return 0
        n = min(self.regular, elapsed // self.interval_us + 1)
        if n == self.regular and self.count > self.regular and elapsed >= self.query_us:
            n += 1
        return n

    def first_covering(self, t: datetime, lo: int, hi: int) -> Window | None:
        """The lowest-index window in [lo, hi) that contains t."""
        rel = _us(t - self.started_at)  # t − T
        k = max(lo, -(-rel // self.interval_us))  # ceil(rel / I): the first window ending at or after t
        if k < min(hi, self.regular):
            w = self.window(k)
            if w.covers(t):
                return w
        if hi > self.regular and self.count > self.regular and lo <= self.regular:
            w = self.window(self.regular)
            if w.covers(t):
                return w
        return None

    def span(self, lo: int, hi: int) -> list[tuple[datetime, datetime]]:
        """Time ranges covered by windows lo … hi−1 (one range when consecutive windows overlap)."""
        if lo >= hi:
            return []
        if self.interval_us <= self.query_us:
            ends = [self.window(k).end for k in (lo, hi - 1)]
            starts = [self.window(k).start for k in (lo, hi - 1)]
            return [(min(starts), max(ends))]
        return [(w.start, w.end) for w in (self.window(k) for k in range(lo, hi))]


def query_windows(
    started_at: datetime, query_time: float, query_interval: float, delay_time: float = 0
) -> list[Window]:
    """Every window of an action started at `started_at` (see the module docstring)."""
    return Schedule.of(started_at, query_time, query_interval, delay_time).windows()
