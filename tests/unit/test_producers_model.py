"""Model-based test of the producers the pipelines of one process share (connector/stream/producers.py):
sinks take and give back producers for several [kafka] sections, replace a broken one (some with a
producer that another sink already replaced), and a producer fails to start now and then.
Invariants: sinks whose producer settings are equal hold one producer and sinks whose settings differ
never do (topics and max_unacked are not producer settings; a password is); a producer in use is open;
every producer no sink uses any more was closed exactly once; a replacement happens once however many
sinks ask for it."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from connector.config import KafkaSection
from connector.kafka import SinkError
from connector.stream import producers

BASE = {"bootstrap_servers": "127.0.0.1:1", "sasl_mechanism": "SCRAM-SHA-256", "sasl_plain_username": "u"}
# (section, the producer it must get): equal settings, equal producer
SECTIONS = [
    (KafkaSection(**BASE, sasl_plain_password="pw", topic="a"), "A"),
    (KafkaSection(**BASE, sasl_plain_password="pw", topic="b", max_unacked=7, topics={"ocsf": "o"}), "A"),
    (KafkaSection(**BASE, sasl_plain_password="pw", client_id="own"), "B"),
    (KafkaSection(**BASE, sasl_plain_password="other"), "C"),
]


class FakeProducer:
    def __init__(self, n: int):
        self.n, self.closes = n, 0

    def close(self, timeout=None) -> None:
        self.closes += 1


class SharedProducersModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.made: list[FakeProducer] = []
        self.unreachable = False
        self.users: list[tuple[producers.Producer, str, FakeProducer]] = []  # (handle, group, producer seen)

    def make(self) -> FakeProducer:
        if self.unreachable:
            raise SinkError("cannot reach Kafka")
        self.made.append(FakeProducer(len(self.made)))
        return self.made[-1]

    @rule(which=st.integers(0, len(SECTIONS) - 1), unreachable=st.booleans())
    def acquire(self, which, unreachable):
        kafka, group = SECTIONS[which]
        self.unreachable = unreachable
        present = any(g == group for _, g, _ in self.users)
        try:
            handle = producers.acquire(kafka, self.make, 10000)
        except SinkError:
            assert unreachable and not present, "a producer in use is shared, not made again"
            return
        assert not (unreachable and not present)
        self.users.append((handle, group, handle.producer))

    @precondition(lambda self: self.users)
    @rule(data=st.data())
    def release(self, data):
        i = data.draw(st.integers(0, len(self.users) - 1))
        handle, _, _ = self.users.pop(i)
        producers.release(handle, 0)

    @precondition(lambda self: self.users)
    @rule(data=st.data(), stale=st.booleans())
    def renew(self, data, stale):
        """A sink found its producer broken: the one it uses now, or one it used before (another
        sink replaced it meanwhile)."""
        self.unreachable = False
        i = data.draw(st.integers(0, len(self.users) - 1))
        handle, group, seen = self.users[i]
        old = seen if stale else handle.producer
        current, before = handle.producer, len(self.made)
        handle.renew(old, "failed fatally")
        if old is current:
            assert len(self.made) == before + 1 and handle.producer is self.made[-1]
        else:  # already replaced: nothing to do
            assert len(self.made) == before and handle.producer is current
        self.users[i] = (handle, group, handle.producer)

    @invariant()
    def equal_settings_one_producer_different_settings_never(self):
        by_group: dict[str, producers.Producer] = {}
        for handle, group, _ in self.users:
            assert by_group.setdefault(group, handle) is handle
        assert len({id(h) for h in by_group.values()}) == len(by_group)
        for group, handle in by_group.items():
            assert handle.users == sum(g == group for _, g, _ in self.users)

    @invariant()
    def in_use_is_open_and_the_rest_closed_once(self):
        in_use = {id(h.producer) for h, _, _ in self.users}
        for p in self.made:
            assert p.closes == (0 if id(p) in in_use else 1), (p.n, p.closes)

    def teardown(self):
        for handle, _, _ in self.users:
            producers.release(handle, 0)
        assert not producers._shared


def test_a_replacement_happens_once_however_many_sinks_ask():
    made: list[FakeProducer] = []

    def make():
        made.append(FakeProducer(len(made)))
        return made[-1]

    a = producers.acquire(SECTIONS[0][0], make, 10000)
    b = producers.acquire(SECTIONS[1][0], make, 10000)
    assert a is b and len(made) == 1
    broken = a.producer
    a.renew(broken, "lost its producer id")
    b.renew(broken, "lost its producer id")  # the second sink noticed the same broken producer
    assert len(made) == 2 and a.producer is made[1] and broken.closes == 1
    producers.release(a, 0)
    assert made[1].closes == 0  # b still uses it
    producers.release(b, 0)
    assert made[1].closes == 1 and not producers._shared


@pytest.fixture(autouse=True)
def _empty_registry():
    yield
    assert not producers._shared, "a test left a shared producer behind"


test_shared_producers_model = SharedProducersModel.TestCase
test_shared_producers_model.settings = settings(
    max_examples=150, stateful_step_count=30, derandomize=True, deadline=None
)
