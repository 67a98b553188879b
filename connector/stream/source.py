"""source: reads every Threat Response alert once, in server order, page by page.

Cursor design
-------------
Sort key: `sort=createdAt,id` ascending. `createdAt` is the server's insert time, so an alert
that arrives late (its endpoint-side `alertedAt` minutes or days in the past) still sorts after
everything already read: an `alertedAt` high-water mark would skip it, this cursor cannot. `id`
breaks ties between alerts inserted in the same millisecond.

There is no `createdAtFrom` filter in the API, so the position in the sorted list is an offset.
The cursor is (createdAt, id, offset): the key of the last record read and how many records up
to and including it the list held. Every page is requested with a one-record overlap: it starts
at the last record already read. If that first record is the one we read last, the page is
aligned and everything after it is new. If it is not, the offset drifted (Tanium prunes old
alerts, shifting the list left): when the page starts after the cursor key we may have skipped
records, so we step the offset back (doubling) until the cursor record is in view again, and
records at or before the cursor key are filtered out. So page and poll boundaries produce no
duplicates and no gaps; new alerts only ever append at the end. A record without a usable
(createdAt, id) cannot be placed or deduplicated: it is delivered (the DLQ explains it) and does
not move the cursor.

With no checkpoint yet, the first record created at or after `source.start_from` is found by
binary search over offsets with `limit=1` probes (about log2(total) requests).

The in-memory cursor moves as pages are read; the durable checkpoint is a separate thing that
the pipeline advances only behind Kafka acknowledgements (see pipeline.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from connector.timeutil import format_ts

log = logging.getLogger(__name__)

SORT = "createdAt,id"


@dataclass(frozen=True)
class Position:
    """Where a record sits: its sort key and the count of records up to and including it."""

    created_at: str | None
    id: int | None
    offset: int

    def to_checkpoint(self) -> dict:
        return {"created_at": self.created_at, "id": self.id, "offset": self.offset}

    @classmethod
    def from_checkpoint(cls, data: dict) -> Position:
        return cls(data.get("created_at"), data.get("id"), int(data.get("offset", 0)))


def sort_key(alert) -> tuple[str, int] | None:
    """(createdAt, id), or None for a record that cannot be placed (the DLQ will explain it)."""
    if not isinstance(alert, dict):
        return None
    created, ident = alert.get("createdAt"), alert.get("id")
    if not isinstance(created, str) or not isinstance(ident, int) or isinstance(ident, bool) or ident <= 0:
        return None
    return created, ident


def _created(items: list) -> str:
    """createdAt of the first placeable record of a probe page ("~" sorts after any time)."""
    return next((k[0] for k in map(sort_key, items) if k is not None), "~")


class AlertSource:
    def __init__(self, client, page_size: int, limit: int, metrics=None):
        self.client = client
        self.page_size = page_size
        self.limit = limit
        self.metrics = metrics
        self.key: tuple[str, int] | None = None  # in-memory cursor: greatest key read
        self.offset = 0  # records up to and including the last one read
        self.anchor: tuple[str, int] | None = None  # key of the last record read
        self.start_at: datetime | None = None  # used while no key is known

    def resume(self, checkpoint: dict | None, start_at: datetime) -> None:
        if checkpoint and checkpoint.get("id") is not None:
            pos = Position.from_checkpoint(checkpoint)
            self.key, self.offset, self.start_at = (pos.created_at, pos.id), pos.offset, None
        else:
            self.key, self.offset, self.start_at = None, 0, start_at
        self.anchor = self.key

    def _first_offset_at(self, when: datetime) -> int:
        """Index of the first alert with createdAt >= when (binary search with limit=1 probes)."""
        target = format_ts(when)
        probe = self.client.list_alerts([], offset=0, limit=1, sort=SORT)
        total = probe.filtered if probe.filtered is not None else probe.total
        if total is None or _created(probe.items) >= target:
            return 0  # everything is new enough, or no meta: scan from the start, the cycle filters by time
        lo, hi = 0, total
        while lo < hi:
            mid = (lo + hi) // 2
            if _created(self.client.list_alerts([], offset=mid, limit=1, sort=SORT).items) < target:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def cycle(self) -> Iterator[list[tuple[object, Position]]]:
        """One poll cycle: yields pages of (alert, position) that are new, up to `limit` records.
        Sets `self.hit_limit` when the cycle stopped at the limit (more is waiting)."""
        min_created = None
        if self.key is None:
            if self.offset == 0 and self.start_at:
                self.offset = self._first_offset_at(self.start_at)  # once; later cycles go on from it
            start = self.offset
            min_created = format_ts(self.start_at) if self.start_at else None
        else:
            start = max(0, self.offset - 1)
        overlap = 1 if self.page_size > 1 else 0
        step_back = self.page_size
        emitted = 0
        while emitted < self.limit:
            page = self.client.list_alerts([], offset=start, limit=self.page_size, sort=SORT).items
            if not page:
                break
            first = sort_key(page[0])
            # aligned: the page starts exactly on the last record read, so the rest is new by position
            aligned = self.key is not None and start == self.offset - 1 and first == self.anchor
            # a page that should start at or before the cursor record but starts after it: records were
            # pruned below us since we counted, so step back until the cursor record is in view again
            if (
                not aligned
                and self.key is not None
                and 0 < start < self.offset
                and first is not None
                and first > self.key
            ):
                log.warning("alert list shifted (pruning?) at offset %d; stepping back %d", start, step_back)
                start = max(0, start - step_back)
                step_back *= 2
                continue
            saved, out = (self.key, self.offset, self.anchor), []
            index = start - 1  # list index of the last placeable record seen; unplaceable ones hold none
            for i, alert in enumerate(page):
                k = sort_key(alert)
                if k is not None:
                    index += 1
                if aligned:
                    new = i > 0
                elif k is None:
                    new = True  # cannot be placed or deduplicated: deliver it (the DLQ explains it)
                else:
                    new = (self.key is None or k > self.key) and (min_created is None or k[0] >= min_created)
                if not new:
                    continue
                if k is not None:
                    self.offset, self.anchor = max(self.offset, index + 1), k
                if k is not None and (self.key is None or k > self.key):
                    self.key = k  # never backwards: an out-of-order record keeps the cursor where it is
                out.append((alert, Position(*(self.key or (None, None)), self.offset)))
            if emitted + len(out) > self.limit:
                out = out[: self.limit - emitted]
                # the rest of the page is read again next cycle
                self.key, self.offset, self.anchor = saved
                for alert, pos in out:
                    self.offset, self.anchor = pos.offset, sort_key(alert)
                    self.key = (pos.created_at, pos.id) if pos.id is not None else self.key
            emitted += len(out)
            if self.metrics and out:
                self.metrics.records_received.labels(self.metrics.pipeline, "source").inc(len(out))
            if out:
                yield out
            placed = index - start + 1
            if placed < self.page_size:
                break
            start = start + placed - overlap
        self.hit_limit = emitted >= self.limit
        if self.hit_limit:
            log.info("cycle stopped at tanium.limit=%d records; polling again at once", self.limit)
