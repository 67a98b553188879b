"""`tanium-connector bench`: how close the pipeline gets to what Tanium and Kafka allow.

One run starts the TR simulator (in this process) and the embedded broker (tansu) on loopback,
then measures three phases, each in its own spawned child process so that its CPU time and peak
RSS are its own (the simulator's and the broker's work is in other processes):

1. sink ceiling: a bare kafka-python producer (the connector's producer settings: acks=all,
   idempotence, linger, batch size) sending pre-serialized events taken from the normalizer's own
   output of the simulator's alerts, with the pipeline's keys and headers;
2. source ceiling: the connector's AlertSource fetching the same alerts page by page, nothing else;
3. pipeline: StreamPipeline(once=True) with enrich + normalize + publish + checkpoint, metrics on,
   over the same alerts into a fresh topic with a fresh checkpoint.

Every phase process first applies the interpreter settings `run` ships (connector/tuning.py:
switch interval, GC threshold) unless --switch-interval / --gc-threshold ask for a what-if, and
reports the settings it ran with (`interpreter` of each phase in --json).

Figures: events/s of each, pipeline / min(ceilings) (per run, then the median over --repeat runs),
IntelDoc requests per distinct (doc, revision), Tanium requests per 1,000 events, peak RSS (VmHWM)
and CPU seconds per 1,000 events of each phase's process. `--validation-actions N` also counts the
Tanium requests of the validation engine for N concurrent job actions against 1 over the same
simulated period; `--rss-scale` compares the pipeline's peak RSS for 100k and 1M alerts.
Freshness (`--freshness-seconds`, default 15): the pipeline runs on a live stream of 50 alerts/s
with tanium.poll_interval = 1 s, and its tanium_connector_freshness_seconds histogram (createdAt →
Kafka acknowledgement) gives p50 and p99, estimated from the buckets as Prometheus'
histogram_quantile does (the figure the dashboard shows); target p99 <= poll interval + 1 s.
Each phase topic is deleted afterwards: the in-memory broker would otherwise hold every event.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import multiprocessing
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

from connector.tools.bench_report import (
    hardware,
    print_report,
    print_rss_report,
    targets,
)
from connector.tuning import GC_THRESHOLD, SWITCH_INTERVAL, interpreter_settings, tune_interpreter

log = logging.getLogger(__name__)

PAGE_SIZE = 500
SINK_POOL = 1000  # distinct pre-serialized events the sink ceiling cycles through
PHASE_START_TIMEOUT = 60.0  # spawning a child and importing the connector
FRESHNESS_RATE = 50  # live alerts per second in the freshness phase
FRESHNESS_POLL = 1.0  # its tanium.poll_interval (seconds)


# ---- command line ---------------------------------------------------------------------------------


def _whole(low: int, hint: str):
    """An argparse type: a whole number ≥ low."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number ({hint})") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"{n} is too small: give {low} or more ({hint})")
        return n

    return parse


_positive_int = _whole(1, "e.g. 20000")
_count = _whole(0, "0 turns it off")


def _latency(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of milliseconds (e.g. 20)") from None
    if not 0 <= v <= 10_000:
        raise argparse.ArgumentTypeError(f"{v:g} ms is outside 0–10000 ms")
    return v


def _switch_ms(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of milliseconds (e.g. 0.5)") from None
    if not 0 < v <= 1000:
        raise argparse.ArgumentTypeError(f"{v:g} ms is outside 0–1000 ms (0 excluded)")
    return v


def _scales(text: str) -> tuple[int, int]:
    parts = [p.strip().replace("_", "") for p in text.split(",")]
    try:
        small, large = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give two alert counts SMALL,LARGE (e.g. 100000,1000000)") from None
    if not 1 <= small < large:
        raise argparse.ArgumentTypeError(f"{text!r}: SMALL must be at least 1 and below LARGE")
    return small, large


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--alerts", type=_positive_int, default=20000, help="alerts per phase (default %(default)s)")
    parser.add_argument(
        "--intel-docs", type=_positive_int, default=20, help="IntelDocs the alerts share (default %(default)s)"
    )
    parser.add_argument(
        "--latency-ms", type=_latency, default=20.0, help="simulator delay per request in ms (default %(default)s)"
    )
    parser.add_argument(
        "--repeat", type=_positive_int, default=1, help="runs; figures are medians over them (default %(default)s)"
    )
    parser.add_argument(
        "--validation-actions",
        type=_count,
        default=200,
        metavar="N",
        help="also count validation Tanium requests for N concurrent job actions vs 1 (default %(default)s; 0 = skip)",
    )
    parser.add_argument(
        "--rss-scale",
        type=_scales,
        nargs="?",
        const=(100_000, 1_000_000),
        default=None,
        metavar="SMALL,LARGE",
        help="only compare the pipeline's peak RSS for SMALL and LARGE alerts (default 100000,1000000; takes minutes)",
    )
    parser.add_argument(
        "--client",
        choices=["kafka-python", "both"],
        default=None,
        help="Kafka clients measured: kafka-python (the default client) or both it and "
        "confluent (librdkafka); default: both when confluent-kafka is installed",
    )
    parser.add_argument(
        "--gc-threshold",
        type=_count,
        default=None,
        metavar="N",
        help="what-if: every phase process runs gc.freeze() and gc.set_threshold(N, 10, 10) first; 0 leaves "
        f"Python's collector settings (default: {GC_THRESHOLD}, as `run` ships)",
    )
    parser.add_argument(
        "--switch-interval",
        type=_switch_ms,
        default=None,
        metavar="MS",
        help="what-if: every phase process runs sys.setswitchinterval(MS / 1000) first "
        f"(default: {SWITCH_INTERVAL * 1000:g}, as `run` ships; Python's own is 5)",
    )
    parser.add_argument(
        "--freshness-seconds",
        type=_count,
        default=15,
        metavar="S",
        help=f"run the pipeline for S seconds on a live stream of {FRESHNESS_RATE} alerts/s and report "
        "p50/p99 freshness, createdAt to Kafka acknowledgement (default %(default)s; 0 = skip)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


# ---- measurements in child processes ---------------------------------------------------------------


def _peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM). ru_maxrss is not used: Linux carries the forking
    parent's peak over exec into it."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _measured(events: int, t0: float, c0: float, **extra) -> dict:
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    return {
        "events": events,
        "seconds": wall,
        "events_per_s": events / wall if wall > 0 else 0.0,
        "cpu_seconds": cpu,
        "cpu_per_1k": cpu / events * 1000 if events else 0.0,
        "peak_rss_mib": _peak_rss_mib(),
        **extra,
    }


def _phase_sink(raw: dict, pool: list[tuple[bytes, bytes]], count: int) -> dict:
    from connector.config import parse_pipeline
    from connector.kafka import make_producer
    from connector.stream.pipeline import (
        StreamPipeline,  # noqa: F401 (same imports, so the same baseline RSS)
    )

    cfg = parse_pipeline(raw)
    if cfg.kafka is None:
        raise BenchError("the sink phase needs a [kafka] section")
    if cfg.kafka.client == "confluent":
        return _sink_confluent(cfg, pool, count)
    producer = make_producer(cfg.kafka)
    topic = cfg.kafka.topic
    headers = _headers(cfg)
    producer.partitions_for(topic)  # metadata and topic creation stay outside the timing
    n = len(pool)
    t0, c0 = time.perf_counter(), time.process_time()
    send = producer.send
    futures = [send(topic, value=pool[i % n][1], key=pool[i % n][0], headers=headers) for i in range(count)]
    producer.flush()
    out = _measured(count, t0, c0)
    out["failed"] = sum(1 for f in futures if not f.succeeded())
    producer.close(5)
    return out


def _sink_confluent(cfg, pool: list[tuple[bytes, bytes]], count: int) -> dict:
    from confluent_kafka import Producer

    from connector.stream.confluent import confluent_settings

    producer = Producer(confluent_settings(cfg.kafka))
    topic = cfg.kafka.topic
    headers = _headers(cfg)
    producer.list_topics(topic, timeout=30)  # metadata stays outside the timing
    failed = [0]

    def report(err, _msg):
        if err is not None:
            failed[0] += 1

    n = len(pool)
    t0, c0 = time.perf_counter(), time.process_time()
    produce, poll = producer.produce, producer.poll
    for i in range(count):
        key, value = pool[i % n]
        while True:
            try:
                produce(topic, value, key, headers=headers, on_delivery=report)
                break
            except BufferError:
                poll(0.05)
        if not i % 500:
            poll(0)
    left = producer.flush(120)
    out = _measured(count, t0, c0)
    out["failed"] = failed[0] + left
    return out


def _phase_source(raw: dict) -> dict:
    from connector.config import parse_pipeline
    from connector.stream.pipeline import StreamPipeline  # noqa: F401
    from connector.stream.source import AlertSource
    from connector.tanium import TaniumClient
    from connector.timeutil import parse_start

    cfg = parse_pipeline(raw)
    client = TaniumClient(cfg.tanium)
    source = AlertSource(client, cfg.tanium.page_size, cfg.tanium.limit)
    source.resume(None, parse_start(cfg.source.start_from))
    pairs: set = set()
    n = 0
    t0, c0 = time.perf_counter(), time.process_time()
    while True:  # what the pipeline's source thread does with --once
        for page in source.cycle():
            n += len(page)
            for alert, _ in page:
                if isinstance(alert, dict):
                    pairs.add((alert.get("intelDocId"), alert.get("intelDocRevisionId")))
        if not source.hit_limit:
            break
    out = _measured(n, t0, c0, doc_revisions=len(pairs))
    client.close()
    return out


def _phase_pipeline(raw: dict) -> dict:
    from connector.config import parse_pipeline
    from connector.metrics import Metrics
    from connector.stream.pipeline import StreamPipeline

    cfg = parse_pipeline(raw)
    pipe = StreamPipeline(cfg, metrics=Metrics(cfg.pipeline.name), once=True)
    t0, c0 = time.perf_counter(), time.process_time()
    code = pipe.run()
    s = pipe.summary
    out = _measured(s.published + s.dlq, t0, c0)
    out.update(
        code=code,
        fetched=s.fetched,
        published=s.published,
        dlq=s.dlq,
        errors=list(s.errors),
        delivery_failures=s.delivery_failures,
        intel_requests=s.intel_requests,
    )
    return out


def _phase_freshness(raw: dict, seconds: float) -> dict:
    import threading

    from connector.config import parse_pipeline
    from connector.metrics import Metrics
    from connector.stream.pipeline import StreamPipeline

    cfg = parse_pipeline(raw)
    metrics = Metrics(cfg.pipeline.name)
    pipe = StreamPipeline(cfg, metrics=metrics)
    runner = threading.Thread(target=pipe.run, name="bench-pipeline", daemon=True)
    runner.start()
    time.sleep(seconds)  # the measured period: the simulator adds alerts meanwhile
    pipe.stop()
    runner.join(cfg.pipeline.shutdown_timeout + 10)
    buckets = sorted(
        (float(s.labels["le"]), s.value)
        for family in metrics.registry.collect()
        if family.name == "tanium_connector_freshness_seconds"
        for s in family.samples
        if s.name.endswith("_bucket")
    )
    return {
        "events": pipe.summary.published,
        "observed": int(buckets[-1][1]),
        "p50_s": histogram_quantile(0.5, buckets),
        "p99_s": histogram_quantile(0.99, buckets),
        "errors": list(pipe.summary.errors),
    }


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The q-quantile of a histogram as Prometheus estimates it: linear within the bucket that
    holds it. `buckets`: (upper bound, cumulative count), ascending, +Inf last. None when empty."""
    total = buckets[-1][1]
    if not total:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower  # the highest finite bound, as Prometheus answers
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


_PHASES: dict[str, Callable[..., dict]] = {
    "sink": _phase_sink,
    "source": _phase_source,
    "pipeline": _phase_pipeline,
    "freshness": _phase_freshness,
}


def _child(name: str, args: tuple, conn, gc_threshold: int | None = None, switch_ms: float | None = None) -> None:
    """One phase in this (spawned) process, with the interpreter settings `run` ships unless a
    what-if option says otherwise; the result says which settings it ran with."""
    logging.basicConfig(level=logging.WARNING, format="bench child %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)
    tune_interpreter(
        SWITCH_INTERVAL if switch_ms is None else switch_ms / 1000,
        GC_THRESHOLD if gc_threshold is None else gc_threshold,
    )
    try:
        result = _PHASES[name](*args)
        result["interpreter"] = interpreter_settings()
    except BaseException as e:  # noqa: BLE001 (reported by the parent)
        result = {"error": f"{type(e).__name__}: {e}"}
    conn.send(result)
    conn.close()


def run_phase(name: str, args: tuple, timeout: float, what_if: tuple = (None, None)) -> dict:
    """Runs one phase in a fresh spawned process and returns its figures (raises BenchError).
    what_if: (gc threshold, switch interval in ms), None for the setting `run` ships."""
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(name, args, send, *what_if), name=f"bench-{name}", daemon=True)
    proc.start()
    send.close()
    try:
        if not recv.poll(timeout + PHASE_START_TIMEOUT):
            raise BenchError(f"the {name} phase did not finish within {timeout + PHASE_START_TIMEOUT:.0f}s")
        result = recv.recv()
    except EOFError:
        raise BenchError(f"the {name} phase process died (exit code {proc.exitcode})") from None
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if "error" in result:
        raise BenchError(f"the {name} phase failed: {result['error']}")
    return result


class BenchError(Exception):
    """The benchmark could not measure; str() is for the user."""


# ---- setup in the parent ---------------------------------------------------------------------------


def _headers(cfg) -> list[tuple[str, str | bytes | None]]:  # the type both Kafka clients take
    from connector import __version__
    from connector.stream.normalize import SCHEMA_VERSION

    return [
        ("schema_version", str(SCHEMA_VERSION).encode()),
        ("pipeline", cfg.pipeline.name.encode()),
        ("connector_version", __version__.encode()),
    ]


def _pipeline_raw(sim, bootstrap: str, name: str, state: Path, **over) -> dict:
    raw = {
        "pipeline": {"name": name},
        "tanium": {**sim.settings(), "page_size": PAGE_SIZE, "max_retries": 2},
        "source": {"start_from": "3650d"},
        "kafka": {"bootstrap_servers": bootstrap, "topic": f"{name}.events"},
        "state": {"path": str(state)},
        "metrics": {"enabled": False},
    }
    for section, values in over.items():
        raw.setdefault(section, {}).update(values)
    return raw


def _event_pool(sim, raw: dict, count: int) -> list[tuple[bytes, bytes]]:
    """(key, value) of the first `count` alerts exactly as the pipeline would publish them."""
    from connector.config import parse_pipeline
    from connector.stream.normalize import serialize
    from connector.stream.stages import build_stages
    from connector.tanium import TaniumClient

    cfg = parse_pipeline(raw)
    client = TaniumClient(cfg.tanium)
    stages = build_stages(cfg, client)
    enricher, normalizer = stages.enricher, stages.normalizer
    pool: list[tuple[bytes, bytes]] = []
    saved = sim.faults.latency
    sim.faults.latency = 0
    try:
        offset = 0
        while len(pool) < count:
            items = client.list_alerts([], offset, min(PAGE_SIZE, count - len(pool))).items
            if not items:
                break
            offset += len(items)
            if enricher is not None:
                enricher.enrich(items)
            for alert in items:
                event = normalizer.normalize(alert)
                pool.append((str(event["uid"]).encode(), serialize(event)))
    finally:
        sim.faults.latency = saved
        if enricher is not None:
            enricher.close()
        client.close()
    if not pool:
        raise BenchError("the simulator served no alerts to build sample events from")
    return pool


class _Topics:
    """Creates phase topics ahead (so no phase times topic creation) and deletes them afterwards."""

    def __init__(self, bootstrap: str):
        from kafka import KafkaProducer
        from kafka.admin import KafkaAdminClient

        self.bootstrap = bootstrap
        self.admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="tanium-connector-bench")
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, client_id="tanium-connector-bench")

    def create(self, *topics: str) -> None:
        for t in topics:
            self.producer.partitions_for(t)  # auto-creation through a metadata request

    def delete(self, *topics: str) -> None:
        try:
            self.admin.delete_topics(list(topics), timeout_ms=30000)
        except Exception as e:  # noqa: BLE001 (the broker only holds more memory)
            log.warning("bench: could not delete topics %s: %s", ", ".join(topics), e)

    def close(self) -> None:
        self.producer.close(5)
        self.admin.close()


# ---- one run ---------------------------------------------------------------------------------------


def _what_if(opts) -> tuple:
    return opts.gc_threshold, opts.switch_interval


def _tanium_requests(sim) -> int:
    return sum(sim.stats.values())


def _phase_timeout(alerts: int, latency_ms: float) -> float:
    # generous: 200 events/s at worst, plus the latency of every page
    return 120 + alerts / 200 + (alerts / PAGE_SIZE + 30) * latency_ms / 1000


def one_run(sim, topics: _Topics, bootstrap: str, workdir: Path, pool, opts) -> dict:
    run_id = uuid.uuid4().hex[:8]
    timeout = _phase_timeout(opts.alerts, opts.latency_ms)
    out: dict = {}

    name = f"bench-{run_id}-source"
    before = _tanium_requests(sim)
    out["source"] = run_phase("source", (_pipeline_raw(sim, bootstrap, name, workdir / name),), timeout, _what_if(opts))
    out["source"]["tanium_requests"] = _tanium_requests(sim) - before
    if out["source"]["events"] != opts.alerts:
        raise BenchError(f"source ceiling: fetched {out['source']['events']} alerts, expected {opts.alerts}")

    out["source"]["tanium_requests_per_1k"] = out["source"]["tanium_requests"] / opts.alerts * 1000
    for client in opts.clients:
        res = _client_phases(
            sim, topics, bootstrap, workdir, pool, opts, f"{run_id}-{client}", client, timeout, out["source"]
        )
        if client == "kafka-python":
            out.update(res)
        else:
            out[client] = res
    return out


def _client_phases(
    sim, topics: _Topics, bootstrap: str, workdir: Path, pool, opts, tag: str, client: str, timeout: float, source: dict
) -> dict:
    """Sink ceiling and pipeline with one Kafka client (same producer settings for both)."""
    out: dict = {}
    kafka = {"client": client}
    name = f"bench-{tag}-sink"
    raw = _pipeline_raw(sim, bootstrap, name, workdir / name, kafka=kafka)
    topics.create(f"{name}.events")
    try:
        out["sink"] = run_phase("sink", (raw, pool, opts.alerts), timeout, _what_if(opts))
    finally:
        topics.delete(f"{name}.events")
    if out["sink"]["failed"]:
        raise BenchError(f"sink ceiling ({client}): Kafka did not confirm {out['sink']['failed']} records")

    name = f"bench-{tag}-pipeline"
    raw = _pipeline_raw(sim, bootstrap, name, workdir / name, kafka=kafka)
    topics.create(f"{name}.events", f"{name}.events.dlq")
    before, intel_before = _tanium_requests(sim), sim.stats["intel"]
    try:
        p = out["pipeline"] = run_phase("pipeline", (raw,), timeout, _what_if(opts))
    finally:
        topics.delete(f"{name}.events", f"{name}.events.dlq")
    p["tanium_requests"] = _tanium_requests(sim) - before
    p["intel_requests_seen_by_simulator"] = sim.stats["intel"] - intel_before
    if p["errors"] or p["published"] != opts.alerts or p["code"] != 0:
        raise BenchError(
            f"pipeline ({client}): published {p['published']} of {opts.alerts} alerts "
            f"(dlq {p['dlq']}, errors: {'; '.join(p['errors']) or 'none'})"
        )
    p["tanium_requests_per_1k"] = p["tanium_requests"] / p["events"] * 1000
    pairs = source["doc_revisions"]
    p["doc_revisions"] = pairs
    p["intel_requests_per_doc_revision"] = p["intel_requests_seen_by_simulator"] / pairs if pairs else 0.0
    p["alerts_per_intel_request"] = (
        opts.alerts / p["intel_requests_seen_by_simulator"]
        if p["intel_requests_seen_by_simulator"]
        else float(opts.alerts)
    )
    out["ratio"] = p["events_per_s"] / min(out["sink"]["events_per_s"], source["events_per_s"])
    return out


def _median_run(runs: list[dict]) -> dict:
    """Median of every numeric figure over the runs (the ratio: median of the per-run ratios)."""

    def median_of(items: list[dict], phases) -> dict:
        med: dict = {"ratio": statistics.median(r["ratio"] for r in items)}
        for phase in phases:
            keys = [k for k, v in items[0][phase].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
            med[phase] = {k: statistics.median(r[phase][k] for r in items) for k in keys}
        return med

    med = median_of(runs, ("sink", "source", "pipeline"))
    if "confluent" in runs[0]:
        med["confluent"] = median_of([r["confluent"] for r in runs], ("sink", "pipeline"))
    return med


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
                before = _tanium_requests(sim)
                verdicts: list[dict] = []
                drive(engine, FakeClock(t0 - timedelta(minutes=1)), verdicts.append)
                requests = _tanium_requests(sim) - before
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
        topics = _Topics(bootstrap)
        try:
            name = f"bench-{uuid.uuid4().hex[:8]}-freshness"
            # start_from "now": only alerts created once the pipeline runs, none waiting for its start
            raw = _pipeline_raw(
                sim,
                bootstrap,
                name,
                workdir / name,
                tanium={"poll_interval": FRESHNESS_POLL},
                source={"start_from": "now"},
            )
            topics.create(f"{name}.events", f"{name}.events.dlq")
            try:
                f = run_phase("freshness", (raw, seconds), seconds + 60, _what_if(opts))
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
            topics = _Topics(bootstrap)
            try:
                name = f"bench-{uuid.uuid4().hex[:8]}-rss{n}"
                # without `raw` the in-memory broker holds a million events in about a gigabyte; the
                # connector's own bounds (queued pages, max_unacked) are the same either way
                raw = _pipeline_raw(sim, bootstrap, name, workdir / name, output={"include_raw": False})
                topics.create(f"{name}.events", f"{name}.events.dlq")
                try:
                    p = run_phase("pipeline", (raw,), _phase_timeout(n, opts.latency_ms), _what_if(opts))
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


# ---- hardware --------------------------------------------------------------------------------------


def run_bench(args) -> int:
    from connector.simulator import Simulator
    from connector.tools.embedded import EmbeddedBroker

    logging.getLogger("kafka").setLevel(logging.ERROR)
    have_confluent = importlib.util.find_spec("confluent_kafka") is not None
    if args.client == "both" and not have_confluent:
        print(
            "bench: --client both needs the confluent-kafka package (pip install 'tanium-tr-connector[confluent]')",
            file=sys.stderr,
        )
        return 2
    args.clients = ["kafka-python"] + (["confluent"] if (args.client or "both") == "both" and have_confluent else [])
    hw = hardware()
    config = {
        "alerts": args.alerts,
        "intel_docs": args.intel_docs,
        "latency_ms": args.latency_ms,
        "repeat": args.repeat,
        "page_size": PAGE_SIZE,
        "validation_actions": args.validation_actions,
        # what every phase process runs with (what-if options, else what `run` ships)
        "gc_threshold": GC_THRESHOLD if args.gc_threshold is None else args.gc_threshold,
        "switch_interval_ms": SWITCH_INTERVAL * 1000 if args.switch_interval is None else args.switch_interval,
        "what_if": args.gc_threshold is not None or args.switch_interval is not None,
        "clients": args.clients,
        "freshness_seconds": args.freshness_seconds,
    }
    report: dict = {"config": config, "hardware": hw}
    try:
        with tempfile.TemporaryDirectory(prefix="tanium-bench-") as tmp:
            work = Path(tmp)
            with EmbeddedBroker(log=str(work / "broker.log")) as broker:
                if args.rss_scale:
                    config["rss_scale"] = list(args.rss_scale)
                    if not args.json:
                        print(
                            f"measuring pipeline peak RSS for {args.rss_scale[0]} and {args.rss_scale[1]} "
                            "alerts (takes minutes) …",
                            file=sys.stderr,
                            flush=True,
                        )
                    report["rss_scale"] = measure_rss_scale(args, broker.bootstrap, work)
                else:
                    _stream(report, args, broker.bootstrap, work, Simulator)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    elif args.rss_scale:
        print_rss_report(report, sys.stdout)
    else:
        print_report(report, sys.stdout)
    return 0


def _stream(report: dict, args, bootstrap: str, work: Path, simulator_cls) -> None:
    with simulator_cls(alerts=args.alerts, intel_docs=args.intel_docs, seed=1, latency=args.latency_ms / 1000) as sim:
        topics = _Topics(bootstrap)
        try:
            pool = _event_pool(sim, _pipeline_raw(sim, bootstrap, "bench", work / "pool"), min(SINK_POOL, args.alerts))
            runs = []
            for k in range(args.repeat):
                if not args.json:
                    print(f"run {k + 1}/{args.repeat} …", file=sys.stderr, flush=True)
                runs.append(one_run(sim, topics, bootstrap, work, pool, args))
        finally:
            topics.close()
    report["event_bytes"] = statistics.mean(len(v) for _, v in pool)
    report["runs"] = runs
    report["median"] = _median_run(runs)
    if args.freshness_seconds:
        if not args.json:
            print(
                f"freshness: {args.freshness_seconds}s of live alerts at {FRESHNESS_RATE}/s …",
                file=sys.stderr,
                flush=True,
            )
        report["freshness"] = measure_freshness(args, bootstrap, work)
    if args.validation_actions:
        if not args.json:
            print(f"validation: {args.validation_actions} concurrent job actions vs 1 …", file=sys.stderr, flush=True)
        report["validation"] = measure_validation(args.validation_actions)
    report["targets"] = targets(report)
