"""`bench --profile`: a cProfile of every thread of a phase process over its measured part, written as
a text report: the time per thread, then the top functions by cumulative and by own time (all
threads merged), in microseconds per event so a row reads as "this costs N µs of every alert"; beside
it the merged figures as a pstats file (`python -m pstats FILE`: callers, callees).

A profiler per thread: `threading.setprofile` gives each thread the phase starts its own
cProfile.Profile as it begins (cProfile alone only sees the thread that enabled it); `begin()` clears
what they gathered during the phase's setup, `end()` takes their figures. Times are wall clock per
thread (cProfile's own clock, ~40 ns a reading: a CPU clock costs ~400 ns a reading here, more than
most profiled calls): a thread blocked in a lock, a socket read or select shows that wait as own time
of the blocking call, and a wait for the GIL lands on whatever the thread was running. Profiling
slows the process down (every call is counted), so the phase's throughput figures of a profiled run
are not comparable with an unprofiled one.
"""

from __future__ import annotations

import cProfile
import pstats
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

TOP = 40  # rows per table
_THREAD_NO = re.compile(r"[-_ ]?\d+$")


class PhaseProfile:
    """The profilers of one phase process's threads (install() before the phase starts any thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._profiles: list[tuple[str, cProfile.Profile]] = []
        self._wall = self._cpu = 0.0
        self.stats: list[tuple[str, pstats.Stats]] = []

    def install(self) -> None:
        threading.setprofile(self._thread_started)
        self._enable(threading.current_thread().name)

    def _thread_started(self, _frame, _event, _arg) -> None:
        # the first event of a new thread: its own profiler replaces this hook
        self._enable(threading.current_thread().name)

    def _enable(self, name: str) -> None:
        prof = cProfile.Profile()
        with self._lock:
            self._profiles.append((thread_group(name), prof))
        prof.enable()

    def begin(self) -> None:
        """The measured part starts: what the phase's setup cost is forgotten."""
        with self._lock:
            for _, prof in self._profiles:
                prof.clear()
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def end(self) -> None:
        """The measured part ends: every thread's figures so far (threads still running go on
        unprofiled)."""
        self._wall, self._cpu = time.perf_counter() - self._wall, time.process_time() - self._cpu
        threading.setprofile(None)  # type: ignore[arg-type]  # None removes the hook
        with self._lock:
            profiles = list(self._profiles)
        for name, prof in profiles:
            prof.disable()  # this thread's; another thread's profiler is only snapshot
            prof.create_stats()
            if getattr(prof, "stats", None):
                self.stats.append((name, pstats.Stats(prof)))

    def write(self, path: Path, title: str, events: int) -> None:
        """The report for `events` events of the measured part."""
        per = 1e6 / events if events else 0.0
        merged = pstats.Stats()
        busy: dict[str, float] = {}
        for name, st in self.stats:
            table = st.stats  # type: ignore[attr-defined]
            waited = sum(v[2] for func, v in table.items() if _waits(func))
            busy[name] = busy.get(name, 0.0) + st.total_tt - waited  # type: ignore[attr-defined]
            merged.add(st)
        lines = [
            f"bench --profile: {title}",
            f"{events} events; measured part {self._wall:.2f} s wall, {self._cpu:.2f} s CPU of the process "
            f"= {self._cpu * per:.1f} µs CPU per event (profiled: slower than an unprofiled run)",
            "times are wall clock per thread; calls that block (lock and queue waits, socket reads, select) are",
            "listed apart, and a thread's wait for the GIL lands on whatever it was running",
            "",
            f"{'busy time per thread (own times less blocking calls)':<56}{'s':>8}{'µs/event':>12}",
        ]
        for name, tt in sorted(busy.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {name:<54}{tt:>8.2f}{tt * per:>12.1f}")
        rows = list(merged.stats.items())  # type: ignore[attr-defined]
        work = [r for r in rows if not _waits(r[0])]
        waits = [r for r in rows if _waits(r[0])]
        tables = (
            ("by cumulative time (includes the waits below)", rows, 3),
            ("by own time, blocking calls left out", work, 2),
            ("blocking calls by own time (waiting)", waits, 2),
        )
        for heading, chosen, column in tables:
            lines += ["", f"top functions {heading}, all threads"]
            lines.append(f"{'own µs/ev':>10}{'cum µs/ev':>11}{'calls/ev':>10}  function")
            for func, (_cc, nc, tt, ct, _callers) in sorted(chosen, key=_by(column), reverse=True)[:TOP]:
                calls = nc / events if events else 0.0
                lines.append(f"{tt * per:>10.2f}{ct * per:>11.2f}{calls:>10.2f}  {_name(func)}")
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        merged.dump_stats(path.with_suffix(".pstats"))  # for pstats' own browser or other viewers


# builtins in which a thread waits rather than works
_WAITS = (
    "'acquire' of '_thread.",
    "'get' of '_queue.SimpleQueue'",
    "'recv_into' of '_socket.",
    "'recv' of '_socket.",
    "'poll' of 'select.",
    "'poll' of 'cimpl.",  # librdkafka waits for delivery reports (the reports' own code is listed apart)
    "'flush' of 'cimpl.",
    "'select' of 'select.",
    "time.sleep",
    "posix.fsync",
)


def thread_group(name: str) -> str:
    """A thread's name without its number, so a pool's threads count together ("enrich_3" → "enrich")."""
    return _THREAD_NO.sub("", name) or name


def _by(column: int) -> Callable[[tuple], float]:
    """Sort key of a pstats row (function, (cc, nc, tt, ct, callers)) by one of its figures."""
    return lambda row: row[1][column]


def _waits(func: tuple[str, int, str]) -> bool:
    return func[0] == "~" and any(w in func[2] for w in _WAITS)


def _name(func: tuple[str, int, str]) -> str:
    file, line, name = func
    if file == "~" and line == 0:
        return name  # a builtin: "{method 'acquire' of '_thread.lock' objects}"
    parts = Path(file).parts
    for root in ("connector", "kafka", "confluent_kafka", "requests", "urllib3", "prometheus_client"):
        if root in parts:
            file = "/".join(parts[parts.index(root) :])
            break
    else:
        file = Path(file).name
    return f"{name} ({file}:{line})"
