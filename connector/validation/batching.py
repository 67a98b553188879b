"""Shared validation queries: the units of work (one window or correlation range of one action),
the groups that share one Tanium query, and what a query stopped at `tanium.limit` tells about each
unit (see the engine's docstring on the limit)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from connector.timeutil import parse_ts


@dataclass(frozen=True)
class Unit:
    """One query of one action: window `k` of its schedule, or (k None) its correlation range.
    Raw alertedAt bounds (event time − adjustment), both inclusive."""

    aid: str
    k: int | None
    start: datetime
    end: datetime


@dataclass
class Group:
    """Units fetched with one shared query over [start, end]."""

    units: list[Unit]
    start: datetime
    end: datetime


@dataclass
class FetchStats:
    requests: int = 0
    alerts: int = 0
    limited: bool = False
    filtered: int | None = None
    first: datetime | None = None  # earliest / latest raw alertedAt returned (None: unknown)
    last: datetime | None = None
    times_known: bool = True

    def saw(self, alerts: list) -> None:
        for a in alerts:
            raw = a.get("alertedAt") if isinstance(a, dict) else None
            try:
                t = parse_ts(raw) if isinstance(raw, str) else None
            except (ValueError, TypeError):
                t = None
            if t is None:
                self.times_known = False
                continue
            self.first = t if self.first is None else min(self.first, t)
            self.last = t if self.last is None else max(self.last, t)

    def complete_for(self, u: Unit, g: Group) -> bool:
        """After a query that returned `limit` alerts: whether they are `u`'s whole answer, the first
        `limit` alerts of u's range (u's range is the query's, or holds every alert returned)."""
        if u.start <= g.start and u.end >= g.end:
            return True
        if not self.times_known or self.first is None or self.last is None:
            return False
        return u.start <= self.first and self.last <= u.end


def group_units(units: list[Unit], gap: timedelta) -> list[Group]:
    """Units whose raw ranges overlap or lie within `gap` of each other share one query."""
    out: list[Group] = []
    for u in sorted(units, key=lambda u: (u.start, u.end)):
        if out and u.start <= out[-1].end + gap:
            g = out[-1]
            g.units.append(u)
            g.end = max(g.end, u.end)
        else:
            out.append(Group([u], u.start, u.end))
    return out


def split_units(units: list[Unit], gap: timedelta) -> list[Group]:
    """Smaller groups for units whose shared query stopped at the limit before it held their
    answer: the separate ranges they form, or else two halves (in start order)."""
    groups = group_units(units, gap)
    if len(groups) > 1 or len(units) < 2:
        return groups
    ordered = groups[0].units
    half = len(ordered) // 2
    return [g for part in (ordered[:half], ordered[half:]) for g in group_units(part, gap)]
