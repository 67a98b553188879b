"""Process-wide interpreter settings of the stream pipeline, applied by `run` and by every phase
process of `bench` (so the benchmark measures what runs).

Measured with `bench --switch-interval 0.5 --gc-threshold N` (docs/performance.md): the source
thread's reads and decoding wait for the GIL, which the default 5 ms hand-over makes them wait for
long; and the decoded pages waiting in the queue (~75k objects each) make a low first-generation
threshold rescan them over and over: at 10,000 the collector took 10-14 µs of every alert's CPU
(83 young and 8 middle collections per 20,000 alerts), at 50,000 about 1.5 µs (2 young ones).
"""

from __future__ import annotations

import gc
import sys

SWITCH_INTERVAL = 0.0005  # seconds (Python's default: 0.005)
GC_THRESHOLD = 50_000  # first-generation threshold (Python's default: 700)


def tune_interpreter(switch_interval: float = SWITCH_INTERVAL, gc_threshold: int = GC_THRESHOLD) -> None:
    """sys.setswitchinterval(switch_interval); with a gc_threshold (0: leave the collector as it is),
    gc.freeze() (what was imported stays out of collections) and gc.set_threshold(gc_threshold, 10, 10)."""
    sys.setswitchinterval(switch_interval)
    if gc_threshold:
        gc.freeze()
        gc.set_threshold(gc_threshold, 10, 10)


def interpreter_settings() -> dict:
    """The settings this process runs with: switch interval (ms), GC threshold, whether frozen."""
    return {
        "switch_interval_ms": sys.getswitchinterval() * 1000,
        "gc_threshold": gc.get_threshold()[0],
        "gc_frozen": gc.get_freeze_count() > 0,
    }
