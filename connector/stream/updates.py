"""updates: the lifecycle of alerts — an update event each time a published alert changes.

Tanium moves an alert's `updatedAt` when analysts change its state (and when they acknowledge it).
The API has no updatedAt filter, so each poll cycle, after the creation cursor's pages (source.py),
reads the list sorted by `-updatedAt,-id` from the top down to its watermark (`source.track_updates`).

Watermark
---------
(T, ids): T the newest updatedAt the last completed scan read, `ids` the alerts it read with exactly
that updatedAt. A scan reads from offset 0 and stops at the first record older than T; a record at T
whose id is in `ids` is done, every other record it reads changed since the watermark. The scan's
own watermark is the newest record it read with every id it read at that updatedAt. Ties cannot hide
a change: an alert stamped with T after the scan read past T is not in `ids`, so the next scan takes
it (one request may change many alerts at one updatedAt).

Paging while the list moves
---------------------------
Every change and every new alert enters at the top (updatedAt is now); nothing else moves, but
Tanium's pruning removes old alerts, which may sit anywhere in this order. A page after the first
starts at the last record taken (a one-record overlap), and the scan takes only records that sort
below the last one it took. Records entering at the top meanwhile shift the rest down (a page then
repeats records, which sort at or above the last taken and are passed over) and are left to the next
scan: each is newer than the watermark this scan sets, or ties with it without being in its ids.
A page is trusted only when it starts at or above the last record taken (or at offset 0); otherwise
records above it were removed and some may have been skipped, so the scan finds its place again by
binary search with limit=1 probes (the first offset below the last record taken) and reads on from
one before it. A list that moves under one scan more than MAX_SEARCHES times fails the cycle with a
retryable error: the watermark stays and the next poll scans again. A scan is not capped by
`tanium.limit`: it must reach its watermark to set a new one. Records without an id > 0 and a
timestamp `updatedAt` cannot be placed and are passed over (the creation cursor sends them to the DLQ).

Which changes become events, and their order per guid
-----------------------------------------------------
A changed record becomes an update event when its alert was published: created at or after the
tracking floor (`since`: source.start_from when tracking began without a checkpoint) and at or before
the creation cursor, changed since its creation (updatedAt later than createdAt), and not already
published with this very updatedAt (`published`, see "Durability": the updatedAt of every alert
published, by creation or update event, since the watermark). An alert the creation cursor has not
reached needs no update event: its creation event carries the state it has when it is read. A
cycle delivers its creation pages first and its scan after, and scans move down the list in
updatedAt order, so per guid the creation event comes first and update events follow with a newer
updatedAt each. The event says "closed" when the new state is resolved or
suppressed, else "updated"; any change of updatedAt is one (an acknowledgement too: same state).

Durability
----------
Every record carries the whole checkpoint (a `Mark`): the creation cursor's Position, the watermark
in force, and `published`: the alerts published since that watermark that a scan may still read, each
with the updatedAt it was published with (an alert whose updatedAt is its createdAt never changed and
is left out, so in the steady state this is a handful of alerts). A restart from any record's
checkpoint therefore knows which states were published up to that record: the alerts a creation
page published are not taken for changes, nor are the update events before it published again. A
completed scan that moved the watermark ends with a marker item carrying the new one (and an empty
`published`): it enters the AckWindow without a Kafka record (the pipeline confirms it at once), so
the checkpoint takes the new watermark only when every record before it, the scan's update events
included, is acknowledged (in exactly-once mode: in a transaction after theirs). The checkpoint keeps
it as `updates` {updated_at, ids, since, published}. A crash loses nothing: the next run scans again
from the durable watermark.

What may repeat (at-least-once, after a crash or a rewind): only events sent after the durable
checkpoint, which Kafka may have taken without the checkpoint knowing: update events (the same guid
and updatedAt, so the same state) and creation events (read again with the state the alert has
then). In exactly-once mode nothing repeats. Per guid, updatedAt never goes back from one event to
the next.

Start
-----
Without a checkpoint (or one without a creation cursor) the first cycle anchors the watermark at the
top of the list before it reads any alert, so every later change is seen and no history is re-read. A
checkpoint written without update tracking (no `updates`) resumes tracking from its creation cursor's
createdAt: changes since then to alerts already published become update events (one read after its
change may repeat the state its creation event carried).

Cost: one request per cycle (FIRST_PAGE records from the top) when few alerts changed; more, in pages
doubling up to `tanium.page_size`, when many did. Assumptions: Tanium stamps updatedAt from a clock
that does not go back (a change stamped earlier than one already read would be missed), and a
change of an alert gets a later updatedAt than its previous one (two changes of one alert within
one millisecond are one change here: the event carries the state read).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from connector.stream.source import AlertSource, Position, sort_key
from connector.tanium import MAX_PAGE, TaniumResponseError
from connector.timeutil import format_ts, parse_ts

log = logging.getLogger(__name__)

SORT = "-updatedAt,-id"
FIRST_PAGE = 20  # records the scan asks for first; most cycles find their watermark among them
MAX_SEARCHES = 4  # per scan; a list that keeps moving is scanned again at the next poll
CLOSED = ("resolved", "suppressed")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


class _Marker:
    """The item that carries a new watermark into the AckWindow (no Kafka record)."""

    def __repr__(self) -> str:
        return "MARK"


MARK = _Marker()


def epoch_ms(value) -> int | None:
    """A timestamp string as epoch milliseconds, or None when it is not one."""
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        try:
            when = parse_ts(value)
        except ValueError:
            return None
    if when.tzinfo is None:
        return None
    return (when - _EPOCH) // _MS


def _unchanged(alert, at: int) -> bool:
    """An alert whose updatedAt is its createdAt never changed (a change is stamped later)."""
    return epoch_ms(alert.get("createdAt")) == at


def _iso(ms: int) -> str:
    return format_ts(_EPOCH + ms * _MS)


def update_key(alert) -> tuple[int, int] | None:
    """(updatedAt in ms, id): where a record sits in the -updatedAt,-id order; None: it cannot be placed."""
    if not isinstance(alert, dict):
        return None
    ident = alert.get("id")
    if not isinstance(ident, int) or isinstance(ident, bool) or ident <= 0:
        return None
    at = epoch_ms(alert.get("updatedAt"))
    return None if at is None else (at, ident)


@dataclass(frozen=True)
class Watermark:
    """Where the update scan stands: `at` (updatedAt, epoch ms), the `ids` read at exactly that time,
    and the tracking floor `since` (createdAt; None: every alert up to the creation cursor counts)."""

    at: int
    ids: frozenset[int]
    since: str | None

    def to_checkpoint(self, published: list | None = None) -> dict:
        return {"updated_at": _iso(self.at), "ids": sorted(self.ids), "since": self.since, "published": published or []}

    @classmethod
    def from_checkpoint(cls, data) -> Watermark:
        """Raises ValueError naming the field that is wrong and what it may be."""
        if not isinstance(data, dict):
            raise ValueError(f"updates is {data!r}; it must be an object with updated_at, ids and since")
        at = epoch_ms(data.get("updated_at"))
        if at is None:
            raise ValueError(
                f"updates.updated_at is {data.get('updated_at')!r}; it must be an ISO-8601 time such as "
                "2026-01-31T12:00:00.000Z"
            )
        ids = data.get("ids")
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError(f"updates.ids is {ids!r}; it must be a list of alert ids")
        since = data.get("since")
        if since is not None and epoch_ms(since) is None:
            raise ValueError(f"updates.since is {since!r}; it must be null or an ISO-8601 time")
        return cls(at, frozenset(ids), since)

    @staticmethod
    def published(data: dict) -> list[tuple[int, int]]:
        """The checkpoint's `published` pairs (alert id, updatedAt in epoch ms); ValueError if malformed."""
        pairs = data.get("published", [])
        if not isinstance(pairs, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in p)
            for p in pairs
        ):
            raise ValueError(f"updates.published is {pairs!r}; it must be a list of [alert id, epoch ms] pairs")
        return [(i, at) for i, at in pairs]


class Published:
    """What the session published since the last completed scan, as of one record: the first `n`
    (alert id, updatedAt) pairs of an append-only log (one log per scan epoch, so a record keeps its
    view for O(1)). Compared by identity of the log, so comparing positions stays cheap."""

    __slots__ = ("log", "n")

    def __init__(self, log: list[tuple[int, int]], n: int):
        self.log, self.n = log, n

    def pairs(self) -> list[list[int]]:
        return [[i, at] for i, at in self.log[: self.n]]

    def __eq__(self, other) -> bool:
        return isinstance(other, Published) and self.log is other.log and self.n == other.n

    def __hash__(self) -> int:
        return hash((id(self.log), self.n))


@dataclass(frozen=True)
class Mark(Position):
    """A record's position with update tracking: the creation cursor's Position, the watermark in
    force (`updates`), and for an update event its `change` ("updated" or "closed")."""

    updates: Watermark | None = None
    change: str | None = None
    published: Published | None = None

    def to_checkpoint(self) -> dict:
        out = super().to_checkpoint()
        if self.updates is not None:
            out["updates"] = self.updates.to_checkpoint(self.published.pairs() if self.published else None)
        return out


class TrackedSource:
    """The creation cursor (AlertSource) followed, each cycle, by the update scan; what a pipeline
    session reads when `source.track_updates` is on (same interface as AlertSource)."""

    def __init__(self, source: AlertSource, client, page_size: int):
        self.source = source
        self.client = client
        self.page_size = max(2, min(page_size, MAX_PAGE))  # the overlap takes one record of each page
        self.mark: Watermark | None = None  # None: anchored at the top by the next cycle
        self.since: str | None = None
        self.position = Position(None, None, 0)  # the creation cursor's, as of the last record yielded
        self.sent: dict[int, int] = {}  # alert id → updatedAt published since the last completed scan
        self.log: list[tuple[int, int]] = []  # the same, in order: what records' positions carry

    @property
    def hit_limit(self) -> bool:
        return self.source.hit_limit

    def resume(self, checkpoint: dict | None, start_at: datetime) -> None:
        self.source.resume(checkpoint, start_at)
        self.position = Position.from_checkpoint(checkpoint) if checkpoint else Position(None, None, 0)
        self.sent, self.log = {}, []
        data = checkpoint.get("updates") if checkpoint else None
        if data is not None:
            self.mark = Watermark.from_checkpoint(data)
            self.since = self.mark.since
            for ident, at in Watermark.published(data):
                self._remember(ident, at)
        elif checkpoint and not self.source.from_start:  # written without update tracking
            created, ident = self.source.key
            self.mark, self.since = Watermark(epoch_ms(created) or 0, frozenset({ident}), None), None
        else:
            self.mark, self.since = None, format_ts(start_at)

    def cycle(self) -> Iterator[list[tuple[object, Position]]]:
        if self.mark is None:
            for _ in self._scan(None):  # the anchor: sets the watermark, publishes nothing
                pass
        mark = self.mark
        assert mark is not None  # set by the anchor
        for page in self.source.cycle():
            out: list[tuple[object, Position]] = []
            for alert, pos in page:
                key = update_key(alert)
                # what a scan may still read (at or after the watermark), unless it never changed
                if key is not None and key[0] >= mark.at and not _unchanged(alert, key[0]):
                    self._remember(key[1], key[0])
                self.position = pos
                out.append((alert, Mark(pos.created_at, pos.id, pos.offset, mark, None, self._view())))
            yield out
        yield from self._scan(mark)

    def _remember(self, ident: int, at: int) -> None:
        self.sent[ident] = at
        self.log.append((ident, at))

    def _view(self) -> Published:
        return Published(self.log, len(self.log))

    def _published(self, alert: dict) -> bool:
        """Whether the creation cursor published the alert: created at or after the floor and at or
        before the cursor (compared as source.py compares, createdAt text then id)."""
        key = sort_key(alert)
        src = self.source
        return (
            key is not None and not src.from_start and key <= src.key and (self.since is None or key[0] >= self.since)
        )

    def _scan(self, old: Watermark | None) -> Iterator[list[tuple[object, Position]]]:
        """One scan from the top down to `old` (see "Watermark"); with `old` None only the anchor:
        the newest records, nothing published."""
        pos = self.position
        size = min(self.page_size, FIRST_PAGE)
        start, last, top, ties, searches = 0, None, None, set(), 0
        while True:
            items = self.client.list_alerts([], offset=start, limit=size, sort=SORT, decode=False).items
            keys = [update_key(a) for a in items]
            first = next((k for k in keys if k is not None), None)
            if last is not None and start > 0 and (first is None or first < last):
                searches += 1
                if searches > MAX_SEARCHES:
                    raise TaniumResponseError(
                        f"the alert list moved under the update scan {MAX_SEARCHES} times in one poll (is Tanium "
                        f"sorting by {SORT}?); trying again at the next poll",
                        retryable=True,
                    )
                start = self._search(last, start)
                log.warning("alert list shifted under the update scan (pruned?): reading on at offset %d", start)
                continue
            out: list[tuple[object, Position]] = []
            done, keyed = False, 0
            for alert, key in zip(items, keys, strict=True):
                if key is None:
                    continue
                keyed += 1
                if last is not None and key >= last:
                    continue  # taken already, or entered at the top meanwhile: the next scan's
                floor = old.at if old is not None else top
                if floor is not None and key[0] < floor:
                    done = True
                    break
                last = key
                if top is None:
                    top = key[0]
                if key[0] == top:
                    ties.add(key[1])
                if old is None or (key[0] == old.at and key[1] in old.ids):
                    continue
                change = self._change(alert, key)
                if change is not None:
                    out.append((alert, Mark(pos.created_at, pos.id, pos.offset, old, change, self._view())))
            if out:
                yield out
            if done or len(items) < size:
                break
            start += keyed - 1 if keyed >= 2 else len(items) - 1
            size = min(self.page_size, 2 * size)
        if top is None:  # an empty list: every later change is newer than nothing
            top = old.at if old is not None else 0
        new = Watermark(top, frozenset(ties), self.since)
        # every alert published before or during this scan is now at or below the new watermark, or
        # changed since (then its updatedAt differs): nothing left to remember
        self.sent, self.log = {}, []
        self.mark = new
        if old is not None and new != old:
            yield [(MARK, Mark(pos.created_at, pos.id, pos.offset, new))]

    def _change(self, alert: dict, key: tuple[int, int]) -> str | None:
        """ "updated" or "closed" when the change becomes an update event (see "Which changes"), else None."""
        at, ident = key
        if self.sent.get(ident) == at or _unchanged(alert, at) or not self._published(alert):
            return None
        self._remember(ident, at)
        state = alert.get("state")
        return "closed" if isinstance(state, str) and state.strip().lower() in CLOSED else "updated"

    def _search(self, last: tuple[int, int], below: int) -> int:
        """Where to read on after a page that started below `last`: one before the first offset (at
        most `below`) whose record sorts below `last`. A probe that finds no record, or one that
        cannot be placed, counts as below, which only moves the result towards the front."""
        lo, hi = 0, below
        while lo < hi:
            mid = (lo + hi) // 2
            got = self.client.list_alerts([], offset=mid, limit=1, sort=SORT, decode=False).items
            key = update_key(got[0]) if got else None
            if key is None or key < last:
                hi = mid
            else:
                lo = mid + 1
        return max(0, lo - 1)
