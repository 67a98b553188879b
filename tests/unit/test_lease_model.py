"""Model-based test of the HA lease (connector/stream/leader.py, `Lease`).

Two members and a model of the Kafka group coordinator (classic protocol, one partition that
stays with its owner while the owner is in the group, as cooperative-sticky assigns it) under
any timing: requests that never arrive, answers that arrive late or never, rebalances started
by members joining or by members dropped, members that die. Each member feeds its own `Lease`
with the answers it receives, exactly as LeaderElection does.

Invariant: a member that believes it leads holds partition 0 at the coordinator, and the
coordinator cannot drop it (and so give the partition to anyone else) for at least the lease
margin, the time the pipeline has to notice and stop. So two members never both lead once the
coordinator could have reassigned the partition, in a rebalance or not.

Time is counted in ticks of 100 ms; the lease is given times and durations in ticks too (whole
numbers, so no rounding decides a boundary).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from connector.stream.leader import Lease, rebalance_timeout_ms

SESSION, HEARTBEAT = 40, 10  # ticks: ha.session_timeout_ms 4000, ha.heartbeat_interval_ms 1000 (as test_ha.py)
REBALANCE = rebalance_timeout_ms(SESSION * 100) // 100
NAMES = st.sampled_from("ab")
FOREVER = float("inf")


@dataclass
class Seat:
    """The coordinator's record of one member."""

    name: str
    last_heard: int
    joined: bool = False  # sent JoinGroup in the rebalance now running


class Coordinator:
    """The parts of the classic group protocol the lease relies on. A member is dropped when
    `session` ticks passed since the coordinator last heard from it, or, while a rebalance runs
    that it has not rejoined, `rebalance` ticks after the rebalance began; a member that has
    rejoined is kept until the rebalance completes, which resets everyone's session. Heartbeats
    answer "ok" in a settled group, "rebalancing" while one runs (and count as hearing from the
    member), "lost" to a member it does not know or of an old generation."""

    def __init__(self, session: int, rebalance: int):
        self.session, self.rebalance = session, rebalance
        self.seats: dict[int, Seat] = {}
        self.next_id = 1
        self.generation = 0
        self.preparing = False
        self.began = 0
        self.owner: int | None = None  # member id holding partition 0
        self.outbox: list[tuple[str, tuple]] = []  # (member name, (sent, answer)) completed joins

    def drop_at(self, member_id: int) -> float:
        seat = self.seats[member_id]
        if self.preparing and seat.joined:
            return FOREVER
        at = seat.last_heard + self.session
        return min(at, self.began + self.rebalance) if self.preparing else at

    def tick(self, now: int) -> None:
        dropped = [i for i in self.seats if now > self.drop_at(i)]
        for i in dropped:
            del self.seats[i]
            if self.owner == i:
                self.owner = None
        if dropped and not self.preparing:
            self._prepare(now)
        self._complete(now)

    def heartbeat(self, member_id: int, generation: int, now: int) -> str:
        seat = self.seats.get(member_id)
        if seat is None:
            return "lost"
        if self.preparing:
            seat.last_heard = now
            return "rebalancing"
        if generation != self.generation:
            return "lost"
        seat.last_heard = now
        return "ok"

    def join(self, name: str, member_id: int | None, now: int) -> None:
        if member_id not in self.seats:
            member_id, self.next_id = self.next_id, self.next_id + 1
            self.seats[member_id] = Seat(name, now)
        if not self.preparing:
            self._prepare(now)
        seat = self.seats[member_id]
        seat.joined, seat.last_heard = True, now
        self._complete(now)

    def _prepare(self, now: int) -> None:
        self.preparing, self.began = True, now
        for seat in self.seats.values():
            seat.joined = False

    def _complete(self, now: int) -> None:
        if not self.preparing or not all(s.joined for s in self.seats.values()):
            return
        self.preparing = False
        if not self.seats:
            return
        self.generation += 1
        if self.owner not in self.seats:
            self.owner = min(self.seats)
        for member_id, seat in self.seats.items():
            seat.last_heard, seat.joined = now, False
            # JoinGroup and SyncGroup as one round trip: the answer is timed as a SyncGroup sent
            # when the join completed (a real one is sent later still)
            holds = member_id == self.owner
            self.outbox.append((seat.name, (now, ("assignment", member_id, self.generation, holds))))


@dataclass
class Member:
    name: str
    lease: Lease
    member_id: int | None = None
    generation: int = -1
    cut_off: bool = False  # its requests do not reach the coordinator (dead, or a partitioned network)
    inbox: deque = field(default_factory=deque)  # (request sent at, answer), in arrival order

    def receive(self) -> None:
        sent, answer = self.inbox.popleft()
        if answer == "ok":
            self.lease.answered(sent, settled=True)
        elif answer == "rebalancing":
            self.lease.answered(sent, settled=False)
        elif answer == "lost":
            self.lease.revoked()
            self.member_id = None
        else:
            _, self.member_id, self.generation, holds = answer
            self.lease.answered(sent, settled=True)
            if holds:
                self.lease.assigned()
            else:
                self.lease.revoked()


class LeaseModel(RuleBasedStateMachine):
    session, rebalance = SESSION, REBALANCE

    def __init__(self):
        super().__init__()
        self.now = 0
        self.coordinator = Coordinator(self.session, self.rebalance)
        self.members = {n: Member(n, Lease(self.session * 1000, self.rebalance * 1000, HEARTBEAT * 1000)) for n in "ab"}

    def _route(self) -> None:
        for name, answer in self.coordinator.outbox:
            self.members[name].inbox.append(answer)
        self.coordinator.outbox.clear()

    @rule(ticks=st.integers(1, 25))
    def time_passes(self, ticks):
        for _ in range(ticks):
            self.now += 1
            self.coordinator.tick(self.now)
            self._route()

    # a rule drawn for a member that cannot take it (not joined yet, nothing to read) does nothing

    @rule(name=NAMES, answered_at_once=st.booleans())
    def heartbeat(self, name, answered_at_once=False):
        m = self.members[name]
        if m.member_id is not None and not m.cut_off:  # kafka-python heartbeats once it has joined
            m.inbox.append((self.now, self.coordinator.heartbeat(m.member_id, m.generation, self.now)))
            if answered_at_once:
                while m.inbox:
                    m.receive()

    @rule(name=NAMES)
    def join(self, name):
        if not self.members[name].cut_off:
            self.coordinator.join(name, self.members[name].member_id, self.now)
            self._route()

    @rule(name=NAMES)
    def answer_arrives(self, name):
        m = self.members[name]
        if m.inbox:
            m.receive()

    @rule()
    def all_answers_arrive(self):
        for m in self.members.values():
            while m.inbox:
                m.receive()

    @rule(name=NAMES)
    def answer_lost(self, name):
        m = self.members[name]
        if m.inbox:
            m.inbox.popleft()

    @rule(name=NAMES)
    def cut_off(self, name):
        self.members[name].cut_off = True

    @rule(name=NAMES)
    def reconnects(self, name):
        self.members[name].cut_off = False

    @invariant()
    def a_leader_holds_partition_0_for_at_least_the_margin(self):
        leaders = [m for m in self.members.values() if m.lease.leads(self.now)]
        assert len(leaders) <= 1
        for m in leaders:
            assert self.coordinator.owner is not None and self.coordinator.owner == m.member_id, (
                f"{m.name} leads at {self.now}, but the coordinator gave partition 0 to {self.coordinator.owner}"
            )
            drop = self.coordinator.drop_at(m.member_id)
            assert self.now + HEARTBEAT <= drop, f"{m.name} leads at {self.now} but may be dropped at {drop}"


class LeaseModelShortRebalance(LeaseModel):
    """A rebalance timeout no longer than the session: a member that keeps heartbeating in a
    rebalance but cannot rejoin is dropped by the rebalance timeout first."""

    rebalance = SESSION


MODEL_SETTINGS = settings(max_examples=250, stateful_step_count=50, derandomize=True, deadline=None)
TestLeaseModel = LeaseModel.TestCase
TestLeaseModel.settings = MODEL_SETTINGS
TestLeaseModelShortRebalance = LeaseModelShortRebalance.TestCase
TestLeaseModelShortRebalance.settings = MODEL_SETTINGS


def test_a_leader_cut_off_in_mid_rebalance_steps_down_before_the_partition_moves():
    """a leads; b joins and starts a rebalance; a hears of it from a heartbeat, but its JoinGroup
    never reaches the coordinator. The coordinator drops a a session after that heartbeat and
    gives partition 0 to b; a has stepped down a heartbeat interval earlier."""
    model = LeaseModel()
    a, b = model.members["a"], model.members["b"]
    model.join("a")
    a.receive()
    assert a.lease.leads(model.now)
    model.time_passes(5)
    model.join("b")  # the coordinator now waits for a to rejoin
    model.heartbeat("a")
    heard = model.now
    a.receive()  # "rebalancing"
    model.cut_off("a")
    model.join("a")  # never arrives: a stays in mid-rebalance
    stepped_down = next(t for t in range(heard, heard + SESSION) if not a.lease.leads(t))
    assert stepped_down == heard + SESSION - HEARTBEAT
    while model.coordinator.owner != b.member_id or b.member_id is None:
        model.time_passes(1)
        model.a_leader_holds_partition_0_for_at_least_the_margin()
        while b.inbox:
            b.receive()
    assert b.lease.leads(model.now) and not a.lease.leads(model.now)
    assert model.now > heard + SESSION  # b took over only after a's session ran out


def test_a_leader_that_keeps_hearing_from_the_coordinator_keeps_the_lead():
    model = LeaseModel()
    a = model.members["a"]
    model.join("a")
    a.receive()
    for _ in range(20):  # a heartbeat every interval, answered: 20 sessions' worth
        model.time_passes(HEARTBEAT)
        model.heartbeat("a")
        a.receive()
        assert a.lease.leads(model.now)
    model.time_passes(SESSION - HEARTBEAT - 1)  # then silence: the lease runs out
    assert a.lease.leads(model.now)
    model.time_passes(1)
    assert not a.lease.leads(model.now)
