"""`tanium-connector bench --fleet`: what one more pipeline costs a worker that runs many.

The worker is the real thing: `tanium-connector run DIR` in its own process, with one pipeline
file per simulated Tanium server in DIR and one metrics listener; this process reads the worker's
RSS (VmRSS) and CPU time (utime + stime) from /proc, so the figures are what `top` shows.

Idle (--fleet-sizes, default 1, 50 and 200 pipelines; one worker per size): every pipeline has its
own simulator holding a small history (IDLE_HISTORY alerts) and tanium.poll_interval = 30 s. Once
every pipeline has delivered its history and the worker has settled (SETTLE seconds), the worker's
CPU time is read over a fixed window (--fleet-window) and its RSS at the window's end. Per added
pipeline: (value at n - value at the smallest size) / (n - smallest). Targets: <= 5 MiB RSS and
<= 0.05 % of a core per idle pipeline.

Busy (--fleet-busy N, default 50; 0 skips it): N pipelines, each with its own simulator holding
enough alerts to stay busy through the window, at the run's --latency-ms, as one fleet (a `[fleet]`
section in every file, Kafka state) run by one worker, then shared by --fleet-busy-workers K worker
processes (default 2): what one process carries, and what the machine carries. Their total
throughput is the records the pipelines' sinks confirmed (tanium_connector_records_sent_total
{stage="sink"}, summed over the workers' /metrics) over the window, once every pipeline is
publishing; the ceiling it is held against is bench's own single-pipeline one, measured in the same
run by the same phases (min(sink ceiling, source ceiling), see bench.py), with the single pipeline's
figure beside it. Target: total >= 0.85 x min(ceilings).

The simulators live in this process and one thread serves them all (it waits on every listening
socket at once), so idle simulators cost nothing and none of their work is the worker's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import selectors
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from connector.tools.bench_phases import PAGE_SIZE, BenchError, Topics, number_in, tanium_requests

IDLE_HISTORY = 20  # alerts each idle pipeline drains before it is idle
IDLE_POLL = 30.0  # tanium.poll_interval of the idle pipelines (seconds)
SETTLE = 5.0  # seconds between the last history delivery and the window
BUSY_SLACK = 30.0  # seconds of alerts beyond the window a busy pipeline holds (start-up, stragglers)
RSS_TARGET_MIB = 5.0
CPU_TARGET_PERCENT = 0.05  # of one core, per idle pipeline
RATIO_TARGET = 0.85
HEALTHZ_TIMEOUT = 10.0  # seconds a /healthz probe of the busy worker waits for its answer


# ---- command line ---------------------------------------------------------------------------------


def _sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(p) for p in text.replace("_", "").split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give pipeline counts such as 1,50,200") from None
    if len(sizes) < 2 or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give at least two different pipeline counts, each 1 or more")
    return sizes


_seconds = number_in("s", "30", 1, 3600)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from connector.tools.bench import _count, _positive_int

    g = parser.add_argument_group("fleet (--fleet)")
    g.add_argument(
        "--fleet",
        action="store_true",
        help="measure one worker (`run DIR`) with many pipelines instead: RSS and CPU per idle pipeline, "
        "and the throughput of many busy ones against the single-pipeline ceiling",
    )
    g.add_argument(
        "--fleet-sizes",
        type=_sizes,
        default=[1, 50, 200],
        metavar="N,N,…",
        help="idle pipelines per worker, one worker each (default 1,50,200)",
    )
    g.add_argument(
        "--fleet-window",
        type=_seconds,
        default=30.0,
        metavar="S",
        help="seconds over which the worker's CPU time is read (default %(default)g)",
    )
    g.add_argument(
        "--fleet-busy",
        type=_count,
        default=50,
        metavar="N",
        help="busy pipelines in one worker (default %(default)s; 0 = skip, and the ceilings with it)",
    )
    g.add_argument(
        "--fleet-busy-workers",
        type=_positive_int,
        default=2,
        metavar="K",
        help="the busy pipelines also shared by K worker processes as one fleet, the machine's total "
        "(default %(default)s; 1 = one worker only)",
    )


# ---- the simulators: one thread serves them all ---------------------------------------------------


class SimulatorHost:
    """Simulators whose listening sockets one thread waits on together (each connection still gets
    its own handler thread, as in Simulator.start)."""

    def __init__(self, sims: list):
        self.sims = sims
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="bench-simulators", daemon=True)

    def _serve(self) -> None:
        with selectors.DefaultSelector() as sel:
            for sim in self.sims:
                sim.server.socket.setblocking(False)
                sel.register(sim.server, selectors.EVENT_READ, sim.server)
            while not self._stop.is_set():
                for key, _ in sel.select(0.5):
                    key.data._handle_request_noblock()

    def __enter__(self) -> SimulatorHost:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        for sim in self.sims:
            sim.stop()


# ---- the worker: `tanium-connector run DIR` ---------------------------------------------------------


def _toml(sections: dict[str, dict]) -> str:
    # strings, numbers and booleans only: JSON writes them as TOML reads them
    return "".join(
        f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
        for name, values in sections.items()
    )


def checkpointed(state: Path, names: list[str]) -> dict[str, int]:
    """Alerts each pipeline has delivered and checkpointed, read from its checkpoint file (the worker
    is not asked: under load its own listener answers late, and asking would cost it CPU). A
    simulator numbers its history alerts 1, 2, … in createdAt order, so the checkpoint's alert id
    is the count of the pipeline's contiguous delivered prefix."""
    out = {}
    for name in names:
        try:
            out[name] = json.loads((state / f"{name}.json").read_text(encoding="utf-8"))["id"] or 0
        except FileNotFoundError:
            out[name] = 0
    return out


class Worker:
    """`tanium-connector run DIR` as a process of its own; its logs go to a file."""

    def __init__(self, folder: Path, port: int, log: Path, env: dict[str, str] | None = None):
        self.port, self.log = port, log
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "connector.cli", "run", str(folder), "--log-format", "json"],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
        self.stat = Path(f"/proc/{self.proc.pid}/stat")
        self.status = Path(f"/proc/{self.proc.pid}/status")

    def cpu_seconds(self) -> float:
        # the fields after the command name (which may hold spaces): utime and stime are the 12th and 13th
        fields = self.stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def proc_status(self, key: str) -> int:
        for line in self.status.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise BenchError(f"/proc/{self.proc.pid}/status has no {key}")

    def rss_mib(self) -> float:
        return self.proc_status("VmRSS") / 1024

    def healthz_seconds(self, timeout: float) -> float:
        """How long /healthz took to answer (timeout when it did not)."""
        t0 = time.monotonic()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=timeout) as r:
                r.read()
        except urllib.error.HTTPError:
            pass  # an answer all the same
        except OSError:
            return timeout
        return time.monotonic() - t0

    def wait(self, what: str, ok, timeout: float, poll: float = 0.5) -> float:
        """Seconds until ok() held; BenchError (with the log's tail) when the worker ends or time runs out."""
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"the worker ended (exit code {self.proc.returncode}) before {what}: {self.tail()}")
            with contextlib.suppress(OSError):
                if ok():
                    return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise BenchError(f"the worker did not reach {what} within {timeout:.0f}s: {self.tail()}")
            time.sleep(poll)

    def sent(self) -> dict[str, float]:
        """Records each pipeline's sink had confirmed in this worker (its /metrics)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=HEALTHZ_TIMEOUT) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("tanium_connector_records_sent_total{") and 'stage="sink"' in line:
                out[line.split('pipeline="', 1)[1].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
        return out

    def stop(self, timeout: float = 120, t0: float | None = None) -> tuple[int, float]:
        """SIGTERM (unless `t0`: when it was sent); (exit code, seconds to exit)."""
        if t0 is None:
            t0 = time.monotonic()
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise BenchError(f"the worker did not stop within {timeout:.0f}s of SIGTERM: {self.tail()}") from None
        finally:
            self._log.close()
        return code, time.monotonic() - t0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def tail(self) -> str:
        lines = self.log.read_text(errors="replace").splitlines()[-5:]
        return " | ".join(lines) or "(no log lines)"


@contextlib.contextmanager
def worker_for(sims: list, bootstrap: str, work: Path, tag: str, **tanium):
    """A worker running one pipeline per simulator (named `tag`-NNN) and what each has checkpointed
    (a callable); the topics are deleted afterwards."""
    from connector.tools.embedded import free_port

    folder, state = work / tag, work / f"{tag}-state"
    folder.mkdir()
    port = free_port()
    names = [f"{tag}-{i:03d}" for i in range(len(sims))]
    for name, sim in zip(names, sims, strict=True):
        sections = {
            "pipeline": {"name": name},
            "tanium": {**sim.settings(), "page_size": PAGE_SIZE, **tanium},
            "source": {"start_from": "3650d"},
            "kafka": {"bootstrap_servers": bootstrap, "topic": f"{name}.events"},
            "state": {"path": str(state)},
            "metrics": {"listen": f"127.0.0.1:{port}"},
        }
        (folder / f"{name}.toml").write_text(_toml(sections), encoding="utf-8")
    worker = Worker(folder, port, work / f"{tag}.log")
    topics = Topics(bootstrap)
    try:
        yield worker, lambda: checkpointed(state, names)
    finally:
        worker.kill()
        topics.delete(*(f"{n}.events" for n in names))
        topics.close()


@contextlib.contextmanager
def fleet_for(sims: list, bootstrap: str, work: Path, tag: str, workers: int):
    """`workers` worker processes sharing one pipeline per simulator as one fleet (a `[fleet]` section
    in every file, Kafka state, one directory), and the records each pipeline has published in all
    (a callable summing the workers' /metrics); the topics are deleted afterwards."""
    from connector.tools.embedded import free_port

    folder = work / tag
    folder.mkdir()
    names = [f"{tag}-{i:03d}" for i in range(len(sims))]
    for name, sim in zip(names, sims, strict=True):
        sections = {
            "pipeline": {"name": name},
            "tanium": {**sim.settings(), "page_size": PAGE_SIZE},
            "source": {"start_from": "3650d"},
            "kafka": {"bootstrap_servers": bootstrap, "topic": f"{name}.events"},
            "state": {"backend": "kafka", "topic": f"{tag}.state"},
            "metrics": {"listen": "127.0.0.1:${METRICS_PORT}"},  # each worker its own
            "fleet": {"group_id": tag},
        }
        (folder / f"{name}.toml").write_text(_toml(sections), encoding="utf-8")
    started: list[Worker] = []
    topics = Topics(bootstrap)

    def sent() -> dict[str, float]:
        total = dict.fromkeys(names, 0.0)
        for w in started:
            for name, count in w.sent().items():
                total[name] += count
        return total

    try:
        for i in range(workers):
            port = free_port()
            started.append(Worker(folder, port, work / f"{tag}-{i}.log", env={"METRICS_PORT": str(port)}))
        yield started, sent
    finally:
        for w in started:
            w.kill()
        coordination = [f"{tag}.state.leader.{n}" for n in names]
        topics.delete(*(f"{n}.events" for n in names), f"{tag}.state", *coordination)
        topics.close()


# ---- idle ----------------------------------------------------------------------------------------


def measure_idle(n: int, bootstrap: str, work: Path, window: float) -> dict:
    from connector.simulator import Simulator

    sims = [Simulator(alerts=IDLE_HISTORY, intel_docs=4, history=3600, seed=100 + i) for i in range(n)]
    tag = f"fleet-{uuid.uuid4().hex[:6]}-idle{n}"
    with SimulatorHost(sims), worker_for(sims, bootstrap, work, tag, poll_interval=IDLE_POLL) as (worker, checkpoints):
        # start-up: n producers and n first polls; generous on a shared machine
        started = worker.wait(
            f"{n} pipelines delivering their history",
            lambda: min(checkpoints().values()) >= IDLE_HISTORY,
            60 + n,
        )
        time.sleep(SETTLE)
        requests0, cpu0, t0 = sum(tanium_requests(s) for s in sims), worker.cpu_seconds(), time.monotonic()
        time.sleep(window)
        cpu, seconds = worker.cpu_seconds() - cpu0, time.monotonic() - t0
        requests = sum(tanium_requests(s) for s in sims) - requests0
        rss, threads = worker.rss_mib(), worker.proc_status("Threads")
        code, shutdown = worker.stop()
    if code != 0:
        raise BenchError(f"idle worker with {n} pipelines exited with {code} on SIGTERM: {worker.tail()}")
    return {
        "pipelines": n,
        "rss_mib": rss,
        "cpu_seconds": cpu,
        "window_s": seconds,
        "cpu_core_percent": cpu / seconds * 100,
        "threads": threads,
        "tanium_requests_in_window": requests,
        "start_s": started,
        "shutdown_s": shutdown,
    }


def per_added(sizes: dict[str, dict]) -> dict[str, dict]:
    """RSS and CPU per pipeline added beyond the smallest worker, for every larger one."""
    base = min(sizes.values(), key=lambda s: s["pipelines"])
    return {
        key: {
            "rss_mib": (s["rss_mib"] - base["rss_mib"]) / (s["pipelines"] - base["pipelines"]),
            "cpu_core_percent": (s["cpu_core_percent"] - base["cpu_core_percent"])
            / (s["pipelines"] - base["pipelines"]),
        }
        for key, s in sizes.items()
        if s is not base
    }


# ---- busy ----------------------------------------------------------------------------------------


def single_pipeline(opts, bootstrap: str, work: Path) -> dict:
    """bench's own phases, kafka-python: sink ceiling, source ceiling and one pipeline."""
    from connector.simulator import Simulator
    from connector.tools.bench import SINK_POOL, _event_pool, one_run
    from connector.tools.bench_phases import pipeline_raw

    with Simulator(alerts=opts.alerts, intel_docs=opts.intel_docs, seed=1, latency=opts.latency_ms / 1000) as sim:
        topics = Topics(bootstrap)
        try:
            pool = _event_pool(sim, pipeline_raw(sim, bootstrap, "bench", work / "pool"), min(SINK_POOL, opts.alerts))
            run = one_run(
                sim, topics, bootstrap, work, pool, argparse.Namespace(**{**vars(opts), "clients": ["kafka-python"]})
            )
        finally:
            topics.close()
    return {
        "sink_events_per_s": run["sink"]["events_per_s"],
        "source_events_per_s": run["source"]["events_per_s"],
        "ceiling_events_per_s": min(run["sink"]["events_per_s"], run["source"]["events_per_s"]),
        "pipeline_events_per_s": run["pipeline"]["events_per_s"],
        "alerts": opts.alerts,
    }


def measure_busy(n: int, workers: int, ceiling: float, opts, bootstrap: str, work: Path) -> dict:
    """n busy pipelines shared by `workers` worker processes (a fleet) over the window."""
    from connector.simulator import Simulator

    window = opts.fleet_window
    # each pipeline alone could not drain its alerts before the window ends, even at the whole ceiling
    # (a fleet of several workers may pass one process's ceiling: room for twice it)
    alerts = max(PAGE_SIZE * 4, math.ceil(ceiling * min(workers, 2) * (window + BUSY_SLACK) / n))
    sims = [
        Simulator(alerts=alerts, intel_docs=opts.intel_docs, seed=200 + i, latency=opts.latency_ms / 1000)
        for i in range(n)
    ]
    tag = f"fleet-{uuid.uuid4().hex[:6]}-busy{n}x{workers}"
    with SimulatorHost(sims), fleet_for(sims, bootstrap, work, tag, workers) as (group, sent):
        first = group[0]
        started = first.wait(f"all {n} pipelines publishing", lambda: min(sent().values()) > 0, 60 + n, 1.0)
        sent0, cpu0, t0 = sent(), sum(w.cpu_seconds() for w in group), time.monotonic()
        healthz = []  # /healthz answer times through the window, one probe a second (timeout: HEALTHZ_TIMEOUT)
        while (left := t0 + window - time.monotonic()) > 0:
            healthz.append(max(w.healthz_seconds(HEALTHZ_TIMEOUT) for w in group))
            time.sleep(max(0.0, min(left, 1.0 - healthz[-1])))
        sent1, cpu1, t1 = sent(), sum(w.cpu_seconds() for w in group), time.monotonic()
        rss = sum(w.rss_mib() for w in group)
        signalled = time.monotonic()
        for w in group:
            w.proc.send_signal(signal.SIGTERM)
        stops = [w.stop(t0=signalled) for w in group]
    failed = [(w, code) for w, (code, _) in zip(group, stops, strict=True) if code != 0]
    if failed:
        w, code = failed[0]
        raise BenchError(f"busy worker with {n} pipelines exited with {code} on SIGTERM: {w.tail()}")
    drained = [name for name, count in sent1.items() if count >= alerts]
    if drained:
        raise BenchError(f"busy: {len(drained)} pipelines ran out of alerts within the window; the figure would be low")
    events = sum(sent1.values()) - sum(sent0.values())
    per = sorted(sent1[name] - sent0[name] for name in sent1)
    seconds = t1 - t0
    return {
        "pipelines": n,
        "workers": workers,
        "alerts_each": alerts,
        "latency_ms": opts.latency_ms,
        "window_s": seconds,
        "events": events,
        "events_per_s": events / seconds,
        "per_pipeline_min": per[0],
        "per_pipeline_max": per[-1],
        "cpu_core_percent": (cpu1 - cpu0) / seconds * 100,
        "rss_mib": rss,
        "healthz_max_s": max(healthz),
        "healthz_median_s": statistics.median(healthz),
        "healthz_timeouts": sum(1 for h in healthz if h >= HEALTHZ_TIMEOUT),
        "start_s": started,
        "shutdown_s": max(seconds for _, seconds in stops),
    }


# ---- the command ---------------------------------------------------------------------------------


def run_fleet_bench(args) -> int:
    import orjson

    from connector.tools.bench_report import hardware
    from connector.tools.embedded import EmbeddedBroker

    if not Path("/proc/self/stat").exists():
        print("bench --fleet: reads the worker's CPU time and RSS from /proc (Linux only)", file=sys.stderr)
        return 2

    def say(text: str) -> None:
        if not args.json:
            print(text, file=sys.stderr, flush=True)

    report: dict = {
        "config": {
            "sizes": args.fleet_sizes,
            "window_s": args.fleet_window,
            "idle_poll_interval_s": IDLE_POLL,
            "idle_history_alerts": IDLE_HISTORY,
            "busy_pipelines": args.fleet_busy,
            "busy_workers": args.fleet_busy_workers,
            "latency_ms": args.latency_ms,
            "alerts": args.alerts,
        },
        "hardware": hardware(),
    }
    try:
        with tempfile.TemporaryDirectory(prefix="tanium-bench-fleet-") as tmp:
            work = Path(tmp)
            with EmbeddedBroker(log=str(work / "broker.log")) as broker:
                sizes: dict[str, dict] = {}
                for n in args.fleet_sizes:
                    say(f"idle: one worker, {n} pipelines, {args.fleet_window:g}s window …")
                    sizes[str(n)] = measure_idle(n, broker.bootstrap, work, args.fleet_window)
                report["idle"] = {"sizes": sizes, "per_added_pipeline": per_added(sizes)}
                if args.fleet_busy:
                    say(f"single pipeline: sink and source ceilings, pipeline ({args.alerts} alerts) …")
                    single = single_pipeline(args, broker.bootstrap, work)
                    for key, workers in (("busy", 1), ("busy_fleet", args.fleet_busy_workers)):
                        if workers == 1 and key == "busy_fleet":
                            break
                        say(f"busy: {workers} worker(s), {args.fleet_busy} pipelines, {args.fleet_window:g}s window …")
                        ceiling = single["ceiling_events_per_s"]
                        busy = measure_busy(args.fleet_busy, workers, ceiling, args, broker.bootstrap, work)
                        busy["single"] = single
                        busy["ratio"] = busy["events_per_s"] / ceiling
                        report[key] = busy
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    report["targets"] = fleet_targets(report)
    if args.json:
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print_fleet_report(report, sys.stdout)
    return 0


def fleet_targets(report: dict) -> dict:
    largest = max(report["idle"]["per_added_pipeline"].items(), key=lambda kv: int(kv[0]))[1]
    t = {
        "idle_rss_per_pipeline_mib": {
            "value": largest["rss_mib"],
            "target": f"<= {RSS_TARGET_MIB:g}",
            "met": largest["rss_mib"] <= RSS_TARGET_MIB,
        },
        "idle_cpu_per_pipeline_core_percent": {
            "value": largest["cpu_core_percent"],
            "target": f"<= {CPU_TARGET_PERCENT:g}",
            "met": largest["cpu_core_percent"] <= CPU_TARGET_PERCENT,
        },
    }
    for key in ("busy", "busy_fleet"):
        if key in report:
            r = report[key]["ratio"]
            t[f"{key}_ratio"] = {"value": r, "target": f">= {RATIO_TARGET:g}", "met": r >= RATIO_TARGET}
    return t


def print_fleet_report(report: dict, out) -> None:
    from connector.tools.bench_report import hardware_line

    c, idle, t = report["config"], report["idle"], report["targets"]
    ok = {True: "met", False: "NOT MET"}
    w = out.write
    w(
        f"tanium-connector bench --fleet: one worker (`run DIR`), idle pipelines with poll interval "
        f"{c['idle_poll_interval_s']:g} s after {c['idle_history_alerts']} history alerts each, "
        f"CPU over {c['window_s']:g} s\n"
    )
    w(f"hardware: {hardware_line(report['hardware'])}\n\n")
    w(
        f"{'idle pipelines':<16}{'RSS MiB':>10}{'CPU % core':>12}{'threads':>9}{'Tanium req':>12}"
        f"{'start s':>9}{'stop s':>8}\n"
    )
    for s in idle["sizes"].values():
        w(
            f"{s['pipelines']:<16}{s['rss_mib']:>10.1f}{s['cpu_core_percent']:>12.2f}{s['threads']:>9}"
            f"{s['tanium_requests_in_window']:>12}{s['start_s']:>9.1f}{s['shutdown_s']:>8.1f}\n"
        )
    w("\nper added idle pipeline (vs the smallest worker):\n")
    for n, p in idle["per_added_pipeline"].items():
        w(f"  {n:>5} pipelines: RSS {p['rss_mib']:.2f} MiB, CPU {p['cpu_core_percent']:.4f} % of a core\n")
    rss, cpu = t["idle_rss_per_pipeline_mib"], t["idle_cpu_per_pipeline_core_percent"]
    w(
        f"  targets (largest worker): RSS {rss['target']} MiB: {ok[rss['met']]}; "
        f"CPU {cpu['target']} % of a core: {ok[cpu['met']]}\n"
    )
    for key in ("busy", "busy_fleet"):
        if key not in report:
            continue
        b, s = report[key], report[key]["single"]
        w(
            f"\nbusy: {b['pipelines']} pipelines on {b['workers']} worker(s), {b['alerts_each']} alerts each, "
            f"{b['latency_ms']:g} ms per request, {b['window_s']:.0f} s window\n"
        )
        w(
            f"  single pipeline ({s['alerts']} alerts): sink ceiling {s['sink_events_per_s']:.0f}, source ceiling "
            f"{s['source_events_per_s']:.0f}, pipeline {s['pipeline_events_per_s']:.0f} events/s\n"
        )
        w(
            f"  fleet total {b['events_per_s']:.0f} events/s (per pipeline {b['per_pipeline_min'] / b['window_s']:.0f}"
            f"–{b['per_pipeline_max'] / b['window_s']:.0f}), CPU {b['cpu_core_percent']:.0f} % of a core, "
            f"RSS {b['rss_mib']:.0f} MiB\n"
        )
        w(
            f"  /healthz answered in {b['healthz_median_s']:.3f} s (median), {b['healthz_max_s']:.3f} s (max); "
            f"{b['healthz_timeouts']} probes of {HEALTHZ_TIMEOUT:g} s timed out\n"
        )
        w(f"  every pipeline publishing {b['start_s']:.1f} s after start; SIGTERM to exit {b['shutdown_s']:.1f} s\n")
        r = t[f"{key}_ratio"]
        w(
            f"  fleet / min(ceilings) {b['ratio']:.3f} (target {r['target']}: {ok[r['met']]}); fleet / single "
            f"pipeline {b['events_per_s'] / s['pipeline_events_per_s']:.3f}\n"
        )
    w("(shared machine: other processes compete for the same cores; compare figures from one run)\n")
