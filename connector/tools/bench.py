"""`tanium-connector bench`: how close the pipeline gets to what Tanium and Kafka allow.

One run starts the TR simulator (in this process) and the embedded broker (tansu) on loopback,
then measures three phases, each in its own spawned child process so that its CPU time and peak
RSS are its own (the simulator's and the broker's work is in other processes):

1. sink ceiling: a bare kafka-python producer (the connector's producer settings: acks=all,
   idempotence, linger, batch size) sending pre-serialized events taken from the normalizer's own
   output of the simulator's alerts, with the pipeline's keys and headers;
2. source ceiling: the pipeline's source stage, as its settings build it (with source.track_updates,
   the default, the creation cursor and the update scan, so the same Tanium requests), fetching the
   same alerts page by page and decoding each alert's `details`, nothing else;
3. pipeline: StreamPipeline(once=True) with enrich + normalize + publish + checkpoint, metrics on,
   over the same alerts into a fresh topic with a fresh checkpoint;
4. stage work: the work neither ceiling does, alone (the pipeline's processing pass less decoding,
   on the same alerts; bench_phases._phase_stages), as a share of the parts: how much of the CPU
   target's budget it takes by itself.

Every phase process first applies the interpreter settings `run` ships (connector/tuning.py:
switch interval, GC threshold) unless --switch-interval / --gc-threshold ask for a what-if, and
reports the settings it ran with (`interpreter` of each phase in --json).

Figures: events/s of each, pipeline / min(ceilings) and pipeline CPU / (source + sink ceiling CPU)
(per run, then the median over --repeat runs),
IntelDoc requests per distinct (doc, revision), Tanium requests per 1,000 events, peak RSS (VmHWM)
and CPU seconds per 1,000 events of each phase's process. `--validation-actions N` also counts the
Tanium requests of the validation engine for N concurrent job actions against 1 over the same
simulated period; `--rss-scale` compares the pipeline's peak RSS for 100k and 1M alerts.
Freshness (`--freshness-seconds`, default 15): the pipeline runs on a live stream of 50 alerts/s
with tanium.poll_interval = 1 s, and its tanium_connector_freshness_seconds histogram (createdAt →
Kafka acknowledgement) gives p50 and p99, estimated from the buckets as Prometheus'
histogram_quantile does (the figure the dashboard shows); target p99 <= poll interval + 1 s.
Each phase topic is deleted afterwards: the in-memory broker would otherwise hold every event.
`--profile [DIR]` also writes a cProfile report of each phase's measured part to DIR (one file per
phase and client, see bench_profile.py); a profiled run is slower, so its figures are not the ones
to compare.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import statistics
import sys
import tempfile
import uuid
from pathlib import Path

import orjson

from connector.tools import bench_fleet
from connector.tools.bench_measure import (
    FRESHNESS_RATE,
    measure_freshness,
    measure_rss_scale,
    measure_validation,
)
from connector.tools.bench_phases import (
    PAGE_SIZE,
    BenchError,
    Topics,
    number_in,
    phase_timeout,
    pipeline_raw,
    run_phase,
    tanium_requests,
    what_if_settings,
)
from connector.tools.bench_report import (
    hardware,
    load_average,
    print_report,
    print_rss_report,
    targets,
)
from connector.tuning import GC_THRESHOLD, SWITCH_INTERVAL

SINK_POOL = 1000  # distinct pre-serialized events the sink ceiling cycles through


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


_latency = number_in("ms", "20", 0, 10_000)
_switch_ms = number_in("ms", "0.5", 0, 1000, low_excluded=True)


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
    parser.add_argument(
        "--profile",
        nargs="?",
        const="bench-profile",
        default=None,
        metavar="DIR",
        help="also write a cProfile report per phase (top functions by cumulative and own time, µs per "
        "event, per thread) into DIR (default %(const)s); profiling slows the phases down",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    bench_fleet.add_arguments(parser)


# ---- setup in the parent ---------------------------------------------------------------------------


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


# ---- one run ---------------------------------------------------------------------------------------


def _profile(opts, run: int, phase: str, client: str | None = None) -> tuple[str, str] | None:
    """(report path, title) of a phase with --profile, else None."""
    if opts.profile is None:
        return None
    label = phase + (f"-{client}" if client else "") + (f"-run{run + 1}" if opts.repeat > 1 else "")
    title = f"{phase}" + (f" ({client})" if client else "") + (f", run {run + 1}" if opts.repeat > 1 else "")
    return str(Path(opts.profile) / f"{label}.txt"), title


def one_run(sim, topics: Topics, bootstrap: str, workdir: Path, pool, opts, run: int = 0) -> dict:
    run_id = uuid.uuid4().hex[:8]
    timeout = phase_timeout(opts.alerts, opts.latency_ms)
    out: dict = {}

    name = f"bench-{run_id}-source"
    before = tanium_requests(sim)
    out["source"] = run_phase(
        "source",
        (pipeline_raw(sim, bootstrap, name, workdir / name),),
        timeout,
        what_if_settings(opts),
        _profile(opts, run, "source"),
    )
    out["source"]["tanium_requests"] = tanium_requests(sim) - before
    if out["source"]["events"] != opts.alerts:
        raise BenchError(f"source ceiling: fetched {out['source']['events']} alerts, expected {opts.alerts}")

    out["source"]["tanium_requests_per_1k"] = out["source"]["tanium_requests"] / opts.alerts * 1000
    name = f"bench-{run_id}-stages"
    saved, sim.faults.latency = sim.faults.latency, 0  # its fetching is not what it measures
    try:
        out["stages"] = run_phase("stages", (pipeline_raw(sim, bootstrap, name, workdir / name),), timeout)
    finally:
        sim.faults.latency = saved
    for client in opts.clients:
        res = _client_phases(
            sim, topics, bootstrap, workdir, pool, opts, f"{run_id}-{client}", client, timeout, out, run
        )
        if client == "kafka-python":
            out.update(res)
        else:
            out[client] = res
    return out


def _client_phases(
    sim,
    topics: Topics,
    bootstrap: str,
    workdir: Path,
    pool,
    opts,
    tag: str,
    client: str,
    timeout: float,
    measured: dict,
    run: int,
) -> dict:
    """Sink ceiling and pipeline with one Kafka client (same producer settings for both), held
    against the client-independent phases `measured` already (source ceiling, stage work)."""
    source, stages = measured["source"], measured["stages"]
    out: dict = {}
    kafka = {"client": client}
    name = f"bench-{tag}-sink"
    raw = pipeline_raw(sim, bootstrap, name, workdir / name, kafka=kafka)
    topics.create(f"{name}.events")
    try:
        out["sink"] = run_phase(
            "sink", (raw, pool, opts.alerts), timeout, what_if_settings(opts), _profile(opts, run, "sink", client)
        )
    finally:
        topics.delete(f"{name}.events")
    if out["sink"]["failed"]:
        raise BenchError(f"sink ceiling ({client}): Kafka did not confirm {out['sink']['failed']} records")

    name = f"bench-{tag}-pipeline"
    raw = pipeline_raw(sim, bootstrap, name, workdir / name, kafka=kafka)
    topics.create(f"{name}.events", f"{name}.events.dlq")
    before, intel_before = tanium_requests(sim), sim.stats["intel"]
    try:
        p = out["pipeline"] = run_phase(
            "pipeline", (raw,), timeout, what_if_settings(opts), _profile(opts, run, "pipeline", client)
        )
    finally:
        topics.delete(f"{name}.events", f"{name}.events.dlq")
    p["tanium_requests"] = tanium_requests(sim) - before
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
    parts = source["cpu_per_1k"] + out["sink"]["cpu_per_1k"]
    out["cpu_vs_parts"] = p["cpu_per_1k"] / parts
    out["stages_vs_parts"] = stages["cpu_per_1k"] / parts
    return out


def _median_run(runs: list[dict]) -> dict:
    """Median of every numeric figure over the runs (the ratios: medians of the per-run ratios)."""

    def median_of(items: list[dict], phases) -> dict:
        ratios = ("ratio", "cpu_vs_parts", "stages_vs_parts")
        med: dict = {key: statistics.median(r[key] for r in items) for key in ratios}
        for phase in phases:
            keys = [k for k, v in items[0][phase].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
            med[phase] = {k: statistics.median(r[phase][k] for r in items) for k in keys}
            threads = [r[phase].get("threads_cpu_per_1k", {}) for r in items]
            common = [name for name in threads[0] if all(name in t for t in threads)]
            med[phase]["threads_cpu_per_1k"] = {name: statistics.median(t[name] for t in threads) for name in common}
        return med

    med = median_of(runs, ("sink", "source", "stages", "pipeline"))
    if "confluent" in runs[0]:
        med["confluent"] = median_of([r["confluent"] for r in runs], ("sink", "pipeline"))
    return med


# ---- the command -----------------------------------------------------------------------------------


def run_bench(args) -> int:
    from connector.simulator import Simulator
    from connector.tools.embedded import EmbeddedBroker

    logging.getLogger("kafka").setLevel(logging.ERROR)
    if args.fleet:
        return bench_fleet.run_fleet_bench(args)
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
    if args.profile is not None:
        try:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            print(f"bench: --profile {args.profile}: cannot create the directory ({e.strerror or e})", file=sys.stderr)
            return 2
        config["profile"] = str(Path(args.profile).resolve())
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
    hw["load_avg_1m_end"] = load_average()
    if args.json:
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    elif args.rss_scale:
        print_rss_report(report, sys.stdout)
    else:
        print_report(report, sys.stdout)
    return 0


def _stream(report: dict, args, bootstrap: str, work: Path, simulator_cls) -> None:
    with simulator_cls(alerts=args.alerts, intel_docs=args.intel_docs, seed=1, latency=args.latency_ms / 1000) as sim:
        topics = Topics(bootstrap)
        try:
            pool = _event_pool(sim, pipeline_raw(sim, bootstrap, "bench", work / "pool"), min(SINK_POOL, args.alerts))
            runs = []
            for k in range(args.repeat):
                if not args.json:
                    print(f"run {k + 1}/{args.repeat} …", file=sys.stderr, flush=True)
                runs.append(one_run(sim, topics, bootstrap, work, pool, args, k))
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
