"""Prometheus metrics and the /metrics, /healthz, /readyz listener.

Every family carries a `pipeline` label so one Grafana dashboard serves many pipelines (the fleet's
worker series carry `group` and `worker` instead). Other labels are small fixed sets (stage,
endpoint, status class, reason, result): never alert ids or hostnames. Each `Metrics` object owns its
registry, so tests can hold several in one process; the pipelines one process runs together
(connector/stream/fleet.py) share one through for_pipeline().

A component built without a metrics listener still gets a Metrics: `NO_METRICS` (or any
`Metrics(..., record=False)`), whose families hand out one child that records nothing. So no
stage tests for metrics on its hot path, and an unrecorded increment costs a no-op call (about
20 ns) instead of a Prometheus child's locked update (about 250 ns).
"""

from __future__ import annotations

import copy
import os
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector

from connector import __version__
from connector.fieldmap import DEFAULT_FIELD_MAP

P = "tanium_connector_"
# this process among a fleet's workers (a pod's name is its host name)
WORKER = f"{socket.gethostname()}:{os.getpid()}"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# Every label value a counter can take that is known in advance, so its series exists at 0 from the
# first scrape (increase() cannot see a series whose first sample is already 1).
# NormalizeError codes (normalize.py) and the pipeline's own "too large": the reasons of DLQ records
DLQ_REASONS = ("not an object", "bad id", "no id", "not serializable", "too large")
# records a stage does not pass on, by stage: the normalizer's rejections, the validation query limit
DROP_REASONS = {"normalize": ("not an object", "bad id", "no id"), "validation": ("limit",)}
RETRY_REASONS = ("429", "5xx", "network")  # why the Tanium client retried (tanium.py)
KEY_RELOAD_RESULTS = ("changed", "failed")  # re-reads of tanium.api_key_file (secrets.py)
# freshness: fine around a poll interval (the target is p99 <= poll_interval + 1 s), coarse beyond,
# up to the day-old alerts of a backfill
FRESHNESS_BUCKETS: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 7.5, 10, 15, 20, 30)
FRESHNESS_BUCKETS += (45, 60, 90, 120, 300, 600, 1800, 3600, 21600, 86400)


class _Unrecorded:
    """A metric family and its children at once, recording nothing (see NO_METRICS)."""

    def labels(self, *_values) -> _Unrecorded:
        return self

    def inc(self, _amount: float = 1) -> None:
        pass

    def set(self, _value: float) -> None:
        pass

    def observe(self, _value: float) -> None:
        pass

    def set_function(self, _f: Callable[[], float]) -> None:
        pass

    def set_to_current_time(self) -> None:
        pass


_UNRECORDED = _Unrecorded()


class Metrics:
    """Every metric family of the connector. `record=False` gives families that record nothing
    (and an empty registry): what a component without a metrics listener is handed."""

    def __init__(self, pipeline: str, registry: CollectorRegistry | None = None, *, record: bool = True):
        self.pipeline = pipeline
        self.registry = r = registry or CollectorRegistry()
        if registry is None and record:
            ProcessCollector(registry=r)
            GCCollector(registry=r)
        lp = ["pipeline"]

        def counter(name, doc, labels=()) -> Any:
            return Counter(P + name, doc, lp + list(labels), registry=r) if record else _UNRECORDED

        def gauge(name, doc, labels=()) -> Any:
            return Gauge(P + name, doc, lp + list(labels), registry=r) if record else _UNRECORDED

        def hist(name, doc, labels=(), buckets=LATENCY_BUCKETS) -> Any:
            return Histogram(P + name, doc, lp + list(labels), buckets=buckets, registry=r) if record else _UNRECORDED

        def unlabelled(kind, name, doc, labels) -> Any:  # a family without the pipeline label
            return kind(P + name, doc, labels, registry=r) if record else _UNRECORDED

        # Overview
        self.build_info = gauge("build_info", "Build information (always 1)", ["version"])
        self.ready = gauge("ready", "1 when the last Tanium call and Kafka are fine and the checkpoint is fresh")
        self.records_received = counter("records_received_total", "Records a stage took in", ["stage"])
        self.records_sent = counter("records_sent_total", "Records a stage passed on", ["stage"])
        self.records_dropped = counter("records_dropped_total", "Records a stage did not pass on", ["stage", "reason"])
        self.dlq_records = counter("dlq_records_total", "Records written to the dead-letter topic", ["reason"])
        # Tanium API
        self.requests = counter(
            "source_requests_total", "Tanium API requests by endpoint and status class", ["endpoint", "code_class"]
        )
        self.request_duration = hist("source_request_duration_seconds", "Tanium API request latency", ["endpoint"])
        self.retries = counter("source_retries_total", "Tanium API retries by reason", ["reason"])
        self.rate_limited = counter("source_rate_limited_seconds_total", "Seconds waited because Tanium said 429")
        self.pages = counter("source_pages_total", "Alert pages fetched")
        # API key (connector/secrets.py): 401s that re-reading tanium.api_key_file did not cure, and the re-reads
        self.unauthorized = gauge(
            "source_unauthorized", "1 while Tanium answers 401 to the API key (file re-read), 0 once it accepts it"
        )
        self.auth_failures = counter("source_auth_failures_total", "Requests Tanium answered 401 (file re-read)")
        self.api_key_reloads = counter(
            "source_api_key_reloads_total", "Re-reads of tanium.api_key_file: a new key, or none usable", ["result"]
        )
        self.last_success = gauge("last_success_timestamp_seconds", "Unix time of the last successful poll cycle")
        # the stale-poll alert compares time since last_success with 3x this (set it from tanium.poll_interval)
        self.poll_interval = gauge("poll_interval_seconds", "Configured tanium.poll_interval")
        # Enrichment
        self.cache_requests = counter("enrich_cache_requests_total", "IntelDoc cache lookups", ["result"])
        self.cache_entries = gauge("enrich_cache_entries", "IntelDocs held in the cache")
        self.lookup_duration = hist("enrich_lookup_duration_seconds", "IntelDoc fetch latency")
        self.enrich_errors = counter("enrich_errors_total", "IntelDoc lookups that failed (alert passes unenriched)")
        # Normalize
        self.normalize_warnings = counter(
            "normalize_warnings_total", "Mapped values dropped by a type check", ["field"]
        )
        # Kafka sink
        self.produce_duration = hist("sink_produce_duration_seconds", "Time from send to broker acknowledgement")
        self.inflight = gauge("sink_inflight_records", "Records sent but not yet acknowledged")
        self.delivery_failures = counter("sink_delivery_failures_total", "Records Kafka did not confirm", ["topic"])
        self.checkpoint_ts = gauge(
            "checkpoint_timestamp_seconds", "createdAt of the last alert whose delivery is committed in the checkpoint"
        )
        self.checkpoint_commits = counter("checkpoint_commits_total", "Checkpoint writes")
        self.freshness = hist(
            "freshness_seconds",
            "Seconds from an alert's createdAt (Tanium) to Kafka's acknowledgement of its event",
            buckets=FRESHNESS_BUCKETS,
        )
        self.checkpoint_errors = counter(
            "checkpoint_errors_total", "Checkpoint saves that failed (retried with backoff; the checkpoint lags)"
        )
        # Rewinds: a failed delivery makes the pipeline read again from the checkpoint
        self.rewinds = counter("rewinds_total", "Re-reads from the checkpoint after a failed delivery")
        self.rewind_backoff = gauge(
            "rewind_backoff_seconds", "Wait before the current re-read from the checkpoint (0 when none is pending)"
        )
        self.paused = gauge(
            "paused", "1 while the pipeline waits on a record that neither its topic nor the dead-letter topic accepts"
        )
        # Validation
        self.actions_in_flight = gauge("validation_actions_in_flight", "Job actions with windows still open")
        self.verdicts = counter("validation_verdicts_total", "Verdicts published by result", ["result"])
        self.detection_latency = hist(
            "validation_detection_latency_seconds",
            "First detection time minus job action start",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800),
        )
        self.validation_queries = counter("validation_queries_total", "Alert queries run for validation windows")
        # HA (set only when ha.enabled or [fleet])
        self.ha_leader = gauge("ha_leader", "1 while this process is the HA leader (the one polling)")
        # Fleet: per worker (labelled by group and worker, not pipeline) and the owner of each pipeline
        gw = ["group", "worker"]
        self.fleet_pipelines = unlabelled(Gauge, "fleet_pipelines", "Pipelines this worker runs in the group", gw)
        self.fleet_rebalances = unlabelled(
            Counter, "fleet_rebalances_total", "Group rebalances this worker went through", gw
        )
        self.fleet_last_rebalance = unlabelled(
            Gauge, "fleet_last_rebalance_timestamp_seconds", "Unix time of this worker's last rebalance", gw
        )
        self.fleet_owner = gauge("fleet_owner", "1 while this worker runs the pipeline (label worker)", ["worker"])

        self._init_series(pipeline)

    def for_pipeline(self, pipeline: str) -> Metrics:
        """The same families (one registry, one /metrics) for another pipeline of this process:
        every stage labels its series with `metrics.pipeline`."""
        other = copy.copy(self)
        other.pipeline = pipeline
        other._init_series(pipeline)
        return other

    def _init_series(self, pipeline: str) -> None:
        self.build_info.labels(pipeline, __version__).set(1)
        self.ready.labels(pipeline).set(0)
        for stage in ("source", "enrich", "normalize", "sink"):
            self.records_received.labels(pipeline, stage)
            self.records_sent.labels(pipeline, stage)
        for result in ("hit", "miss", "negative_hit"):
            self.cache_requests.labels(pipeline, result)
        for result in ("detected", "missed", "rejected"):
            self.verdicts.labels(pipeline, result)
        for reason in DLQ_REASONS:
            self.dlq_records.labels(pipeline, reason)
        for stage, reasons in DROP_REASONS.items():
            for reason in reasons:
                self.records_dropped.labels(pipeline, stage, reason)
        for reason in RETRY_REASONS:
            self.retries.labels(pipeline, reason)
        for result in KEY_RELOAD_RESULTS:
            self.api_key_reloads.labels(pipeline, result)
        for name in DEFAULT_FIELD_MAP:  # a field_map only re-maps these fields, never adds one
            self.normalize_warnings.labels(pipeline, name)
        # Series exist (at 0) from the first scrape, so rate()/increase() see the first event and
        # dashboards show 0 rather than "No data". Timestamps and poll_interval stay unset until known.
        for family in (
            self.rate_limited,
            self.pages,
            self.unauthorized,
            self.auth_failures,
            self.cache_entries,
            self.lookup_duration,
            self.enrich_errors,
            self.produce_duration,
            self.inflight,
            self.checkpoint_commits,
            self.freshness,
            self.checkpoint_errors,
            self.rewinds,
            self.rewind_backoff,
            self.paused,
            self.actions_in_flight,
            self.detection_latency,
            self.validation_queries,
        ):
            family.labels(pipeline)

    def init_from_config(self, cfg) -> None:
        """Series only the pipeline file knows (call once for a stream pipeline): the poll interval,
        which the stale-poll alert multiplies by 3; zero delivery failures per output topic, so the
        first failure shows as an increase and the dashboard shows 0 instead of "No data"; and, for a
        pipeline of a fleet or with HA, this worker's pipelines and rebalances in its Kafka group (the
        last-rebalance time stays unset until the first)."""
        self.poll_interval.labels(self.pipeline).set(cfg.tanium.poll_interval)
        if cfg.kafka is not None:
            formats = [cfg.kafka.topics[f] for f in cfg.output.formats if f != "normalized"]
            for topic in (cfg.kafka.topic, cfg.kafka.dlq_topic, *formats):
                self.delivery_failures.labels(self.pipeline, topic)
        group = member_group(cfg)
        if group is not None:  # the worker's series of its group, at 0 until the member joins (its first rebalance)
            self.fleet_pipelines.labels(group, WORKER)
            self.fleet_rebalances.labels(group, WORKER)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def member_group(cfg) -> str | None:
    """The Kafka group a stream pipeline's process joins: its fleet's, its own with [ha], else none."""
    from connector.stream.leader import fleet_group, group_id  # leader.py labels its series with WORKER

    if cfg.fleet is not None:
        return fleet_group(cfg.fleet.group_id)
    return group_id(cfg.pipeline.name) if cfg.ha.enabled else None


NO_METRICS = Metrics("", record=False)  # the default of every component's `metrics`

Check = Callable[[], tuple[bool, str]]


class HealthServer:
    """Serves /metrics, /healthz (alive() is true; always, without it) and /readyz (ready() is
    true) on one port. A failing check answers 503 with its reason."""

    def __init__(self, metrics: Metrics, listen: str, ready: Check, alive: Check | None = None):
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        self.metrics = metrics
        self.ready = ready
        self.alive = alive or (lambda: (True, "ok"))
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server API)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, outer.metrics.render(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._check(outer.alive, "ok", "not alive")
                elif path == "/readyz":
                    self._check(outer.ready, "ready", "not ready")
                else:
                    self._reply(404, b"not found: try /metrics, /healthz or /readyz\n")

            def _check(self, check: Check, good: str, bad: str) -> None:
                ok, why = check()
                body = (why or (good if ok else bad)).encode() + b"\n"
                # a process running several pipelines answers per pipeline, in JSON
                self._reply(200 if ok else 503, body, "application/json" if body.startswith(b"{") else None)

            def _reply(self, code, body, ctype=None):
                self.send_response(code)
                self.send_header("Content-Type", ctype or "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # scrapes are not worth a log line each
                pass

        self.server = ThreadingHTTPServer((host, int(port)), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="health", daemon=True)

    def start(self) -> HealthServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
