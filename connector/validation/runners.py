"""The file runner of Security Validation mode (`tanium-connector validate --job-actions FILE`), the
engine's clocks and `drive`, the loop that runs an engine to its verdicts; the Kafka consumer-group
runner (`tanium-connector run` with mode = "validation") is in kafka_runner.py.

Clocks: the engine never reads the time itself. `SystemClock` waits for real; tests pass a
`FakeClock` whose `sleep_until` jumps, so a 15-minute schedule runs in milliseconds. Against the
simulator's past windows every run time has passed already and queries run at once. A job action
whose started_at lies more than `validation.max_clock_skew` minutes ahead of the clock is rejected
(in Kafka mode on the results topic) instead of being waited for.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TextIO

import orjson

from connector.config import ConfigError
from connector.metrics import NO_METRICS, Metrics
from connector.tanium import TaniumClient, TaniumError
from connector.timeutil import format_ts, utcnow
from connector.validation.engine import ValidationEngine, count_verdict
from connector.validation.rules import JobAction, Rejection, check_start, parse_job_action_bytes


class SystemClock:
    def now(self) -> datetime:
        return utcnow()

    def sleep_until(self, t: datetime, stop: threading.Event | None = None, cap: float | None = None) -> None:
        wait = (t - utcnow()).total_seconds()
        if cap is not None:
            wait = min(wait, cap)
        if wait > 0:
            (stop or threading.Event()).wait(wait)


class FakeClock:
    """Time that moves only when someone sleeps: tests run long schedules instantly."""

    def __init__(self, start: datetime):
        self.t = start
        self.slept: list[datetime] = []

    def now(self) -> datetime:
        return self.t

    def sleep_until(self, t: datetime, stop: threading.Event | None = None, cap: float | None = None) -> None:
        if t > self.t:
            self.t = t
            self.slept.append(t)


def _noop(topic: str, key: str | None, value: dict) -> None:
    pass


# ---- file mode ---------------------------------------------------------------------------------


def read_job_actions(path: str | Path) -> list[tuple[int, JobAction | Rejection]]:
    """(line number, JobAction or Rejection) for each non-blank line of a JSON-lines file."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"--job-actions {p}: file not found") from None
    except OSError as e:
        raise ConfigError(f"--job-actions {p}: cannot read ({e.strerror or e})") from None
    out, seen = [], set()
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        item = parse_job_action_bytes(line)
        if isinstance(item, JobAction):
            if item.id in seen:
                item = Rejection(
                    f"id: {item.id!r} appears more than once in the file; ids must be unique", item.raw, item.id
                )
            else:
                seen.add(item.id)
        out.append((n, item))
    return out


def format_verdict(v: dict) -> str:
    """One human-readable line per verdict."""
    if v.get("result") == "rejected":
        where = f"line {v['line']} " if v.get("line") else ""
        ident = f"(id {v['action_id']}) " if v.get("action_id") else ""
        return f"REJECTED  {where}{ident}{v['reason']}"
    parts = [f"{v['result'].upper():<9} {v['action_id']}  {v['name']!r}", f"events={v['matched_events']}"]
    if v["first_detection_time"]:
        parts.append(f"first={v['first_detection_time']} ({v['latency_seconds']:+.1f}s)")
    parts.append(f"alerted={'yes' if v['alerted'] else 'no'}")
    if v["suspicious_events"]:
        parts.append(f"suspicious={v['suspicious_events']}")
    parts.append(f"windows={v['windows']['queried']}/{v['windows']['total']}")
    parts.append(f"requests={v['requests_attributed']:.1f} (of {v['requests_shared_total']} shared)")
    line = "  ".join(parts)
    return line + "".join(f"  note: {n}" for n in v["notes"])


def drive(
    engine: ValidationEngine,
    clock,
    emit: Callable[[dict], None],
    stop: threading.Event | None = None,
    waiting: Callable[[str], None] | None = None,
) -> None:
    """Runs the engine until every open action has its verdict (or `stop` is set). `waiting` is
    told what each wait of a second or more is for and until when."""
    while not (stop and stop.is_set()):
        wake = engine.next_wakeup()
        if wake is None:  # no open action left
            return
        wait = (wake - clock.now()).total_seconds()
        if waiting and wait >= 1:
            waiting(f"waiting until {format_ts(wake)} ({wait:.0f} s) for {engine.waiting_for(wake)}")
        clock.sleep_until(wake, stop)
        if stop and stop.is_set():
            return
        for v in engine.tick(clock.now()):
            emit(v)


def validate_file(
    cfg,
    job_actions_path,
    json_output: bool = False,
    out: TextIO | None = None,
    clock=None,
    *,
    client=None,
    publish: Callable[[str, str | None, dict], None] | None = None,
    metrics: Metrics = NO_METRICS,
) -> int:
    """Judges every job action of a JSON-lines file and prints one verdict line each (JSON with
    `json_output`). Exit code: 0 all judged, 1 Tanium failed, 2 some job actions were rejected.
    Events, suspicious events and devices go to `publish` (nothing is published by default).
    Each wait for a window is announced on stderr."""
    out = out or sys.stdout
    clock = clock or SystemClock()
    items = read_job_actions(job_actions_path)
    own_client = client is None
    client = client or TaniumClient(cfg.tanium, metrics)
    engine = ValidationEngine(cfg, client, publish or _noop, metrics=metrics)

    def emit(v: dict) -> None:
        out.write((orjson.dumps(v).decode() if json_output else format_verdict(v)) + "\n")
        out.flush()
        count_verdict(metrics, v)

    def waiting(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    rejected = 0
    try:
        for n, item in items:
            if isinstance(item, JobAction):
                item = check_start(item, clock.now(), cfg.validation.max_clock_skew) or item
            if isinstance(item, Rejection):
                rejected += 1
                emit({**item.record(cfg.pipeline.name), "line": n})
            else:
                engine.add(item)
        drive(engine, clock, emit, waiting=waiting)
    except TaniumError as e:
        print(f"error: Tanium query failed: {e.message}", file=sys.stderr)
        return 1
    finally:
        if engine.enricher is not None:
            engine.enricher.close()
        if own_client:
            client.close()
    return 2 if rejected else 0
