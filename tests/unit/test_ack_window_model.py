"""Model-based test of AckWindow, the structure the checkpoint follows: records enter one by one or a
page at a time, outcomes arrive in any order, and the passed front of its lists is cut off as it
goes (a tiny cut-off size here, so cuts happen all the time). Invariant: the committable position is
always the last final record of the contiguous acknowledged prefix, as a plain list of every record
ever added says; `confirmed`, `pending` and `failed` agree with that list, and an outcome reported
twice or for an unknown record is refused."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from connector.stream.sink import AckWindow


class AckWindowModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.window = AckWindow()
        self.window.COMPACT_AT = 3
        self.records: list[tuple[int, bool]] = []  # (position, final) by seq
        self.states: list[bool | None] = []  # by seq: None waiting, True acknowledged, False failed

    def _added(self, first: int, entries: list[tuple[int, bool]]) -> None:
        assert first == len(self.records), "sequence numbers follow each other in send order"
        self.records += entries
        self.states += [None] * len(entries)

    def _alerts(self, draw_finals: list[bool]) -> list[tuple[int, bool]]:
        # positions grow with the alerts; an alert's records share its position, the last is final
        pos = (self.records[-1][0] + 1) if self.records else 0
        out = []
        for final in draw_finals:
            out.append((pos, final))
            pos += final
        return out

    @rule(final=st.booleans())
    def add_one(self, final):
        (entry,) = self._alerts([final])
        self._added(self.window.add(*entry), [entry])

    @rule(finals=st.lists(st.booleans(), min_size=1, max_size=6))
    def add_page(self, finals):
        entries = self._alerts(finals)
        first = self.window.add_page([p for p, _ in entries], [f for _, f in entries])
        self._added(first, entries)

    @precondition(lambda self: None in self.states)
    @rule(data=st.data())
    def answer(self, data):
        waiting = [seq for seq, state in enumerate(self.states) if state is None]
        seq = data.draw(st.sampled_from(waiting))
        ok = data.draw(st.integers(0, 11)) > 0  # mostly successes, so the prefix moves
        self.window.done(seq, ok)
        self.states[seq] = ok

    @precondition(lambda self: any(s is not None for s in self.states))
    @rule(data=st.data())
    def answer_twice_is_refused(self, data):
        seq = data.draw(st.sampled_from([seq for seq, state in enumerate(self.states) if state is not None]))
        with pytest.raises(ValueError):
            self.window.done(seq, True)
        with pytest.raises(ValueError):
            self.window.done(len(self.states), True)  # not added yet

    def _prefix(self) -> int:
        n = 0
        while n < len(self.states) and self.states[n] is True:
            n += 1
        return n

    @invariant()
    def committable_is_the_last_final_record_of_the_acknowledged_prefix(self):
        finals = [pos for pos, final in self.records[: self._prefix()] if final]
        assert self.window.committable() == (finals[-1] if finals else None)

    @invariant()
    def confirmed_pending_and_failed_agree_with_the_records(self):
        prefix = self._prefix()
        for seq in range(len(self.records) + 1):
            assert self.window.confirmed(seq) == (seq < prefix), seq
        assert self.window.pending == len(self.records) - prefix
        assert self.window.failed == (False in self.states)


test_ack_window_model = AckWindowModel.TestCase
test_ack_window_model.settings = settings(max_examples=150, stateful_step_count=40, derandomize=True, deadline=None)
