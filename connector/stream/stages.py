"""The one place that builds the stream stages from a pipeline's settings (the pipeline, the
validation engine and the benchmark all use it, so a setting means the same everywhere)."""

from __future__ import annotations

from dataclasses import dataclass

from connector.metrics import NO_METRICS, Metrics
from connector.stream.enrich import Enricher
from connector.stream.normalize import Normalizer
from connector.stream.source import AlertSource
from connector.stream.updates import TrackedSource


@dataclass
class Stages:
    """Source, enricher (None when enrichment is off) and normalizer of one pipeline."""

    source: AlertSource | TrackedSource
    enricher: Enricher | None
    normalizer: Normalizer


def build_stages(cfg, client, metrics: Metrics = NO_METRICS) -> Stages:
    """The stages configured by `cfg` (a PipelineConfig), reading Tanium through `client`."""
    enricher = None
    if cfg.tanium.enrich_intel_docs:
        e = cfg.enrich
        enricher = Enricher(
            client.get_intel, e.cache_size, e.cache_ttl, e.negative_ttl, e.concurrency, metrics, timeout=e.timeout
        )
    # the one place the event-time adjustment is applied
    normalizer = Normalizer(
        cfg.effective_field_map,
        cfg.pipeline.name,
        cfg.validation.event_time_adjustment,
        cfg.output.include_raw,
        cfg.tanium.host,
        metrics,
    )
    return Stages(build_source(cfg, client, metrics), enricher, normalizer)


def build_source(cfg, client, metrics: Metrics = NO_METRICS) -> AlertSource | TrackedSource:
    """A new source (cursor unset: call resume()). The pipeline builds one per session. With
    source.track_updates it also reads the alerts that changed (connector/stream/updates.py)."""
    source = AlertSource(client, cfg.tanium.page_size, cfg.tanium.limit, metrics)
    return TrackedSource(source, client, cfg.tanium.page_size) if cfg.source.track_updates else source
