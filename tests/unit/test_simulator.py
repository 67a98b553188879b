"""The TR simulator over real HTTP: endpoints, envelope, paging, every filter, sort, data shape,
injection, live mode, faults, TLS and the command line."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import orjson
import pytest
import requests

from connector.simulator import GARBAGE_KINDS, TR_PATH, Simulator
from connector.timeutil import parse_ts

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
END = "2024-05-01T00:00:00.000Z"


def get(sim, path, params=None, key=None, **kw):
    headers = {"session": sim.api_key if key is None else key}
    return requests.get(sim.url + path, params=params, headers=headers, timeout=10, **kw)


def alerts(sim, params=None):
    r = get(sim, TR_PATH + "/alerts", params)
    assert r.status_code == 200, r.text
    return r.json()


def all_alerts(sim):
    out = []
    while True:
        page = alerts(sim, [("limit", "500"), ("offset", str(len(out)))])["data"]
        out += page
        if len(page) < 500:
            return out


@pytest.fixture(scope="module")
def fixed():
    """Reproducible data set shared by the read-only tests of this module."""
    with Simulator(alerts=1200, intel_docs=8, seed=11, end=END, history=3 * 3600, revisions=3) as s:
        s.everything = all_alerts(s)
        yield s


# -- envelope, paging, shape ---------------------------------------------------------------------


def test_envelope_meta_and_default_limit(fixed):
    body = alerts(fixed)
    assert set(body) == {"data", "meta"}
    assert body["meta"] == {"totalCount": 1200, "filteredCount": 1200}
    assert len(body["data"]) == 100  # default limit


def test_limit_offset_and_the_500_cap(fixed):
    assert len(alerts(fixed, {"limit": 500})["data"]) == 500
    page = alerts(fixed, {"limit": 7, "offset": 1195})["data"]
    assert [a["id"] for a in page] == [1196, 1197, 1198, 1199, 1200]
    assert alerts(fixed, {"offset": 5000})["data"] == []
    r = get(fixed, TR_PATH + "/alerts", {"limit": 501})
    assert r.status_code == 400
    assert "500" in r.json()["errors"][0]["description"]
    assert get(fixed, TR_PATH + "/alerts", {"limit": "ten"}).status_code == 400
    assert get(fixed, TR_PATH + "/alerts", {"offset": -1}).status_code == 400


def test_trailing_slash_is_accepted(fixed):
    assert get(fixed, TR_PATH + "/alerts/", {"limit": 3}).json()["data"] == alerts(fixed, {"limit": 3})["data"]
    assert get(fixed, TR_PATH + "/intels/").status_code == 200


def test_alert_shape_timestamps_and_order(fixed):
    data = fixed.everything
    assert [a["id"] for a in data] == list(range(1, 1201))
    created = [a["createdAt"] for a in data]
    assert created == sorted(created)  # ids increase with createdAt
    for a in data:
        for f in ("createdAt", "alertedAt", "receivedAt", "updatedAt"):
            assert TS.match(a[f]), (f, a[f])
        delay = parse_ts(a["createdAt"]) - parse_ts(a["alertedAt"])
        assert timedelta(0) <= delay <= timedelta(minutes=5, seconds=1)
        assert a["alertedAt"].endswith(".000Z")
        assert a["type"] == "detect.match" and a["matchType"] in ("process", "file", "port")
        assert isinstance(a["details"], str)
    assert len({a["guid"] for a in data}) == len(data)


def test_details_are_realistic_json_strings(fixed):
    seen = set()
    for a in fixed.everything[:400]:
        d = orjson.loads(a["details"])
        mt = d["match"]["type"]
        seen.add(mt)
        assert mt == a["matchType"]
        assert d["intel_id"] == a["intelDocId"] and d["config_id"] == a["scanConfigId"]
        f = d["finding"]
        assert f["intel_id"].startswith(f"{a['intelDocId']}:{a['intelDocRevisionId']}:")
        assert f["finding_id"] == a["findingId"] and f["first_seen"] == a["alertedAt"]
        assert set(f["system_info"]) >= {"os", "bits", "platform"}
        assert f["whats"]
        props = d["match"]["properties"]
        if mt == "process":
            assert props["file"]["fullpath"] == a["path"]
            assert props["parent"]["parent"]["name"]  # nested parent processes
            assert re.fullmatch(r"[0-9a-f]{32}", props["file"]["md5"])
            acting = f["whats"][0]["artifact_activity"]["acting_artifact"]["process"]
            assert acting["parent"]["process"]["pid"] == props["ppid"]
        elif mt == "file":
            assert props["fullpath"] == a["path"] and len(props["sha256"]) == 64
        else:
            assert {"local_ip", "remote_ip", "local_port", "remote_port"} <= set(props)
            assert props["process"]["file"]["fullpath"] == a["path"]
    assert seen == {"process", "file", "port"}


def test_many_alerts_share_few_docs_with_revisions(fixed):
    counts: dict[int, int] = {}
    revs: dict[int, set] = {}
    for a in fixed.everything:
        counts[a["intelDocId"]] = counts.get(a["intelDocId"], 0) + 1
        revs.setdefault(a["intelDocId"], set()).add(a["intelDocRevisionId"])
    assert set(counts) <= set(fixed.intel_doc_ids) and len(counts) <= 8
    assert max(counts.values()) > 1200 / 8 * 2  # skewed: the top doc has far more than an even share
    assert any(len(r) > 1 for r in revs.values())  # revisions=3: some doc changed revision over time


def test_same_seed_same_data_other_seed_other_data():
    with (
        Simulator(alerts=50, seed=5, end=END) as a,
        Simulator(alerts=50, seed=5, end=END) as b,
        Simulator(alerts=50, seed=6, end=END) as c,
    ):
        assert alerts(a, {"limit": 50}) == alerts(b, {"limit": 50})
        assert alerts(a, {"limit": 50})["data"] != alerts(c, {"limit": 50})["data"]


def test_a_million_virtual_alerts_page_cheaply():
    with Simulator(alerts=1_000_000, seed=2, end=END) as s:
        body = alerts(s, {"limit": 5, "offset": 999_997})
        assert [a["id"] for a in body["data"]] == [999_998, 999_999, 1_000_000]
        assert body["meta"]["totalCount"] == 1_000_000
        window = alerts(
            s, [("alertedAtFrom", "2024-04-30T23:00:00Z"), ("alertedAtUntil", "2024-04-30T23:01:00Z"), ("limit", "500")]
        )
        assert 0 < window["meta"]["filteredCount"] < 2000
        assert all("2024-04-30T23:00" in a["alertedAt"] for a in window["data"])


# -- filters ---------------------------------------------------------------------------------------


def ids(body):
    return [a["id"] for a in body["data"]]


def expect(fixed, pred):
    return [a["id"] for a in fixed.everything if pred(a)][:500]


@pytest.mark.parametrize("field", ["state", "severity", "priority", "type", "matchType"])
def test_exact_filters_repeated_is_or(fixed, field):
    values = sorted({a[field] for a in fixed.everything})
    one = values[0]
    body = alerts(fixed, [(field, one), ("limit", "500")])
    assert ids(body) == expect(fixed, lambda a: a[field] == one)
    assert body["meta"]["filteredCount"] == sum(a[field] == one for a in fixed.everything)
    if len(values) > 1:
        two = values[:2]
        assert ids(alerts(fixed, [(field, two[0]), (field, two[1]), ("limit", "500")])) == expect(
            fixed, lambda a: a[field] in two
        )


def test_state_resolved_does_not_match_unresolved(fixed):
    got = alerts(fixed, [("state", "resolved"), ("limit", "500")])["data"]
    assert got and {a["state"] for a in got} == {"resolved"}


@pytest.mark.parametrize("field", ["intelDocId", "scanConfigId"])
def test_number_filters(fixed, field):
    value = fixed.everything[0][field]
    assert ids(alerts(fixed, [(field, str(value)), ("limit", "500")])) == expect(fixed, lambda a: a[field] == value)


@pytest.mark.parametrize(
    "field,part",
    [
        ("computerName", lambda v: v.split(".")[0].upper()),
        ("computerIpAddress", lambda v: v.rsplit(".", 1)[0] + "."),
        ("guid", lambda v: v[-6:]),
        ("path", lambda v: v.split("\\")[-1].split("/")[-1]),
    ],
)
def test_contains_filters_case_insensitive(fixed, field, part):
    needle = part(fixed.everything[3][field])
    got = alerts(fixed, [(field, needle), ("limit", "500")])
    assert ids(got) == expect(fixed, lambda a: needle.lower() in a[field].lower())
    assert fixed.everything[3]["id"] in ids(got)


def test_different_parameters_are_and(fixed):
    a0 = fixed.everything[10]
    got = alerts(fixed, [("computerName", a0["computerName"]), ("matchType", a0["matchType"]), ("limit", "500")])
    assert ids(got) == expect(
        fixed, lambda a: a["computerName"] == a0["computerName"] and a["matchType"] == a0["matchType"]
    )
    assert a0["id"] in ids(got)


def test_intel_filters_and_details_contains(fixed):
    yara = {d["id"] for d in get(fixed, TR_PATH + "/intels").json()["data"] if d["type"] == "yara"}
    got = alerts(fixed, [("intelType", "yara"), ("limit", "500")])
    assert ids(got) == expect(fixed, lambda a: a["intelDocId"] in yara)
    finding = orjson.loads(fixed.everything[0]["details"])["finding"]["finding_id"]
    assert ids(alerts(fixed, [("details", finding)])) == [fixed.everything[0]["id"]]


def test_alerted_at_window_inclusive_from_exclusive_until(fixed):
    data = fixed.everything
    t0, t1 = data[300]["alertedAt"], data[600]["alertedAt"]
    lo, hi = min(t0, t1), max(t0, t1)
    got = alerts(fixed, [("alertedAtFrom", lo), ("alertedAtUntil", hi), ("limit", "500")])
    want = [a["id"] for a in data if lo <= a["alertedAt"] < hi]
    assert got["meta"]["filteredCount"] == len(want)
    assert ids(got) == want[:500]
    assert any(a["alertedAt"] == lo for a in got["data"])  # inclusive
    assert all(a["alertedAt"] != hi for a in got["data"])  # exclusive
    # the same instant written with an offset, no fraction, or microseconds
    dt = parse_ts(lo)
    for form in (dt.isoformat(), dt.strftime("%Y-%m-%dT%H:%M:%SZ"), dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")):
        assert alerts(fixed, [("alertedAtFrom", form), ("alertedAtUntil", hi)])["meta"]["filteredCount"] == len(want)
    r = get(fixed, TR_PATH + "/alerts", {"alertedAtFrom": "yesterday"})
    assert r.status_code == 400 and "alertedAtFrom" in r.text


# -- sort and expand -------------------------------------------------------------------------------


def test_sort_descending_and_multi_column(fixed):
    assert ids(alerts(fixed, {"sort": "-createdAt", "limit": 5})) == [1200, 1199, 1198, 1197, 1196]
    assert ids(alerts(fixed, {"sort": "createdAt,id", "limit": 3, "offset": 10})) == [11, 12, 13]
    got = alerts(fixed, {"sort": "computerName,-id", "limit": 500})["data"]
    want = sorted(fixed.everything, key=lambda a: (a["computerName"], -a["id"]))[:500]
    assert [a["id"] for a in got] == [a["id"] for a in want]
    got = alerts(fixed, {"sort": "+alertedAt", "limit": 50})["data"]
    assert [a["alertedAt"] for a in got] == sorted(a["alertedAt"] for a in fixed.everything)[:50]
    r = get(fixed, TR_PATH + "/alerts", {"sort": "nonsense"})
    assert r.status_code == 400 and "nonsense" in r.text


def test_expand_intel_doc(fixed):
    for a in alerts(fixed, {"expand": "intelDoc", "limit": 20})["data"]:
        assert a["intelDoc"]["id"] == a["intelDocId"]
        assert "labelIds" not in a["intelDoc"] and "name" in a["intelDoc"]
    assert "intelDoc" not in alerts(fixed, {"limit": 1})["data"][0]


# -- other endpoints -------------------------------------------------------------------------------


def test_single_alert_and_unknown_ids(fixed):
    r = get(fixed, TR_PATH + "/alerts/42")
    assert r.status_code == 200 and r.json()["data"] == fixed.everything[41]
    assert get(fixed, TR_PATH + "/alerts/99999").status_code == 404
    assert get(fixed, TR_PATH + "/intels/99999").status_code == 404
    assert get(fixed, TR_PATH + "/nothing-here").status_code == 404


def test_intels_types_techniques_and_labels(fixed):
    body = get(fixed, TR_PATH + "/intels").json()
    docs = body["data"]
    assert body["meta"]["totalCount"] == 8
    assert {d["type"] for d in docs} == {"tanium-signal", "openioc", "yara", "processInjection"}
    assert any(d["mitreAttack"] and d["mitreAttack"]["techniques"][0]["id"].startswith("T") for d in docs)
    one = get(fixed, f"{TR_PATH}/intels/{docs[0]['id']}").json()["data"]
    assert one["id"] == docs[0]["id"] and TS.match(one["updatedAt"]) and "labelIds" in one
    labels = get(fixed, f"{TR_PATH}/intels/{docs[0]['id']}/labels").json()["data"]
    assert [lab["id"] for lab in labels] == one["labelIds"]
    assert get(fixed, TR_PATH + "/intels", {"type": "yara"}).json()["meta"]["filteredCount"] == sum(
        d["type"] == "yara" for d in docs
    )
    assert len(get(fixed, TR_PATH + "/intels", {"limit": 1}).json()["data"]) == 1


def test_session_header_required(fixed):
    assert get(fixed, TR_PATH + "/alerts", key="").status_code == 401
    assert get(fixed, TR_PATH + "/alerts", key="token-wrong").status_code == 401
    r = get(fixed, "/api/v2/session/current")
    assert r.status_code == 200 and r.json()["data"]
    assert fixed.api_key not in r.text


def test_bare_mode_serves_3x_shapes():
    with Simulator(alerts=5, bare=True) as s:
        body = get(s, TR_PATH + "/alerts").json()
        assert isinstance(body, list) and len(body) == 5
        assert isinstance(get(s, f"{TR_PATH}/intels/{s.intel_doc_ids[0]}").json(), dict)


def test_stats_count_requests_per_endpoint(sim):
    get(sim, TR_PATH + "/alerts")
    doc = sim.intel_doc_ids[0]
    for _ in range(3):
        get(sim, f"{TR_PATH}/intels/{doc}")
    get(sim, f"{TR_PATH}/intels/{doc}/labels")
    assert sim.stats["alerts"] == 1 and sim.stats["intel"] == 3 and sim.stats["intel_labels"] == 1


# -- injection and live mode -----------------------------------------------------------------------


def test_inject_port_match_for_an_actor_host(sim):
    when = datetime.now(UTC) - timedelta(minutes=3)
    a = sim.inject(
        computer_name="actor1.corp.local",
        ip="10.0.0.5",
        alerted_at=when,
        match_type="port",
        local_ip="10.0.0.5",
        remote_ip="192.0.2.77",
        remote_port=4444,
        md5="0" * 32,
        args="evil.exe --beacon",
        intel_doc_id=sim.intel_doc_ids[1],
    )
    assert a["id"] == 301 and a["computerName"] == "actor1.corp.local" and a["computerIpAddress"] == "10.0.0.5"
    assert parse_ts(a["alertedAt"]) == when.replace(microsecond=when.microsecond // 1000 * 1000)
    assert a["intelDocId"] == sim.intel_doc_ids[1]
    props = orjson.loads(a["details"])["match"]["properties"]
    assert (props["local_ip"], props["remote_ip"], props["remote_port"]) == ("10.0.0.5", "192.0.2.77", 4444)
    assert props["process"]["args"] == "evil.exe --beacon" and props["process"]["file"]["md5"] == "0" * 32
    served = alerts(sim, [("computerName", "actor1"), ("alertedAtFrom", a["alertedAt"])])
    assert ids(served) == [301] and served["data"][0] == a


def test_inject_process_and_file_matches_and_raw_details(sim):
    p = sim.inject(computer_name="h1", match_type="process", args="cmd.exe /c calc", user="CORP\\eve")
    props = orjson.loads(p["details"])["match"]["properties"]
    assert props["args"] == "cmd.exe /c calc" and props["user"] == "CORP\\eve" and props["parent"]
    f = sim.inject(computer_name="h2", match_type="file", path="/tmp/x.bin", sha256="ab" * 32)
    props = orjson.loads(f["details"])["match"]["properties"]
    assert f["path"] == props["fullpath"] == "/tmp/x.bin" and props["sha256"] == "ab" * 32
    raw = sim.inject(details="not json at all")
    assert raw["details"] == "not json at all"
    assert sim.inject(details=None)["details"] is None
    assert sim.inject(fields={"severity": "weird"})["severity"] == "weird"
    assert [x["id"] for x in (p, f, raw)] == [301, 302, 303]


def test_inject_rejects_bad_input(sim):
    with pytest.raises(TypeError, match="unknown overrides"):
        sim.inject(colour="red")
    with pytest.raises(ValueError, match="match_type"):
        sim.inject(match_type="registry")
    with pytest.raises(ValueError, match="before the newest alert"):
        sim.inject(created_at=datetime(2000, 1, 1, tzinfo=UTC))


def test_bump_revision(sim):
    doc = sim.intel_doc_ids[0]
    before = get(sim, f"{TR_PATH}/intels/{doc}").json()["data"]["revisionId"]
    assert sim.bump_revision(doc) == before + 1
    assert get(sim, f"{TR_PATH}/intels/{doc}").json()["data"]["revisionId"] == before + 1
    assert sim.inject(intel_doc_id=doc)["intelDocRevisionId"] == before + 1


def wait_for(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_live_mode_adds_alerts_some_late():
    with Simulator(alerts=10, live_rate=200, late_fraction=0.5, live_total=60, seed=3) as s:
        assert wait_for(lambda: s.live_created >= 60)
        data = all_alerts(s)
        assert len(data) == 70 and [a["id"] for a in data] == list(range(1, 71))
        created = [a["createdAt"] for a in data]
        assert created == sorted(created)
        live = data[10:]
        late = [a for a in live if parse_ts(a["createdAt"]) - parse_ts(a["alertedAt"]) > timedelta(minutes=20)]
        assert 0 < len(late) < len(live)
        # live_total reached: the live thread ends and no more alerts arrive
        assert wait_for(lambda: not any(t.name == "simulator-live" and t.is_alive() for t in s._threads))
        assert s.alert_count == 70


# -- faults ----------------------------------------------------------------------------------------


def test_fault_429_with_retry_after_then_ok(sim):
    sim.faults.rate_limit_next = 2
    sim.faults.retry_after = "1"
    for _ in range(2):
        r = get(sim, TR_PATH + "/alerts")
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    assert get(sim, TR_PATH + "/alerts").status_code == 200
    assert sim.faults.served["rate_limit"] == 2


def test_fault_5xx_burst_and_endpoint_scope(sim):
    sim.faults.error_rate = 1.0
    sim.faults.endpoints = {"intel"}
    assert get(sim, TR_PATH + "/alerts").status_code == 200
    assert get(sim, f"{TR_PATH}/intels/{sim.intel_doc_ids[0]}").status_code == 503
    sim.faults.reset()
    sim.faults.error_next, sim.faults.error_status = 1, 502
    assert get(sim, TR_PATH + "/alerts").status_code == 502
    assert get(sim, TR_PATH + "/alerts").status_code == 200


def test_fault_connection_reset_mid_body(sim):
    sim.faults.reset_next = 1
    with pytest.raises((requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError)):
        get(sim, TR_PATH + "/alerts")
    assert get(sim, TR_PATH + "/alerts").status_code == 200


def test_fault_stall_beyond_the_client_timeout(sim):
    sim.faults.stall_next, sim.faults.stall_seconds = 1, 5
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.get(sim.url + TR_PATH + "/alerts", headers={"session": sim.api_key}, timeout=0.3)
    assert get(sim, TR_PATH + "/alerts").status_code == 200


def test_fault_malformed_json(sim):
    sim.faults.malformed_next = 1
    r = get(sim, TR_PATH + "/alerts")
    assert r.status_code == 200
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(r.content)


def test_fault_garbage_records_mixed_into_a_page(sim):
    sim.faults.garbage_next, sim.faults.garbage_per_page = 1, len(GARBAGE_KINDS)
    sim.faults.huge_details_bytes = 200_000
    r = get(sim, TR_PATH + "/alerts", {"limit": 50})
    body = orjson.loads(r.content.decode("utf-8", errors="replace"))  # one kind is invalid UTF-8
    items = body["data"]
    real = [x for x in items if isinstance(x, dict) and isinstance(x.get("id"), int) and x["id"] > 0]
    assert [x["id"] for x in real] == list(range(1, 51))  # nothing real lost or moved
    assert len(items) == 50 + len(GARBAGE_KINDS)
    assert [k for k, _ in sim.garbage_log] == list(GARBAGE_KINDS)
    assert any(not isinstance(x, dict) for x in items)
    assert any(isinstance(x, dict) and "id" not in x for x in items)
    assert any(isinstance(x, dict) and isinstance(x.get("id"), str) for x in items)
    assert any(isinstance(x, dict) and len(str(x.get("details", ""))) > 200_000 for x in items)
    assert any(isinstance(x, dict) and "\ufffd" in str(x.get("computerName")) for x in items)
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(r.content)
    # negative ids at the createdAt of the record before: they never move a (createdAt, id) cursor
    for k, x in enumerate(items):
        if isinstance(x, dict) and isinstance(x.get("id"), int) and x["id"] < 0:
            prev = next(
                p for p in reversed(items[:k]) if isinstance(p, dict) and isinstance(p.get("id"), int) and p["id"] > 0
            )
            assert x["createdAt"] == prev["createdAt"]


def test_fault_wrong_token_module_missing_forbidden(sim):
    sim.faults.wrong_token = True
    assert get(sim, TR_PATH + "/alerts").status_code == 401
    sim.faults.wrong_token = False
    sim.api_key = "token-rotated"  # the old token "expired"
    assert get(sim, TR_PATH + "/alerts", key="token-demo").status_code == 401
    sim.api_key = "token-demo"
    sim.faults.module_missing = True
    for path in ("/alerts", "/alerts/1", "/intels", f"/intels/{sim.intel_doc_ids[0]}"):
        r = get(sim, TR_PATH + path)
        assert r.status_code == 404 and r.json()["errors"][0]["description"].endswith("does not exist")
    assert get(sim, "/api/v2/session/current").status_code == 200  # the platform itself is there
    sim.faults.module_missing = False
    sim.faults.forbidden = True
    assert get(sim, TR_PATH + "/alerts").status_code == 403


# -- TLS and command line --------------------------------------------------------------------------


def test_https_with_a_given_certificate(tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    with Simulator(alerts=3, certfile=str(tmp_path / "server.pem")) as s:
        assert s.url.startswith("https://")
        with pytest.raises(requests.exceptions.SSLError):
            get(s, TR_PATH + "/alerts")
        assert len(get(s, TR_PATH + "/alerts", verify=str(tmp_path / "ca.pem")).json()["data"]) == 3


def test_command_line_serves_until_sigterm(tmp_path):
    env = {**os.environ, "TANIUM_API_KEY": "token-from-env"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "connector.simulator",
            "--port",
            "0",
            "--alerts",
            "25",
            "--intel-docs",
            "3",
            "--seed",
            "4",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        url = re.search(r"(http://\S+)", line).group(1)
        assert "token-from-env" not in line
        r = requests.get(url + TR_PATH + "/alerts", headers={"session": "token-from-env"}, timeout=10)
        assert r.json()["meta"]["totalCount"] == 25
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_command_line_rejects_bad_values():
    out = subprocess.run(
        [sys.executable, "-m", "connector.simulator", "--history", "forever"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "forever" in out.stderr and "Traceback" not in out.stderr


def put(sim, path, state, params=None):
    return requests.put(
        sim.url + TR_PATH + path, params=params, json=state, headers={"session": sim.api_key}, timeout=10
    )


def test_state_changes_move_updated_at_and_the_updated_at_order():
    """PUT alerts/{id} and the bulk PUT alerts/?id=… change state and updatedAt (one time for a bulk
    change, later than every earlier updatedAt); -updatedAt,-id pages follow; bad requests change nothing."""
    with Simulator(alerts=300, seed=4, end=END, history=3600) as s:
        full = sorted(all_alerts(s), key=lambda a: (a["updatedAt"], a["id"]), reverse=True)
        assert [a["id"] for a in alerts(s, {"sort": "-updatedAt,-id", "limit": 500})["data"]] == [a["id"] for a in full]
        assert [a["id"] for a in alerts(s, {"sort": "-updatedAt", "offset": 7, "limit": 5})["data"]] == [
            a["id"] for a in full[7:12]
        ]
        assert put(s, "/alerts/7", {"state": "resolved"}).json()["data"]["state"] == "resolved"
        bulk = put(s, "/alerts/", {"state": "suppressed"}, [("id", 9), ("id", 8)]).json()["data"]
        assert [(a["id"], a["state"]) for a in bulk] == [(9, "suppressed"), (8, "suppressed")]
        assert bulk[0]["updatedAt"] == bulk[1]["updatedAt"] == bulk[0]["suppressedAt"] > full[0]["updatedAt"]
        assert [a["id"] for a in alerts(s, {"sort": "-updatedAt,-id", "limit": 3})["data"]] == [9, 8, 7]
        assert [a["id"] for a in alerts(s, {"sort": "updatedAt", "offset": 297})["data"]] == [7, 8, 9]
        assert {8, 9} <= {a["id"] for a in alerts(s, {"state": "suppressed", "limit": 500})["data"]}
        for path, body, params, status, says in (
            ("/alerts/7", {"state": "closed"}, None, 400, "unresolved, inprogress, resolved, suppressed"),
            ("/alerts/7", [1], None, 400, "JSON object"),
            ("/alerts/", {"state": "resolved"}, None, 400, "no alert ids"),
            ("/alerts/", {"state": "resolved"}, [("id", "x")], 400, "integers"),
            ("/alerts/", {"state": "resolved"}, [("id", 5), ("id", 9999)], 404, "alert 9999 not found"),
        ):
            r = put(s, path, body, params)
            assert (r.status_code, says in r.json()["errors"][0]["description"]) == (status, True), r.text
        assert s.get_alert(5)["state"] == full[[a["id"] for a in full].index(5)]["state"]  # the 404 changed nothing
        assert [(c[0], c[2]) for c in s.lifecycle.changes] == [(7, "resolved"), (9, "suppressed"), (8, "suppressed")]
        assert s.stats["update"] == 7


def test_live_updates_move_recent_alerts_one_step_on():
    """Live mode's state changes: unresolved → inprogress → resolved or suppressed, never back."""
    with Simulator(alerts=100, seed=4, history=3600, live_updates=100) as s:
        deadline = time.monotonic() + 20
        while len(s.lifecycle.changes) < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        changes = list(s.lifecycle.changes)
    assert len(changes) >= 40
    before = {"inprogress": "unresolved", "resolved": "inprogress", "suppressed": "inprogress"}
    last: dict[int, str] = {}
    for aid, _, to, _ in changes:
        assert last.get(aid, before[to]) == before[to], f"alert {aid}: {last.get(aid)} → {to}"
        last[aid] = to
    assert {to for _, _, to, _ in changes} >= {"inprogress", "resolved"}
