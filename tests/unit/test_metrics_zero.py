"""Labelled counters that dashboards and alert rules watch exist at 0 from the first scrape, for
every label value the connector can produce: increase() and rate() cannot see a series whose first
sample is already 1. The label values are checked against what the code really produces, so a new
reason cannot appear without its series being created up front."""

from __future__ import annotations

import pytest

from connector.config import parse_pipeline
from connector.fieldmap import DEFAULT_FIELD_MAP
from connector.metrics import DLQ_REASONS, DROP_REASONS, KEY_RELOAD_RESULTS, RETRY_REASONS, WORKER, Metrics
from connector.stream.leader import election_for
from connector.stream.normalize import NormalizeError, Normalizer, serialize
from connector.tanium import TaniumClient, TaniumError

P = "pipe"


def samples(m: Metrics, family: str) -> dict[tuple, float]:
    """{label values (without pipeline): value} of a counter family's `_total` samples."""
    out = {}
    for metric in m.registry.collect():
        if metric.name == f"tanium_connector_{family}":
            for s in metric.samples:
                if s.name.endswith("_total"):
                    out[tuple(v for k, v in sorted(s.labels.items()) if k != "pipeline")] = s.value
    return out


def test_a_fresh_registry_has_every_known_label_value_at_zero():
    m = Metrics(P)
    assert samples(m, "dlq_records") == {(r,): 0.0 for r in DLQ_REASONS}
    assert samples(m, "normalize_warnings") == {(f,): 0.0 for f in DEFAULT_FIELD_MAP}
    dropped = {(r, stage): 0.0 for stage, reasons in DROP_REASONS.items() for r in reasons}
    assert samples(m, "records_dropped") == dropped  # labels sorted by name: reason, stage
    assert samples(m, "source_retries") == {(r,): 0.0 for r in RETRY_REASONS}
    assert samples(m, "source_api_key_reloads") == {(r,): 0.0 for r in KEY_RELOAD_RESULTS}
    assert samples(m, "source_auth_failures") == {(): 0.0}
    assert m.registry.get_sample_value("tanium_connector_source_unauthorized", {"pipeline": P}) == 0
    text = m.render().decode()
    assert f'tanium_connector_dlq_records_total{{pipeline="{P}",reason="bad id"}} 0.0' in text
    assert f'tanium_connector_source_retries_total{{pipeline="{P}",reason="429"}} 0.0' in text


BAD_RECORDS = [[1, 2], "text", {"id": True}, {"id": 5, "guid": 7}, {"guid": ""}, {"id": "x1"}]


@pytest.mark.parametrize("record", BAD_RECORDS, ids=repr)
def test_every_normalize_rejection_has_a_precreated_reason(record):
    m = Metrics(P)
    with pytest.raises(NormalizeError) as e:
        Normalizer(DEFAULT_FIELD_MAP, P, metrics=m).normalize(record)
    assert e.value.code in DLQ_REASONS and e.value.code in DROP_REASONS["normalize"]
    assert set(samples(m, "records_dropped")) == {(r, s) for s, rs in DROP_REASONS.items() for r in rs}


def test_serialize_and_size_rejections_have_precreated_reasons():
    nested: list = []
    for _ in range(300):
        nested = [nested]
    with pytest.raises(NormalizeError) as e:
        serialize({"x": nested})
    assert e.value.code in DLQ_REASONS
    assert "too large" in DLQ_REASONS  # the pipeline's own reason for an event over kafka.max_request_size


def test_every_retry_reason_the_client_produces_is_precreated(sim):
    """429, 5xx and a connection reset: each retried once, no series beyond the pre-created ones."""
    from connector.config import TaniumSection

    m = Metrics(P)
    client = TaniumClient(TaniumSection(**sim.settings(max_retries=1)), m, backoff_base=0.01, backoff_cap=0.02)
    sim.faults.retry_after = "0"
    for fault in ("rate_limit_next", "error_next", "reset_next"):
        setattr(sim.faults, fault, 1)
        client.list_alerts([], 0, 1)
    sim.faults.stall_next, sim.faults.stall_seconds = 2, 1
    slow = TaniumClient(TaniumSection(**sim.settings(max_retries=1, timeout=0.2)), m)
    with pytest.raises(TaniumError):
        slow.list_alerts([], 0, 1)
    client.close()
    slow.close()
    retries = samples(m, "source_retries")
    assert set(retries) == {(r,) for r in RETRY_REASONS}
    assert retries[("429",)] == 1 and retries[("5xx",)] == 1 and retries[("network",)] == 2


def _cfg(**sections):
    raw = {
        "pipeline": {"name": P},
        "tanium": {"host": "tanium.example.com", "api_key": "token-test"},
        "kafka": {"bootstrap_servers": "127.0.0.1:9", "topic": "t.events"},
        "state": {"backend": "kafka"},
        **sections,
    }
    return parse_pipeline(raw)


def _worker_series(m: Metrics) -> dict[str, dict[tuple, float]]:
    """{sample name: {(group, worker): value}} of the per-worker group families."""
    out: dict[str, dict[tuple, float]] = {}
    for metric in m.registry.collect():
        if metric.name.startswith("tanium_connector_fleet_") and metric.name != "tanium_connector_fleet_owner":
            for s in metric.samples:
                if not s.name.endswith("_created"):
                    out.setdefault(s.name, {})[(s.labels["group"], s.labels["worker"])] = s.value
    return out


@pytest.mark.parametrize(
    "sections,group",
    [
        ({"fleet": {"group_id": "emea"}}, "tanium-connector.fleet.emea"),
        ({"ha": {"enabled": True}}, f"tanium-connector.{P}.leader"),
    ],
    ids=["fleet", "ha"],
)
def test_a_group_members_worker_series_exist_at_zero_and_its_first_rebalance_counts(sections, group):
    """A pipeline of a fleet (or with HA) has this worker's pipelines and rebalances in its group at
    0 before the member joins; the member's own updates land on those series, so the join's
    rebalance is an increase from 0. The last-rebalance time stays unset until a rebalance."""
    cfg = _cfg(**sections)
    m = Metrics(P)
    m.init_from_config(cfg)
    zero = {(group, WORKER): 0.0}
    assert _worker_series(m) == {
        "tanium_connector_fleet_pipelines": zero,
        "tanium_connector_fleet_rebalances_total": zero,
    }
    election = election_for(cfg, m, on_change=None)  # builds the group member; joins nothing yet
    assert election.member.group == group
    election.member._assigned([])  # what the group's listener calls when a rebalance completes
    series = _worker_series(m)
    assert series["tanium_connector_fleet_rebalances_total"] == {(group, WORKER): 1.0}
    assert series["tanium_connector_fleet_pipelines"] == zero
    assert set(series["tanium_connector_fleet_last_rebalance_timestamp_seconds"]) == {(group, WORKER)}
    # the pipeline's own series: not run here (yet), not the leader
    assert m.registry.get_sample_value("tanium_connector_fleet_owner", {"pipeline": P, "worker": WORKER}) == 0
    assert m.registry.get_sample_value("tanium_connector_ha_leader", {"pipeline": P}) == 0


def test_a_pipeline_without_a_group_has_no_worker_series():
    m = Metrics(P)
    m.init_from_config(_cfg())
    assert _worker_series(m) == {}
