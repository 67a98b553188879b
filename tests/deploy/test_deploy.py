"""deploy/: the Dockerfile, the compose stack, the Kubernetes manifests and the Grafana dashboard
hang together and point at things the connector really has (subcommands, endpoints, ports,
metric names, labels). No container engine or cluster here: structure is checked with PyYAML,
the CLI's own parser, the pipeline loader and a real /metrics listener.

Helpers at the top are shared with tests/deploy/test_prometheus.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import pytest
import yaml

from connector.cli import build_parser
from connector.config import parse_pipeline
from connector.metrics import HealthServer, Metrics
from connector.stream.fleet import check_together, group_members, pipeline_files
from connector.tools.embedded import free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "tanium-connector.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
K8S = DEPLOY / "kubernetes"
ROWS = [
    "Overview",
    "Tanium API",
    "Enrichment",
    "Normalize",
    "Kafka sink",
    "Validation",
    "Downstream",
    "Fleet",
    "Process",
]
# Metrics that come from elsewhere than the connector's /metrics.
EXTERNAL = {"up": "Prometheus (scrape status)", "kafka_": "kafka_exporter"}


# ---- shared helpers -------------------------------------------------------------------------


def load_yaml(path: Path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_yaml_all(path: Path) -> list:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def dashboard_panels(dash: dict | None = None) -> list[dict]:
    """Every non-row panel, including panels nested in collapsed rows, with its row title."""
    out, row = [], None
    for p in (dash or dashboard())["panels"]:
        if p["type"] == "row":
            row = p["title"]
            for inner in p.get("panels", []):
                out.append({**inner, "_row": row})
        else:
            out.append({**p, "_row": row})
    return out


def dashboard_queries(dash: dict | None = None) -> list[tuple[str, str, str]]:
    """(row, panel title, expr) for every panel target."""
    return [(p["_row"], p["title"], t["expr"]) for p in dashboard_panels(dash) for t in p.get("targets", [])]


def variable_queries(dash: dict | None = None) -> dict[str, str]:
    out = {}
    for v in (dash or dashboard())["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]
            out[v["name"]] = q["query"] if isinstance(q, dict) else q
    return out


def alert_rules() -> list[dict]:
    return [r for g in load_yaml(ALERTS)["groups"] for r in g["rules"]]


_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "offset",
    "bool",
    "inf",
    "nan",
}


def _strip(expr: str) -> str:
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (matcher values)
    s = re.sub(r"\[[^\]]*\]", "", s)  # ranges and subqueries
    return s


def metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (not functions, keywords or label names)."""
    s = re.sub(r"\{[^}]*\}", "", _strip(expr))
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.:$])[A-Za-z_:][\w:]*", s):
        if s[m.end() :].lstrip().startswith("(") or m.group(0).lower() in _KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def label_names(expr: str) -> dict[str, set[str]]:
    """{'matchers': labels used in {…} per selector, 'grouping': labels in by/on/… clauses}."""
    s = _strip(expr)
    matchers = set()
    for body in re.findall(r"\{([^}]*)\}", s):
        matchers |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", body))
    grouping = set()
    for body in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", s):
        grouping |= {x.strip() for x in body.split(",") if x.strip()}
    return {"matchers": matchers, "grouping": grouping}


def label_values_selector(query: str) -> tuple[str, str]:
    """Grafana's label_values(SELECTOR, LABEL) → (SELECTOR, LABEL)."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", query)
    assert m, f"unsupported variable query {query!r}"
    return m.group(1), m.group(2)


def external_source(name: str) -> str | None:
    for prefix, source in EXTERNAL.items():
        if name == prefix or (prefix.endswith("_") and name.startswith(prefix)):
            return source
    return None


def all_expressions() -> list[tuple[str, str]]:
    """(where, expr) for the dashboard panels, its variables and the alert rules."""
    out = [(f"dashboard {row} / {title}", e) for row, title, e in dashboard_queries()]
    out += [(f"dashboard variable ${n}", label_values_selector(q)[0]) for n, q in variable_queries().items()]
    out += [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]
    return out


def exposed_names(text: str) -> set[str]:
    """Sample names a scrape of `text` yields, including those of families without children yet."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif line and not line.startswith("#"):
            names.add(re.match(r"[A-Za-z_:][\w:]*", line).group(0))
    return names


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def subcommands() -> dict[str, object]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return dict(action.choices)


def pipeline_with_key_file(text: str, tmp_path: Path) -> object:
    """Validates a deploy pipeline file with the connector's loader; the mounted key file is
    replaced by a temporary one (the mount path does not exist here)."""
    raw = tomllib.loads(text)
    key = tmp_path / "api-key"
    key.write_text("token-test\n")
    assert raw["tanium"].get("api_key_file"), "deploy pipelines read the API key from a mounted file"
    raw["tanium"]["api_key_file"] = str(key)
    return parse_pipeline(raw, "deploy pipeline")


def listen_port(listen: str) -> int:
    return int(listen.rpartition(":")[2])


# ---- helper self-checks (a broken extractor would make the name tests pass vacuously) ----------


def test_promql_name_and_label_extraction():
    expr = (
        'histogram_quantile(0.95, sum by (le, endpoint) (rate(foo_seconds_bucket{pipeline=~"$p", '
        'code!~"5.."}[$__rate_interval]))) / on(pipeline) group_left bar_total offset 5m > 1e3 '
        'and time() - baz > 3 * qux{x="a{b}"}'
    )
    assert metric_names(expr) == {"foo_seconds_bucket", "bar_total", "baz", "qux"}
    labels = label_names(expr)
    assert labels["matchers"] == {"pipeline", "code", "x"}
    assert labels["grouping"] == {"le", "endpoint", "pipeline"}
    assert label_values_selector('label_values(m{a=~"$b"}, instance)') == ('m{a=~"$b"}', "instance")
    text = '# TYPE h histogram\n# TYPE c_total counter\nc_total{a="1"} 2\n'
    assert exposed_names(text) == {"h", "h_bucket", "h_sum", "h_count", "c_total"}


# ---- Dockerfile -------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in (DEPLOY / "Dockerfile").read_text(encoding="utf-8").splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def instr(name: str) -> list[str]:
    return [args for word, args in dockerfile() if word == name]


def test_dockerfile_base_user_port_entrypoint():
    assert instr("FROM") == ["python:3.11-slim"]
    user = instr("USER")[-1].split(":")[0]
    assert user not in ("", "0", "root"), "the image must not run as root"
    assert "9464" in instr("EXPOSE")[0].split()
    entry = json.loads(instr("ENTRYPOINT")[-1])
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert entry == ["tanium-connector"] and "tanium-connector" in pyproject["project"]["scripts"]
    cmd = json.loads(instr("CMD")[-1])
    assert cmd[0] in subcommands(), f"CMD runs unknown subcommand {cmd[0]!r}"
    build_parser().parse_args(cmd)  # the default command line is accepted by the real CLI


def test_dockerfile_copies_existing_files_and_bakes_no_secret():
    for args in instr("COPY"):
        parts = [p for p in args.split() if not p.startswith("--")]
        for src in parts[:-1]:
            assert (ROOT / src).exists(), f"COPY source {src} does not exist in the repository"
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    for needed in ("pyproject.toml", "README.md", "connector/"):
        assert f"!{needed}" in ignore, f"{needed} is copied by the Dockerfile but excluded from the context"
    for word, args in dockerfile():
        if word in ("ENV", "ARG", "LABEL"):
            assert not re.search(r"(?i)(api_?key|token|password|secret)\s*=", args), f"{word} {args}"
    assert not (ROOT / "deploy" / "Dockerfile").read_text().count("token-demo")


def test_dockerfile_healthcheck_asks_healthz_for_real(tmp_path):
    hc = instr("HEALTHCHECK")[0]
    cmd = json.loads(hc[hc.index("CMD") + 3 :].strip())
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(instr("ENV"))))
    url = env["HEALTHCHECK_URL"]
    assert re.fullmatch(r"http://127\.0\.0\.1:9464/healthz", url)
    assert cmd[0] == "python"
    # run the exact command against a real listener, then against a port nobody listens on
    m = Metrics("hc")
    server = HealthServer(m, f"127.0.0.1:{free_port()}", lambda: (False, "not yet")).start()
    try:
        ok = subprocess.run(
            [sys.executable, *cmd[1:]],
            capture_output=True,
            timeout=30,
            env={**os.environ, "HEALTHCHECK_URL": f"http://127.0.0.1:{server.port}/healthz"},
        )
        assert ok.returncode == 0, ok.stderr
    finally:
        server.stop()
    down = subprocess.run(
        [sys.executable, *cmd[1:]],
        capture_output=True,
        timeout=30,
        env={**os.environ, "HEALTHCHECK_URL": f"http://127.0.0.1:{free_port()}/healthz"},
    )
    assert down.returncode != 0


# ---- compose ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(DEPLOY / "compose.yaml")


def _bind_mounts(service: dict) -> list[tuple[Path, str]]:
    out = []
    for v in service.get("volumes", []):
        src, _, rest = v.partition(":")
        if src.startswith("."):
            out.append(((DEPLOY / src).resolve(), rest.split(":")[0]))
    return out


def _by_command(compose, command: str) -> dict[str, object]:
    """{service: parsed command line} of the services running `tanium-connector COMMAND`."""
    out = {}
    for name, service in compose["services"].items():
        if service.get("build") and service["command"][0] == command:
            out[name] = build_parser().parse_args(service["command"])
    return out


def test_compose_has_the_whole_stack(compose):
    s = compose["services"]
    assert s["kafka"]["image"].startswith("apache/kafka:")
    env = s["kafka"]["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}  # KRaft, no ZooKeeper
    assert str(env["KAFKA_CONTROLLER_QUORUM_VOTERS"]).startswith(f"{env['KAFKA_NODE_ID']}@kafka:")
    assert s["kafka-exporter"]["image"].startswith("danielqsj/kafka-exporter:")
    assert any("kafka:9092" in a for a in s["kafka-exporter"]["command"])
    assert s["prometheus"]["image"].startswith("prom/prometheus:")
    assert s["grafana"]["image"].startswith("grafana/grafana:")
    built = [name for name, service in s.items() if service.get("build")]
    assert len(_by_command(compose, "simulate")) == 3 and len(_by_command(compose, "run")) == 2
    assert len(built) == 5, built
    for name in built:
        build = s[name]["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"


def test_compose_commands_are_real_subcommands(compose):
    """Three simulators listening for the other containers; two workers running one mounted
    directory of pipeline files."""
    s = compose["services"]
    for name, sim in _by_command(compose, "simulate").items():
        assert sim.host == "0.0.0.0", name
        assert s[name].get("healthcheck"), f"{name}: the workers wait for it to be healthy"
    sources = set()
    for name, run in _by_command(compose, "run").items():
        (folder,) = run.pipeline
        mounts = {dst: src for src, dst in _bind_mounts(s[name])}
        assert folder in mounts and mounts[folder].is_dir(), f"{name}: the pipeline directory is not mounted"
        sources.add(mounts[folder])
        assert set(_by_command(compose, "simulate")) <= set(s[name]["depends_on"]), name
    assert len(sources) == 1, "the workers of a fleet run the same directory"


def test_compose_files_exist(compose):
    for name, service in compose["services"].items():
        for src, _ in _bind_mounts(service):
            assert src.exists(), f"{name}: mounted file {src} does not exist"
    for name, secret in compose["secrets"].items():
        assert (DEPLOY / secret["file"]).is_file(), f"secret {name}: {secret['file']} missing"


def _compose_fleet(compose) -> tuple[list[str], Path]:
    """The worker services and the pipeline directory they run."""
    workers = _by_command(compose, "run")
    name, run = next(iter(workers.items()))
    mounts = {dst: src for src, dst in _bind_mounts(compose["services"][name])}
    return sorted(workers), mounts[run.pipeline[0]]


def test_compose_fleet_points_at_the_compose_services(compose, tmp_path):
    """The pipeline files load as one fleet (the checks of `run DIR`), each reads its own simulator
    with a key the simulator accepts from a secret the workers have, Kafka by its advertised name,
    metrics where Prometheus scrapes both workers; the SIEM stand-in reads every events topic."""
    s = compose["services"]
    workers, folder = _compose_fleet(compose)
    files = pipeline_files([str(folder)])
    assert len(files) == 3
    named = [(f, pipeline_with_key_file(f.read_text(), tmp_path)) for f in files]
    check_together(named)
    cfgs = [cfg for _, cfg in named]
    assert len(group_members(cfgs, None)) == 1, "one fleet"
    sims = _by_command(compose, "simulate")
    assert sorted((cfg.tanium.host, cfg.tanium.port) for cfg in cfgs) == sorted((n, a.port) for n, a in sims.items())
    advertised = s["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    (consumer,) = re.findall(r"--include '([^']+)'", " ".join(s["downstream-consumer"]["command"]))
    for f, cfg in named:
        key_file = tomllib.loads(f.read_text())["tanium"]["api_key_file"]
        secret = key_file.removeprefix("/run/secrets/")
        assert all(secret in s[w]["secrets"] for w in workers), f"{f.name}: {secret} is not given to every worker"
        key = (DEPLOY / compose["secrets"][secret]["file"]).read_text().strip()
        assert key == (sims[cfg.tanium.host].api_key or "token-demo"), f"{f.name}: the simulator rejects the key"
        for server in cfg.kafka.bootstrap_servers:
            assert f"//{server}" in advertised, f"{server} is not an advertised Kafka listener"
        assert cfg.state.backend == "kafka", "the workers share checkpoints through Kafka"
        assert re.fullmatch(consumer, cfg.kafka.topic), f"the SIEM stand-in does not read {cfg.kafka.topic}"
    # one listener per worker, reachable from Prometheus, which scrapes every worker
    (listen,) = {cfg.metrics.listen for cfg in cfgs}
    host, _, port = listen.rpartition(":")
    assert host == "0.0.0.0"
    prom = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "tanium-connector")
    assert job["static_configs"][0]["targets"] == [f"{w}:{port}" for w in workers]
    published = [p for w in workers for p in s[w]["ports"]]
    assert all(p.endswith(f":{port}") for p in published) and len(set(published)) == len(workers)


def test_compose_prometheus_and_grafana_wiring(compose):
    s = compose["services"]
    prom = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    prom_mounts = {dst: src for src, dst in _bind_mounts(s["prometheus"])}
    assert prom_mounts["/etc/prometheus/prometheus.yml"] == DEPLOY / "prometheus" / "prometheus.yml"
    for rule_file in prom["rule_files"]:
        assert prom_mounts.get(rule_file) == ALERTS, f"rule file {rule_file} is not alerts.yml"
    targets = {j["job_name"]: j["static_configs"][0]["targets"] for j in prom["scrape_configs"]}
    assert targets["kafka-exporter"] == ["kafka-exporter:9308"]

    graf = {dst: src for src, dst in _bind_mounts(s["grafana"])}
    ds_dir = graf["/etc/grafana/provisioning/datasources"]
    (ds,) = [d for f in sorted(ds_dir.glob("*.yml")) for d in load_yaml(f)["datasources"]]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    assert ds["jsonData"]["timeInterval"] == prom["global"]["scrape_interval"]
    dash_dir = graf["/etc/grafana/provisioning/dashboards"]
    (provider,) = [p for f in sorted(dash_dir.glob("*.yml")) for p in load_yaml(f)["providers"]]
    mounted = [dst for dst, src in graf.items() if src == DASHBOARD]
    assert mounted and mounted[0].startswith(provider["options"]["path"] + "/")


# ---- Kubernetes -------------------------------------------------------------------------------


def kustomize_docs(root: Path) -> list[dict]:
    """The documents a kustomization lists (files, and other kustomizations' directories, followed)
    and the ConfigMaps its configMapGenerator makes, read without kustomize: names without the hash
    suffix, no namespace. test_k8s_*_renders checks the real rendering where kubectl exists."""
    kust = load_yaml(root / "kustomization.yaml")
    docs = []
    for res in kust.get("resources", []):
        path = (root / res).resolve()
        if path.is_dir():
            docs += kustomize_docs(path)
            continue
        assert path.is_file(), f"{root}/kustomization.yaml lists {res}, which does not exist"
        for d in load_yaml_all(path):
            assert d.get("apiVersion") and d.get("kind") and d["metadata"].get("name"), f"{res}: incomplete"
            docs.append(d)
    for gen in kust.get("configMapGenerator", []):
        data = {Path(f).name: (root / f).read_text(encoding="utf-8") for f in gen["files"]}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    return docs


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict]:
    docs = {}
    for d in kustomize_docs(K8S):
        assert d["kind"] not in docs, f"two {d['kind']}s in {K8S}"
        docs[d["kind"]] = d
    return docs


def _container(k8s) -> dict:
    (c,) = k8s["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def _k8s_pipeline(k8s, tmp_path):
    c = _container(k8s)
    run = build_parser().parse_args(c["args"])
    assert run.command == "run"
    (path,) = run.pipeline
    mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    vol = next(v for v in k8s["Deployment"]["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert vol["configMap"]["name"] == k8s["ConfigMap"]["metadata"]["name"]
    text = k8s["ConfigMap"]["data"][path[len(mount["mountPath"]) + 1 :]]
    return text, pipeline_with_key_file(text, tmp_path)


def test_k8s_deployment_probes_hit_the_connector_endpoints(k8s, tmp_path):
    c = _container(k8s)
    _, cfg = _k8s_pipeline(k8s, tmp_path)
    host, port = cfg.metrics.listen.rpartition(":")[0], listen_port(cfg.metrics.listen)
    assert host == "0.0.0.0", "probes and Prometheus connect from outside the pod"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = c[probe]["httpGet"]
        assert get["path"] == path
        assert ports.get(get["port"], get["port"]) == port
    # the paths answer on a real listener as the probes expect (readyz 503 until ready)
    ready = {"ok": False}
    m = Metrics("probe")
    server = HealthServer(m, f"127.0.0.1:{free_port()}", lambda: (ready["ok"], "waiting")).start()
    try:
        assert scrape(server.port, "/healthz")[0] == 200
        assert scrape(server.port, "/readyz")[0] == 503
        ready["ok"] = True
        assert scrape(server.port, "/readyz")[0] == 200
    finally:
        server.stop()


def test_k8s_deployment_is_hardened_and_bounded(k8s, tmp_path):
    dep = k8s["Deployment"]
    spec = dep["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    c = _container(k8s)
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind])
    _, cfg = _k8s_pipeline(k8s, tmp_path)
    if cfg.state.backend == "file":  # a read-only root needs a writable volume for checkpoints
        assert any(cfg.state.path.startswith(m["mountPath"]) and not m.get("readOnly") for m in c["volumeMounts"])
    else:
        assert cfg.state.backend == "kafka" and cfg.kafka is not None
    assert pod["terminationGracePeriodSeconds"] > cfg.pipeline.shutdown_timeout


def test_k8s_api_key_comes_from_a_secret(k8s, tmp_path):
    text, _ = _k8s_pipeline(k8s, tmp_path)
    key_path = tomllib.loads(text)["tanium"]["api_key_file"]
    c = _container(k8s)
    mount = next(m for m in c["volumeMounts"] if key_path.startswith(m["mountPath"] + "/"))
    vol = next(v for v in k8s["Deployment"]["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    items = {i["path"]: i["key"] for i in vol["secret"]["items"]}
    assert key_path[len(mount["mountPath"]) + 1 :] in items and vol["secret"]["secretName"]
    assert "Secret" not in k8s, "the API key Secret is created by the operator, never committed"
    assert "api_key" not in tomllib.loads(text)["tanium"], "no key in the ConfigMap"


def test_k8s_service_and_servicemonitor_select_the_metrics_port(k8s):
    pod_labels = k8s["Deployment"]["spec"]["template"]["metadata"]["labels"]
    svc = k8s["Service"]
    assert svc["metadata"]["name"] == "tanium-connector", "the Service name is the job label the alerts use"
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in _container(k8s)["ports"]}
    sm = k8s["ServiceMonitor"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] == port["name"] and ep["path"] == "/metrics"


def test_k8s_prometheusrule_equals_alerts_yml(k8s):
    assert k8s["PrometheusRule"]["spec"]["groups"] == load_yaml(ALERTS)["groups"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed (kustomize render skipped)")
def test_k8s_kustomization_renders():
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert {d["kind"] for d in docs} == {"ConfigMap", "Deployment", "Service", "ServiceMonitor", "PrometheusRule"}
    assert all(d["metadata"]["namespace"] == "tanium-connector" for d in docs)


# ---- Kubernetes: the fleet example ------------------------------------------------------------

FLEET = K8S / "fleet"


@pytest.fixture(scope="module")
def fleet() -> dict[str, list[dict]]:
    """The fleet example's documents by kind."""
    out: dict[str, list[dict]] = {}
    for d in kustomize_docs(FLEET):
        out.setdefault(d["kind"], []).append(d)
    return out


def _fleet_pod(fleet) -> tuple[dict, dict]:
    (dep,) = fleet["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    return pod, c


def _mounted(pod: dict, c: dict, path: str) -> tuple[dict, dict]:
    """The volume mount holding `path` (a file inside a directory mount) and its volume."""
    mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    return mount, next(v for v in pod["volumes"] if v["name"] == mount["name"])


def _fleet_files(fleet) -> dict[str, str]:
    """{file name: text} of the pipeline directory the workers run (the ConfigMap they mount)."""
    pod, c = _fleet_pod(fleet)
    run = build_parser().parse_args(c["args"])
    assert run.command == "run"
    (folder,) = run.pipeline
    mount = next(m for m in c["volumeMounts"] if m["mountPath"].rstrip("/") == folder.rstrip("/"))
    vol = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    (cm,) = [d for d in fleet["ConfigMap"] if d["metadata"]["name"] == vol["configMap"]["name"]]
    return cm["data"]


def test_k8s_fleet_pipeline_files_load_as_one_fleet(fleet, tmp_path):
    """Every file of the workers' pipeline directory loads (its mounted key file replaced by a
    temporary one), and the files pass the checks `run DIR` makes: distinct names, one metrics
    listener, one fleet whose pipelines agree on the group's timeouts."""
    files = _fleet_files(fleet)
    assert len(files) >= 3 and all(name.endswith(".toml") for name in files), sorted(files)
    named = [(Path(name), pipeline_with_key_file(text, tmp_path)) for name, text in sorted(files.items())]
    check_together(named)
    cfgs = [cfg for _, cfg in named]
    members = group_members(cfgs, None)  # builds the group member, joins nothing
    assert list(members) == [cfgs[0].fleet.group_id], "one fleet"
    for cfg in cfgs:
        assert cfg.state.backend == "kafka" and cfg.kafka is not None, cfg.pipeline.name
        assert cfg.metrics.enabled and cfg.metrics.listen == "0.0.0.0:9464", cfg.pipeline.name
    assert len({cfg.tanium.host for cfg in cfgs}) == len(cfgs), "one Tanium server per pipeline"


def test_k8s_fleet_every_pipeline_has_its_own_mounted_secret(fleet):
    pod, c = _fleet_pod(fleet)
    secrets = {d["metadata"]["name"]: d for d in fleet["Secret"]}
    used = []
    for name, text in sorted(_fleet_files(fleet).items()):
        tanium = tomllib.loads(text)["tanium"]
        assert "api_key" not in tanium, f"{name}: no key in the ConfigMap"
        mount, vol = _mounted(pod, c, tanium["api_key_file"])
        assert mount.get("readOnly") and "subPath" not in mount, f"{name}: a subPath mount never sees an update"
        items = {i["path"]: i["key"] for i in vol["secret"]["items"]}
        key = items[tanium["api_key_file"][len(mount["mountPath"]) + 1 :]]
        secret = secrets[vol["secret"]["secretName"]]
        assert key in secret.get("stringData", secret.get("data", {})), f"{name}: the Secret has no {key!r}"
        used.append(secret["metadata"]["name"])
    assert sorted(used) == sorted(secrets), "one Secret per pipeline, and no Secret nobody uses"
    for secret in secrets.values():  # placeholders, never a real token
        assert all(v.startswith("REPLACE-") for v in secret["stringData"].values()), secret["metadata"]["name"]


def test_k8s_fleet_workers_are_probed_hardened_and_scraped(fleet, k8s, tmp_path):
    """Several workers, probes on the one listener of the files, the hardening of the single-pipeline
    Deployment, and pods the shared Service (the Prometheus job) selects."""
    (dep,) = fleet["Deployment"]
    spec = dep["spec"]
    assert spec["replicas"] >= 2 and spec["strategy"]["type"] == "RollingUpdate"
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    pod, c = _fleet_pod(fleet)
    base = k8s["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"] == base["securityContext"]
    assert c["securityContext"] == _container(k8s)["securityContext"]
    assert pod["automountServiceAccountToken"] is False
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind])
    assert any(m["mountPath"] == "/tmp" and not m.get("readOnly") for m in c["volumeMounts"])
    cfgs = [pipeline_with_key_file(text, tmp_path) for text in _fleet_files(fleet).values()]
    assert pod["terminationGracePeriodSeconds"] > max(cfg.pipeline.shutdown_timeout for cfg in cfgs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    (listen,) = {cfg.metrics.listen for cfg in cfgs}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = c[probe]["httpGet"]
        assert get["path"] == path and ports.get(get["port"], get["port"]) == listen_port(listen)
    (svc,) = fleet["Service"]
    assert svc["metadata"]["name"] == "tanium-connector", "the Service name is the job label the alerts use"
    assert svc["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["targetPort"] in ports
    assert [r["spec"]["groups"] for r in fleet["PrometheusRule"]] == [load_yaml(ALERTS)["groups"]]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed (kustomize render skipped)")
def test_k8s_fleet_kustomization_renders(fleet):
    out = subprocess.run(["kubectl", "kustomize", str(FLEET)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["ConfigMap", "Deployment", "Service", "ServiceMonitor", "PrometheusRule"] + ["Secret"] * 3)
    assert all(d["metadata"]["namespace"] == "tanium-connector" for d in docs)
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    volumes = dep["spec"]["template"]["spec"]["volumes"]
    # the generated name (with its content hash) is the one the workers mount: a changed file rolls them
    assert [v["configMap"]["name"] for v in volumes if "configMap" in v] == [cm["metadata"]["name"]]
    assert cm["data"] == _fleet_files(fleet)
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["image"].startswith("registry.example.com/")


# ---- dashboard --------------------------------------------------------------------------------


def test_dashboard_rows_variables_and_layout():
    dash = dashboard()
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert [r.split(" (")[0] for r in rows] == ROWS
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"pipeline", "instance", "datasource"} <= names
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))
    for p in dashboard_panels(dash):
        assert p.get("targets"), f"panel {p['title']!r} has no query"
        assert p["datasource"]["uid"] == "${datasource}"
    by_row = {}
    for p in dashboard_panels(dash):
        by_row.setdefault(p["_row"].split(" (")[0], []).append(p)
    assert set(by_row) == set(ROWS), "every row has panels"


def selectors(expr: str, name: str) -> list[str]:
    """The {…} part of every occurrence of metric `name` in `expr` ("" when it has none)."""
    pattern = rf"(?<![\w:]){re.escape(name)}(?![\w:])(\{{[^}}]*\}})?"
    return [m.group(1) or "" for m in re.finditer(pattern, expr)]


# Whether a pipeline runs is a question over every worker: filtered by instance, a pipeline another
# instance runs would look as if nobody ran it. Its panels select pipelines only.
ACROSS_WORKERS = {"tanium_connector_fleet_owner"}


def connector_families() -> dict[str, tuple[str, ...]]:
    """{family name: label names} of every family the connector's Metrics defines."""
    return {a._name: tuple(a._labelnames) for a in vars(Metrics("families")).values() if hasattr(a, "_labelnames")}


def test_dashboard_connector_queries_filter_by_pipeline_and_instance():
    """Pipeline series follow $pipeline and $instance; a worker's series (its Kafka group's, no
    pipeline label) follow $instance, whose values are the instances of the selected pipelines; the
    owner of a pipeline follows $pipeline only (ACROSS_WORKERS)."""
    families = connector_families()
    worker_level = {f for f, labels in families.items() if "pipeline" not in labels}
    assert worker_level == {
        "tanium_connector_fleet_pipelines",
        "tanium_connector_fleet_rebalances",
        "tanium_connector_fleet_last_rebalance_timestamp_seconds",
    }
    for row, title, expr in dashboard_queries():
        for name in metric_names(expr):
            family = _family(name)
            for sel in selectors(expr, name):
                where = f"{row} / {title}: {name}"
                if family in ACROSS_WORKERS:
                    assert "instance" not in sel, f"{where} must count every worker, not the selected instances"
                elif name.startswith(("tanium_connector_", "process_", "python_")) or name == "up":
                    assert 'instance=~"$instance"' in sel, f"{where} ignores $instance"
                if name.startswith("tanium_connector_") and family not in worker_level:
                    assert 'pipeline=~"$pipeline"' in sel, f"{where} ignores $pipeline"


def test_dashboard_fleet_row_shows_workers_and_owners():
    fleet = [p for p in dashboard_panels() if p["_row"] == "Fleet"]
    used = {_family(n) for p in fleet for t in p["targets"] for n in metric_names(t["expr"])}
    assert used == {f for f in connector_families() if f.startswith("tanium_connector_fleet_")}
    (owners,) = [p for p in fleet if p["type"] == "table"]
    (expr,) = [t["expr"] for t in owners["targets"]]
    assert label_names(expr)["grouping"] >= {"pipeline", "worker"} and expr.endswith("== 1)")


# ---- metric names -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exposed() -> tuple[set[str], dict[str, set[str]]]:
    """Names in a real /metrics scrape, and every family's label names."""
    m = Metrics("names")
    server = HealthServer(m, f"127.0.0.1:{free_port()}", lambda: (True, "ready")).start()
    try:
        status, text = scrape(server.port)
    finally:
        server.stop()
    assert status == 200
    labels: dict[str, set[str]] = {}
    for line in text.splitlines():  # families with samples (process_*, python_* included)
        if not line.startswith("#") and "{" in line:
            name, body = line.split("{", 1)
            labels.setdefault(_family(name), set()).update(re.findall(r'(\w+)="', body.rsplit("}", 1)[0]))
    for attr in vars(m).values():  # and those with no label set initialised yet
        if hasattr(attr, "_labelnames") and hasattr(attr, "_name"):
            labels.setdefault(attr._name, set()).update(attr._labelnames)
    return exposed_names(text), labels


def _family(name: str) -> str:
    return re.sub(r"_(total|bucket|sum|count|created)$", "", name)


def test_every_metric_in_dashboard_and_rules_is_exposed(exposed):
    names, _ = exposed
    missing = []
    for where, expr in all_expressions():
        for name in metric_names(expr):
            if external_source(name) is None and name not in names:
                missing.append(f"{where}: {name}")
    assert not missing, "not in the connector's /metrics output:\n" + "\n".join(missing)


def test_every_label_in_dashboard_and_rules_exists(exposed):
    _, families = exposed
    wrong = []
    for where, expr in all_expressions():
        names = metric_names(expr)
        if any(external_source(n) for n in names):
            continue  # kafka_exporter's and Prometheus' labels are not the connector's to check
        known = {"instance", "job", "le"}  # scrape labels, histogram buckets
        for n in names:
            known |= families.get(_family(n), set())
        used = label_names(expr)
        wrong += [f"{where}: label {label!r}" for label in sorted((used["matchers"] | used["grouping"]) - known)]
    assert not wrong, "labels the connector's metrics do not have:\n" + "\n".join(wrong)


def test_init_from_config_exposes_poll_interval_and_zero_delivery_failures(tmp_path):
    """The stale-poll alert needs the poll interval; the delivery-failure alert and panel need the
    per-topic series before the first failure."""
    cfg = pipeline_with_key_file((DEPLOY / "pipelines" / "fleet" / "emea.toml").read_text(), tmp_path)
    m = Metrics(cfg.pipeline.name)
    m.init_from_config(cfg)
    text = m.render().decode()
    assert f'tanium_connector_poll_interval_seconds{{pipeline="{cfg.pipeline.name}"}} 5.0' in text
    for topic in (cfg.kafka.topic, cfg.kafka.dlq_topic):
        assert (
            f'tanium_connector_sink_delivery_failures_total{{pipeline="{cfg.pipeline.name}",topic="{topic}"}} 0.0'
        ) in text


def test_freshness_has_a_p50_p99_panel_and_an_alert_rule():
    name = "tanium_connector_freshness_seconds_bucket"
    exprs = [e for _, _, e in dashboard_queries() if name in metric_names(e)]
    assert {q for q in ("0.5", "0.99") for e in exprs if e.startswith(f"histogram_quantile({q},")} == {"0.5", "0.99"}
    assert [r["alert"] for r in alert_rules() if name in metric_names(r["expr"])] == ["TaniumConnectorFreshnessHigh"]
