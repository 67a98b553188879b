"""A component built without a metrics listener gets an unrecorded Metrics (NO_METRICS): it has every
family a recorded one has, takes every call a stage makes, and exposes nothing."""

from __future__ import annotations

from connector.fieldmap import DEFAULT_FIELD_MAP
from connector.metrics import NO_METRICS, Metrics
from connector.stream.normalize import Normalizer


def test_unrecorded_metrics_have_every_family_and_record_nothing():
    recorded, unrecorded = Metrics("p"), Metrics("p", record=False)
    assert vars(recorded).keys() == vars(unrecorded).keys()
    for name, family in vars(unrecorded).items():
        if name in ("pipeline", "registry"):
            continue
        child = family.labels("p", "x", "y")
        child.inc()
        child.inc(2.5)
        child.set(1)
        child.observe(0.1)
    assert unrecorded.render() == b""
    assert NO_METRICS.render() == b""


def test_a_stage_without_metrics_works_on_the_unrecorded_default():
    normalizer = Normalizer(DEFAULT_FIELD_MAP, "p")
    event = normalizer.normalize({"id": 1, "guid": "g", "details": {}, "detailsError": "details is null"})
    assert event["uid"] == "g"
    assert event["normalization_warnings"] == ["details: details is null"]
    assert NO_METRICS.render() == b""
