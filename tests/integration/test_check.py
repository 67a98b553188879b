"""`tanium-connector check`: each step reported, Healthy/Unhealthy with the precise reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from connector.tanium import MODULE_MISSING_MESSAGE
from connector.tools.embedded import free_port, wait_port

ROOT = Path(__file__).resolve().parents[2]


def check(cfg_text: str, tmp_path, *extra, env=None):
    f = tmp_path / "p.toml"
    f.write_text(cfg_text)
    return subprocess.run(
        [sys.executable, "-m", "connector.cli", "check", str(f), *extra],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def demo_pointed_at(port: int, kafka: str | None = None) -> str:
    """pipelines/demo.toml as shipped, with the simulator's port (and optionally a Kafka sink)."""
    text = (ROOT / "pipelines" / "demo.toml").read_text().replace("port = 8443", f"port = {port}")
    if kafka:
        text += f'\n[kafka]\nbootstrap_servers = "{kafka}"\n'
    return text


@pytest.fixture
def simulate_cli():
    """`tanium-connector simulate` as a user runs it, on a free port."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "connector.cli", "simulate", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert wait_port("127.0.0.1", port, 20), "simulator did not start"
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def test_demo_pipeline_against_the_simulate_command_is_healthy(simulate_cli, tmp_path):
    r = check(demo_pointed_at(simulate_cli), tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[-1] == "Healthy"
    for step in ("tcp", "credentials", "threat_response", "intel_docs"):
        assert any(line.startswith("ok") and f" {step} " in line for line in lines), step


def test_module_missing_is_unhealthy_with_the_404_explanation(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "connector.cli", "simulate", "--port", str(port), "--module-missing"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert wait_port("127.0.0.1", port, 20)
        r = check(demo_pointed_at(port), tmp_path)
        js = check(demo_pointed_at(port), tmp_path, "--json")
    finally:
        proc.terminate()
        proc.wait(10)
    assert r.returncode == 1
    assert r.stdout.splitlines()[-1] == f"Unhealthy: threat_response: {MODULE_MISSING_MESSAGE}"
    report = json.loads(js.stdout)
    assert js.returncode == 1 and report["healthy"] is False
    assert [s["name"] for s in report["steps"]] == ["tcp", "credentials", "threat_response"]
    assert report["steps"][-1]["message"] == MODULE_MISSING_MESSAGE


def test_wrong_token_names_expiry_and_trusted_ips(simulate_cli, tmp_path):
    r = check(demo_pointed_at(simulate_cli), tmp_path, env={"TANIUM_API_KEY": "token-wrong-XYZ"})
    assert r.returncode == 1
    last = r.stdout.splitlines()[-1]
    assert last.startswith("Unhealthy: credentials: ") and "401" in last
    assert "expired" in last and "IP" in last
    assert "token-wrong-XYZ" not in r.stdout + r.stderr


def test_connection_refused_and_dns_failures_name_host_port_protocol(tmp_path):
    port = free_port()  # nothing listens there
    r = check(demo_pointed_at(port), tmp_path)
    assert r.returncode == 1
    assert f"Unhealthy: tcp: connection refused by http://127.0.0.1:{port}" in r.stdout
    text = demo_pointed_at(port).replace('host = "127.0.0.1"', 'host = "no-such-host.invalid"')
    r = check(text, tmp_path)
    assert r.returncode == 1 and "cannot resolve host 'no-such-host.invalid'" in r.stdout
    assert "Traceback" not in r.stderr


def test_kafka_step_when_the_file_configures_a_sink(simulate_cli, broker, tmp_path):
    r = check(demo_pointed_at(simulate_cli, kafka=broker.bootstrap), tmp_path)
    assert r.returncode == 0, r.stdout
    assert any(line.startswith("ok") and " kafka " in line for line in r.stdout.splitlines())
    dead = f"127.0.0.1:{free_port()}"
    r = check(demo_pointed_at(simulate_cli, kafka=dead), tmp_path)
    assert r.returncode == 1
    assert r.stdout.splitlines()[-1].startswith(f"Unhealthy: kafka: cannot reach Kafka at {dead}")
