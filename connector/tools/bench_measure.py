"""The benchmark's measurements beside the throughput runs: validation requests and lateness, freshness
on a live stream, and peak RSS at scale; each is its own figure, so they live apart from the runs."""

from __future__ import annotations

import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from connector.tools.bench_phases import (
    BenchError,
    Topics,
    phase_timeout,
    pipeline_raw,
    run_phase,
    tanium_requests,
    what_if_settings,
)

FRESHNESS_RATE = 50  # live alerts per second in the freshness phase
FRESHNESS_POLL = 1.0  # its tanium.poll_interval (seconds)


# ---- validation: requests and window lateness for N actions vs 1 --------------------------------------


def measure_validation(n_actions: int) -> dict:
    """The validation engine with 1 and with N open job actions (starts spread over one minute):
    Tanium requests over the same simulated period (fake clock, counted by the simulator) at the
    default settings and with max_lateness = 30 s (query rounds shared over 30 s); and, with the
    real clock, how late windows run: for each tick, how overdue its most overdue window was when
    the tick began plus how long the tick's queries took (3-second windows, starts over 2 s)."""
    from connector.config import parse_pipeline
    from connector.simulator import Simulator
    from connector.tanium import TaniumClient
    from connector.timeutil import format_ts
    from connector.validation.engine import ValidationEngine
    from connector.validation.rules import JobAction, parse_job_action
    from connector.validation.runners import FakeClock, SystemClock, drive

    def engine_with(sim, n: int, starts: list[datetime], hosts: list[str], **validation) -> ValidationEngine:
        cfg = parse_pipeline(
            {
                "pipeline": {"name": "bench-validation", "mode": "validation"},
                "tanium": sim.settings(max_retries=1),
                "metrics": {"enabled": False},
                "validation": {"discover_network_devices": False, **validation},
            }
        )
        engine = ValidationEngine(cfg, TaniumClient(cfg.tanium), lambda *_: None)
        for k in range(n):
            action = parse_job_action(
                {
                    "id": f"bench-{n}-{k}",
                    "job_id": "bench",
                    "name": f"bench {k}",
                    "type": "host_cli",
                    "started_at": format_ts(starts[k]),
                    "source": {"hostnames": [hosts[k]]},
                }
            )
            if not isinstance(action, JobAction):
                raise BenchError(f"validation: bench job action rejected: {action.reason}")
            engine.add(action)
        return engine

    def finish(engine: ValidationEngine) -> None:
        if engine.enricher is not None:
            engine.enricher.close()
        engine.client.close()

    now = datetime.now(UTC)
    t0 = (now - timedelta(days=1)).replace(hour=14, minute=0, second=0, microsecond=0)
    hosts = [f"bench-{uuid.uuid4().hex[:8]}" for _ in range(n_actions)]
    starts = [t0 + timedelta(seconds=k % 60) for k in range(n_actions)]
    counts: dict[str, dict] = {}
    lateness: dict[str, dict] = {}
    with Simulator(seed=11, alerts=600, hosts=30, history=2 * 86400, end=now) as sim:
        for k, h in enumerate(hosts):
            sim.inject(computer_name=h, alerted_at=t0 + timedelta(seconds=k % 60 + 30))
        for label, settings in (("default", {}), ("max_lateness_30", {"max_lateness": 30})):
            for n in sorted({1, n_actions}):
                engine = engine_with(sim, n, starts, hosts, **settings)
                before = tanium_requests(sim)
                verdicts: list[dict] = []
                drive(engine, FakeClock(t0 - timedelta(minutes=1)), verdicts.append)
                requests = tanium_requests(sim) - before
                finish(engine)
                detected = sum(1 for v in verdicts if v.get("detected"))
                counts[f"{label}/{n}"] = {"requests": requests, "verdicts": len(verdicts), "detected": detected}
                if len(verdicts) != n or detected != n:
                    raise BenchError(f"validation: {n} actions gave {len(verdicts)} verdicts, {detected} detected")
        clock = SystemClock()
        for n in sorted({1, n_actions}):
            begin = clock.now() + timedelta(seconds=0.5)
            soon = [begin + timedelta(seconds=(k % 10) * 0.2) for k in range(n)]
            engine = engine_with(sim, n, soon, hosts, query_time=0.05, query_interval=1)
            late: list[float] = []
            while (wake := engine.next_wakeup()) is not None:  # None once no action is open
                clock.sleep_until(wake)
                last = engine.trace[-1] if engine.trace else None
                began = time.monotonic()
                engine.tick(clock.now())
                spent = time.monotonic() - began
                if engine.trace and engine.trace[-1] is not last and engine.trace[-1]["kind"] == "windows":
                    late.append(engine.trace[-1]["late"] + spent)
            finish(engine)
            lateness[str(n)] = {"max_s": max(late), "mean_s": statistics.mean(late), "ticks": len(late)}
    one, many = counts["max_lateness_30/1"]["requests"], counts[f"max_lateness_30/{n_actions}"]["requests"]
    return {
        "actions": n_actions,
        "requests_1": one,  # with max_lateness = 30
        "requests_n": many,
        "ratio": many / one if one else float("inf"),
        "requests_1_default": counts["default/1"]["requests"],
        "requests_n_default": counts[f"default/{n_actions}"]["requests"],
        "lateness": lateness,
        "detail": counts,
    }


# ---- freshness: createdAt → Kafka acknowledgement on a live stream ---------------------------------


def measure_freshness(opts, bootstrap: str, workdir: Path) -> dict:
    from connector.simulator import Simulator

    seconds = opts.freshness_seconds
    with Simulator(
        alerts=0, intel_docs=opts.intel_docs, seed=5, live_rate=FRESHNESS_RATE, latency=opts.latency_ms / 1000
    ) as sim:
        topics = Topics(bootstrap)
        try:
            name = f"bench-{uuid.uuid4().hex[:8]}-freshness"
            # start_from "now": only alerts created once the pipeline runs, none waiting for its start
            raw = pipeline_raw(
                sim,
                bootstrap,
                name,
                workdir / name,
                tanium={"poll_interval": FRESHNESS_POLL},
                source={"start_from": "now"},
            )
            topics.create(f"{name}.events", f"{name}.events.dlq")
            try:
                f = run_phase("freshness", (raw, seconds), seconds + 60, what_if_settings(opts))
            finally:
                topics.delete(f"{name}.events", f"{name}.events.dlq")
        finally:
            topics.close()
    if f["errors"] or not f["observed"]:
        raise BenchError(f"freshness: {f['events']} events published (errors: {'; '.join(f['errors']) or 'none'})")
    return {"rate": FRESHNESS_RATE, "seconds": seconds, "poll_interval_s": FRESHNESS_POLL, **f}


# ---- RSS scale: pipeline peak RSS for SMALL vs LARGE alerts ----------------------------------------


def measure_rss_scale(opts, bootstrap: str, workdir: Path) -> dict:
    from connector.simulator import Simulator

    out: dict = {}
    for n in opts.rss_scale:
        with Simulator(alerts=n, intel_docs=opts.intel_docs, seed=1, latency=opts.latency_ms / 1000) as sim:
            topics = Topics(bootstrap)
            try:
                name = f"bench-{uuid.uuid4().hex[:8]}-rss{n}"
                # without `raw` the in-memory broker holds a million events in about a gigabyte; the
                # connector's own bounds (queued pages, max_unacked) are the same either way
                raw = pipeline_raw(sim, bootstrap, name, workdir / name, output={"include_raw": False})
                topics.create(f"{name}.events", f"{name}.events.dlq")
                try:
                    p = run_phase("pipeline", (raw,), phase_timeout(n, opts.latency_ms), what_if_settings(opts))
                finally:
                    topics.delete(f"{name}.events", f"{name}.events.dlq")
            finally:
                topics.close()
        if p["published"] != n:
            raise BenchError(f"rss scale: published {p['published']} of {n} alerts")
        out[str(n)] = {k: p[k] for k in ("events", "events_per_s", "peak_rss_mib", "cpu_per_1k", "seconds")}
        if not opts.json:
            print(
                f"  {n:>9} alerts: peak RSS {p['peak_rss_mib']:.1f} MiB, {p['events_per_s']:.0f} events/s",
                file=sys.stderr,
                flush=True,
            )
    small, large = (out[str(n)]["peak_rss_mib"] for n in opts.rss_scale)
    return {"small": opts.rss_scale[0], "large": opts.rss_scale[1], "runs": out, "ratio": large / small}
