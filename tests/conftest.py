"""Fixtures every test folder shares: the real embedded broker (tansu), unique topic names, a simulator."""

from __future__ import annotations

import uuid

import pytest

from connector.tools.embedded import EmbeddedBroker


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    log = tmp_path_factory.mktemp("tansu") / "tansu.log"
    with EmbeddedBroker(log=str(log)) as b:
        yield b


@pytest.fixture
def topic_prefix():
    """Unique topic names per test: the session broker is shared."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def sim():
    """A TR simulator on a free loopback port: 300 alerts over the last hour, 6 IntelDocs, seed 7.
    Faults and injected alerts are per test (`sim.faults`, `sim.inject(...)`)."""
    from connector.simulator import Simulator

    with Simulator(alerts=300, intel_docs=6, seed=7, history=3600) as s:
        yield s
