"""The benchmark's CPU by thread counts a thread that starts and ends between two of its readings,
and leaves its own sampler out."""

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


def test_the_samplers_own_cpu_is_kept_apart_from_the_phases():
    threads = ThreadCPU()
    threads.SAMPLE = 0.001  # many readings: the sampler's own CPU is well above zero
    threads.start()
    end = time.thread_time() + 0.2  # CPU, not wall time: the same on a loaded machine
    while time.thread_time() < end:
        pass
    out = threads.stop()
    assert "bench-sampler" not in out, out
    assert threads.own > 0
    assert out["MainThread"] >= 0.2, out
