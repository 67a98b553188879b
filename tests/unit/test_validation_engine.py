"""Security Validation against the TR simulator over real HTTP: schedule, matching, outputs, cost.

Alerts are injected for made-up actor hosts at chosen alertedAt times; the simulator's own history
alerts (other hosts) are in the same time ranges as noise. A FakeClock drives the schedule, so the
15-minute schedules below run in milliseconds while every query is a real HTTP request.
"""

from __future__ import annotations

import importlib.util
import io
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers import write_pipeline

from connector.config import ConfigError, parse_pipeline
from connector.metrics import NO_METRICS, Metrics
from connector.simulator import Simulator
from connector.tanium import TaniumClient
from connector.timeutil import format_ts
from connector.validation.engine import ValidationEngine
from connector.validation.rules import parse_job_action
from connector.validation.runners import FakeClock, SystemClock, drive, validate_file
from connector.validation.windows import Schedule

NOW = datetime.now(UTC)
T = (NOW - timedelta(days=1)).replace(hour=12, minute=0, second=0, microsecond=0)  # yesterday 12:00:00 UTC
S = timedelta(seconds=1)
M = timedelta(minutes=1)


@pytest.fixture(scope="module")
def sim():
    with Simulator(seed=11, alerts=600, hosts=30, history=2 * 86400, end=NOW) as s:
        yield s


def make_cfg(sim, *, tanium=None, field_map=None, **validation):
    raw = {
        "pipeline": {"name": "sv-test", "mode": "validation"},
        "tanium": sim.settings(max_retries=1, **(tanium or {})),
        "metrics": {"enabled": False},
        "validation": {"query_time": 5, "query_interval": 30, "delay_time": 0, **validation},
    }
    if field_map is not None:
        raw["field_map"] = field_map
    return parse_pipeline(raw)


def host() -> str:
    return f"msv-{uuid.uuid4().hex[:8]}"


def action(name: str, hosts=(), ips=(), t: datetime = T, **over) -> dict:
    a = {
        "id": over.pop("id", f"a-{uuid.uuid4().hex[:8]}"),
        "job_id": "job-1",
        "name": name,
        "type": "host_cli",
        "started_at": format_ts(t),
        "source": {"hostnames": list(hosts), "ips": list(ips)},
    }
    a.update(over)
    return a


class Collector:
    def __init__(self):
        self.records: list[tuple[str, str | None, dict]] = []

    def __call__(self, topic, key, value):
        self.records.append((topic, key, value))

    def on(self, topic: str) -> list[tuple[str | None, dict]]:
        return [(k, v) for t, k, v in self.records if t == topic]


def judge(cfg, actions, tmp_path, start=None, metrics: Metrics = NO_METRICS):
    """validate_file over a JSON-lines file with a fast clock; verdicts by action id."""
    path = tmp_path / f"{uuid.uuid4().hex[:6]}.jsonl"
    path.write_text("".join((a if isinstance(a, str) else json.dumps(a)) + "\n" for a in actions))
    out, col = io.StringIO(), Collector()
    code = validate_file(
        cfg, path, json_output=True, out=out, clock=FakeClock(start or T - M), publish=col, metrics=metrics
    )
    verdicts = [json.loads(ln) for ln in out.getvalue().splitlines()]
    return code, {f"line{v['line']}" if v.get("line") else v["action_id"]: v for v in verdicts}, col


def engine_for(cfg, col=None):
    client = TaniumClient(cfg.tanium)
    return ValidationEngine(cfg, client, col or Collector()), client


def run_engine(engine, actions, start):
    for a in actions:
        assert engine.add(parse_job_action(a))
    clock, verdicts = FakeClock(start), []
    drive(engine, clock, verdicts.append)
    return verdicts, clock


# ---- schedule ----------------------------------------------------------------------------------


def test_documented_example_runs_11_queries_at_the_documented_times(sim):
    """Q = 5, I = 30 s, T = 12:00:00: queries over 11:55:00–12:00:00 … 12:00:00–12:05:00, run at each
    window's end (D = 0) or ten minutes later (D = 10), never before the window closed."""
    for delay, first in ((0, "12:00:00"), (10, "12:10:00")):
        cfg = make_cfg(sim, delay_time=delay, discover_network_devices=False)
        engine, client = engine_for(cfg)
        before = sim.stats["alerts"]
        run_engine(engine, [action("doc example", [host()])], T - M)
        ticks = [t for t in engine.trace if t["kind"] == "windows"]
        assert len(ticks) == 11
        runs = [t["at"].strftime("%H:%M:%S") for t in ticks]
        assert runs[0] == first and runs[-1] == (T + (5 + delay) * M).strftime("%H:%M:%S")
        assert all(
            (b - a) == 30 * S for a, b in zip([t["at"] for t in ticks], [t["at"] for t in ticks[1:]], strict=False)
        )
        ranges = [(r[0][0].strftime("%H:%M:%S"), r[0][1].strftime("%H:%M:%S")) for r in (t["ranges"] for t in ticks)]
        assert ranges == [
            ("11:55:00", "12:00:00"),
            ("11:55:30", "12:00:30"),
            ("11:56:00", "12:01:00"),
            ("11:56:30", "12:01:30"),
            ("11:57:00", "12:02:00"),
            ("11:57:30", "12:02:30"),
            ("11:58:00", "12:03:00"),
            ("11:58:30", "12:03:30"),
            ("11:59:00", "12:04:00"),
            ("11:59:30", "12:04:30"),
            ("12:00:00", "12:05:00"),
        ]
        assert all(t["at"] >= t["ranges"][0][1] for t in ticks)  # never before the window closed
        assert sim.stats["alerts"] - before == 11  # one HTTP request per window (each range fits a page)
        client.close()


def test_each_window_runs_at_its_due_time_with_many_actions(sim):
    """40 actions starting 0.7 s apart (fake clock): every window runs no earlier than T + D + k·I
    and at most validation.max_lateness (0.5 s) after it; query rounds are at least that far apart."""
    cfg = make_cfg(sim, discover_network_devices=False)
    engine, client = engine_for(cfg)
    acts = [action(f"a{k}", [host()], t=T + k * 0.7 * S, id=f"due{k}") for k in range(40)]
    schedules = {a["id"]: parse_job_action(a) for a in acts}
    verdicts, _ = run_engine(engine, acts, T - M)
    assert len(verdicts) == 40
    ticks = [t for t in engine.trace if t["kind"] == "windows"]
    late = []
    for tick in ticks:
        for aid, (lo, hi) in tick["windows"].items():
            a = schedules[aid]
            sch = Schedule.of(a.started_at, 5, 30, 0)
            late += [(tick["at"] - sch.window(k).run_at).total_seconds() for k in range(lo, hi)]
    assert len(late) == 40 * 11
    assert min(late) >= 0 and max(late) <= 0.5, (min(late), max(late))
    gaps = [(b["at"] - a["at"]).total_seconds() for a, b in zip(ticks, ticks[1:], strict=False)]
    assert min(gaps) >= 0.5
    client.close()


def test_delay_shifts_execution_not_windows(sim, tmp_path):
    h = host()
    sim.inject(computer_name=h, alerted_at=T + 20 * S)
    cfg = make_cfg(sim, delay_time=10)
    code, v, _ = judge(cfg, [action("delayed", [h], id="d1", metadata={"vid": "A101-123"})], tmp_path)
    assert code == 0
    d = v["d1"]
    assert d["metadata"] == {"vid": "A101-123"}  # carried through to the verdict
    assert d["detected"] and d["windows"]["first_query_at"] == format_ts(T + 10 * M)
    assert d["windows"]["last_query_at"] == format_ts(T + 15 * M)
    assert (d["windows"]["first_start"], d["windows"]["last_end"]) == (format_ts(T - 5 * M), format_ts(T + 5 * M))
    assert d["first_detection_time"] == format_ts(T + 20 * S) and d["latency_seconds"] == 20.0


def test_past_windows_run_immediately_with_the_real_clock(sim):
    h = host()
    t0 = NOW - timedelta(hours=3)
    sim.inject(computer_name=h, alerted_at=t0 + 5 * S)
    cfg = make_cfg(sim)
    engine, client = engine_for(cfg)
    engine.add(parse_job_action(action("past", [h], t=t0, id="p1")))
    verdicts = []
    drive(engine, SystemClock(), verdicts.append)  # would sleep for minutes if it waited on run times
    assert [v["result"] for v in verdicts] == ["detected"]
    assert engine.stats["ticks"] == 1 and verdicts[0]["windows"]["queried"] == 11
    client.close()


@pytest.mark.parametrize(
    "adjust,offset,detected",
    [
        (+20, -(5 * 60 + 10), True),  # raw 11:54:50 → event 11:55:10: moved into the first window
        (+20, -(5 * 60 + 30), False),  # raw 11:54:30 → 11:54:50: still out (applied twice it would be in)
        (-20, +(5 * 60 + 10), True),  # raw 12:05:10 → 12:04:50: moved into the last window
        (-20, +(5 * 60 + 30), False),  # raw 12:05:30 → 12:05:10: out (twice: 12:04:50, in)
        (-20, -(4 * 60 + 50), False),  # raw 11:55:10 → 11:54:50: moved out of the first window
        (+20, +(4 * 60 + 50), False),  # raw 12:04:50 → 12:05:10: moved out of the last window
    ],
)
def test_event_time_adjustment_applied_exactly_once(sim, tmp_path, adjust, offset, detected):
    h = host()
    alerted = T + offset * S
    sim.inject(computer_name=h, alerted_at=alerted)
    cfg = make_cfg(sim, event_time_adjustment=adjust)
    _, v, col = judge(cfg, [action("adjusted", [h], id="t1")], tmp_path)
    assert v["t1"]["detected"] is detected
    if detected:
        ((key, rec),) = col.on(cfg.validation.events_topic)
        assert key == "t1" and rec["event"]["event_time"] == format_ts(alerted + adjust * S)
        assert v["t1"]["first_detection_time"] == format_ts(alerted + adjust * S)


# ---- matching ----------------------------------------------------------------------------------


def test_host_cli_matching_by_hostname_fqdn_short_name_and_ip(sim, tmp_path):
    fqdn, short, by_ip, other = host(), host(), host(), host()
    sim.inject(computer_name=f"{fqdn.upper()}.LAB.LOCAL", alerted_at=T + 10 * S)
    sim.inject(computer_name=short, alerted_at=T + 11 * S)
    sim.inject(computer_name=by_ip, ip="10.250.7.9", alerted_at=T + 12 * S)
    sim.inject(computer_name=other, alerted_at=T + 13 * S)
    cfg = make_cfg(sim)
    _, v, col = judge(
        cfg,
        [
            action("fqdn event, short actor", [fqdn], id="h1"),
            action("short event, fqdn actor", [f"{short}.lab.local"], id="h2"),
            action("ip only", ips=["10.250.7.9"], id="h3"),
            action("nothing for this host", [host()], id="h4"),
        ],
        tmp_path,
    )
    assert [v[i]["result"] for i in ("h1", "h2", "h3", "h4")] == ["detected", "detected", "detected", "missed"]
    rules = {k: rec["matched_rules"] for k, rec in col.on(cfg.validation.events_topic)}
    assert rules["h1"][:2] == ["time", "host:computer"]
    assert "ip:src_ip" in rules["h3"] and "host:computer" not in rules["h3"]
    assert all(rec["window"]["index"] is not None for _, rec in col.on(cfg.validation.events_topic))


def test_host_cli_matching_by_additional_hosts_only(sim, tmp_path):
    h = host()
    sim.inject(computer_name=h, ip="10.250.8.1", alerted_at=T + 30 * S)
    # only additional_hosts carries the host name: the other identity fields are mapped to nothing
    fm = {"computer": [], "host": [], "src_ip": [], "dest_ip": [], "additional_hosts": ["computerName"]}
    cfg = make_cfg(sim, field_map=fm)
    _, v, col = judge(cfg, [action("additional", [f"{h}.corp.local"], id="ah")], tmp_path)
    assert v["ah"]["detected"]
    ((_, rec),) = col.on(cfg.validation.events_topic)
    assert rec["matched_rules"] == ["time", "host:additional_hosts"]


def test_network_matching_with_ports_and_reversed_direction(sim, tmp_path):
    src, dst = "10.251.0.5", "10.251.0.9"
    sim.inject(
        computer_name=host(),
        ip=src,
        match_type="port",
        local_ip=src,
        remote_ip=dst,
        local_port=50123,
        remote_port=445,
        alerted_at=T + 40 * S,
    )
    # the same connection seen from the destination endpoint
    sim.inject(
        computer_name=host(),
        ip=dst,
        match_type="port",
        local_ip=dst,
        remote_ip=src,
        local_port=445,
        remote_port=50123,
        alerted_at=T + 41 * S,
    )
    src2, dst2 = "10.251.1.5", "10.251.1.9"
    sim.inject(
        computer_name=host(),
        ip=src2,
        match_type="port",
        local_ip=src2,
        remote_ip=dst2,
        local_port=50124,
        remote_port=8080,
        alerted_at=T + 42 * S,
    )
    cfg = make_cfg(sim, save_suspicious_events=True)
    net = {"type": "network"}
    _, v, col = judge(
        cfg,
        [
            action("smb", ips=[src], destination={"ips": [dst]}, dest_port=445, id="n1", **net),
            action("wrong port", ips=[src2], destination={"ips": [dst2]}, dest_port=443, id="n2", **net),
        ],
        tmp_path,
    )
    assert v["n1"]["detected"] and v["n1"]["matched_events"] == 2
    directions = sorted(rec["matched_rules"][1] for k, rec in col.on(cfg.validation.events_topic) if k == "n1")
    assert directions == ["network:forward", "network:reversed"]
    assert all("dest_port" in rec["matched_rules"] for k, rec in col.on(cfg.validation.events_topic))
    assert not v["n2"]["detected"] and v["n2"]["suspicious_events"] == 1
    ((_, sus),) = col.on(cfg.validation.suspicious_topic)
    assert sus["failed_fields"] == [{"field": "dest_port", "reason": "mismatch", "expected": 443, "actual": 8080}]


def test_expected_markers_hash_command_line_and_technique(sim, tmp_path):
    h = host()
    md5 = "0123456789abcdef0123456789abcdef"
    doc_id = sim.intel_doc_ids[0]
    techniques = [t["id"] for t in sim.intel_doc(doc_id)["mitreAttack"]["techniques"]]
    sim.inject(
        computer_name=h,
        match_type="process",
        intel_doc_id=doc_id,
        md5=md5,
        args="rundll32.exe C:\\Temp\\payload.dll,EntryPoint",
        alerted_at=T + 50 * S,
    )
    cfg = make_cfg(sim, save_suspicious_events=True)
    exp_ok = {
        "file_hashes": [md5.upper()],
        "command_line_contains": ["payload.dll"],
        "mitre_techniques": [techniques[0]],
    }
    exp_bad = {"file_hashes": ["f" * 64], "command_line_contains": ["mimikatz"], "mitre_techniques": ["T1486"]}
    _, v, col = judge(
        cfg,
        [action("markers ok", [h], id="m1", expected=exp_ok), action("markers bad", [h], id="m2", expected=exp_bad)],
        tmp_path,
    )
    assert v["m1"]["detected"] and not v["m2"]["detected"]
    ((_, rec),) = col.on(cfg.validation.events_topic)
    assert rec["matched_rules"][-3:] == ["file_hash", "command_line", "mitre_technique"]
    ((_, sus),) = col.on(cfg.validation.suspicious_topic)
    assert [f["field"] for f in sus["failed_fields"]] == ["file_hash", "command_line", "mitre_techniques"]


def test_requests_are_reported_as_the_actions_share_and_the_shared_total(sim):
    """Three actions with the same start share every query: each verdict reports a third of the
    requests as its share and all of them as the shared total; the shares add up to the total."""
    cfg = make_cfg(sim, discover_network_devices=False)
    engine, client = engine_for(cfg)
    acts = [action(f"share {k}", [host()], id=f"r{k}") for k in range(3)]
    verdicts, _ = run_engine(engine, acts, T - M)
    total = engine.stats["requests"]
    assert total >= 11  # one request per window at least
    for v in verdicts:
        assert "requests" not in v
        assert v["requests_shared_total"] == total
        assert v["requests_attributed"] == pytest.approx(total / 3)
    assert sum(v["requests_attributed"] for v in verdicts) == pytest.approx(total)
    client.close()


def test_dedup_across_overlapping_windows(sim, tmp_path):
    h = host()
    sim.inject(computer_name=h, alerted_at=T + 10 * S)  # inside windows 1 … 10
    cfg = make_cfg(sim)
    engine, client = engine_for(cfg, col := Collector())
    (verdict,), _ = run_engine(engine, [action("dedup", [h], id="dd")], T - M)
    assert engine.stats["ticks"] == 11  # the alert was fetched by ten of them
    assert verdict["matched_events"] == 1
    assert len(col.on(cfg.validation.events_topic)) == 1
    assert col.on(cfg.validation.events_topic)[0][1]["window"]["index"] == 1  # first window that covers it
    client.close()


@pytest.mark.parametrize("save", [True, False])
def test_suspicious_events_with_failed_fields(sim, tmp_path, save):
    h = host()
    # a file match has no command line: a required marker field is missing
    sim.inject(computer_name=h, match_type="file", alerted_at=T + 5 * S)
    # outside every window: neither matched nor suspicious
    sim.inject(computer_name=h, match_type="file", alerted_at=T + 6 * M)
    cfg = make_cfg(sim, save_suspicious_events=save)
    _, v, col = judge(
        cfg, [action("needs cmdline", [h], id="s1", expected={"command_line_contains": ["whoami"]})], tmp_path
    )
    assert not v["s1"]["detected"] and v["s1"]["suspicious_events"] == 1
    sus = col.on(cfg.validation.suspicious_topic)
    if save:
        ((key, rec),) = sus
        assert key == "s1" and rec["failed_fields"] == [
            {"field": "command_line", "reason": "missing", "expected": ["whoami"]}
        ]
        assert rec["window"]["start"] <= rec["event"]["event_time"] <= rec["window"]["end"]
        assert rec["matched_rules"][:2] == ["time", "host:computer"]
    else:
        assert sus == []
        assert any("suspicious events not saved" in n for n in v["s1"]["notes"])


# ---- limit, correlation, discovery -------------------------------------------------------------


def test_limit_caps_each_query_and_is_noted_and_counted(sim, tmp_path):
    t = T - timedelta(days=3)  # before the simulator's history: only these alerts are there
    h = host()
    for k in range(12):
        sim.inject(computer_name=h, alerted_at=t + (k + 1) * S)
    cfg = make_cfg(sim, tanium={"limit": 5, "page_size": 2, "enrich_intel_docs": False})
    metrics = Metrics("sv-test")
    _, v, _ = judge(cfg, [action("capped", [h], t=t, id="L1")], tmp_path, start=t - M, metrics=metrics)
    assert v["L1"]["detected"] and v["L1"]["matched_events"] == 5  # the cap, not 12
    assert any("tanium.limit (5) was reached" in n for n in v["L1"]["notes"])
    dropped = metrics.records_dropped.labels("sv-test", "validation", "limit")._value.get()
    assert dropped >= 7  # 12 in range, 5 fetched, per query
    assert v["L1"]["requests_shared_total"] == 1 + 10 * 3  # window 0 is empty (1 request); the others: pages of 2, 2, 1


@pytest.fixture(scope="module")
def noisy():
    """About 8 alerts a minute from 20 endpoints over four hours that end an hour ago."""
    with Simulator(seed=3, alerts=2000, hosts=20, history=4 * 3600, end=NOW - timedelta(hours=1)) as s:
        yield s


def test_limit_applies_to_each_window_so_judging_together_changes_no_verdict(noisy, tmp_path):
    """Six actions ten minutes apart, tanium.limit 150: each window holds about 40 alerts, the hour
    they span about 500. Judged from one file (every window due at once) they get the verdicts,
    matched events and windows they get when each is judged alone."""
    t = NOW - timedelta(hours=3)
    acts = []
    for i in range(6):
        h = host()
        noisy.inject(computer_name=h, alerted_at=t + i * 10 * M + 20 * S)
        acts.append(action(f"noisy {i}", [h], t=t + i * 10 * M, id=f"n{i}"))
    cfg = make_cfg(noisy, tanium={"limit": 150, "enrich_intel_docs": False}, discover_network_devices=False)
    late = t + 2 * timedelta(hours=1)  # after every window: all of them are due at the first tick
    _, together, col = judge(cfg, acts, tmp_path, start=late)
    for a in acts:
        _, alone, col1 = judge(cfg, [a], tmp_path, start=late)
        v, w = together[a["id"]], alone[a["id"]]
        assert (v["result"], v["matched_events"], v["notes"]) == ("detected", 1, []), v
        assert (w["result"], w["matched_events"], w["notes"]) == (v["result"], v["matched_events"], v["notes"])
        mine = [(rec["event"]["uid"], rec["window"]) for k, rec in col.on(cfg.validation.events_topic) if k == a["id"]]
        assert mine == [(rec["event"]["uid"], rec["window"]) for _, rec in col1.on(cfg.validation.events_topic)]


def test_correlation_query_sets_alerted_and_publishes_correlated_events(sim, tmp_path):
    docs = sim.intel_doc_ids
    h1, h2 = host(), host()
    sim.inject(computer_name=h1, intel_doc_id=docs[1], alerted_at=T + 15 * S)
    sim.inject(computer_name=h2, intel_doc_id=docs[2], alerted_at=T + 16 * S)
    cfg = make_cfg(
        sim, correlation_query_enabled=True, correlation_query=f"intelDocId={docs[1]}", correlation_query_interval=2
    )
    engine, client = engine_for(cfg, col := Collector())
    verdicts, _ = run_engine(engine, [action("alerted", [h1], id="c1"), action("not alerted", [h2], id="c2")], T - M)
    v = {x["action_id"]: x for x in verdicts}
    assert v["c1"]["detected"] and v["c1"]["alerted"] and v["c1"]["correlated_events"] == 1
    assert v["c2"]["detected"] and not v["c2"]["alerted"]
    corr = [rec for k, rec in col.on(cfg.validation.events_topic) if rec["correlated"]]
    assert len(corr) == 1 and corr[0]["action_id"] == "c1" and corr[0]["window"]["index"] is None
    assert corr[0]["event"]["signature_id"] == str(docs[1]) or corr[0]["event"]["signature_id"] == docs[1]
    runs = [t for t in engine.trace if t["kind"] == "correlation"]
    # first tick, then every 2 minutes, and once more when the actions finish
    assert 3 <= len(runs) <= 5
    client.close()


def test_correlation_query_with_unknown_parameter_is_a_clear_error(sim):
    with pytest.raises(ConfigError) as e:
        make_cfg(sim, correlation_query_enabled=True, correlation_query="intelDocId=700&colour=red")
    assert "unknown alert filter parameter 'colour'" in str(e.value) and "intelDocId" in str(e.value)
    make_cfg(sim, correlation_query_enabled=True, correlation_query="severity=high")


@pytest.mark.parametrize("command", ["validate-config", "run"])
def test_a_correlation_query_setting_the_window_is_refused_by_every_command(sim, tmp_path, command, capsys):
    """alertedAtFrom / alertedAtUntil come from each action's window: the pipeline file is refused
    when it is loaded, so validate-config and run give the same error (exit code 2)."""
    from connector import cli

    path = write_pipeline(
        tmp_path / "sv.toml",
        {
            "pipeline": {"name": "sv-corr", "mode": "validation"},
            "tanium": sim.settings(),
            "kafka": {"bootstrap_servers": "127.0.0.1:9"},
            "validation": {
                "correlation_query_enabled": True,
                "correlation_query": "alertedAtFrom=2026-01-01T00:00:00Z",
            },
        },
    )
    assert cli.main([command, str(path)]) == 2
    err = capsys.readouterr().err
    assert "validation.correlation_query" in err and "alertedAtFrom is set by the connector" in err, err


@pytest.mark.parametrize("discover", [True, False])
def test_device_discovery(sim, tmp_path, discover):
    h = host()
    sim.inject(computer_name=h, ip="10.252.0.7", alerted_at=T + 25 * S)
    sim.inject(computer_name=h, ip="10.252.0.7", alerted_at=T + 26 * S)
    cfg = make_cfg(sim, discover_network_devices=discover)
    _, v, col = judge(cfg, [action("disc", [h], id="dv")], tmp_path)
    assert v["dv"]["matched_events"] == 2
    events = [rec for _, rec in col.on(cfg.validation.events_topic)]
    devices = col.on(cfg.validation.devices_topic)
    mine = [rec for k, rec in devices if k == h]
    if discover:
        assert len(mine) == 1  # once, although both alerts were fetched by up to 11 queries
        assert mine[0]["computer_name"] == h and "10.252.0.7" in mine[0]["ips"]
        assert len({k for k, _ in devices}) == len(devices)  # every endpoint once
        for rec in events:
            assert rec["security_technology"]["vendor"] == "Tanium"
            assert rec["security_technology"]["product"] == "Threat Response"
            assert rec["security_technology"]["host"] == sim.host
            assert rec["event"]["observer"]["product"] == "Threat Response"
    else:
        assert devices == []
        for rec in events:
            assert "security_technology" not in rec and "observer" not in rec["event"]


# ---- file mode ---------------------------------------------------------------------------------


def test_invalid_job_actions_in_a_file_are_reported_and_the_rest_judged(sim, tmp_path):
    h = host()
    sim.inject(computer_name=h, alerted_at=T + 3 * S)
    good = action("good", [h], id="ok1")
    cfg = make_cfg(sim)
    code, v, _ = judge(
        cfg,
        [good, '{"id": "x1", "name": ', json.dumps({**good, "id": "bad1", "type": "email"}), json.dumps(good)],
        tmp_path,
    )
    assert code == 2
    assert v["ok1"]["result"] == "detected"
    assert "not valid JSON" in v["line2"]["reason"] and v["line2"]["input"] == '{"id": "x1", "name": '
    assert v["line3"]["result"] == "rejected" and v["line3"]["action_id"] == "bad1"
    assert "type: must be one of host_cli, network" in v["line3"]["reason"] and v["line3"]["input"]["type"] == "email"
    assert v["line4"]["action_id"] == "ok1" and "appears more than once" in v["line4"]["reason"]
    assert len(v) == 4


def test_human_output_has_one_line_per_action(sim, tmp_path):
    h = host()
    sim.inject(computer_name=h, alerted_at=T + 7 * S)
    path = tmp_path / "a.jsonl"
    path.write_text(
        json.dumps(action("seen", [h], id="hu1"))
        + "\n"
        + json.dumps(action("unseen", [host()], id="hu2"))
        + "\n"
        + "[]\n"
    )
    out = io.StringIO()
    code = validate_file(make_cfg(sim), path, False, out, FakeClock(T - M))
    lines = out.getvalue().splitlines()
    assert code == 2 and len(lines) == 3
    assert lines[0].startswith("REJECTED  line 3 ") and "must be a JSON object" in lines[0]
    seen = next(ln for ln in lines if "hu1" in ln)
    assert seen.startswith("DETECTED  hu1  'seen'") and "events=1" in seen and "(+7.0s)" in seen
    assert next(ln for ln in lines if "hu2" in ln).startswith("MISSED    hu2")


def test_action_dated_beyond_the_clock_skew_allowance_is_rejected(sim, tmp_path):
    """The clock reads T − 1 min: an action starting 3 days later is rejected at once with the
    reason; one starting 3 minutes ahead (within validation.max_clock_skew = 5) is judged."""
    h = host()
    sim.inject(computer_name=h, alerted_at=T + 2 * M + 5 * S)
    cfg = make_cfg(sim)
    far = action("next week's job", [host()], t=T + timedelta(days=3), id="f1")
    near = action("starts soon", [h], t=T + 2 * M, id="f2")
    code, v, _ = judge(cfg, [far, near], tmp_path)
    assert code == 2
    assert v["line1"]["result"] == "rejected" and v["line1"]["action_id"] == "f1"
    assert "started_at" in v["line1"]["reason"] and "3 days ahead" in v["line1"]["reason"]
    assert "validation.max_clock_skew = 5 minutes" in v["line1"]["reason"]
    assert v["f2"]["result"] == "detected"
    assert set(v) == {"line1", "f2"}
    stricter = make_cfg(sim, max_clock_skew=1)
    _, v, _ = judge(stricter, [near], tmp_path)
    assert v["line1"]["result"] == "rejected" and "3 minutes ahead" in v["line1"]["reason"]


def test_validate_says_what_it_waits_for_and_until_when(sim, tmp_path, capsys):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(action("soon", [host()], id="w1")) + "\n")
    clock = FakeClock(T - M)
    assert validate_file(make_cfg(sim), path, True, io.StringIO(), clock) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"waiting until {format_ts(T)} (60 s) for window 1 of 11 of action w1"
    assert lines[1] == f"waiting until {format_ts(T + 30 * S)} (30 s) for window 2 of 11 of action w1"
    assert len(lines) == 11  # one line per wait, none when nothing is waited for


def test_tanium_failure_in_file_mode_is_a_clear_error_without_the_key(sim, tmp_path, capsys):
    cfg = make_cfg(sim, tanium={"api_key": "wrong-secret-key-123"})
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(action("x", [host()], id="e1")) + "\n")
    out = io.StringIO()
    assert validate_file(cfg, path, True, out, FakeClock(T - M)) == 1
    err = capsys.readouterr().err
    last = err.splitlines()[-1]  # after the line saying what it waited for
    assert last.startswith("error: Tanium query failed:") and "token" in last.lower(), err
    assert "wrong-secret-key-123" not in err + out.getvalue()
    assert out.getvalue() == ""  # no verdict when Tanium could not be asked


def test_missing_job_actions_file_is_a_config_error(sim, tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        validate_file(make_cfg(sim), tmp_path / "nope.jsonl", out=io.StringIO())


# ---- cost ----------------------------------------------------------------------------------------


def count_requests(sim, cfg, starts: list[datetime], hosts: list[str], tag: str) -> tuple[int, int]:
    """(requests the simulator saw, requests the engine counted) judging one action per start."""
    engine, client = engine_for(cfg)
    acts = [action(f"bench {k}", [hosts[k]], t=s, id=f"{tag}-{k}") for k, s in enumerate(starts)]
    before = sim.stats["alerts"] + sim.stats["intel"]
    verdicts, _ = run_engine(engine, acts, min(starts) - M)
    client.close()
    assert len(verdicts) == len(starts) and all(v["detected"] for v in verdicts)
    return sim.stats["alerts"] + sim.stats["intel"] - before, engine.stats["requests"]


@pytest.mark.slow
def test_requests_follow_due_times_not_the_number_of_actions(sim, capsys):
    """Counts, not timings. 200 actions whose starts fall on 5 seconds cost what 5 actions on those
    seconds cost (one query round per distinct due time). With max_lateness = 30, 200 actions
    spread over a minute cost at most twice one action (rounds shared over 30 s)."""
    t0 = T + 2 * timedelta(hours=1)
    hosts = [host() for _ in range(200)]
    for k, h in enumerate(hosts):
        sim.inject(computer_name=h, alerted_at=t0 + (k % 60) * S + 30 * S)
    cfg = make_cfg(sim, discover_network_devices=False)
    on_5 = [t0 + (k % 5) * S for k in range(200)]
    few, many = count_requests(sim, cfg, on_5[:5], hosts, "f"), count_requests(sim, cfg, on_5, hosts, "m")
    relaxed = make_cfg(sim, discover_network_devices=False, max_lateness=30)
    spread = [t0 + (k % 60) * S for k in range(200)]
    one, spread_200 = (
        count_requests(sim, relaxed, spread[:1], hosts, "o"),
        count_requests(sim, relaxed, spread, hosts, "s"),
    )
    with capsys.disabled():
        print(
            f"\nvalidation requests (simulator, engine): 5 vs 200 actions on 5 start seconds {few} vs {many}; "
            f"max_lateness 30 s, 1 vs 200 actions over a minute {one} vs {spread_200}"
        )
    for sim_count, engine_count in (few, many, one, spread_200):
        assert sim_count == engine_count
    assert many[0] <= few[0] + 5  # a few more pages for the 195 more alerts
    assert spread_200[0] <= 2 * one[0]


# ---- the shipped example -------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = {
    "sv-1001": ("detected", True),
    "sv-1002": ("detected", False),
    "sv-1003": ("detected", False),
    "sv-1004": ("missed", False),
    "sv-1005": ("missed", False),
    "sv-1006": ("missed", False),
}


@pytest.fixture(scope="module")
def example_sim():
    spec = importlib.util.spec_from_file_location(
        "validation_simulator", ROOT / "pipelines/examples/validation_simulator.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sim = mod.start(port=0, api_key="token-example")
    yield sim
    sim.stop()


def test_shipped_example_through_the_cli(example_sim, tmp_path, monkeypatch, capsys):
    """`tanium-connector validate pipelines/security-validation.toml --job-actions …` with the
    example simulator: the documented verdicts, with the real clock (the windows are in the past)."""
    from connector import cli

    toml = (
        (ROOT / "pipelines/security-validation.toml").read_text().replace("port = 8443", f"port = {example_sim.port}")
    )
    (tmp_path / "sv.toml").write_text(toml)
    monkeypatch.setenv("TANIUM_API_KEY", "token-example")
    examples = str(ROOT / "pipelines/examples/job-actions.jsonl")
    assert cli.main(["validate", str(tmp_path / "sv.toml"), "--job-actions", examples, "--json"]) == 0
    verdicts = {v["action_id"]: v for v in map(json.loads, capsys.readouterr().out.splitlines())}
    assert {k: (v["result"], v["alerted"]) for k, v in verdicts.items()} == EXPECTED
    assert verdicts["sv-1005"]["suspicious_events"] == 1 and verdicts["sv-1006"]["suspicious_events"] == 1
    assert verdicts["sv-1001"]["latency_seconds"] == 3.0
    assert cli.main(["validate", str(tmp_path / "sv.toml"), "--job-actions", examples]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and sum(ln.startswith("DETECTED") for ln in lines) == 3
