"""The stream pipeline's liveness (what /healthz reports): the bound it is judged against, and that
only a process that should be polling can be stuck."""

from __future__ import annotations

import io
import time
from types import SimpleNamespace

import pytest

from connector.config import ConfigError, parse_pipeline
from connector.stream.pipeline import StreamPipeline


def cfg(sim, **pipeline):
    return parse_pipeline({"pipeline": {"name": "live", **pipeline}, "tanium": {**sim.settings(), "poll_interval": 30}})


def test_default_bound_covers_five_poll_intervals_and_a_poll_attempt_that_times_out(sim):
    c = cfg(sim)
    assert c.liveness_bound == max(60, 5 * 30, 2 * (c.tanium.max_retries + 1) * c.tanium.timeout) == 360
    assert cfg(sim, liveness_timeout=2.5).liveness_bound == 2.5


@pytest.mark.parametrize("value", [0, -1, "soon"])
def test_liveness_timeout_is_checked(sim, value):
    with pytest.raises(ConfigError, match="pipeline.liveness_timeout"):
        cfg(sim, liveness_timeout=value)


def test_a_pipeline_that_should_poll_and_does_not_is_not_alive(sim):
    pipe = StreamPipeline(cfg(sim, liveness_timeout=5), dry_run=True, out=io.StringIO())
    try:
        assert pipe.liveness() == (True, "ok")
        pipe.last_poll = time.monotonic() - 6
        ok, why = pipe.liveness()
        assert not ok and why.startswith("no poll attempt for 6s")
        pipe.election = SimpleNamespace(is_leader=False)  # an HA standby does not poll
        assert pipe.liveness() == (True, "ok")
    finally:
        pipe.client.close()
