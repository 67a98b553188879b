"""Model-based test of the source cursor: the real AlertSource polls FakeTanium, an in-memory alert
list served the way Tanium serves `sort=createdAt,id` with `offset` and `limit`.

The list changes as Tanium's does: alerts are appended at the end (`createdAt` is the insert time,
so an alert whose `alertedAt` is days old still sorts last; some share the previous alert's
`createdAt` and the id breaks the tie); records without a usable (createdAt, id) key arrive at the
end and take a list position (like the simulator's garbage records: negative, missing or
non-integer id, the neighbour's `createdAt` or none, a unique `guid`; or twins with the very same
content); the oldest N are pruned (below the cursor, to empty, across a restart). Changes also land
between two requests of one poll. Each poll uses any page size (1..500) and any `tanium.limit`. The
server may also add keyless records to every answer beyond `limit` (the simulator's garbage fault):
they hold no list position and are not part of the list. A restart builds a new AlertSource from
the durable checkpoint: the Position of a record the session delivered, the last one or one lagging
behind it (the pipeline commits only acknowledged prefixes).

Checked after every poll:
- a complete poll is a cycle that ended at the end of the list, not cut by the limit; every record
  present in the list from the poll's first request to its last was delivered by the end of that
  poll, in this session or an earlier one (a delivered twin stands in for an identical one: at the
  head of the list, after a prune, the source cannot tell them apart);
- within a session (between restarts) no record is delivered twice, and the cursor key of the
  delivered positions never goes back;
- a poll with nothing new, on a list without keyless records, costs one request.
And a list that moves before every request ends the poll with a retryable error.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

from connector.stream.source import AlertSource, Position
from connector.tanium import AlertPage, TaniumResponseError
from connector.timeutil import format_ts

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
START = datetime(2020, 1, 1, tzinfo=UTC)  # source.start_from: before every alert of the model
KEYLESS = ("negative_id", "missing_id", "wrong_types", "twin")
MAX_REQUESTS = 1000  # per poll: far more than the model's lists need; more means the cursor is stuck


class FakeTanium:
    """The client interface AlertSource uses: list_alerts(params, offset, limit, sort) → AlertPage.
    `during` holds changes that happen just before the n-th request of the current poll."""

    def __init__(self, meta: bool):
        self.items: list[dict] = []
        self.meta = meta
        self.requests = 0
        self.during: list[tuple[int, object]] = []
        self.noise = 0  # keyless records added to every answer beyond `limit`, as the simulator's faults do
        self.served_noise: list[dict] = []

    def list_alerts(self, params, offset: int, limit: int, sort: str = "createdAt,id", decode=True) -> AlertPage:
        assert params == [] and sort == "createdAt,id"
        assert 1 <= limit <= 500 and offset >= 0, (offset, limit)  # Tanium answers 400 otherwise
        self.requests += 1
        assert self.requests <= MAX_REQUESTS, f"more than {MAX_REQUESTS} requests in one poll: the cursor is stuck"
        for when, change in self.during:
            if when == self.requests:
                change()
        page = self.items[offset : offset + limit]  # the records themselves: the model knows them by id()
        for _ in range(self.noise):  # never ahead of the page's first record, like the simulator's
            self.served_noise.append({"guid": f"noise-{len(self.served_noise)}"})
            page.insert(1 + self.requests % len(page) if page else 0, self.served_noise[-1])
        n = len(self.items) if self.meta else None
        return AlertPage(page, n, n)


def name(record: dict) -> str:
    return record.get("guid", f"twin@{id(record):x}")


class SourceModel(RuleBasedStateMachine):
    @initialize(alerts=st.integers(0, 30), meta=st.booleans())
    def start(self, alerts, meta):
        self.tanium = FakeTanium(meta)
        self.next_id = 1
        self.next_garbage = 1
        self.clock = 0  # ms after EPOCH of the newest createdAt
        self.checkpoint: dict | None = None
        self.records: list[dict] = []  # every record the list ever held (their id() identifies them)
        self.ever: set[int] = set()  # ids of the records delivered in any session
        self.session: set[int] = set()
        self.positions: list[Position] = []  # delivered in this session, in order
        self.quiet_ok = False  # the last poll was complete and nothing changed since
        self.page_size = None
        self.src = self.new_source()
        self.add(alerts, tie=False, late=False)

    def new_source(self) -> AlertSource:
        src = AlertSource(self.tanium, 10, 10_000)
        src.resume(self.checkpoint, START)
        return src

    # ---- the list ------------------------------------------------------------------------
    def created(self, tie: bool) -> str:
        if not tie:
            self.clock += 1 + self.next_id % 3 * 400
        return format_ts(EPOCH + timedelta(milliseconds=self.clock))

    def add(self, n: int, tie: bool, late: bool) -> None:
        for _ in range(n):
            created = self.created(tie and self.next_id > 1)
            alerted = format_ts(EPOCH - timedelta(days=3)) if late else created
            i = self.next_id
            self.next_id += 1
            self.append_record({"id": i, "guid": f"alert-{i}", "createdAt": created, "alertedAt": alerted})
        self.quiet_ok = False

    def append_record(self, record: dict) -> None:
        self.records.append(record)
        self.tanium.items.append(record)

    def prune_oldest(self, n: int) -> None:
        del self.tanium.items[:n]
        self.quiet_ok = False

    @rule(n=st.integers(1, 15), tie=st.booleans(), late=st.booleans())
    def append(self, n, tie, late):
        self.add(n, tie, late)

    @rule(kind=st.sampled_from(KEYLESS))
    def append_keyless(self, kind):
        g = self.next_garbage
        self.next_garbage += 1
        last = self.tanium.items[-1].get("createdAt") if self.tanium.items else None  # the neighbour's
        record = {"guid": f"garbage-{g}", "createdAt": last, "state": "unresolved"}
        if kind == "negative_id":
            record["id"] = -g
        elif kind == "wrong_types":
            record.update(id=f"x{g}", createdAt=1697459178)
        elif kind == "twin":
            record = {"state": "unresolved"}
        self.append_record(record)
        self.quiet_ok = False

    @rule(n=st.integers(0, 2))
    def server_noise(self, n):
        """From now on every answer carries `n` extra keyless records that hold no list position:
        they are not in the list, so only the no-repeat and no-stall checks concern them."""
        self.tanium.noise = n
        self.quiet_ok = False

    @rule(n=st.integers(0, 40))
    def prune(self, n):
        self.prune_oldest(n)

    @rule()
    def prune_all(self):
        self.prune_oldest(len(self.tanium.items))

    @rule(at=st.integers(2, 6), prune=st.integers(0, 25), add=st.integers(0, 8))
    def meanwhile(self, at, prune, add):
        """Before the at-th request of the next poll, prune the oldest `prune` and add `add` alerts."""

        def change():
            self.prune_oldest(prune)
            self.add(add, tie=False, late=False)

        self.tanium.during.append((at, change))
        self.quiet_ok = False

    # ---- the connector -------------------------------------------------------------------
    @rule(
        page_size=st.integers(1, 12) | st.just(500),
        limit=st.integers(1, 25) | st.just(10_000),
    )
    def poll(self, page_size, limit):
        quiet = (
            self.quiet_ok
            and page_size == self.page_size
            and not self.tanium.noise
            and all(isinstance(a.get("id"), int) and a["id"] > 0 for a in self.tanium.items)
        )
        self.page_size = page_size
        self.src.page_size, self.src.limit = page_size, limit
        before = {id(a) for a in self.tanium.items}
        self.tanium.requests = 0
        got = [(a, pos) for page in self.src.cycle() for a, pos in page]
        after = {id(a) for a in self.tanium.items}
        requests = self.tanium.requests

        for alert, pos in got:
            assert id(alert) not in self.session, f"{name(alert)} delivered twice in one session"
            self.session.add(id(alert))
            self.ever.add(id(alert))
            if self.positions and pos.id is not None and self.positions[-1].id is not None:
                last = self.positions[-1]
                assert (pos.created_at, pos.id) >= (last.created_at, last.id), "the cursor went back"
            self.positions.append(pos)
        assert len(got) <= limit
        complete = not self.src.hit_limit
        if complete:
            # after a prune, a twin at the head of the list cannot be told from the one already
            # delivered (see the source's docstring): a delivered twin stands in for it
            twin_seen = any(id(r) in self.session and "guid" not in r for r in self.records)
            missed = [
                name(r)
                for r in self.records
                if id(r) in (before & after) - self.ever and not ("guid" not in r and twin_seen)
            ]
            assert not missed, f"present during a complete poll but never delivered: {missed}"
        if quiet:
            assert got == [] and requests == 1, (got, requests)
        self.quiet_ok = complete
        for when, change in self.tanium.during:
            if when > requests:  # the poll ended before it: it happens afterwards
                change()
        self.tanium.during = []

    @rule(lag=st.integers(0, 4))
    def restart(self, lag):
        """The process restarts from its durable checkpoint."""
        if lag < len(self.positions):
            self.checkpoint = json.loads(json.dumps(self.positions[-1 - lag].to_checkpoint()))
        self.src = self.new_source()
        self.session = set()
        self.positions = []
        self.quiet_ok = False


SourceModel.TestCase.settings = settings(
    max_examples=400,
    stateful_step_count=50,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_source_cursor_model = SourceModel.TestCase


def test_a_list_that_moves_at_every_request_ends_the_poll_with_a_retryable_error():
    """When the list shifts before every single request (pruning as fast as the cursor reads),
    the search is given up after MAX_SEARCHES tries: a TaniumError the pipeline retries at the
    next poll, not an endless loop."""
    tanium = FakeTanium(meta=True)
    for i in range(1, 301):
        tanium.items.append({"id": i, "createdAt": format_ts(EPOCH + timedelta(seconds=i))})
    tanium.during = [(n, lambda: tanium.items.__delitem__(slice(0, 3))) for n in range(2, MAX_REQUESTS)]
    src = AlertSource(tanium, 10, 10_000)
    src.resume(Position(tanium.items[99]["createdAt"], 100, 100).to_checkpoint(), START)
    with pytest.raises(TaniumResponseError, match="moved under the cursor") as e:
        for _ in src.cycle():
            pass
    assert e.value.retryable
    assert tanium.requests < 60
