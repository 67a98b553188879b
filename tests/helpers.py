"""Helpers shared by the test folders: reading topics to their end, waiting on conditions, pipeline
files and configs, the connector CLI in a subprocess, its metrics, a proxy that stalls or slows
a broker's connections, an HTTP forward proxy, and a key file laid out like a Kubernetes Secret volume."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from kafka import KafkaConsumer, TopicPartition

from connector.config import parse_pipeline
from connector.metrics import Metrics
from connector.stream.pipeline import StreamPipeline
from connector.tools.embedded import free_port, tansu_binary, wait_port

ROOT = Path(__file__).resolve().parent.parent


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def write_pipeline(path: Path, sections: dict[str, dict]) -> Path:
    """A pipeline file from {section: {key: value}} (flat sections only)."""
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def stream_sections(
    name: str, sim, bootstrap: str, state_dir: Path, *, metrics_port: int | None = None, **over
) -> dict[str, dict]:
    sections = {
        "pipeline": {"name": name, "shutdown_timeout": 20},
        "tanium": {**sim.settings(), "poll_interval": 0.2},
        "source": {"start_from": "30d"},
        "kafka": {"bootstrap_servers": bootstrap, "topic": f"{name}.events", "linger_ms": 5},
        "state": {"path": str(state_dir)},
        "metrics": ({"listen": f"127.0.0.1:{metrics_port}"} if metrics_port else {"enabled": False}),
    }
    for section, values in over.items():
        sections.setdefault(section, {}).update(values)
    return sections


class Cli:
    """`python -m connector.cli ARGS` with its stderr (logs) in a file, so a full pipe never
    blocks it and the logs survive the kill."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None):
        self.log, self.out = log, log.with_suffix(".out")
        self._files = [open(log, "ab"), open(self.out, "wb")]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "connector.cli", *args],
            cwd=ROOT,
            stdout=self._files[1],
            stderr=self._files[0],
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> int:
        self.proc.kill()  # SIGKILL: no handler, no flush, no goodbye
        code = self.proc.wait(30)
        self._close()
        return code

    def wait(self, timeout: float) -> tuple[int, str]:
        """(exit code, stdout); kills the process if it runs past `timeout`."""
        try:
            self.proc.wait(timeout)
        finally:
            self.stop()
        return self.proc.returncode, self.out.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        if self.alive:
            self.proc.kill()
            self.proc.wait(30)
        self._close()

    def _close(self) -> None:
        for f in self._files:
            f.close()

    def logs(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


class SecretDir:
    """A directory laid out like a Kubernetes Secret volume: `api_key` → `..data/api_key`, `..data` →
    a timestamped directory. `swap` writes a new timestamped directory and renames a new `..data`
    symlink over the old one (atomic), then removes the old directory, as the kubelet does."""

    def __init__(self, root: Path, key: str):
        self.root, self.n = root, 0
        self.swap(key)
        (root / "api_key").symlink_to("..data/api_key")

    @property
    def path(self) -> str:
        return str(self.root / "api_key")

    def swap(self, key: str) -> None:
        self.n += 1
        new = self.root / f"..2025_01_01_00_00_{self.n:02d}"
        new.mkdir()
        (new / "api_key").write_text(key)
        old = os.readlink(self.root / "..data") if (self.root / "..data").is_symlink() else None
        (self.root / "..data_tmp").symlink_to(new.name)
        os.rename(self.root / "..data_tmp", self.root / "..data")
        if old:
            for f in (self.root / old).iterdir():
                f.unlink()
            (self.root / old).rmdir()


def scrape(port: int, path: str = "/metrics", timeout: float = 2) -> tuple[int, str]:
    """(HTTP status, body) of the connector's health server; (0, "") when it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def metric(text: str, family: str, **labels) -> float | None:
    """Sum of the samples of `tanium_connector_<family>` whose labels include `labels`."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if not line.startswith(f"tanium_connector_{family}") or line.startswith("#"):
            continue
        name, _, rest = line.partition("{") if "{" in line.split(" ")[0] else (line.split(" ")[0], "", "")
        if name != f"tanium_connector_{family}":
            continue
        if rest and any(f'{k}="{v}"' not in rest.split("}")[0] for k, v in labels.items()):
            continue
        total += float(line.rsplit(" ", 1)[1])
        seen = True
    return total if seen else None


def read_topic(
    bootstrap: str,
    topic: str,
    expect: int | None = None,
    timeout: float = 30,
    isolation_level: str = "read_uncommitted",
):
    """Every record of `topic`, from the beginning to its end, duplicates included. With `expect`, first
    waits (up to `timeout`) until at least that many arrived; the read always goes on to the end of
    the topic, so records beyond `expect` (duplicates) are seen too."""
    deadline = time.monotonic() + timeout
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level=isolation_level)
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
            if expect is not None and len(out) < expect:
                continue
            # the end: tansu may report end offsets below what it serves, so also wait for an empty poll
            if not batch and all(consumer.position(tp) >= end for tp, end in consumer.end_offsets(tps).items()):
                break
        return out
    finally:
        consumer.close()


def wait_until(cond, timeout=60, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def make_cfg(sim, bootstrap, prefix, tmp_path, **over):
    raw = {
        "pipeline": {"name": prefix, "shutdown_timeout": 20},
        "tanium": {**sim.settings(), "poll_interval": 0.2},
        "source": {"start_from": "30d"},
        "kafka": {"bootstrap_servers": bootstrap, "topic": f"{prefix}.events", "linger_ms": 5},
        "state": {"path": str(tmp_path / "state")},
    }
    for section, values in over.items():
        raw.setdefault(section, {}).update(values)
    return parse_pipeline(raw)


class Running:
    """A pipeline on a thread, stopped (gracefully) at the end."""

    def __init__(self, cfg, **kw):
        self.metrics = Metrics(cfg.pipeline.name)
        self.pipe = StreamPipeline(cfg, metrics=self.metrics, **kw)
        self.code = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        self.code = self.pipe.run()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.pipe.stop()
        self.thread.join(60)
        assert not self.thread.is_alive(), "pipeline did not stop"

    def committed_offset(self):
        return (self.pipe.committed or {}).get("offset", 0)


def ids_of(records):
    return [json.loads(r.value)["raw"]["id"] for r in records]


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
def broker_behind_proxy(tmp_path_factory, name: str, proxy_class=StallProxy, broker_args=(), cwd=None):
    """A tansu broker that advertises a proxy's address, so every client connection goes
    through the proxy. `cwd`: the broker's working directory (its `file://` URLs are relative to it)."""
    real, front = free_port(), free_port()
    log = open(tmp_path_factory.mktemp(name) / "tansu.log", "ab")
    proc = subprocess.Popen(
        [
            tansu_binary(),
            "broker",
            "--listener-url",
            f"tcp://127.0.0.1:{real}",
            "--advertised-listener-url",
            f"tcp://127.0.0.1:{front}",
            "--storage-engine",
            "memory://tansu/",
            *broker_args,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
    )
    try:
        assert wait_port("127.0.0.1", real, 20), f"{name} tansu did not start"
        proxy = proxy_class(front, ("127.0.0.1", real))
        yield ProxiedBroker(proxy, front, proc)
        proxy.close()
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


class ForwardProxy(ThreadingHTTPServer):
    """A minimal plain-HTTP forward proxy on 127.0.0.1: enough to prove requests go through it.
    `seen` holds (request target, session header) per request. `hosts` maps names only the proxy
    can resolve (as a site proxy resolves internal names) to addresses."""

    daemon_threads = True

    def __init__(self, hosts: dict[str, str] | None = None):
        seen = self.seen = []
        names = hosts or {}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                seen.append((self.path, self.headers.get("session")))
                u = urlsplit(self.path)
                conn = http.client.HTTPConnection(names.get(u.hostname, u.hostname), u.port, timeout=10)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("proxy-connection", "host")}
                conn.request("GET", u.path + ("?" + u.query if u.query else ""), headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                self.send_response(resp.status)
                self.send_header("Content-Type", resp.getheader("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.shutdown()
        self.server_close()
