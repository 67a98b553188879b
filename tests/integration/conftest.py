"""Integration tests: the connector's parts against the real broker (tansu), the simulator over HTTP
and the CLI in subprocesses. Fixtures here: brokers reachable only through a stalling or slow proxy."""

from __future__ import annotations

import pytest
from helpers import broker_behind_proxy


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    """A broker (module-wide) reachable only through a proxy: `.bootstrap`, `.proxy.stall()`,
    `.proxy.resume()`. Use the `proxy` fixture too: it resumes the proxy after each test."""
    with broker_behind_proxy(tmp_path_factory, "tansu-proxied") as b:
        yield b


@pytest.fixture
def proxy(proxied):
    yield proxied.proxy
    proxied.proxy.resume()


@pytest.fixture(scope="module")
def slowed(tmp_path_factory):
    """Like `proxied`, for slow-link tests: `.proxy.delay = seconds`. Use the `slow_link`
    fixture too: it sets the delay back to 0 after each test."""
    with broker_behind_proxy(tmp_path_factory, "tansu-slowed") as b:
        yield b


@pytest.fixture
def slow_link(slowed):
    yield slowed.proxy
    slowed.proxy.delay = 0.0
    slowed.proxy.resume()
