"""Secrets, TLS, Kafka security settings and the metrics listener, at the CLI level.

- The Tanium API key never appears anywhere the connector writes: one test collects every
  output (debug logs with faults and a 401, a logged traceback, /metrics, `check` text and JSON,
  `validate-config`, the events and DLQ topics, repr/str of the config objects) and greps it.
- TLS against a simulator with a self-signed (trustme) certificate: `check` and `run --once`
  fail clearly when verifying, work with `ca_bundle`, work with a logged warning when
  `verify_ssl = false`.
- Kafka SASL/SSL settings reach kafka-python unchanged, and SCRAM is spoken on the wire against
  the embedded broker with authentication on (see the SASL test's docstring for tansu's limits).
- The metrics/health listener binds to loopback unless told otherwise.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid

import pytest
from helpers import (
    ROOT,
    Cli,
    StallProxy,
    broker_behind_proxy,
    read_topic,
    scrape,
    stream_sections,
    wait_until,
    write_pipeline,
)

from connector.config import parse_pipeline
from connector.kafka import client_settings, producer_settings
from connector.metrics import HealthServer, Metrics
from connector.simulator import Simulator
from connector.stream.checkpoint import FileCheckpointStore
from connector.tanium import TaniumClient
from connector.tools.embedded import free_port


def cli(*args, timeout=120, env=None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "connector.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


# ---- the API key never leaks --------------------------------------------------------------------


@pytest.mark.slow
def test_the_api_key_appears_nowhere(broker, topic_prefix, tmp_path):
    key = f"tanium-token-{uuid.uuid4().hex}"
    core = key.split("-")[-1][8:24]  # a distinctive middle part: no partial leak either
    kafka_password = f"kafka-pw-{uuid.uuid4().hex}"
    seen: dict[str, str] = {}
    with Simulator(alerts=300, intel_docs=5, seed=51, history=3600, api_key=key) as sim:
        port = free_port()
        state_dir = tmp_path / "state"
        sections = stream_sections(
            topic_prefix,
            sim,
            broker.bootstrap,
            state_dir,
            metrics_port=port,
            tanium={"page_size": 50, "timeout": 2, "max_retries": 2},
        )
        cfg_file = write_pipeline(tmp_path / "p.toml", sections)
        store = FileCheckpointStore(state_dir, topic_prefix)
        # faults on every endpoint: retries, resets, stalls, bad pages and garbage records (→ DLQ)
        f = sim.faults
        f.rate_limit_next, f.error_next, f.reset_next, f.stall_next, f.malformed_next = 2, 2, 2, 1, 1
        f.stall_seconds = 30
        f.garbage_rate, f.garbage_kinds = 1.0, ("non_object", "wrong_types", "invalid_utf8")
        run = Cli(["--log-level", "debug", "--log-format", "json", "run", str(cfg_file)], tmp_path / "run.log")
        try:
            wait_until(lambda: (store.load() or {}).get("offset") == 300, timeout=90, what="all delivered")
            wait_until(lambda: scrape(port)[0] == 200, what="/metrics")
            seen["/metrics"] = scrape(port)[1]
            seen["/readyz"] = scrape(port, "/readyz")[1]
            sim.api_key = "rotated"  # the token "expires": 401 on every request from now on
            n = sim.stats["alerts"]
            wait_until(lambda: sim.stats["alerts"] > n + 1, what="requests answered 401")
            wait_until(lambda: "401 Unauthorized" in run.logs(), what="the 401 logged")
            seen["/metrics after 401"] = scrape(port)[1]
        finally:
            run.proc.terminate()
            code, seen["run stdout"] = run.wait(60)
        seen["run log (debug, faults, 401)"] = run.logs()
        assert code == 0
        assert sim.faults.served["stall"] == 1 and sim.faults.served["garbage"] > 0
        assert "Unauthorized" in seen["run log (debug, faults, 401)"]
        assert '"level": "debug"' in seen["run log (debug, faults, 401)"]

        # check and validate-config, with the wrong key (401) and with the right one
        for label, api_key in (("401", key), ("ok", "rotated")):
            p = write_pipeline(
                tmp_path / f"check-{label}.toml", {**sections, "tanium": {**sections["tanium"], "api_key": api_key}}
            )
            for args in (["check", str(p)], ["check", str(p), "--json"], ["validate-config", str(p)]):
                r = cli("--log-level", "debug", *args)
                name = " ".join(a for a in args if not a.endswith(".toml"))
                seen[f"{name} {label} stdout"], seen[f"{name} {label} stderr"] = r.stdout, r.stderr
                if args[0] == "check":
                    assert r.returncode == (1 if label == "401" else 0), r.stdout + r.stderr[-2000:]
        assert "401" in seen["check 401 stdout"] and '"healthy": false' in seen["check --json 401 stdout"]
        assert json.loads(seen["validate-config 401 stdout"])["tanium"]["api_key"] == "***"

        # a bad setting next to the key: the error names the setting, never the key
        bad = write_pipeline(tmp_path / "bad.toml", {**sections, "tanium": {**sections["tanium"], "port": 0}})
        r = cli("validate-config", str(bad))
        assert r.returncode == 2 and "tanium.port" in r.stderr
        seen["validate-config error"] = r.stdout + r.stderr

    # a traceback logged with the key in the exception and the message: redacted as a whole
    code = (
        "import logging\nfrom connector import cli\ncli.setup_logging('debug', '%s')\n"
        "cli.REDACT.secrets = [%r]\ntry:\n    raise RuntimeError('request failed, session: %s')\n"
        "except RuntimeError:\n    logging.getLogger('connector.x').exception('boom %s')\n"
    )
    for fmt in ("json", "text"):
        r = subprocess.run(
            [sys.executable, "-c", code % (fmt, key, key, key)], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert "Traceback" in r.stderr and "RuntimeError" in r.stderr and "boom ***" in r.stderr, r.stderr
        seen[f"traceback ({fmt})"] = r.stderr

    # topics: events and dead letters
    events = read_topic(broker.bootstrap, f"{topic_prefix}.events", expect=300)
    dlq = read_topic(broker.bootstrap, f"{topic_prefix}.events.dlq", timeout=10)
    assert len(dlq) > 0
    seen["events topic"] = "\n".join(r.value.decode("utf-8", "replace") for r in events)
    seen["dlq topic"] = "\n".join(r.value.decode("utf-8", "replace") + repr(r.headers) for r in dlq)

    # config objects and the client
    cfg = parse_pipeline(
        {
            **sections,
            "tanium": {**sections["tanium"], "api_key": key},
            "kafka": {
                **sections["kafka"],
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_plain_username": "svc",
                "sasl_plain_password": kafka_password,
            },
        }
    )
    client = TaniumClient(cfg.tanium)
    seen["repr/str"] = "\n".join(
        [
            repr(cfg),
            str(cfg),
            repr(cfg.tanium),
            str(cfg.tanium),
            repr(cfg.kafka),
            str(cfg.kafka),
            f"{cfg.tanium!r} {cfg.tanium}",
            json.dumps(cfg.masked()),
            cfg.model_dump_json(),
            repr(cfg.model_dump()),
            repr(client),
            repr(cfg.tanium.api_key),
        ]
    )
    client.close()

    assert len(seen) >= 20
    for where, text in seen.items():
        assert key not in text and core not in text, f"the API key leaked into {where}"
        assert kafka_password not in text, f"the Kafka password leaked into {where}"


# ---- TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    trustme = pytest.importorskip("trustme")
    d = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    for name, ident in (("server", "127.0.0.1"), ("other", "tanium.example.com")):
        ca.issue_cert(ident).private_key_and_cert_chain_pem.write_to_path(str(d / f"{name}.pem"))
    return d


def _tls_pipeline(tmp_path, sim, broker, prefix, **tanium):
    sections = stream_sections(prefix, sim, broker.bootstrap, tmp_path / "state", tanium=tanium)
    return write_pipeline(tmp_path / f"tls-{len(list(tmp_path.iterdir()))}.toml", sections)


def test_tls_check_verifies_by_default_and_says_what_to_do(certs, broker, topic_prefix, tmp_path):
    with Simulator(alerts=20, intel_docs=2, certfile=str(certs / "server.pem")) as sim:
        assert sim.url.startswith("https://")
        p = _tls_pipeline(tmp_path, sim, broker, topic_prefix)
        r = cli("check", str(p))
        assert r.returncode == 1 and "Traceback" not in r.stderr + r.stdout
        failed = [line for line in r.stdout.splitlines() if line.startswith("FAILED")]
        assert len(failed) == 1 and failed[0].split()[1] == "tls", r.stdout
        assert "could not be verified" in failed[0] and "tanium.ca_bundle" in failed[0]
        r = cli("check", str(p), "--json")
        doc = json.loads(r.stdout)
        assert r.returncode == 1 and doc["healthy"] is False and "tanium.ca_bundle" in doc["summary"]

        r = cli("check", str(_tls_pipeline(tmp_path, sim, broker, topic_prefix, ca_bundle=str(certs / "ca.pem"))))
        assert r.returncode == 0 and r.stdout.splitlines()[-1] == "Healthy", r.stdout + r.stderr
        assert "TLS" in r.stdout and "NOT verified" not in r.stdout

        r = cli(
            "--log-format", "json", "check", str(_tls_pipeline(tmp_path, sim, broker, topic_prefix, verify_ssl=False))
        )
        assert r.returncode == 0 and "NOT verified" in r.stdout, r.stdout
        warnings = [json.loads(x) for x in r.stderr.splitlines() if x.startswith("{")]
        assert any(w["level"] == "warning" and "verification is OFF" in w["msg"] for w in warnings), r.stderr


def test_tls_check_names_a_host_name_mismatch(certs, broker, topic_prefix, tmp_path):
    with Simulator(alerts=5, intel_docs=2, certfile=str(certs / "other.pem")) as sim:
        p = _tls_pipeline(tmp_path, sim, broker, topic_prefix, ca_bundle=str(certs / "ca.pem"))
        r = cli("check", str(p))
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert "FAILED tls" in r.stdout and "127.0.0.1" in r.stdout and "mismatch" in r.stdout, r.stdout


def test_tls_run_once_fails_clearly_then_works_with_ca_bundle_or_unverified(certs, broker, topic_prefix, tmp_path):
    with Simulator(alerts=40, intel_docs=3, certfile=str(certs / "server.pem")) as sim:
        p = _tls_pipeline(tmp_path, sim, broker, topic_prefix)
        r = cli("--log-format", "json", "run", str(p), "--once")
        assert r.returncode == 1 and "Traceback" not in r.stderr
        errors = [json.loads(x) for x in r.stderr.splitlines() if x.startswith("{")]
        assert any(
            e["level"] == "error"
            and "TLS certificate verification failed" in e["msg"]
            and "tanium.ca_bundle" in e["msg"]
            for e in errors
        ), r.stderr
        assert read_topic(broker.bootstrap, f"{topic_prefix}.events", timeout=3) == []

        r = cli(
            "--log-format",
            "json",
            "run",
            str(_tls_pipeline(tmp_path, sim, broker, topic_prefix, ca_bundle=str(certs / "ca.pem"))),
            "--once",
        )
        assert r.returncode == 0, r.stderr[-2000:]
        assert "verification is OFF" not in r.stderr
        assert len(read_topic(broker.bootstrap, f"{topic_prefix}.events", expect=40)) == 40

        r = cli(
            "--log-format",
            "json",
            "run",
            str(_tls_pipeline(tmp_path, sim, broker, topic_prefix, verify_ssl=False)),
            "--once",
            "--since",
            "1d",
        )
        assert r.returncode == 0, r.stderr[-2000:]
        logs = [json.loads(x) for x in r.stderr.splitlines() if x.startswith("{")]
        assert any(e["level"] == "warning" and "verification is OFF" in e["msg"] for e in logs)
        assert len(read_topic(broker.bootstrap, f"{topic_prefix}.events", expect=80)) == 80


# ---- Kafka security settings --------------------------------------------------------------------


def _kafka(**kafka):
    return parse_pipeline(
        {
            "pipeline": {"name": "k"},
            "tanium": {"host": "t.example.com", "api_key": "x"},
            "kafka": {"bootstrap_servers": "k1:9093,k2:9093", **kafka},
        }
    ).kafka


@pytest.mark.parametrize(
    "settings",
    [
        {
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": "PLAIN",
            "sasl_plain_username": "svc",
            "sasl_plain_password": "pw-1",
        },
        {
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-256",
            "sasl_plain_username": "svc",
            "sasl_plain_password": "pw-2",
            "ssl_cafile": "CA",
        },
        {
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_plain_username": "svc",
            "sasl_plain_password": "pw-3",
            "ssl_cafile": "CA",
        },
        {
            "security_protocol": "SSL",
            "ssl_cafile": "CA",
            "ssl_certfile": "CA",
            "ssl_keyfile": "CA",
            "ssl_password": "key-pw",
        },
    ],
)
def test_kafka_security_settings_reach_kafka_python(settings, certs):
    ca = str(certs / "ca.pem")
    settings = {k: (ca if v == "CA" else v) for k, v in settings.items()}
    kafka = _kafka(**settings)
    out = client_settings(kafka)
    assert out["bootstrap_servers"] == ["k1:9093", "k2:9093"]
    for k, v in settings.items():
        assert out[k] == v, k  # secrets unwrapped for kafka-python, nothing renamed or dropped
    assert set(out) == {"bootstrap_servers", "client_id", *settings}
    prod = producer_settings(kafka)
    assert all(prod[k] == v for k, v in out.items())
    for secret in ("sasl_plain_password", "ssl_password"):
        if secret in settings:
            assert settings[secret] not in repr(kafka) and settings[secret] not in json.dumps(
                parse_pipeline(
                    {
                        "pipeline": {"name": "k"},
                        "tanium": {"host": "t.example.com", "api_key": "x"},
                        "kafka": {"bootstrap_servers": "k1:9093", **settings},
                    }
                ).masked()
            )
    # kafka-python itself takes every setting (a typo'd or unknown key would raise here)
    from kafka import KafkaProducer

    unknown = set(prod) - set(KafkaProducer.DEFAULT_CONFIG)
    assert not unknown, unknown


class RecordingProxy(StallProxy):
    """Forwards like StallProxy and keeps every byte the client sent (to read the SASL exchange)."""

    def __init__(self, port, target):
        self.sent = bytearray()
        self.lock = threading.Lock()
        super().__init__(port, target)

    def seen(self, data, from_client):
        if from_client:
            with self.lock:
                self.sent += data


@pytest.fixture(scope="module")
def auth_broker(tmp_path_factory):
    """tansu with `--authentication`, behind a RecordingProxy (advertised)."""
    with broker_behind_proxy(tmp_path_factory, "tansu-auth", RecordingProxy, ["--authentication"]) as b:
        yield b.bootstrap, b.proxy


@pytest.mark.slow
@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_scram_is_spoken_to_the_embedded_broker(mechanism, auth_broker, sim, topic_prefix, tmp_path):
    """The embedded broker (tansu 0.6.0) with `--authentication` accepts SCRAM-SHA-256/512 only for
    users stored in the broker, and users can only be added over an authenticated connection
    (`tansu user create` cannot authenticate, and PLAIN — the only mechanism that needs no stored
    user — is not built in: the broker drops the connection, NoSharedMechanism); storage is
    memory-only, so users cannot be created first and the broker restarted with authentication.
    So a successful login cannot be shown here. What is shown: the connector's settings reach the
    wire — a SaslHandshake naming the mechanism, a SCRAM client-first message with the user name,
    the password never in clear — and the refused login ends in a clear error and exit code 1."""
    bootstrap, proxy = auth_broker
    password = f"pw-{uuid.uuid4().hex}"
    user = f"svc-{uuid.uuid4().hex[:8]}"
    p = write_pipeline(
        tmp_path / "p.toml",
        stream_sections(
            topic_prefix,
            sim,
            bootstrap,
            tmp_path / "state",
            kafka={
                "security_protocol": "SASL_PLAINTEXT",
                "sasl_mechanism": mechanism,
                "sasl_plain_username": user,
                "sasl_plain_password": password,
            },
        ),
    )
    with proxy.lock:
        proxy.sent.clear()
    r = cli("run", str(p), "--once")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot reach Kafka at") and "SASL" in last, last
    with proxy.lock:
        wire = bytes(proxy.sent)
    assert mechanism.encode() in wire  # SaslHandshakeRequest
    assert b"n,,n=" + user.encode() + b",r=" in wire  # SCRAM client-first message
    assert password.encode() not in wire and password not in r.stderr + r.stdout


# ---- the metrics / health listener --------------------------------------------------------------


def test_metrics_listener_binds_to_loopback_unless_told_otherwise():
    cfg = parse_pipeline({"pipeline": {"name": "m"}, "tanium": {"host": "t.example.com", "api_key": "x"}})
    host, _, port = cfg.metrics.listen.rpartition(":")
    assert (host, port) == ("127.0.0.1", "9464")
    m = Metrics("m")
    servers = []
    try:
        for listen, expect in ((f"{host}:0", "127.0.0.1"), (":0", "127.0.0.1"), ("0.0.0.0:0", "0.0.0.0")):
            s = HealthServer(m, listen, lambda: (True, "ready")).start()
            servers.append(s)
            assert s.server.server_address[0] == expect, listen
            assert scrape(s.port, "/healthz")[0] == 200
    finally:
        for s in servers:
            s.stop()
