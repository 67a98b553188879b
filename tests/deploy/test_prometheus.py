"""deploy/prometheus: the alert rules pass `promtool check rules`, their unit tests pass
`promtool test rules`, every rule has a firing and a not-firing test, and the compose scrape
configuration is valid for Prometheus. promtool comes from Debian's `prometheus` package
(.ci/run installs it); without it these tests skip and say so."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml
from test_deploy import ALERTS, DEPLOY, alert_rules, load_yaml

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not found: install Debian's prometheus package (apt-get install prometheus), as .ci/run does",
)
TESTS = DEPLOY / "prometheus" / "alerts_test.yml"


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120)


@needs_promtool
def test_promtool_check_rules():
    out = promtool("check", "rules", str(ALERTS))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in out.stdout


@needs_promtool
def test_promtool_unit_tests_pass():
    out = promtool("test", "rules", str(TESTS))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


@needs_promtool
def test_promtool_unit_tests_catch_a_broken_rule(tmp_path):
    """The unit tests have teeth: loosening one threshold makes them fail."""
    rules = ALERTS.read_text().replace(") > 0.1\n", ") > 0.5\n")
    assert rules != ALERTS.read_text()
    (tmp_path / "alerts.yml").write_text(rules)
    shutil.copy(TESTS, tmp_path / "alerts_test.yml")
    out = promtool("test", "rules", str(tmp_path / "alerts_test.yml"))
    assert out.returncode != 0 and "TaniumConnectorApiErrorRatioHigh" in out.stdout + out.stderr


def test_every_rule_is_tested_firing_and_not_firing():
    cases: dict[str, set[str]] = {}
    for t in load_yaml(TESTS)["tests"]:
        for case in t.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], set()).add("firing" if case.get("exp_alerts") else "quiet")
    for rule in alert_rules():
        assert cases.get(rule["alert"]) == {"firing", "quiet"}, f"{rule['alert']}: tested {cases.get(rule['alert'])}"


def test_every_rule_tells_the_operator_what_to_check():
    for rule in alert_rules():
        ann = rule.get("annotations", {})
        assert ann.get("summary") and len(ann.get("description", "")) > 120, rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert "check" in ann["description"].lower(), f"{rule['alert']}: say what to check"


@needs_promtool
def test_promtool_check_compose_config(tmp_path):
    """The compose scrape config is valid (rule file path pointed at the repository copy)."""
    cfg = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    cfg["rule_files"] = [str(ALERTS)]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    out = promtool("check", "config", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
