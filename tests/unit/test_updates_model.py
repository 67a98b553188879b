"""Model-based test of the update scan (connector/stream/updates.py): the real TrackedSource over the
real AlertSource polls FakeTanium, an in-memory alert list served in both orders the connector asks
for (`createdAt,id` ascending and `-updatedAt,-id`) with `offset` and `limit`.

The list changes as Tanium's does: alerts are created (updatedAt = createdAt = now), analysts move
one alert or several at once to another state (one updatedAt for all: ties), the clock may stand
still between actions (more ties), and retention prunes the oldest. Any of these may also happen just
before the n-th request of a poll, i.e. between two pages of the scan or of the creation cursor. Some
alerts were created before source.start_from and are never published. As the scan assumes, Tanium's
clock does not go back and a change is stamped later than the alert's previous updatedAt. A restart (a crash) builds a
new TrackedSource from the durable checkpoint: the position of an item the session delivered, the last
one or one lagging behind it (the pipeline commits only acknowledged prefixes); what was delivered
after it stays in the topic (at-least-once).

Checked throughout (the guarantee itself):
- per alert, the first event is its creation, and updatedAt never goes back from one event to the next;
- every event carries a state the alert really had at that updatedAt, and says "closed" exactly when
  that state is resolved or suppressed;
- no (alert, updatedAt) is published twice, except one that was delivered after the checkpoint a
  restart resumed from (at-least-once): one event per change, and a restart from the last item
  delivered repeats nothing, even one in the middle of a failed scan;
- alerts created before source.start_from get no event;
- after a quiet poll (no change during it, not cut by tanium.limit), every alert created since
  start_from has been published and the last event of each carries its current updatedAt and state:
  every change was published, none lost.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from connector.simulator.clock import iso_ms
from connector.stream.source import AlertSource
from connector.stream.updates import CLOSED, MARK, Mark, TrackedSource
from connector.tanium import AlertPage, TaniumError, TaniumResponseError

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z in ms
START = datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC)  # source.start_from: one second after the first alerts
STATES = ("unresolved", "inprogress", "resolved", "suppressed")


class FakeTanium:
    """The client interface the sources use: list_alerts(params, offset, limit, sort) → AlertPage.
    `during` holds actions that happen just before the n-th request of the current poll."""

    def __init__(self):
        self.alerts: dict[int, dict] = {}
        self.history: dict[int, dict[int, str]] = {}  # id → {updatedAt ms: state it had then}
        self.clock = T0
        self.newest = 0  # newest updatedAt stamped
        self.next_id = 1
        self.requests = self.scan_requests = 0
        self.during: list[tuple[int, tuple]] = []  # (request number, action)
        self.during_scan: list[tuple[int, tuple]] = []  # (request number among the scan's, action)

    def tick(self, ms: int) -> None:
        self.clock += ms

    def create(self) -> None:
        aid, at = self.next_id, max(self.clock, self.newest)
        self.next_id += 1
        stamp = iso_ms(at)
        self.alerts[aid] = {
            "id": aid,
            "guid": f"g-{aid}",
            "state": "unresolved",
            "createdAt": stamp,
            "updatedAt": stamp,
        }
        self.history[aid] = {at: "unresolved"}
        self.newest = at

    def change(self, ranks: list[int], state: str) -> None:
        """Changes the alerts at these ranks of the list by age (0 the oldest, -1 the newest)."""
        ids = sorted(self.alerts)
        live = sorted({ids[r] for r in ranks if -len(ids) <= r < len(ids)})
        if not live:
            return
        # Tanium's clock does not go back, and a change is later than the alert's previous one
        at = max(self.clock, self.newest, *(self._at(i) + 1 for i in live))
        for i in live:
            self.alerts[i] = {**self.alerts[i], "state": state, "updatedAt": iso_ms(at)}
            self.history[i][at] = state
        self.newest = at

    def _at(self, aid: int) -> int:
        return int(datetime.fromisoformat(self.alerts[aid]["updatedAt"]).timestamp() * 1000)

    def prune(self, n: int) -> None:
        for aid in sorted(self.alerts)[:n]:  # ids increase with createdAt
            del self.alerts[aid]

    def create_many(self, n: int) -> None:
        for _ in range(n):
            self.create()

    def act(self, action: tuple) -> None:
        getattr(self, action[0])(*action[1:])

    def list_alerts(self, params, offset: int, limit: int, sort: str, decode: bool = True) -> AlertPage:
        assert params == []
        self.requests += 1
        self.scan_requests += sort != "createdAt,id"
        due = [a for n, a in self.during if n == self.requests]
        due += [a for n, a in self.during_scan if n == self.scan_requests and sort != "createdAt,id"]
        for action in due:
            self.act(action)
        rows = list(self.alerts.values())
        if sort == "createdAt,id":
            rows.sort(key=lambda a: (a["createdAt"], a["id"]))
        else:
            assert sort == "-updatedAt,-id", sort
            rows.sort(key=lambda a: (a["updatedAt"], a["id"]), reverse=True)
        return AlertPage([dict(a) for a in rows[offset : offset + limit]], len(rows), len(rows))


actions = st.one_of(
    st.tuples(st.just("create")),
    st.tuples(st.just("create_many"), st.integers(2, 8)),
    st.tuples(st.just("change"), st.lists(st.integers(-6, 8), min_size=1, max_size=8), st.sampled_from(STATES)),
    st.tuples(st.just("prune"), st.integers(1, 3)),
    st.tuples(st.just("tick"), st.integers(0, 2)),
)


class UpdatesMachine(RuleBasedStateMachine):
    @initialize(page_size=st.integers(2, 6), limit=st.integers(1, 8), old=st.integers(0, 3))
    def setup(self, page_size, limit, old):
        self.tanium = FakeTanium()
        for _ in range(old):  # before source.start_from: never published
            self.tanium.create()
        self.old = set(self.tanium.alerts)
        self.tanium.tick(1000)
        self.page_size, self.limit = page_size, limit
        self.topic: list[tuple[int, str, int, str]] = []  # (id, action, updatedAt ms, state), in order
        self.durable: dict | None = None
        self.may_repeat: set[tuple[int, int]] = set()  # events delivered after a restart's checkpoint
        self.published: set[tuple[int, int]] = set()
        self._session()

    def _session(self) -> None:
        self.source = TrackedSource(AlertSource(self.tanium, self.page_size, self.limit), self.tanium, self.page_size)
        self.source.resume(self.durable, START)
        self.delivered: list[tuple[Mark, tuple[int, int] | None]] = []  # this session's items: position, event

    def _poll(self) -> bool:
        """One cycle; False when it failed (a retryable Tanium error: the next poll tries again)."""
        self.tanium.requests = self.tanium.scan_requests = 0
        try:
            for page in self.source.cycle():
                for alert, pos in page:
                    assert isinstance(pos, Mark)
                    event = None if alert is MARK else self._publish(alert, pos.change or "created")
                    self.delivered.append((pos, event))
        except TaniumError:
            return False
        finally:
            self.tanium.during, self.tanium.during_scan = [], []
        return True

    def _publish(self, alert: dict, action: str) -> tuple[int, int]:
        aid, state = alert["id"], alert["state"]
        at = int(datetime.fromisoformat(alert["updatedAt"]).timestamp() * 1000)
        assert aid not in self.old, f"alert {aid}, created before start_from, was published"
        assert self.tanium.history[aid].get(at) == state, f"alert {aid} never had state {state} at {at}"
        assert (action == "closed") == (action != "created" and state in CLOSED)
        earlier = [e for e in self.topic if e[0] == aid]
        if action != "created":
            assert earlier, f"an update event of alert {aid} before its creation event"
        if earlier:
            assert at >= earlier[-1][2], f"alert {aid}: updatedAt went back from {earlier[-1][2]} to {at}"
        if (aid, at) in self.published:
            assert (aid, at) in self.may_repeat, f"alert {aid} published again at {at}, before the checkpoint"
        self.published.add((aid, at))
        self.topic.append((aid, action, at, state))
        return aid, at

    @rule(action=actions)
    def act(self, action):
        self.tanium.act(action)

    @rule(action=actions, at=st.integers(1, 8))
    def act_during_next_poll(self, action, at):
        self.tanium.during.append((at, action))

    @rule(action=actions, at=st.integers(1, 4))
    def act_during_next_scan(self, action, at):
        """Before the at-th request of the next poll's update scan (pages and probes)."""
        self.tanium.during_scan.append((at, action))

    @rule()
    def poll(self):
        self._poll()

    @precondition(lambda self: self.delivered)
    @rule(back=st.integers(0, 4))
    def crash(self, back):
        i = len(self.delivered) - 1 - back
        if i >= 0:
            self.durable = self.delivered[i][0].to_checkpoint()
        # what was delivered after the checkpoint may be published again (at-least-once)
        self.may_repeat |= {event for _, event in self.delivered[max(0, i + 1) :] if event is not None}
        self._session()

    @rule()
    def quiet_polls(self):
        """Polls until one is quiet (nothing changes during it, not cut by the limit), then compares
        the last event of every alert with the truth."""
        self.tanium.during, self.tanium.during_scan = [], []
        for _ in range(60):
            if self._poll() and not self.source.hit_limit:
                break
        else:
            raise AssertionError("no quiet poll in 60")
        last = {e[0]: e for e in self.topic}
        for aid, alert in self.tanium.alerts.items():
            if aid in self.old:
                continue
            assert aid in last, f"alert {aid} was never published"
            at = int(datetime.fromisoformat(alert["updatedAt"]).timestamp() * 1000)
            assert last[aid][2:] == (at, alert["state"]), f"alert {aid}: last event {last[aid]}, truth {alert}"

    @invariant()
    def creation_first(self):
        if hasattr(self, "topic"):
            first: dict[int, str] = {}
            for aid, action, _, _ in self.topic:
                first.setdefault(aid, action)
            assert all(a == "created" for a in first.values())


UpdatesMachine.TestCase.settings = settings(
    max_examples=400,
    stateful_step_count=30,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_update_scan = UpdatesMachine.TestCase


def _tracked(tanium: FakeTanium, page_size: int = 2) -> TrackedSource:
    source = TrackedSource(AlertSource(tanium, page_size, 100), tanium, page_size)
    source.resume(None, START)
    return source


def _events(source: TrackedSource) -> list[tuple[int, str, str]]:
    return [
        (a["id"], pos.change or "created", a["state"]) for page in source.cycle() for a, pos in page if a is not MARK
    ]


def test_removals_above_the_scan_between_two_pages_skip_no_change():
    """Alerts the scan already read are pruned before its next page, so the list moves up under it:
    the scan finds its place again (binary search) and reads the change that moved into the gap."""
    tanium = FakeTanium()
    tanium.tick(1000)
    tanium.create_many(10)
    source = _tracked(tanium)
    assert len(_events(source)) == 10
    for rank in (5, 4, 3, 2, 1, 0, -2, -1):  # -updatedAt order: ids 10, 9, 1, 2, 3, 4, 5, 6
        tanium.tick(1)
        tanium.change([rank], "resolved")
    # pages of two with a one-record overlap: ids 10, 9 | 9, 1 | 1, 2 | then ids 1 and 2 are pruned, and
    # the next page, at offset 3, would start at id 4
    tanium.during_scan = [(4, ("prune", 2))]
    tanium.requests = tanium.scan_requests = 0
    assert _events(source) == [(i, "closed", "resolved") for i in (10, 9, 1, 2, 3, 4, 5, 6)]


def test_a_list_that_keeps_moving_under_the_scan_fails_the_poll_retryably():
    """Before every request of the scan after its first, two alerts it read are pruned: after
    MAX_SEARCHES searches the poll ends with a retryable error and the watermark stays."""
    tanium = FakeTanium()
    tanium.tick(1000)
    tanium.create_many(60)
    source = _tracked(tanium)
    _events(source)
    for rank in range(19, -1, -1):
        tanium.tick(1)
        tanium.change([rank], "inprogress")
    mark = source.mark
    tanium.during_scan = [(n, ("prune", 2)) for n in range(2, 40)]
    tanium.requests = tanium.scan_requests = 0
    with pytest.raises(TaniumResponseError, match="moved under the update scan") as e:
        _events(source)
    assert e.value.retryable and source.mark == mark


def test_a_restart_between_a_creation_page_and_the_scans_marker_repeats_nothing():
    """The checkpoint of a creation record says which states its page published: an alert that
    changed before it was first read is not taken for a change after a restart from there (in
    exactly-once mode a repeat would be a second record of the alert)."""
    tanium = FakeTanium()
    tanium.tick(1000)
    tanium.create_many(3)
    source = _tracked(tanium)
    _events(source)
    tanium.tick(5)
    tanium.create_many(2)
    tanium.tick(5)
    tanium.change([-1], "inprogress")  # alert 5 changes before the connector reads it
    items = [item for page in source.cycle() for item in page]
    assert [(a["id"], pos.change) for a, pos in items[:-1]] == [(4, None), (5, None)] and items[-1][0] is MARK
    again = _tracked(tanium)  # a restart from alert 5's record, before the marker: nothing to publish
    again.resume(items[-2][1].to_checkpoint(), START)
    assert _events(again) == []
