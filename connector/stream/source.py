"""source: reads every Threat Response alert once, in server order, page by page.

Cursor design
-------------
Sort key: `sort=createdAt,id` ascending. `createdAt` is the server's insert time, so an alert
that arrives late (its endpoint-side `alertedAt` minutes or days in the past) still sorts after
everything already read: an `alertedAt` high-water mark would skip it, this cursor cannot. `id`
breaks ties between alerts inserted in the same millisecond. New alerts therefore only append at
the end of the list, and Tanium's retention prunes the oldest from its front.

There is no `createdAtFrom` filter in the API, so a place in the list is an offset, and every
prune shifts offsets left. The cursor is therefore a key with an offset as a hint: the key
(createdAt, id) of the last alert delivered (the cursor record), and `offset`, how many records
the list held up to and including it when it was read. Alerts at or before the key are done,
alerts after it are new. Without a checkpoint the key is (source.start_from, 0), which no alert
has: every alert created at or after start_from sorts after it.

A cycle requests the page that starts at the cursor record (offset - 1). A page is trusted only
when it provably starts at or before the cursor: its first keyed record sorts at or before the
key (then every record before the page does too), or it starts at offset 0. In the common case
the page starts with the cursor record itself and the rest of it is new, so a poll costs no
request beyond its pages. The next page of a cycle starts again at the last keyed record read (a
one-record overlap; `tanium.page_size` 1 is read as pages of 2), so a prune between two pages is
caught the same way. A short page ends the cycle; `tanium.limit` caps the records per cycle, and
the next cycle goes on from the last one delivered.

Pruning below the cursor: the page at the hint then starts after the cursor record, or is empty
(with the overlap, an empty page means the list shrank, never "nothing new"). The cursor finds its
place again by binary search over offsets with limit=1 probes: the largest offset whose record
sorts at or before the key, or 0 when the cursor record and all before it are gone. That costs the
failed page plus about log2(list size) small requests, after which reading goes on as usual. A
restart from a checkpoint whose offset no longer fits is the same case, and the same search finds
source.start_from when there is no checkpoint. A list that moves under the cursor more than
MAX_SEARCHES times in one cycle ends it with a retryable Tanium error (the next poll tries again).
Guarantees (tests/unit/test_source_model.py):
every alert that is in the list from the first to the last request of a cycle that reaches the
end of the list (not cut by the limit) is delivered by that cycle or an earlier one, whatever was
pruned before or during it; within one run of the cursor (between restarts) no alert is delivered
twice and the key never goes back; a restart repeats only what follows its checkpoint. An alert
pruned before any cycle could read it cannot be delivered.

Records without a usable (createdAt, id) key cannot be placed by key. Where Tanium counts them
in offsets, the offset hint counts keyed records only, so it errs towards the front (a few records
are read again and skipped); where a server adds them to a page beyond `limit` (the simulator's
garbage fault), they hold no offset and the hint is exact. A full page with one keyed record or
none is read again with twice the limit (up to 500; beyond, the next page overlaps on the last
record itself), so a run of keyless records never stalls the cursor. A keyless record is
delivered (the DLQ explains it) when it lies after the cursor record, unless it is one of the
keyless JSON objects already delivered there (told apart by content and by count; other JSON
values cannot be, and are delivered each time a page shows them there). Keyless records ahead of
a page's first keyed record wait until that record shows which side of the cursor they are on; at
the head of the list, once the cursor record is pruned, an object equal to one already delivered
after it is taken for that one. They never move the key. Otherwise the guarantees above hold for
keyless records too.

The in-memory cursor moves as pages are read; the durable checkpoint (`Position`) is a separate
thing that the pipeline advances only behind Kafka acknowledgements (see pipeline.py).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from connector.metrics import NO_METRICS, Metrics
from connector.tanium import MAX_PAGE, TaniumResponseError
from connector.timeutil import format_ts, parse_ts

log = logging.getLogger(__name__)

SORT = "createdAt,id"
MAX_SEARCHES = 4  # per cycle; a list that keeps moving under the cursor is retried at the next poll
_PENDING, _BEFORE, _AFTER = "pending", "before", "after"  # where the scan is relative to the cursor record


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Position:
    """Where a record sits: the cursor key after it and the count of records up to the cursor record."""

    created_at: str | None
    id: int | None
    offset: int

    def to_checkpoint(self) -> dict:
        return {"created_at": self.created_at, "id": self.id, "offset": self.offset}

    @classmethod
    def from_checkpoint(cls, data: dict) -> Position:
        """Raises ValueError naming the field that is missing or wrong and what it may be."""
        missing = [f for f in ("created_at", "id", "offset") if f not in data]
        if missing:
            raise ValueError(f"{' and '.join(missing)} missing; a checkpoint must have created_at, id and offset")
        created, ident, offset = data["created_at"], data["id"], data["offset"]
        if not _whole(offset) or offset < 0:
            raise ValueError(f"offset is {offset!r}; it must be a whole number >= 0")
        if created is None and ident is None:
            return cls(None, None, offset)  # only records without a key were delivered
        if not _whole(ident) or ident <= 0:
            raise ValueError(f"id is {ident!r}; it must be an alert id (a whole number > 0), or null with created_at")
        try:
            parse_ts(created)
        except ValueError:
            raise ValueError(
                f"created_at is {created!r}; it must be the alert's createdAt, an ISO-8601 time such as "
                "2026-01-31T12:00:00.000Z"
            ) from None
        return cls(created, ident, offset)


def sort_key(alert) -> tuple[str, int] | None:
    """(createdAt, id), or None for a record that cannot be placed (the DLQ will explain it)."""
    if not isinstance(alert, dict):
        return None
    created, ident = alert.get("createdAt"), alert.get("id")
    if not isinstance(created, str) or not isinstance(ident, int) or isinstance(ident, bool) or ident <= 0:
        return None
    return created, ident


def _same(a, b) -> bool:
    """The same list record: equal keys, or equal content for records without one."""
    key = sort_key(a)
    return key == sort_key(b) if key is not None else a == b


def _fingerprint(keyless) -> str | None:
    """What tells keyless JSON objects apart (their content); None for other values, which cannot be."""
    if not isinstance(keyless, dict):
        return None
    return hashlib.blake2b(repr(keyless).encode("utf-8", "replace"), digest_size=16).hexdigest()


def _count(page) -> int | None:
    return page.filtered if page.filtered is not None else page.total


class AlertSource:
    def __init__(self, client, page_size: int, limit: int, metrics: Metrics = NO_METRICS):
        self.client = client
        self.page_size = page_size
        self.limit = limit
        self._m_received = metrics.records_received.labels(metrics.pipeline, "source")
        self.key: tuple[str, int] = ("", 0)  # cursor key: the last alert delivered, or (start_from, 0)
        self.from_start = True  # the key is (start_from, 0): no alert delivered yet
        self.offset: int | None = None  # records up to and including the cursor record; None: search
        self.after: Counter[str] = Counter()  # fingerprints of keyless objects delivered after the cursor record
        self.hit_limit = False

    def resume(self, checkpoint: dict | None, start_at: datetime) -> None:
        pos = Position.from_checkpoint(checkpoint) if checkpoint else None
        if pos is not None and pos.id is not None and pos.created_at is not None:
            self.key, self.from_start, self.offset = (pos.created_at, pos.id), False, pos.offset or None
        else:
            self.key, self.from_start, self.offset = (format_ts(start_at), 0), True, None
        self.after = Counter()

    def _position(self) -> Position:
        return Position(None, None, self.offset or 0) if self.from_start else Position(*self.key, self.offset or 0)

    def _take(self, alert, at: int = 0) -> tuple[object, Position]:
        """Moves the cursor over a record being delivered (`at`: a keyed record's offset)."""
        key = sort_key(alert)
        if key is not None:
            self.key, self.from_start, self.offset, self.after = key, False, at + 1, Counter()
        elif (fp := _fingerprint(alert)) is not None:
            self.after[fp] += 1
        return alert, self._position()

    def _delivered(self, keyless, seen: Counter) -> bool:
        """Whether a keyless record after the cursor record is one already delivered there; `seen`
        counts those met since the cursor record, so equal objects are told apart by number."""
        fp = _fingerprint(keyless)
        if fp is None or seen[fp] >= self.after[fp]:
            return False
        seen[fp] += 1
        return True

    def _probe(self, offset: int) -> tuple[bool, object]:
        """(whether the record at `offset` sorts at or before the key, the page)."""
        page = self.client.list_alerts([], offset=offset, limit=1, sort=SORT, decode=False)
        key = sort_key(page.items[0]) if page.items else None
        return key is not None and key <= self.key, page

    def _search(self, below: int | None) -> int:
        """The largest offset (below `below`) whose record sorts at or before the key, or 0: reading
        from there misses nothing. A probe that meets a keyless record counts as "after", which only
        moves the result towards the front. Sets the offset hint to match."""
        lo = 0
        if below is None:
            ok, page = self._probe(0)
            below = _count(page) if ok else None  # no count (TR 3.x): read from the start
        hi = below or 0
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._probe(mid)[0]:
                lo = mid
            else:
                hi = mid
        self.offset = lo + 1 if lo else 0  # a probe saw a keyed record at lo, so this count is exact
        return lo

    def cycle(self) -> Iterator[list[tuple[object, Position]]]:
        """One poll cycle: yields pages of (alert, position) that are new, up to `limit` records.
        Sets `self.hit_limit` when the cycle stopped at the limit (more is waiting)."""
        self.hit_limit = False
        size = max(2, self.page_size)  # the overlap takes one record of each page
        emitted = searches = 0
        start = self._search(None) if self.offset is None else max(0, self.offset - 1)
        expect = None  # set: the record the page must start with (the previous page's last record)
        pending: list = []  # keyless records met before the scan knows whether they lie before or after the cursor
        phase, seen = _PENDING, Counter[str]()
        while True:
            got = self.client.list_alerts([], offset=start, limit=size, sort=SORT, decode=False)
            items = got.items
            if expect is not None:
                trusted = bool(items) and _same(items[0], expect)
            else:
                first = next((k for k in map(sort_key, items) if k is not None), None)
                trusted = start == 0 or (first is not None and first <= self.key)
            if not trusted:
                searches += 1
                if searches > MAX_SEARCHES:
                    raise TaniumResponseError(
                        f"the alert list moved under the cursor {MAX_SEARCHES} times in one poll (is Tanium "
                        f"sorting by {SORT}?); trying again at the next poll",
                        retryable=True,
                    )
                n = _count(got)
                start = self._search(start if n is None else min(start, n))
                log.warning(
                    "alert list shifted (pruned below the cursor?): found %s again at offset %d",
                    "source.start_from" if self.from_start else f"createdAt {self.key[0]} id {self.key[1]}",
                    start,
                )
                expect, phase, pending, seen = None, _PENDING, [], Counter()
                continue
            out, keyed = [], 0
            for i, alert in enumerate(items):
                k = sort_key(alert)
                at = start + keyed  # offset of a keyed record, counting keyed records only
                keyed += k is not None
                if i == 0 and expect is not None:
                    continue  # the overlap: handled with the previous page
                if k is None:
                    if phase == _PENDING:
                        pending.append(alert)
                        continue
                    if phase == _BEFORE or self._delivered(alert, seen):
                        continue
                    new = [alert]
                elif k <= self.key:
                    # at or before the cursor: done, and so are the keyless records before it
                    phase, pending, seen = (_AFTER if k == self.key else _BEFORE), [], Counter()
                    self.offset = at + 1
                    continue
                else:
                    # a new alert; keyless records ahead of it at the head of the list follow a
                    # cursor record that was pruned
                    new = [g for g in pending if not self._delivered(g, seen)] + [alert]
                    pending = []
                for a in new:
                    out.append(self._take(a, at))
                    emitted += 1
                    if emitted >= self.limit:
                        break
                if emitted >= self.limit:
                    break
                if k is not None:
                    phase, seen = _AFTER, Counter()
                elif (fp := _fingerprint(alert)) is not None:
                    seen[fp] += 1
            full = len(items) >= size
            if not full and emitted < self.limit:
                # nothing keyed from offset 0 to the end of the list: all of it follows the cursor record
                for g in [g for g in pending if not self._delivered(g, seen)]:
                    out.append(self._take(g))
                    emitted += 1
                    if emitted >= self.limit:
                        break
            # the pipeline adds to the alerts it is given (details decoded, the IntelDoc joined) while
            # this reads on: the last record, which the next page may have to match, is kept as it came
            tail = dict(items[-1]) if items and isinstance(items[-1], dict) else (items[-1] if items else None)
            if out:
                self._m_received.inc(len(out))
                yield out
            if emitted >= self.limit:
                self.hit_limit = True
                log.info("cycle stopped at tanium.limit=%d records; polling again at once", self.limit)
                return
            if not full:
                return
            if keyed >= 2:  # the next page starts at the last keyed record read
                start, expect, phase, pending, seen = start + keyed - 1, None, _PENDING, [], Counter()
            elif size < MAX_PAGE:  # one keyed record or none: read the same place further
                size, phase, pending, seen = min(MAX_PAGE, 2 * size), _PENDING, [], Counter()
            else:  # 499 keyless records in a row: overlap on the last record itself
                start, expect = start + len(items) - 1, tail
