"""Shared fixtures: the real embedded broker (tansu) and helpers to read topics back."""
from __future__ import annotations

import contextlib
import time
import uuid

import pytest
from kafka import KafkaConsumer, TopicPartition

from connector.embedded import EmbeddedBroker


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    log = tmp_path_factory.mktemp("tansu") / "tansu.log"
    with EmbeddedBroker(log=str(log)) as b:
        yield b


@pytest.fixture
def topic_prefix():
    """Unique topic names per test: the session broker is shared."""
    return f"t{uuid.uuid4().hex[:10]}"


def read_topic(bootstrap: str, topic: str, expect: int | None = None, timeout: float = 30,
               isolation_level: str = "read_uncommitted"):
    """Every record of `topic` from the beginning up to its end offsets as seen now; with
    `expect`, keeps reading until that many arrived (or `timeout`)."""
    deadline = time.monotonic() + timeout
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             isolation_level=isolation_level)
    try:
        parts = consumer.partitions_for_topic(topic)
        while not parts and time.monotonic() < deadline:
            time.sleep(0.1)
            parts = consumer.partitions_for_topic(topic)
        if not parts:
            return []
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out = []
        while time.monotonic() < deadline:
            batch = [r for recs in consumer.poll(timeout_ms=300).values() for r in recs]
            out.extend(batch)
            if expect is not None:
                if len(out) >= expect:
                    break
            # tansu may report end offsets below what it serves: also wait for an empty poll
            elif not batch and all(consumer.position(tp) >= end
                                   for tp, end in consumer.end_offsets(tps).items()):
                break
        return out
    finally:
        consumer.close()


@pytest.fixture
def sim():
    """A TR simulator on a free loopback port: 300 alerts over the last hour, 6 IntelDocs, seed 7.
    Faults and injected alerts are per test (`sim.faults`, `sim.inject(...)`)."""
    from connector.simulator import Simulator

    with Simulator(alerts=300, intel_docs=6, seed=7, history=3600) as s:
        yield s


# -- appended by the sink+state engineer: a broker reachable only through a stalling proxy, for
# back-pressure, delivery-failure and partition tests (issues 3 and 7) ---------------------------
import socket  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402

from connector.embedded import free_port, tansu_binary, wait_port  # noqa: E402


class StallProxy:
    """Forwards 127.0.0.1:port → target. stall() stops moving bytes in both directions while
    keeping every connection open (new ones are accepted and held): a black-holed network.
    resume() lets the held bytes flow again, so connections survive the outage intact.
    `delay` (seconds) holds every chunk before forwarding it: a slow broker or link (each direction
    of a connection forwards one chunk at a time, so throughput drops to about chunk size / delay)."""

    delay = 0.0

    def __init__(self, port: int, target: tuple[str, int]):
        self.target = target
        self.flowing = threading.Event()
        self.flowing.set()
        self.closed = False
        self.socks: list[socket.socket] = []
        self.server = socket.create_server(("127.0.0.1", port))
        threading.Thread(target=self._accept, daemon=True).start()

    def stall(self):
        self.flowing.clear()

    def resume(self):
        self.flowing.set()

    def close(self):
        self.closed = True
        self.flowing.set()
        self.server.close()
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass

    def _accept(self):
        while not self.closed:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.socks.append(conn)
            threading.Thread(target=self._connect, args=(conn,), daemon=True).start()

    def _connect(self, conn):
        self.flowing.wait()
        try:
            up = socket.create_connection(self.target)
        except OSError:
            conn.close()
            return
        self.socks.append(up)
        threading.Thread(target=self._pump, args=(conn, up, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(up, conn, False), daemon=True).start()

    def seen(self, data: bytes, from_client: bool) -> None:
        """Called with every chunk before it is forwarded (a subclass may record it)."""

    def _pump(self, src, dst, from_client):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                self.seen(data, from_client)
                if self.delay:
                    time.sleep(self.delay)  # the injected latency itself
                self.flowing.wait()
                if self.closed:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class ProxiedBroker:
    def __init__(self, proxy: StallProxy, port: int, proc: subprocess.Popen):
        self.proxy, self.bootstrap, self.proc = proxy, f"127.0.0.1:{port}", proc


@contextlib.contextmanager
def broker_behind_proxy(tmp_path_factory, name: str, proxy_class=StallProxy, broker_args=()):
    """A tansu broker that advertises a proxy's address, so every client connection goes
    through the proxy."""
    real, front = free_port(), free_port()
    log = open(tmp_path_factory.mktemp(name) / "tansu.log", "ab")
    proc = subprocess.Popen(
        [tansu_binary(), "broker", "--listener-url", f"tcp://127.0.0.1:{real}",
         "--advertised-listener-url", f"tcp://127.0.0.1:{front}", "--storage-engine", "memory://tansu/",
         *broker_args],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        assert wait_port("127.0.0.1", real, 20), f"{name} tansu did not start"
        proxy = proxy_class(front, ("127.0.0.1", real))
        yield ProxiedBroker(proxy, front, proc)
        proxy.close()
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


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
