"""The benchmark's CPU by thread counts a thread that starts and ends between two of its readings."""

from __future__ import annotations

import threading
import time

from connector.tools.bench_phases import ThreadCPU


def test_a_thread_that_ends_between_two_readings_is_counted_under_its_name():
    original = threading.Thread.run
    threads = ThreadCPU()
    threads.SAMPLE = 3600  # no reading between start and stop but the ones they take
    threads.start()
    try:

        def work():
            end = time.thread_time() + 0.05
            while time.thread_time() < end:
                pass

        t = threading.Thread(target=work, name="source short")
        t.start()
        t.join()
    finally:
        out = threads.stop()
    assert out.get("source", 0) >= 0.05, out
    assert threading.Thread.run is original  # stop() put it back
