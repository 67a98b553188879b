"""Edges around the stream pipeline, on the real broker, the simulator and the CLI in subprocesses:
a slow IntelDoc endpoint does not hold alerts back (enrich.timeout); a proxy password never shows;
`check` takes the route `run` takes (environment proxies, NO_PROXY); `--dry-run` keeps stdout for
events and ends normally when its reader leaves; /healthz reports a hung poll loop; the freshness
histogram measures createdAt to Kafka acknowledgement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    Cli,
    ForwardProxy,
    Running,
    ids_of,
    make_cfg,
    metric,
    read_topic,
    scrape,
    stream_sections,
    wait_until,
    write_pipeline,
)

from connector.tools.embedded import free_port

RETRY_AFTER = 5  # seconds: every first /intels request is answered 429 with this Retry-After


def test_slow_intel_docs_do_not_hold_alerts_back(broker, sim, topic_prefix, tmp_path):
    """Every doc's first lookup is rate limited for 5 s; enrich.timeout is 0.5 s. All 300 alerts are
    published before any lookup has finished (so none waited for one), each carries the
    enrichment warning, and an alert that arrives later is enriched from the background lookup."""
    docs = len(sim.intel_doc_ids)
    sim.faults.endpoints = {"intel"}
    sim.faults.rate_limit_next = docs
    sim.faults.retry_after = str(RETRY_AFTER)
    cfg = make_cfg(sim, broker.bootstrap, topic_prefix, tmp_path, enrich={"timeout": 0.5})
    with Running(cfg) as run:
        wait_until(lambda: run.pipe.summary.published == 300, timeout=RETRY_AFTER, what="300 alerts published")
        assert run.pipe.enricher.stats["entries"] == 0, "published before any IntelDoc lookup finished"
        wait_until(lambda: run.pipe.enricher.stats["entries"] == docs, timeout=30, what="the background lookups")
        late = sim.inject(intel_doc_id=sim.intel_doc_ids[0])
        wait_until(lambda: run.pipe.summary.published == 301, what="the later alert published")
    records = read_topic(broker.bootstrap, cfg.kafka.topic, expect=301)
    assert sorted(ids_of(records)) == list(range(1, 302))
    events = {e["raw"]["id"]: e for e in (json.loads(r.value) for r in records)}
    for i in range(1, 301):
        warnings = events[i]["normalization_warnings"]
        assert any(w.startswith("intelDoc: ") and "enrich.timeout" in w for w in warnings), (i, warnings)
        assert "intelDoc" not in events[i]["raw"]
    later = events[late["id"]]
    assert later["raw"]["intelDoc"]["id"] == sim.intel_doc_ids[0] and later["normalization_warnings"] == []
    assert sim.stats["intel"] == 2 * docs, "one 429 and one answer per doc: no lookup was started twice"


# ---- proxy passwords never show ------------------------------------------------------------------

PROXY_PASSWORD = "pr0xy-PASS"


PROXY_VARS = {"http_proxy", "https_proxy", "no_proxy", "all_proxy"}  # either case


def cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The connector CLI with the proxy variables of this environment removed and `env` added."""
    clean = {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARS}
    return subprocess.run(
        [sys.executable, "-m", "connector.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**clean, **(env or {})},
    )


def test_validate_config_check_and_a_failing_run_never_show_the_proxy_password(sim, tmp_path):
    dead = f"http://alice:{PROXY_PASSWORD}@127.0.0.1:{free_port()}"
    path = write_pipeline(
        tmp_path / "p.toml",
        {
            "pipeline": {"name": "masked"},
            "tanium": {**sim.settings(), "proxy": dead, "max_retries": 0, "timeout": 2},
            "state": {"path": str(tmp_path / "state")},
        },
    )
    shown = cli("validate-config", str(path), env=None)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["tanium"]["proxy"].startswith("http://***@127.0.0.1:")
    checked = cli("check", str(path), env=None)
    assert checked.returncode == 1 and "proxy" in checked.stdout
    ran = cli("--log-level", "debug", "run", str(path), "--dry-run", "--once", env=None)
    assert ran.returncode == 1 and "Tanium poll failed" in ran.stderr
    # the same proxy from the environment instead of the file
    path.write_text(path.read_text().replace(f'proxy = "{dead}"\n', ""))
    env = {"HTTP_PROXY": dead}
    env_checked = cli("check", str(path), env=env)
    env_ran = cli("--log-level", "debug", "run", str(path), "--dry-run", "--once", env=env)
    assert env_checked.returncode == 1 and env_ran.returncode == 1
    for r in (shown, checked, ran, env_checked, env_ran):
        assert PROXY_PASSWORD not in r.stdout + r.stderr, r.args
        assert "Traceback" not in r.stderr, r.args


# ---- check takes the route run takes -------------------------------------------------------------

INTERNAL = "tanium.internal.invalid"  # a name only the proxy resolves


def test_check_goes_through_the_environment_proxy_as_run_does(sim, tmp_path):
    """The Tanium host is reachable only through HTTP_PROXY: run works, and so does check. With the
    host in NO_PROXY both go direct, and check says the name does not resolve."""
    proxy = ForwardProxy(hosts={INTERNAL: "127.0.0.1"})
    try:
        path = write_pipeline(
            tmp_path / "p.toml",
            {
                "pipeline": {"name": "envproxy"},
                "tanium": {**sim.settings(host=INTERNAL), "max_retries": 0, "timeout": 5},
                "state": {"path": str(tmp_path / "state")},
            },
        )
        env = {"HTTP_PROXY": proxy.url}
        ran = cli("run", str(path), "--dry-run", "--once", env=env)
        assert ran.returncode == 0, ran.stderr
        assert len(ran.stdout.splitlines()) == 300
        checked = cli("check", str(path), env=env)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        lines = checked.stdout.splitlines()
        assert lines[-1] == "Healthy"
        assert any(line.startswith("ok") and " proxy " in line and proxy.url in line for line in lines), lines
        assert any(line.startswith("ok") and " credentials " in line for line in lines)
        assert proxy.seen and all(target.startswith(f"http://{INTERNAL}:") for target, _ in proxy.seen)

        bypass = {**env, "NO_PROXY": INTERNAL}
        direct = cli("check", str(path), env=bypass)
        assert direct.returncode == 1
        assert f"Unhealthy: tcp: cannot resolve host '{INTERNAL}'" in direct.stdout
        assert cli("run", str(path), "--dry-run", "--once", env=bypass).returncode == 1
    finally:
        proxy.close()


def test_check_names_an_unreachable_environment_proxy(sim, tmp_path):
    path = write_pipeline(
        tmp_path / "p.toml", {"pipeline": {"name": "deadproxy"}, "tanium": {**sim.settings(), "max_retries": 0}}
    )
    port = free_port()
    r = cli("check", str(path), env={"HTTP_PROXY": f"http://127.0.0.1:{port}"})
    assert r.returncode == 1
    last = r.stdout.splitlines()[-1]
    assert last.startswith(f"Unhealthy: proxy: connection refused by the proxy http://127.0.0.1:{port}"), last
    assert "HTTP_PROXY" in last and "NO_PROXY" in last


# ---- --dry-run: stdout carries events only, and a closed stdout is a normal end ----------------


def dry_run_pipeline(sim, tmp_path) -> Path:
    return write_pipeline(
        tmp_path / "dry.toml",
        {"pipeline": {"name": "dry"}, "tanium": sim.settings(), "state": {"path": str(tmp_path / "state")}},
    )


def test_dry_run_into_a_pipe_closed_early_ends_normally(sim, tmp_path):
    """`run --dry-run --once … | head -1`: the reader leaves after one line; exit 0, no traceback."""
    path = dry_run_pipeline(sim, tmp_path)
    clean = {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARS}
    proc = subprocess.Popen(
        [sys.executable, "-m", "connector.cli", "run", str(path), "--dry-run", "--once"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean,
    )
    first = proc.stdout.readline()
    proc.stdout.close()  # as head does after its line
    _, err = proc.communicate(timeout=60)
    assert json.loads(first)["raw"]["id"] == 1
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err and b"BrokenPipeError" not in err
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").iterdir()), "dry run wrote a checkpoint"


def test_dry_run_sends_dead_letter_records_to_stderr(sim, tmp_path):
    bad = sim.inject(fields={"guid": 12345})  # alert 301: a guid that is not text goes to the DLQ
    r = cli("run", str(dry_run_pipeline(sim, tmp_path)), "--dry-run", "--once", "--log-format", "json")
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(events) == 300 and all(e["schema_version"] and e["raw"]["id"] > 0 for e in events)
    logged = [json.loads(line) for line in r.stderr.splitlines()]
    dead = [x for x in logged if "dead-letter" in x["msg"]]
    assert len(dead) == 1 and dead[0]["level"] == "warning"
    msg = dead[0]["msg"]
    assert "dry-run.dlq" in msg
    record = json.loads(msg[msg.index("{") :])
    assert record["reason"].startswith("bad id") and json.loads(record["raw"])["id"] == bad["id"]


# ---- /healthz: a poll loop that makes no progress is reported dead -------------------------------

LIVENESS = 1.5  # pipeline.liveness_timeout in the test (the default is minutes)
STALL = 6  # seconds the simulator holds one alerts request without answering (tanium.timeout is 10)


def test_healthz_fails_while_the_poll_loop_hangs_and_recovers_after(broker, sim, topic_prefix, tmp_path):
    """`run` as deployed: while one Tanium request hangs longer than pipeline.liveness_timeout,
    /healthz answers 503 (an orchestrator restarts the process); once the loop polls again, 200."""
    port = free_port()
    path = write_pipeline(
        tmp_path / "p.toml",
        stream_sections(
            topic_prefix,
            sim,
            broker.bootstrap,
            tmp_path / "state",
            metrics_port=port,
            pipeline={"liveness_timeout": LIVENESS},
            tanium={"timeout": 10, "max_retries": 0},
        ),
    )
    run = Cli(["run", str(path)], tmp_path / "run.log")
    try:
        wait_until(
            lambda: not run.alive or (metric(scrape(port)[1], "records_sent_total", stage="sink") or 0) >= 300,
            timeout=60,
            what="300 alerts published",
        )
        assert run.alive, run.logs()
        assert scrape(port, "/healthz") == (200, "ok\n")
        sim.faults.endpoints = {"alerts"}
        sim.faults.stall_seconds = STALL
        sim.faults.stall_next = 1
        wait_until(lambda: scrape(port, "/healthz")[0] == 503, timeout=STALL, what="/healthz 503 during the hang")
        status, why = scrape(port, "/healthz")
        assert status == 503 and "no poll attempt" in why and f"{LIVENESS:g}s" in why, why
        wait_until(lambda: scrape(port, "/healthz")[0] == 200, timeout=STALL + 10, what="/healthz 200 again")
        assert run.alive
    finally:
        run.stop()
    assert "Tanium poll failed" in run.logs()  # the hung request ended as a failed poll, then polling went on


def test_healthz_answers_what_the_liveness_callable_says():
    from connector.metrics import HealthServer, Metrics

    state = {"alive": (True, "ok")}
    server = HealthServer(Metrics("h"), "127.0.0.1:0", lambda: (True, "ready"), lambda: state["alive"]).start()
    try:
        assert scrape(server.port, "/healthz") == (200, "ok\n")
        state["alive"] = (False, "no poll attempt for 9s")
        assert scrape(server.port, "/healthz") == (503, "no poll attempt for 9s\n")
    finally:
        server.stop()


# ---- freshness: createdAt → Kafka acknowledgement -------------------------------------------------


@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
def test_freshness_histogram_observes_each_event_from_created_at_to_its_ack(
    delivery, broker, sim, topic_prefix, tmp_path
):
    """One observation per published event (DLQ records are not events) when Kafka confirms it (or
    commits its transaction), each between the time the pipeline started and the time the last
    event was confirmed, counted from the alert's createdAt."""
    from connector.timeutil import parse_ts

    sim.inject(fields={"guid": 12345})  # alert 301 goes to the DLQ
    created = [parse_ts(sim.get_alert(i)["createdAt"]).timestamp() for i in range(1, 301)]
    over = {"pipeline": {"delivery": delivery}, "state": {"backend": "kafka", "topic": f"{topic_prefix}.state"}}
    cfg = make_cfg(sim, broker.bootstrap, topic_prefix, tmp_path, **(over if delivery == "exactly-once" else {}))
    started = time.time()
    with Running(cfg) as run:
        wait_until(lambda: run.pipe.summary.published == 300 and run.pipe.summary.dlq == 1, what="all delivered")
        confirmed = time.time()
        m = run.metrics
    count = m.registry.get_sample_value("tanium_connector_freshness_seconds_count", {"pipeline": topic_prefix})
    total = m.registry.get_sample_value("tanium_connector_freshness_seconds_sum", {"pipeline": topic_prefix})
    assert count == 300
    assert sum(started - c for c in created) <= total <= sum(confirmed - c for c in created)
