"""The dashboard and the alert rules against a real Prometheus scraping a real connector.

One stack per module: the TR simulator (with a 429, a 5xx, a garbage record and alerts with bad
field values, so the error panels have something to show), the embedded broker, the connector
started as `tanium-connector run FILE` (as the image does; the pipeline is a fleet's, run by this one
worker, so the Fleet row and the fleet rules have series), and Debian's `prometheus` binary
scraping it every second with the alert rules loaded. Then every dashboard query (with
$pipeline, $instance, $__rate_interval and $__range substituted) must parse and return data,
every alert expression must parse and evaluate cleanly in the rule manager, every connector
metric an alert rule needs must exist, and every label value the dashboard or a rule selects
(stage="sink", code_class=~"429|5xx", …) must occur in the connector's series. Queries on
kafka_exporter metrics are skipped (no kafka_exporter here).

A validation pipeline (`tanium-connector run` of a validation-mode file, against a simulator of
its own) is the second target of the same job. Fed one job action the simulator has an alert for
(detected) and one it has none for (missed), every Validation-row panel, selected for that
pipeline and instance, must return a real (non-NaN) value.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from helpers import write_pipeline
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from test_deploy import (
    ALERTS,
    alert_rules,
    connector_families,
    dashboard_queries,
    external_source,
    label_values_selector,
    metric_names,
    scrape,
    variable_queries,
)

from connector.timeutil import format_ts
from connector.tools.embedded import free_port

PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        PROMETHEUS is None,
        reason="prometheus not found: install Debian's prometheus package "
        "(apt-get install prometheus), as .ci/run does",
    ),
]
PIPELINE = "promtest"
VALIDATION = "promval"  # the validation pipeline's name
P = "tanium_connector_"
SETTLE = (
    "dlq_records_total",
    "records_dropped_total",
    "source_retries_total",
    "normalize_warnings_total",
    "checkpoint_timestamp_seconds",
    "sink_produce_duration_seconds_count",
)
GRACE = 5  # seconds a query may still take to show data once the stack has settled
JOB = "tanium-connector"
DEADLINE = 90  # seconds for the whole stack to show data; polled, never slept through


def _get(url: str, timeout: float = 5) -> tuple[int, dict | str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            body = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        body, status = e.read().decode(), e.code
    except OSError as e:  # not listening yet
        return 0, str(e)
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def wait_for(what: str, check, deadline: float, proc_logs=()):
    """Polls check() until it returns something truthy; fails naming `what` at the deadline."""
    while True:
        value = check()
        if value:
            return value
        for proc, log in proc_logs:
            if proc.poll() is not None:
                pytest.fail(f"{what}: {proc.args[0]} exited with {proc.returncode}:\n{Path(log).read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


class Stack:
    def __init__(self, prom_url: str, instance: str, deadline: float, logs):
        self.prom_url, self.instance, self.deadline, self.logs = prom_url, instance, deadline, logs
        # set by the fixture: the validation pipeline's instance, its simulator, broker and topics
        self.validation_instance = ""
        self.validation_sim = None
        self.bootstrap = ""
        self.jobs_topic = ""

    settled = 0.0

    def poll(self, expr: str, done) -> dict:
        """Queries until done(body) or the grace after settling is over; returns the last answer."""
        body = self.query(expr)
        while not done(body) and time.monotonic() < min(self.deadline, self.settled + GRACE):
            time.sleep(0.25)
            body = self.query(expr)
        return body

    def query(self, expr: str) -> dict:
        status, body = _get(f"{self.prom_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert isinstance(body, dict), f"HTTP {status}: {body}"
        return body

    def substitute(self, expr: str, pipeline: str = PIPELINE, instance: str | None = None) -> str:
        # instance "127.0.0.1:PORT" as a regex matches itself (the dots match any character)
        return (
            expr.replace("$__rate_interval", "10s")
            .replace("$__range", "1m")
            .replace("$pipeline", pipeline)
            .replace("$instance", instance or self.instance)
            .replace("$topic", ".*")
        )

    def logs_tail(self) -> str:
        return "\n".join(f"--- {Path(log).name}\n{Path(log).read_text()[-2000:]}" for _, log in self.logs)


@pytest.fixture(scope="module")
def stack(broker, tmp_path_factory):
    from connector.simulator import Simulator

    tmp = tmp_path_factory.mktemp("promlive")
    with (
        Simulator(port=0, alerts=300, intel_docs=8, seed=7, live_rate=5) as sim,
        Simulator(port=0, alerts=50, seed=5, hosts=20, history=86400) as vsim,
    ):
        # Error paths the dashboard shows: a 429 and a 503 (retries, rate-limited seconds, status
        # classes), a record that is not an object (DLQ, records dropped), bad field values (warnings).
        sim.faults.endpoints = {"alerts"}
        sim.faults.rate_limit_next = 1
        sim.faults.error_next = 1
        sim.inject(match_type="port", local_port="not-a-port", local_ip="not-an-ip")

        key = tmp / "api-key"
        key.write_text(sim.api_key + "\n")
        mport = free_port()
        topic = f"t{uuid.uuid4().hex[:10]}.events"
        pipeline = tmp / "pipeline.toml"
        pipeline.write_text(f"""
[pipeline]
name = "{PIPELINE}"
[tanium]
protocol = "http"
host = "127.0.0.1"
port = {sim.port}
api_key_file = "{key}"
poll_interval = 1
page_size = 100
max_retries = 3
[source]
start_from = "30d"
[kafka]
bootstrap_servers = "{broker.bootstrap}"
topic = "{topic}"
[state]
backend = "kafka"
topic = "{topic}.state"
[fleet]
group_id = "{topic}"
[metrics]
listen = "127.0.0.1:{mport}"
""")
        # Short windows: an action is judged over query_time = 6 s around its start, queried every 2 s.
        vport = free_port()
        vprefix = f"v{uuid.uuid4().hex[:10]}"
        jobs_topic = f"{vprefix}.jobs"
        vpipeline = write_pipeline(
            tmp / "validation.toml",
            {
                "pipeline": {"name": VALIDATION, "mode": "validation", "shutdown_timeout": 10},
                "tanium": vsim.settings(max_retries=1),
                "kafka": {"bootstrap_servers": broker.bootstrap, "linger_ms": 0},
                "metrics": {"listen": f"127.0.0.1:{vport}"},
                "validation": {
                    "query_time": 0.1,
                    "query_interval": 2,
                    "session_timeout": 6,
                    "job_actions_topic": jobs_topic,
                    "group_id": f"{vprefix}.group",
                    **{f"{k}_topic": f"{vprefix}.{k}" for k in ("results", "events", "suspicious", "devices")},
                },
            },
        )
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        try:
            admin.create_topics([NewTopic(jobs_topic, 1, 1)])
        finally:
            admin.close()

        files = []
        conn_log, val_log = tmp / "connector.log", tmp / "validation.log"
        conn = _run_connector(pipeline, conn_log, files)
        val = _run_connector(vpipeline, val_log, files)
        prom = None
        try:
            deadline = time.monotonic() + DEADLINE
            logs = [(conn, conn_log), (val, val_log)]
            wait_for("the connector's /healthz", lambda: _healthy(mport), deadline, logs)
            wait_for("the validation pipeline's /healthz", lambda: _healthy(vport), deadline, logs)
            # garbage only once the start-position search is over, so it lands in a real page
            wait_for("events published", lambda: _published(mport), deadline, logs)
            sim.faults.garbage_kinds = ("non_object",)
            sim.faults.garbage_next = 1

            pport = free_port()
            (tmp / "prometheus.yml").write_text(
                yaml.safe_dump(
                    {
                        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                        "rule_files": [str(ALERTS)],
                        "scrape_configs": [
                            {
                                "job_name": JOB,
                                "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in (mport, vport)]}],
                            }
                        ],
                    }
                )
            )
            prom_log = tmp / "prometheus.log"
            files.append(open(prom_log, "wb"))
            prom = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={tmp / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{pport}",
                    "--log.level=warn",
                ],
                stdout=files[-1],
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
            logs.append((prom, prom_log))
            s = Stack(f"http://127.0.0.1:{pport}", f"127.0.0.1:{mport}", deadline, logs)
            s.validation_instance, s.validation_sim = f"127.0.0.1:{vport}", vsim
            s.bootstrap, s.jobs_topic = broker.bootstrap, jobs_topic
            wait_for("Prometheus to be ready", lambda: _get(f"{s.prom_url}/-/ready")[0] == 200, deadline, logs)
            wait_for(
                "five successful scrapes of both connectors",
                lambda: len(
                    s.query(f'count_over_time(up{{job="{JOB}"}}[1m]) >= 5 and up{{job="{JOB}"}} == 1')["data"]["result"]
                )
                == 2,
                deadline,
                logs,
            )
            # Settled: the injected faults have been counted (these series exist at 0 from the
            # start) and scraped a few times. After that a query still without data gets a short
            # grace only (no waiting out the deadline).
            settle = [f'sum({P}{n}{{job="{JOB}"}}) > 0' for n in SETTLE]
            settle += [f'count_over_time({P}{n}{{job="{JOB}"}}[1m]) >= 3' for n in SETTLE]
            while time.monotonic() < deadline and not all(s.query(q)["data"]["result"] for q in settle):
                time.sleep(0.25)
            s.settled = time.monotonic()
            yield s
        finally:
            for p in (conn, val, prom):
                if p is not None and p.poll() is None:
                    p.terminate()
                    try:
                        p.wait(40)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
            for f in files:
                f.close()


def _run_connector(pipeline: Path, log: Path, files: list) -> subprocess.Popen:
    """`tanium-connector run PIPELINE` (as the image runs it), its output in `log`."""
    exe = Path(sys.executable).parent / "tanium-connector"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "connector.cli"]
    files.append(open(log, "wb"))
    return subprocess.Popen(
        [*cmd, "run", str(pipeline), "--log-format", "json"],
        stdout=files[-1],
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )


def _healthy(port: int) -> bool:
    try:
        return scrape(port, "/healthz")[0] == 200
    except OSError:
        return False


def _published(port: int) -> bool:
    text = scrape(port)[1]
    m = re.search(r'tanium_connector_records_sent_total\{[^}]*stage="sink"\} (\S+)', text)
    return bool(m and float(m.group(1)) > 0)


PANEL_QUERIES = dashboard_queries()


def _external(expr: str) -> list[str]:
    return sorted({f"{n} ({external_source(n)})" for n in metric_names(expr) if external_source(n) and n != "up"})


PANEL_IDS = [f"{r}/{t}/{i}" for i, (r, t, _) in enumerate(PANEL_QUERIES)]


@pytest.mark.parametrize("row,title,expr", PANEL_QUERIES, ids=PANEL_IDS)
def test_dashboard_query_returns_data(stack, row, title, expr):
    needs = _external(expr)
    if needs:
        pytest.skip(f"needs {', '.join(needs)}: kafka_exporter is not running here (it runs in deploy/compose.yaml)")
    q = stack.substitute(expr)
    body = stack.query(q)
    assert body["status"] == "success", f"{q}: {body.get('error')}"
    body = stack.poll(q, lambda b: b["data"]["result"])  # rates need two samples of a series
    assert body["data"]["result"], f"{row} / {title}: no data for\n{q}\n{stack.logs_tail()}"


@pytest.mark.parametrize("name,query", sorted(variable_queries().items()))
def test_dashboard_variable_has_values(stack, name, query):
    selector, label = label_values_selector(query)
    needs = _external(selector)
    if needs:
        pytest.skip(f"needs {', '.join(needs)}: kafka_exporter is not running here")
    status, body = _get(
        f"{stack.prom_url}/api/v1/label/{label}/values?"
        + urllib.parse.urlencode({"match[]": stack.substitute(selector)})
    )
    assert status == 200 and body["status"] == "success", body
    expected = {"pipeline": PIPELINE, "instance": stack.instance}[name]
    assert expected in body["data"]


@pytest.mark.parametrize("rule", alert_rules(), ids=[r["alert"] for r in alert_rules()])
def test_alert_expression_parses_and_evaluates(stack, rule):
    body = stack.query(rule["expr"])
    assert body["status"] == "success", f"{rule['alert']}: {body.get('error')}"


RULE_INPUTS = sorted({n for r in alert_rules() for n in metric_names(r["expr"]) if n.startswith("tanium_connector_")})


WORKER_LEVEL = {f for f, labels in connector_families().items() if "pipeline" not in labels}


@pytest.mark.parametrize("name", RULE_INPUTS)
def test_metric_an_alert_needs_is_exported(stack, name):
    """A rule on a series the running connector never exports can never fire. A worker's series
    (of its Kafka group, without a pipeline label) are looked for on the pipeline's instance."""
    which = f'instance="{stack.instance}"' if name.removesuffix("_total") in WORKER_LEVEL else f'pipeline="{PIPELINE}"'
    q = f'{name}{{job="{JOB}", {which}}}'
    body = stack.poll(q, lambda b: b["data"]["result"])
    users = [r["alert"] for r in alert_rules() if name in metric_names(r["expr"])]
    assert body["data"]["result"], f"{name} (used by {', '.join(users)}) is not exported by a running connector"


def _matched_values() -> list[tuple[str, str, str]]:
    """(metric, label, value) for every literal label value the dashboard and the rules select
    connector series by, e.g. code_class=~"429|5xx" → (…requests_total, code_class, 429), (…, 5xx)."""
    exprs = [e for _, _, e in PANEL_QUERIES] + [r["expr"] for r in alert_rules()]
    out = set()
    for expr in exprs:
        for name, body in re.findall(r"(tanium_connector_\w+)\{([^}]*)\}", expr):
            for label, _, value in re.findall(r'(\w+)\s*(=~|=)\s*"([^"]*)"', body):
                if label in ("pipeline", "instance", "job") or not re.fullmatch(r"\w+(\|\w+)*", value):
                    continue
                out |= {(name, label, v) for v in value.split("|")}
    return sorted(out)


@pytest.mark.parametrize("name,label,value", _matched_values())
def test_label_value_selected_by_dashboard_or_rules_exists(stack, name, label, value):
    """A selector on a label value the connector never uses would silently match nothing."""
    q = f'count by ({label}) ({name}{{job="{JOB}", pipeline="{PIPELINE}"}})'

    def values(body):
        return {r["metric"].get(label) for r in body["data"]["result"]}

    seen = values(stack.poll(q, lambda b: value in values(b)))
    assert value in seen, f'{name}{{{label}="{value}"}} never appears; the connector uses {sorted(seen)}'


def test_rules_evaluate_in_the_rule_manager_and_a_healthy_run_raises_no_outage(stack):
    def evaluated():
        status, body = _get(f"{stack.prom_url}/api/v1/rules")
        rules = [r for g in body["data"]["groups"] for r in g["rules"]]
        if len(rules) == len(alert_rules()) and all(not r["lastEvaluation"].startswith("0001") for r in rules):
            return rules
        return None

    rules = wait_for("every rule to be evaluated", evaluated, time.monotonic() + 30)
    bad = [f"{r['name']}: {r.get('lastError')}" for r in rules if r["health"] != "ok"]
    assert not bad, bad
    outage = {
        "TaniumConnectorDown",
        "TaniumConnectorMissing",
        "TaniumConnectorPollStale",
        "TaniumConnectorKafkaDeliveryFailures",
        "TaniumConnectorFleetPipelineUnowned",
        "TaniumConnectorFleetGone",
        "TaniumConnectorFleetWorkerOverloaded",
    }
    active = {r["name"] for r in rules if r["state"] in ("pending", "firing")}
    assert not active & outage, f"a healthy run raised {sorted(active & outage)}"


VALIDATION_QUERIES = [(r, t, e) for r, t, e in PANEL_QUERIES if r.split(" (")[0] == "Validation"]


@pytest.fixture(scope="module")
def verdicts(stack):
    """Two job actions for the validation pipeline, dated 10 minutes ago (so their windows run at
    once): one on a host the simulator has an alert for 4 s after the start (detected, latency 4 s),
    one on a host without alerts (missed). Returns once Prometheus has scraped both verdicts."""
    t = datetime.now(UTC) - timedelta(minutes=10)
    seen, unseen = (f"pv-{uuid.uuid4().hex[:6]}" for _ in range(2))
    stack.validation_sim.inject(computer_name=seen, alerted_at=t + timedelta(seconds=4))
    producer = KafkaProducer(bootstrap_servers=stack.bootstrap)
    try:
        for aid, host in (("pv-detected", seen), ("pv-missed", unseen)):
            action = {
                "id": aid,
                "job_id": "job-pv",
                "name": f"action {aid}",
                "type": "host_cli",
                "started_at": format_ts(t),
                "source": {"hostnames": [host]},
            }
            producer.send(stack.jobs_topic, key=aid.encode(), value=json.dumps(action).encode()).get(10)
    finally:
        producer.close()
    q = f'sum by (result) ({P}validation_verdicts_total{{pipeline="{VALIDATION}", result=~"detected|missed"}}) > 0'
    wait_for(
        "Prometheus to scrape a detected and a missed verdict",
        lambda: len(stack.query(q)["data"]["result"]) == 2,
        time.monotonic() + 45,
        stack.logs,
    )
    return {"detected", "missed"}


@pytest.mark.parametrize("row,title,expr", VALIDATION_QUERIES, ids=[t for _, t, _ in VALIDATION_QUERIES])
def test_validation_panel_shows_real_values_of_a_validation_pipeline(stack, verdicts, row, title, expr):
    q = stack.substitute(expr, VALIDATION, stack.validation_instance)

    def real(body) -> bool:
        values = [float(r["value"][1]) for r in body["data"]["result"]]
        return bool(values) and all(math.isfinite(v) for v in values)

    body = stack.poll(q, real)
    assert body["status"] == "success", f"{q}: {body.get('error')}"
    assert real(body), f"{row} / {title}: no real value for\n{q}\n{body['data']['result']}\n{stack.logs_tail()}"


def test_verdicts_in_range_panel_counts_each_result(stack, verdicts):
    (expr,) = [e for _, t, e in VALIDATION_QUERIES if t.startswith("Verdicts in range")]
    body = stack.query(stack.substitute(expr, VALIDATION, stack.validation_instance))
    counts = {r["metric"]["result"]: float(r["value"][1]) for r in body["data"]["result"]}
    assert {r for r, n in counts.items() if n >= 1} == verdicts, counts
