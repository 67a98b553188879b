"""The benchmark's phases: what each spawned child process measures, and how the parent sets one up
(pipeline file, topics, timeout) and runs it; shared by the runs (bench.py) and the other
measurements (bench_measure.py)."""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from connector.tanium import decode_details
from connector.tools.bench_profile import PhaseProfile, thread_group
from connector.tuning import GC_THRESHOLD, SWITCH_INTERVAL, interpreter_settings, tune_interpreter

log = logging.getLogger(__name__)

PAGE_SIZE = 500
PHASE_START_TIMEOUT = 60.0  # spawning a child and importing the connector
_profile: PhaseProfile | None = None  # set in a phase process run with --profile


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


class ThreadCPU:
    """CPU seconds of each thread of this process over the measured part, by thread name without its
    number (a pool's threads count together): the kernel's count for each thread (Linux /proc), read
    every SAMPLE seconds by a sampler thread, and by each Python thread itself as it ends (a short
    one, such as the source thread of a small run, could start and end between two readings).
    Empty where /proc is not there. The sampler's own CPU (`own`, after stop()) is the benchmark's,
    not the phase's: it is left out of the table and taken off the phase's CPU."""

    SAMPLE = 0.02

    def __init__(self) -> None:
        self.own = 0.0
        self._stop = threading.Event()
        self._base: dict[int, float] = {}
        self._last: dict[int, tuple[str, float]] = {}
        self._sampler = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._run_thread = threading.Thread.run

    def start(self) -> None:
        self._base = {tid: cpu for tid, (_, cpu) in self._read().items()}
        last, run = self._last, self._run_thread

        def run_and_count(thread: threading.Thread) -> None:
            try:
                run(thread)
            finally:  # the same clock as schedstat's first figure: the thread's time on a CPU
                if thread.native_id is not None:
                    last[thread.native_id] = (thread.name.split(" ", 1)[0], time.thread_time())

        threading.Thread.run = run_and_count  # type: ignore[method-assign,assignment]  # this phase's process only
        self._sampler.start()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._sampler.join()
        threading.Thread.run = self._run_thread  # type: ignore[method-assign]
        sampler = self._last.pop(self._sampler.native_id or -1, None)  # it counted itself as it ended
        self.own = sampler[1] if sampler else 0.0
        out: dict[str, float] = {}
        for tid, (name, cpu) in self._last.items():
            group = thread_group(name)
            out[group] = out.get(group, 0.0) + cpu - self._base.get(tid, 0.0)
        return out

    def _run(self) -> None:
        while True:
            self._last.update(self._read())
            if self._stop.wait(self.SAMPLE):
                self._last.update(self._read())
                return

    def _read(self) -> dict[int, tuple[str, float]]:
        """{thread id: (name, CPU seconds)} of every thread, Python's or a library's own (librdkafka's,
        named by the kernel)."""
        # a pipeline's threads carry its name after their role ("source NAME"): the role is the figure
        names = {t.native_id: t.name.split(" ", 1)[0] for t in threading.enumerate() if t is not self._sampler}
        out: dict[int, tuple[str, float]] = {}
        try:
            tids = [int(tid) for tid in os.listdir("/proc/self/task")]
        except OSError:
            return out
        for tid in tids:
            if tid == self._sampler.native_id:
                continue
            try:
                with open(f"/proc/self/task/{tid}/schedstat", encoding="ascii") as f:
                    cpu = int(f.read().split()[0]) / 1e9  # on-CPU nanoseconds, the first figure
                name = names.get(tid)
                if name is None:
                    with open(f"/proc/self/task/{tid}/comm", encoding="utf-8") as f:
                        name = f.read().strip()
            except (OSError, ValueError, IndexError):
                continue  # ended meanwhile
            out[tid] = (name, cpu)
        return out


_threads: ThreadCPU | None = None  # the running phase's


def _begin() -> tuple[float, float]:
    """The measured part of a phase starts: (wall, CPU) clock readings for _measured()."""
    global _threads
    if _profile is not None:
        _profile.begin()
    t0, c0 = time.perf_counter(), time.process_time()
    if _profile is None:  # a profiled run's threads are slowed down (the sampler's own reads too)
        _threads = ThreadCPU()  # read inside the process's CPU reading, so the threads add up to no more
        _threads.start()
    return t0, c0


def _measured(events: int, t0: float, c0: float, **extra) -> dict:
    wall = time.perf_counter() - t0
    threads = _threads.stop() if _threads is not None else {}
    cpu = time.process_time() - c0 - (_threads.own if _threads is not None else 0.0)
    if _profile is not None:
        _profile.end()
    return {
        "events": events,
        "seconds": wall,
        "events_per_s": events / wall if wall > 0 else 0.0,
        "cpu_seconds": cpu,
        "cpu_per_1k": cpu / events * 1000 if events else 0.0,
        # where the CPU went, by thread
        "threads_cpu_per_1k": {name: s / events * 1000 for name, s in threads.items()} if events else {},
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
    t0, c0 = _begin()
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
    t0, c0 = _begin()
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


def _pages(source) -> Iterator[list]:
    """Every page of the source, cycle after cycle until one ends below the limit: what the
    pipeline's source thread reads with --once."""
    while True:
        yield from source.cycle()
        if not source.hit_limit:
            return


def _alerts(page: list) -> Iterator[dict]:
    return (alert for alert, _ in page if isinstance(alert, dict))  # not an update watermark's marker


def _decode(alert: dict) -> None:
    """Decodes the alert's `details` and gives it back its text, as the pipeline does (stream/records.py)."""
    text = decode_details(alert)
    if text is not None:
        alert["details"] = text


def _phase_source(raw: dict) -> dict:
    from connector.config import parse_pipeline
    from connector.stream.pipeline import StreamPipeline  # noqa: F401
    from connector.stream.stages import build_source
    from connector.tanium import TaniumClient
    from connector.timeutil import parse_start

    cfg = parse_pipeline(raw)
    client = TaniumClient(cfg.tanium)
    source = build_source(cfg, client)  # the pipeline's own source stage: update scan included
    source.resume(None, parse_start(cfg.source.start_from))
    pairs: set = set()
    n = 0
    t0, c0 = _begin()
    for page in _pages(source):
        for alert in _alerts(page):
            n += 1  # the pipeline's work of reading an alert, though it does it later:
            _decode(alert)
            pairs.add((alert.get("intelDocId"), alert.get("intelDocRevisionId")))
    out = _measured(n, t0, c0, doc_revisions=len(pairs))
    client.close()
    return out


def _phase_stages(raw: dict) -> dict:
    """The work no ceiling does, alone: the pipeline's processing pass (stream/records.py: enrich
    join, normalize, render, serialize) over the source's pages, less decoding `details`, which the
    source ceiling counts. Only those calls are timed (this thread's CPU); fetching is not, and the
    parent serves it without latency. Decoding is timed first on each page, which brings the page into
    the CPU's cache for the pass after it: the difference is if anything too small."""
    from connector.config import parse_pipeline
    from connector.metrics import Metrics
    from connector.stream.records import RecordMaker
    from connector.stream.stages import build_stages
    from connector.tanium import TaniumClient
    from connector.timeutil import parse_start

    cfg = parse_pipeline(raw)
    client = TaniumClient(cfg.tanium)
    metrics = Metrics(cfg.pipeline.name)
    stages = build_stages(cfg, client, metrics)
    maker = RecordMaker(cfg, stages.enricher, stages.normalizer, metrics)
    source = stages.source
    source.resume(None, parse_start(cfg.source.start_from))
    n, decode, records = 0, 0.0, 0.0
    clock = time.thread_time
    for page in _pages(source):
        alerts = list(_alerts(page))
        if stages.enricher is not None:
            stages.enricher.enrich(alerts)  # the IntelDocs' HTTP requests are not the pass's work
        n += len(alerts)
        t0 = clock()
        for alert in alerts:
            _decode(alert)
        t1 = clock()
        maker.records(page)
        records += clock() - t1
        decode += t1 - t0
    if stages.enricher is not None:
        stages.enricher.close()
    client.close()
    per_1k = 1000 / n if n else 0.0
    return {
        "events": n,
        "cpu_per_1k": (records - decode) * per_1k,
        "records_cpu_per_1k": records * per_1k,
        "decode_cpu_per_1k": decode * per_1k,
    }


def _phase_pipeline(raw: dict) -> dict:
    from connector.config import parse_pipeline
    from connector.metrics import Metrics
    from connector.stream.pipeline import StreamPipeline

    cfg = parse_pipeline(raw)
    pipe = StreamPipeline(cfg, metrics=Metrics(cfg.pipeline.name), once=True)
    t0, c0 = _begin()
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
    "stages": _phase_stages,
    "pipeline": _phase_pipeline,
    "freshness": _phase_freshness,
}


def _child(
    name: str,
    args: tuple,
    conn,
    gc_threshold: int | None = None,
    switch_ms: float | None = None,
    profile: tuple[str, str] | None = None,
) -> None:
    """One phase in this (spawned) process, with the interpreter settings `run` ships unless a
    what-if option says otherwise; the result says which settings it ran with. `profile`: (report
    path, title): the measured part runs under cProfile (bench_profile.py) and the report is written."""
    global _profile
    logging.basicConfig(level=logging.WARNING, format="bench child %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)
    tune_interpreter(
        SWITCH_INTERVAL if switch_ms is None else switch_ms / 1000,
        GC_THRESHOLD if gc_threshold is None else gc_threshold,
    )
    try:
        if profile is not None:
            _profile = PhaseProfile()
            _profile.install()
        result = _PHASES[name](*args)
        result["interpreter"] = interpreter_settings()
        if profile is not None:
            assert _profile is not None
            _profile.write(Path(profile[0]), profile[1], result["events"])
            result["profile"] = profile[0]
    except BaseException as e:  # noqa: BLE001 (reported by the parent)
        result = {"error": f"{type(e).__name__}: {e}"}
    conn.send(result)
    conn.close()


def run_phase(
    name: str, args: tuple, timeout: float, what_if: tuple = (None, None), profile: tuple[str, str] | None = None
) -> dict:
    """Runs one phase in a fresh spawned process and returns its figures (raises BenchError).
    what_if: (gc threshold, switch interval in ms), None for the setting `run` ships; profile:
    (report path, title) to profile the phase (see _child)."""
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(name, args, send, *what_if, profile), name=f"bench-{name}", daemon=True)
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


def number_in(unit: str, example: str, low: float, high: float, *, low_excluded: bool = False):
    """An argparse type: a number of `unit` between low and high (e.g. number_in("ms", "20", 0, 10_000))."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of {UNITS[unit]} (e.g. {example})") from None
        if not (low < v if low_excluded else low <= v) or v > high:
            excluded = f" ({low:g} excluded)" if low_excluded else ""
            raise argparse.ArgumentTypeError(f"{v:g} {unit} is outside {low:g}–{high:g} {unit}{excluded}")
        return v

    return parse


UNITS = {"ms": "milliseconds", "s": "seconds"}


# ---- setup in the parent ---------------------------------------------------------------------------


def _headers(cfg) -> list[tuple[str, str | bytes | None]]:  # the type both Kafka clients take
    from connector import __version__
    from connector.stream.normalize import SCHEMA_VERSION

    return [
        ("schema_version", str(SCHEMA_VERSION).encode()),
        ("pipeline", cfg.pipeline.name.encode()),
        ("connector_version", __version__.encode()),
    ]


def pipeline_raw(sim, bootstrap: str, name: str, state: Path, **over) -> dict:
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


class Topics:
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


def what_if_settings(opts) -> tuple:
    return opts.gc_threshold, opts.switch_interval


def tanium_requests(sim) -> int:
    return sum(sim.stats.values())


def phase_timeout(alerts: int, latency_ms: float) -> float:
    # generous: 200 events/s at worst, plus the latency of every page
    return 120 + alerts / 200 + (alerts / PAGE_SIZE + 30) * latency_ms / 1000
