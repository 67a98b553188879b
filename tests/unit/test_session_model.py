"""Model-based test of the at-least-once delivery machinery: the pipeline's sessions, ack windows,
delivery callbacks, checkpoint commits, rewinds, attempt counting and the dead-letter route.

A hypothesis state machine reads alerts through the pipeline's own sessions (each with its own
AlertSource over a fake Tanium client), hands them to a fake sink that keeps every record's
callback, and then answers those callbacks in any order: acknowledged, refused by Kafka (the
record's own fault) or timed out, including late answers for sessions that already ended. Failed
sessions are rewound the way the pipeline does it (flush that times out, commit, rewind, new
session from the checkpoint). Invariant: the durable checkpoint never passes an alert that Kafka
did not confirm. At the end every outstanding answer arrives and the pipeline runs on until
everything is read: every alert is then confirmed (nothing lost) and the checkpoint is on the last.
"""

from __future__ import annotations

import json
from functools import cache

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from kafka.errors import InvalidRecordError, KafkaTimeoutError

from connector.config import parse_pipeline
from connector.simulator import Simulator
from connector.stream.pipeline import StreamPipeline
from connector.tanium import AlertPage, decode_details

ALERTS = 40


@cache
def alerts() -> tuple:
    """The simulator's first ALERTS alerts as the Tanium client returns them (details decoded)."""
    sim = Simulator(alerts=ALERTS, intel_docs=3, seed=5, history=3600)
    try:
        out = []
        for i in range(1, ALERTS + 1):
            a = sim.get_alert(i)
            decode_details(a)
            out.append(a)
        return tuple(out)
    finally:
        sim.stop()


class ListClient:
    """The Tanium client's list_alerts over the first `visible` alerts (new ones arrive)."""

    def __init__(self):
        self.visible = 10

    def list_alerts(self, params, offset, limit, sort="createdAt,id", decode=True):
        items = [dict(a) for a in alerts()[: self.visible][offset : offset + limit]]
        return AlertPage(items, self.visible, self.visible)

    def close(self):
        pass


class HeldSink:
    """A sink whose records wait until the test answers them (a flush never waits). Like KafkaSink,
    it keeps an exception from a callback to itself, noting it in `callback_errors`."""

    def __init__(self, dlq_topic: str):
        self.dlq_topic = dlq_topic
        self.waiting: list[tuple[int, bool, object]] = []  # (alert id, dead-letter record?, on_done)
        self.callback_errors: list[Exception] = []

    def send(self, topic, key, value, headers, on_done, timeout=None):
        doc = json.loads(value)
        dlq = topic == self.dlq_topic
        self.waiting.append(((json.loads(doc["raw"]) if dlq else doc["raw"])["id"], dlq, on_done))
        return True

    def answer(self, index: int, ok: bool, exc: Exception | None) -> None:
        on_done = self.waiting.pop(index)[2]
        try:
            on_done(ok, exc)
        except Exception as e:  # noqa: BLE001 (what KafkaSink does: log it and go on)
            self.callback_errors.append(e)

    def health(self):
        return True, "held"

    def flush(self, timeout=None):
        return not self.waiting

    def stop(self):
        pass

    def close(self, timeout=None):
        pass


class MemoryStore:
    location = "memory"

    def __init__(self):
        self.saved = None

    def load(self):
        return self.saved

    def save(self, checkpoint, timeout=None):
        self.saved = dict(checkpoint)

    def close(self, timeout=5):
        pass


class ModelPipeline(StreamPipeline):
    def _await(self, answered):
        """The model decides when each answer comes, also for records sent one at a time."""


class SessionMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        cfg = parse_pipeline(
            {
                "pipeline": {
                    "name": "model",
                    "max_delivery_attempts": 2,
                    "rewind_backoff": 0.001,
                    "rewind_backoff_max": 0.001,
                },
                "tanium": {"host": "tanium.test", "api_key": "k", "page_size": 3, "enrich_intel_docs": False},
                "source": {"start_from": "30d"},
                "kafka": {"bootstrap_servers": "127.0.0.1:9", "topic": "events"},
            }
        )
        self.client, self.store = ListClient(), MemoryStore()
        self.sink = HeldSink(cfg.kafka.dlq_topic)
        self.pipe = ModelPipeline(cfg, client=self.client, sink=self.sink, store=self.store)
        self.session = self.pipe._begin_session()
        self.pages = None
        self.confirmed: set[int] = set()  # alerts Kafka acknowledged (as an event or a DLQ record)
        self.poison: int | None = None  # an alert whose event Kafka always refuses
        self.dlq_refuses_poison = False

    def _read(self) -> bool:
        """One page of the current session into the sink; False when the cycle had nothing new."""
        if self.pages is None:
            self.pages = self.session.source.cycle()
        page = next(self.pages, None)
        if page is None:
            self.pages = None
            return False
        self.pipe._process(self.session, page)
        return True

    def _answer(self, index: int, outcome: str) -> None:
        """Kafka answers one waiting record; the poison alert's event (and, while the dead-letter
        topic refuses it, its dead-letter record) is refused whatever `outcome` says."""
        index %= len(self.sink.waiting)
        alert_id, dlq, _ = self.sink.waiting[index]
        if alert_id == self.poison and (not dlq or self.dlq_refuses_poison):
            outcome = "refused"
        if outcome == "ack":
            self.confirmed.add(alert_id)
            self.sink.answer(index, True, None)
        elif outcome == "refused":
            self.sink.answer(index, False, InvalidRecordError("the broker refused the record"))
        else:
            self.sink.answer(index, False, KafkaTimeoutError("delivery timed out"))

    def _rewind(self) -> None:
        # what the pipeline does when a session's delivery failed: its flush times out here
        # (answers stay outstanding), the prefix is committed, a new session starts
        s = self.session
        s.stop.set()
        self.pipe.sink.flush(0)
        self.pipe._commit(s)
        assert self.pipe._rewind(s)
        self.session = self.pipe._begin_session(s.refused_until)
        self.pages = None

    @rule(n=st.integers(1, 4))
    def alerts_arrive(self, n):
        self.client.visible = min(ALERTS, self.client.visible + n)

    @precondition(lambda self: not self.session.failed.is_set())
    @rule()
    def read_a_page(self):
        self._read()

    @precondition(lambda self: self.sink.waiting)
    @rule(index=st.integers(0, 50), outcome=st.sampled_from(["ack", "ack", "refused", "timeout"]))
    def kafka_answers(self, index, outcome):
        self._answer(index, outcome)

    @precondition(lambda self: self.poison is None)
    @rule(alert_id=st.integers(1, 12), dlq_too=st.booleans())
    def an_alert_kafka_always_refuses(self, alert_id, dlq_too):
        self.poison, self.dlq_refuses_poison = alert_id, dlq_too

    @rule()
    def commit(self):
        self.pipe._commit(self.session)

    @precondition(lambda self: self.session.failed.is_set())
    @rule()
    def rewind(self):
        self._rewind()

    @invariant()
    def checkpoint_never_passes_an_unconfirmed_alert(self):
        saved = self.store.saved
        if saved is not None:
            passed = set(range(1, saved["id"] + 1))
            assert passed <= self.confirmed, f"checkpoint {saved} passes unconfirmed alerts {passed - self.confirmed}"

    @invariant()
    def every_answer_reaches_the_window_that_sent_the_record(self):
        assert not self.sink.callback_errors, self.sink.callback_errors

    def _run_on(self) -> None:
        """The rest of the run: Kafka acknowledges everything but the poison."""
        for _ in range(500):
            while self.sink.waiting:
                self._answer(0, "ack")
            if self.session.failed.is_set():
                self._rewind()
                if self.pipe.paused:
                    return  # from here on it retries the same record, slowly
            elif not self._read():  # the cycle is over and everything is answered
                self.pipe._commit(self.session)
                return

    def teardown(self):
        self._run_on()
        if self.dlq_refuses_poison and self.poison <= self.client.visible:
            # paused at the poison: the checkpoint stays before it, /readyz says which alert
            assert (self.store.saved or {}).get("id", 0) < self.poison
            ready, why = self.pipe.readiness()
            assert not ready and f"alert id={self.poison} " in why, why
            self.dlq_refuses_poison = False  # the dead-letter topic is fixed: the pipeline goes on
            self._run_on()
            assert self.pipe.paused is None
        self.checkpoint_never_passes_an_unconfirmed_alert()
        visible = set(range(1, self.client.visible + 1))
        assert visible <= self.confirmed, f"alerts never delivered: {sorted(visible - self.confirmed)}"
        assert self.store.saved["id"] == self.client.visible


def test_a_late_ack_of_an_ended_session_confirms_nothing_in_the_next_one():
    """One path of the machine, spelled out. Session 1 sends alerts 1-6; 1 and 2 are confirmed and
    committed; 3 times out, so the session ends with 4-6 still in flight. Session 2 re-reads from
    the checkpoint and sends 3-8, so its fifth record is alert 7. Then the late ack of session 1's
    fifth record (alert 5) arrives, and session 2's acks of 3-6: the checkpoint reaches alert 6 and
    not 7, which only that late ack could have confirmed had it gone to the current window."""
    m = SessionMachine()

    def send_through(alert_id):
        while not any(a == alert_id for a, _, _ in m.sink.waiting):
            assert m._read() or m._read(), f"alert {alert_id} was never read"

    def answer(alert_id, outcome="ack", latest=False):
        """Answers the first record of the alert still waiting, or the latest one sent."""
        found = [i for i, (a, _, _) in enumerate(m.sink.waiting) if a == alert_id]
        m._answer(found[-1] if latest else found[0], outcome)

    send_through(6)
    answer(1), answer(2)
    m.commit()
    assert m.store.saved["id"] == 2
    answer(3, "timeout")
    m.rewind()
    send_through(8)
    answer(5)  # session 1's
    for alert_id in (3, 4, 5, 6):
        answer(alert_id, latest=True)  # session 2's
    m.commit()
    m.checkpoint_never_passes_an_unconfirmed_alert()
    m.every_answer_reaches_the_window_that_sent_the_record()
    assert m.store.saved["id"] == 6
    m.teardown()


SessionMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
test_sessions_never_commit_past_an_unconfirmed_alert = SessionMachine.TestCase
