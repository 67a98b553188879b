"""`tanium-connector bench` with tiny sizes, so the command cannot rot. Figures are checked for
presence and sanity (positive, consistent with each other), never against a speed."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "connector.cli"]


def bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + ["bench", *args], capture_output=True, text=True, timeout=timeout)


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_bench_json_has_every_figure_and_they_agree():
    r = bench("--alerts", "300", "--intel-docs", "6", "--repeat", "1", "--latency-ms", "0",
              "--validation-actions", "5", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["config"]["alerts"] == 300
    hw = rep["hardware"]
    for key in ("cpu", "cores", "ram_gib", "python", "kafka_python", "crc32c"):
        assert hw[key], key
    assert hw["crc32c"].startswith("C"), "kafka-python must use the crc32c C extension"
    assert len(rep["runs"]) == 1
    run, med = rep["runs"][0], rep["median"]
    for phase in ("sink", "source", "pipeline"):
        ph = run[phase]
        assert ph["events"] == 300, phase
        for key in ("events_per_s", "seconds", "cpu_per_1k", "peak_rss_mib"):
            assert positive(ph[key]), (phase, key, ph[key])
        assert ph["events_per_s"] == pytest.approx(ph["events"] / ph["seconds"])
        assert med[phase]["events_per_s"] == ph["events_per_s"]  # one run: the median is the run
    p = run["pipeline"]
    assert p["published"] == 300 and p["dlq"] == 0 and p["errors"] == []
    # the ratio is the one computed from the printed events/s
    expected = p["events_per_s"] / min(run["sink"]["events_per_s"], run["source"]["events_per_s"])
    assert run["ratio"] == pytest.approx(expected) and med["ratio"] == pytest.approx(expected)
    # IntelDoc requests: counted by the simulator, per distinct (doc, revision) seen by the source
    assert 1 <= p["doc_revisions"] <= 6
    assert 1 <= p["intel_requests_seen_by_simulator"] <= p["doc_revisions"]
    assert p["intel_requests_per_doc_revision"] == pytest.approx(
        p["intel_requests_seen_by_simulator"] / p["doc_revisions"])
    # Tanium requests: at least one page per 500 alerts plus the doc lookups
    assert p["tanium_requests"] >= 1 + p["intel_requests_seen_by_simulator"]
    assert p["tanium_requests_per_1k"] == pytest.approx(p["tanium_requests"] / 300 * 1000)
    assert run["source"]["tanium_requests"] >= 1
    v = rep["validation"]
    assert v["actions"] == 5 and positive(v["requests_1"]) and positive(v["requests_n"])
    assert v["ratio"] == pytest.approx(v["requests_n"] / v["requests_1"])
    assert set(rep["targets"]) == {"ratio", "intel_requests_per_doc_revision", "validation_ratio"}
    assert rep["targets"]["ratio"]["value"] == med["ratio"]


def test_bench_table_names_every_figure():
    r = bench("--alerts", "200", "--intel-docs", "4", "--latency-ms", "0", "--validation-actions", "0")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for text in ("sink ceiling", "source ceiling", "pipeline", "pipeline / min(ceilings)", "IntelDoc requests",
                 "CPU s/1k ev", "peak RSS MiB", "Tanium req/1k ev", "hardware: ", "kafka-python 3", "Python 3"):
        assert text in out, text
    assert "validation requests" not in out


def test_rss_scale_reports_both_sizes_and_their_ratio():
    r = bench("--rss-scale", "200,400", "--latency-ms", "0", "--intel-docs", "4", "--json")
    assert r.returncode == 0, r.stderr
    rs = json.loads(r.stdout)["rss_scale"]
    assert (rs["small"], rs["large"]) == (200, 400)
    small, large = rs["runs"]["200"], rs["runs"]["400"]
    assert small["events"] == 200 and large["events"] == 400
    assert positive(small["peak_rss_mib"]) and positive(large["peak_rss_mib"])
    assert rs["ratio"] == pytest.approx(large["peak_rss_mib"] / small["peak_rss_mib"])


@pytest.mark.parametrize("args, message", [
    (["--alerts", "0"], "at least 1"),
    (["--alerts", "many"], "not a whole number"),
    (["--latency-ms", "-5"], "outside 0"),
    (["--rss-scale", "1000,10"], "below LARGE"),
    (["--validation-actions", "-1"], "negative"),
])
def test_bad_options_are_clear_errors(args, message):
    r = bench(*args, timeout=60)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
