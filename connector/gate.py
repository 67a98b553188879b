"""How many threads of the process may do the connector's CPU work at once.

Why: Python runs one thread at a time (the GIL). A worker with many busy pipelines has a processing
and a source thread per pipeline, plus the Kafka producer's I/O thread they all share; when a
hundred of them want the CPU, each gets a hundredth of it, including the I/O thread that turns
Kafka's acknowledgements into checkpoints, and the process spends its time handing the GIL from
thread to thread. So the CPU-heavy steps take a slot of `CPU` first: a pipeline's processing of a
page (enrich, normalize, serialize, hand to the producer) and the decoding of a Tanium answer. A
thread waiting for a slot sleeps without contending; the threads themselves stay (each pipeline
keeps its own, so a slow Tanium server still holds up only its own pipeline), but only as many
as there are slots compete. One slot: under one GIL a second one only adds hand-overs (`bench
--fleet`, 50 busy pipelines: 0.69 of min(ceilings) with one slot, 0.54 with two; without the gate
some pipelines had not published anything after 110 s). A pipeline alone loses nothing: its source
decodes while the processing thread waits for pages, and the producer's I/O thread needs no slot.

Slots are handed over in the order they were asked for (a thread that gives one back and asks again
at once queues behind the others), so no pipeline starves. A thread that waits while it holds a slot
(for Kafka to take more records, for an IntelDoc, for one record's answer) gives it back meanwhile:
`outside()`. Nothing waits on another thread while it holds a slot, so slots cannot deadlock.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager


class Gate:
    """A fair counting semaphore whose holders can step outside while they wait."""

    def __init__(self, slots: int):
        self._lock = threading.Lock()
        self._free = slots
        self._waiting: deque[threading.Lock] = deque()
        self._mine = threading.local()  # this thread's nesting depth of slot()

    def _acquire(self) -> None:
        with self._lock:
            if self._free and not self._waiting:
                self._free -= 1
                return
            turn = threading.Lock()
            turn.acquire()
            self._waiting.append(turn)
        turn.acquire()  # released by the thread that hands its slot over

    def _release(self) -> None:
        with self._lock:
            if self._waiting:
                self._waiting.popleft().release()  # handed straight over: nobody can jump the queue
            else:
                self._free += 1

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Holds a slot for the block (a thread already holding one just goes on)."""
        depth = getattr(self._mine, "depth", 0)
        if not depth:
            self._acquire()
        self._mine.depth = depth + 1
        try:
            yield
        finally:
            self._mine.depth = depth
            if not depth:
                self._release()

    @contextmanager
    def outside(self) -> Iterator[None]:
        """Gives this thread's slot back for the block (it is about to wait), and takes one again
        after it; a thread without a slot just runs the block."""
        depth = getattr(self._mine, "depth", 0)
        if depth:
            self._mine.depth = 0
            self._release()
        try:
            yield
        finally:
            if depth:
                self._acquire()
                self._mine.depth = depth


CPU = Gate(1)
