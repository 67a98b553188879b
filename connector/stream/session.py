"""Delivery sessions and what the pipeline keeps about records Kafka refuses (see pipeline.py,
"Sessions" and "Records Kafka keeps refusing"). A Session is one pass of reading and delivering from
the durable checkpoint: its source cursor, ack window, page queue and flags belong to it alone, so a
late callback or a slow page of an ended session can touch nothing of the next one."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

from connector.kafka import SinkError
from connector.stream.sink import AckWindow, SinkStopped
from connector.stream.source import Position

QUEUE_PAGES = 4  # pages fetched ahead of the one being delivered (memory stays bounded)


# librdkafka's names for "the broker was not reached" (kafka-python marks those errors retriable)
_UNREACHED = ("_MSG_TIMED_OUT", "_TIMED_OUT", "_TRANSPORT", "_ALL_BROKERS_DOWN")


def refused(exc: Exception | None) -> bool:
    """True when Kafka refused the record itself (too large, invalid, not authorised): sending it
    again cannot help. False for timeouts, lost connections, Kafka out of reach and a stopping sink."""
    if exc is None or isinstance(exc, (SinkStopped, SinkError)) or getattr(exc, "retriable", False):
        return False
    return not str(exc).startswith(_UNREACHED)


def error_text(exc: Exception | None) -> str:
    text, name = str(exc), type(exc).__name__
    return text if name in text else f"{name}: {text}"


def describe(alert, pos: Position) -> str:
    """How log lines and /readyz name a record: its alert id and guid."""
    if isinstance(alert, dict):
        return f"alert id={alert.get('id')!r} guid={alert.get('guid')!r}"
    return f"a {type(alert).__name__} record after position {pos.to_checkpoint()}"


def sort_key(pos: Position) -> tuple[str, int]:
    return pos.created_at or "", pos.id or 0


@dataclass
class Failure:
    """A record Kafka did not confirm. `record` is its identity across sessions: its position's
    sort key and how many records before it in the session shared that position."""

    seq: int
    record: tuple
    kind: str
    error: str
    refused: bool


class Session:
    """One pass of reading and delivering from the durable checkpoint (see "Sessions" above). Its
    source thread and its delivery callbacks touch only this object."""

    def __init__(self, source, started_from: dict | None, careful_until: tuple | None):
        self.source = source
        self.started_from = started_from
        self.window = AckWindow()
        self.pages: queue.Queue = queue.Queue(maxsize=QUEUE_PAGES)
        self.stop = threading.Event()  # the source thread stops reading
        self.failed = threading.Event()  # a delivery failed: the session ends
        # records up to this sort key are sent one at a time (the last session saw refusals there)
        self.careful_until = careful_until
        self.first_refused: Failure | None = None  # in send order
        self.refused_until: tuple | None = None  # sort key of the last refused record
        self.retry_seq: int | None = None  # where the record under retry was sent in this session
        self._last: Position | None = None
        self._dup = 0
        self._lock = threading.Lock()

    def identity(self, pos: Position) -> tuple:
        """A record's identity across sessions (call in read order): its position's sort key and
        how many records before it in this session had the same position (a record that cannot
        be placed shares the position of the one before it)."""
        self._dup = self._dup + 1 if pos == self._last else 0
        self._last = pos
        return (*sort_key(pos), self._dup)

    def fail(self, f: Failure) -> bool:
        """Notes a failed record; True for the session's first failure to arrive."""
        with self._lock:
            first = not self.failed.is_set()
            if f.refused:
                if self.first_refused is None or f.seq < self.first_refused.seq:
                    self.first_refused = f
                if self.refused_until is None or f.record[:2] > self.refused_until:
                    self.refused_until = f.record[:2]
            self.failed.set()
        return first


class Backoff:
    """Exponential: `initial`, doubling per next() up to `cap`; reset() starts over."""

    def __init__(self, initial: float, cap: float):
        self.initial, self.cap, self._next = initial, cap, initial

    def next(self) -> float:
        wait, self._next = self._next, min(self._next * 2, self.cap)
        return wait

    def reset(self) -> None:
        self._next = self.initial


@dataclass
class Retry:
    """The record Kafka keeps refusing (kept across sessions by the processing thread)."""

    record: tuple | None = None
    attempts: int = 0
    what: str = ""  # alert id and guid, once the record was read again
    error: str = ""  # the topic's last refusal
    dlq_error: str = ""  # the dead-letter topic's last refusal
