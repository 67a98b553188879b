"""The CPU gate (connector/gate.py): at most `slots` threads inside at once, slots handed over in the
order they were asked for (a thread that gives its slot back and asks again queues behind the others),
`outside()` frees the slot while a holder waits, and no mix of nesting and stepping outside deadlocks."""

from __future__ import annotations

import threading

from helpers import wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.gate import Gate


def _started(target, *args) -> threading.Thread:
    t = threading.Thread(target=target, args=args, daemon=True)
    t.start()
    return t


def _waiting(gate: Gate, n: int) -> None:
    """Until n threads queue for a slot (threads ask in the order the test starts them)."""
    wait_until(lambda: len(gate._waiting) >= n, timeout=10, what=f"{n} threads queued for a slot")


def test_slots_are_handed_over_in_the_order_asked_and_nobody_jumps_the_queue():
    gate = Gate(1)
    order: list[str] = []
    gate._acquire()  # the test's thread holds the only slot

    def worker(name):
        with gate.slot():
            order.append(name)

    threads = []
    for i, name in enumerate("abc"):
        threads.append(_started(worker, name))
        _waiting(gate, i + 1)
    gate._release()  # to "a", not to whoever asks next
    with gate.slot():  # asked after a, b and c: served after them
        order.append("me")
    for t in threads:
        t.join(5)
    assert order == ["a", "b", "c", "me"]


def test_outside_frees_the_slot_for_a_waiter_and_takes_one_again_after():
    gate = Gate(1)
    inside = threading.Event()
    release = threading.Event()
    seen: list[str] = []

    def other():
        with gate.slot():
            seen.append("other in")
            inside.set()
            release.wait(5)

    with gate.slot():
        t = _started(other)
        _waiting(gate, 1)
        with gate.outside():  # e.g. waiting for Kafka: the other thread gets the slot meanwhile
            assert inside.wait(5)
            release.set()
        # back inside: the other thread has left, else this line could not run
        seen.append("me again")
        t.join(5)
        with gate.slot():  # nested: goes on at once
            seen.append("nested")
    assert seen == ["other in", "me again", "nested"]
    assert gate._free == 1 and not gate._waiting


STEP = st.sampled_from(["slot", "outside", "nested", "work"])


@settings(max_examples=40, deadline=None, derandomize=True)
@given(slots=st.integers(1, 3), plans=st.lists(st.lists(STEP, min_size=1, max_size=8), min_size=2, max_size=6))
def test_never_more_holders_than_slots_and_every_thread_finishes(slots, plans):
    gate = Gate(slots)
    lock = threading.Lock()
    holders = [0]
    most = [0]

    def enter():
        with lock:
            holders[0] += 1
            most[0] = max(most[0], holders[0])

    def leave():
        with lock:
            holders[0] -= 1

    def run(plan):
        for step in plan:
            with gate.slot():
                enter()
                if step == "outside":
                    leave()
                    with gate.outside():
                        pass
                    enter()
                elif step == "nested":
                    with gate.slot():
                        pass
                leave()

    threads = [_started(run, plan) for plan in plans]
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads), "a thread never got its slot"
    assert most[0] <= slots
    assert gate._free == slots and not gate._waiting
