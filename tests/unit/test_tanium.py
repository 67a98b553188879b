"""TaniumClient against the real simulator over HTTP(S): paging, envelope, details, retries,
Retry-After, every error class and its message, TLS, proxies, metrics, and the key never leaking."""

from __future__ import annotations

import email.utils
import logging
import threading
import time
import traceback
from datetime import UTC, datetime, timedelta

import pytest
from helpers import ForwardProxy

from connector.config import TaniumSection, parse_pipeline
from connector.metrics import NO_METRICS, Metrics
from connector.simulator import GARBAGE_KINDS, Simulator
from connector.tanium import (
    MODULE_MISSING_MESSAGE,
    TaniumAuthError,
    TaniumClient,
    TaniumConnectionError,
    TaniumError,
    TaniumModuleMissing,
    TaniumPermissionError,
    TaniumResponseError,
    decode_details,
)
from connector.tanium_http import retry_after
from connector.tools.embedded import free_port

KEY = "token-S3CRET-5f2a9c71d0"
EXPECTED_404 = (
    "Tanium returned 404 for the Threat Response API: the Threat Response module is missing or not "
    "configured on this Tanium server (the Threat Response plugin is required)"
)


@pytest.fixture
def tsim(sim):
    sim.api_key = KEY
    return sim


def make(sim, metrics: Metrics = NO_METRICS, **kw) -> TaniumClient:
    kw.setdefault("api_key", KEY)
    return TaniumClient(TaniumSection(**sim.settings(**kw)), metrics, backoff_base=0.01, backoff_cap=0.05)


def sample(m: Metrics, name: str, **labels) -> float:
    return m.registry.get_sample_value("tanium_connector_" + name, {"pipeline": m.pipeline, **labels}) or 0.0


# -- happy paths -----------------------------------------------------------------------------------


def test_settings_from_a_pipeline_definition(tsim):
    cfg = parse_pipeline({"pipeline": {"name": "p"}, "tanium": tsim.settings(api_key=KEY)})
    c = TaniumClient(cfg.tanium)
    assert c.session_current()["id"]
    assert repr(c) == f"TaniumClient('{tsim.url}')"
    c.close()


def test_list_alerts_unwraps_envelope_and_decodes_details(tsim):
    page = make(tsim).list_alerts([], offset=10, limit=5)
    assert [a["id"] for a in page.items] == [11, 12, 13, 14, 15]
    assert (page.total, page.filtered) == (300, 300)
    for a in page.items:
        assert isinstance(a["details"], dict) and a["details"]["match"]["type"] == a["matchType"]
        assert "detailsError" not in a


def test_filters_and_sort_pass_through(tsim):
    target = tsim.get_alert(17)["computerName"]
    c = make(tsim)
    page = c.list_alerts([("computerName", target)], 0, 500)
    assert page.items and all(a["computerName"] == target for a in page.items)
    assert page.filtered == len(page.items) < 300
    assert [a["id"] for a in c.list_alerts([], 0, 3, sort="-createdAt").items] == [300, 299, 298]


def pages(c, limit: int, page_size: int):
    """Offset paging over list_alerts up to `limit` records or a short page, as the source reads."""
    offset, out = 0, []
    while offset < limit:
        want = min(page_size, limit - offset)
        items = c.list_alerts([], offset, want).items
        if items:
            out.append(items)
        offset += want
        if len(items) < want:
            break
    return out


def test_paging_by_offset_stops_at_limit(tsim):
    c = make(tsim)
    got = pages(c, limit=250, page_size=100)
    assert [len(p) for p in got] == [100, 100, 50]
    assert [a["id"] for p in got for a in p] == list(range(1, 251))
    assert tsim.stats["alerts"] == 3


def test_paging_stops_on_an_empty_or_short_page(tsim):
    c = make(tsim)
    got = pages(c, limit=10_000, page_size=100)
    assert [len(p) for p in got] == [100, 100, 100]
    assert tsim.stats["alerts"] == 4  # the fourth page was empty
    with pytest.raises(ValueError, match="limit must be between 1 and 500"):
        c.list_alerts([], 0, 7000)


def test_extra_records_from_a_hostile_server_do_not_shift_paging(tsim):
    tsim.faults.garbage_next, tsim.faults.garbage_per_page = 1, 3
    tsim.faults.garbage_kinds = ("non_object", "missing_id", "wrong_types")
    pages_ = pages(make(tsim), limit=300, page_size=100)
    real = [a["id"] for p in pages_ for a in p if isinstance(a, dict) and isinstance(a.get("id"), int)]
    assert real == list(range(1, 301))
    assert sum(len(p) for p in pages_) == 303


def test_bare_array_replies_are_accepted():
    with Simulator(alerts=12, bare=True, api_key=KEY) as s:
        c = make(s)
        page = c.list_alerts([], 0, 10)
        assert len(page.items) == 10 and page.total is None and isinstance(page.items[0]["details"], dict)
        assert c.get_intel(s.intel_doc_ids[0])["id"] == s.intel_doc_ids[0]


def test_intel_docs_labels_and_404_is_not_fatal(tsim):
    c = make(tsim)
    doc_id = tsim.intel_doc_ids[0]
    doc = c.get_intel(doc_id)
    assert doc["id"] == doc_id and isinstance(doc["mitreAttack"], dict)
    assert c.get_intel(999_999) is None
    assert c.get_intel("not-a-number") is None
    assert len(c.list_intels(limit=1)) == 1
    assert tsim.stats["intel"] == 2 and tsim.stats["unknown"] == 1  # "not-a-number" is no intel path


def test_bad_arguments_are_refused_before_any_request(tsim):
    c = make(tsim)
    with pytest.raises(ValueError, match="between 1 and 500"):
        c.list_alerts([], 0, 501)
    with pytest.raises(ValueError, match="offset"):
        c.list_alerts([], -1, 10)
    assert tsim.stats["alerts"] == 0


# -- details decoding ------------------------------------------------------------------------------


def test_details_variants_are_kept_and_flagged(tsim):
    tsim.inject(details="definitely not json")
    tsim.inject(details=None)
    tsim.inject(details="[1, 2]")
    tsim.inject(details='{"match": null}')
    tsim.inject(fields={"details": 17})
    tsim.inject(details="[" * 5000 + "]" * 5000)
    items = make(tsim).list_alerts([], 300, 10).items
    assert items[0]["details"] == "definitely not json" and "not valid JSON" in items[0]["detailsError"]
    assert items[1]["details"] is None and items[1]["detailsError"] == "details is null"
    assert items[2]["details"] == "[1, 2]"
    assert items[2]["detailsError"] == "details is JSON but an array, not an object"
    assert items[3]["details"] == {"match": None} and "detailsError" not in items[3]
    assert items[4]["details"] == 17 and items[4]["detailsError"] == "details is a number, expected a JSON string"
    assert "not valid JSON" in items[5]["detailsError"]


def test_decode_details_on_plain_dicts():
    missing = {"id": 1}
    decode_details(missing)
    assert missing["detailsError"] == "details is missing"
    already = {"details": {"match": {}}}
    decode_details(already)
    assert already == {"details": {"match": {}}}
    raw = {"details": b'{"a": 1}'}
    decode_details(raw)
    assert raw["details"] == {"a": 1}


def test_garbage_page_survives_including_invalid_utf8(tsim):
    tsim.faults.garbage_next, tsim.faults.garbage_per_page = 1, len(GARBAGE_KINDS)
    tsim.faults.huge_details_bytes = 100_000
    items = make(tsim).list_alerts([], 0, 20).items
    assert len(items) == 20 + len(GARBAGE_KINDS)
    dicts = [a for a in items if isinstance(a, dict)]
    assert any(not isinstance(a, dict) for a in items)
    assert [a for a in dicts if a.get("encodingError")]  # invalid UTF-8: replaced and flagged
    assert any(isinstance(a.get("id"), str) for a in dicts)  # wrong types are passed on for the DLQ
    huge = [a for a in dicts if isinstance(a.get("details"), dict) and "blob" in a["details"].get("match", {})]
    assert huge and len(huge[0]["details"]["match"]["blob"]) == 100_000
    garbage = [a for a in dicts if a.get("guid", "").startswith("garbage")]
    assert any("not valid JSON" in a.get("detailsError", "") for a in garbage)  # deep nesting
    assert [a["id"] for a in dicts if isinstance(a.get("id"), int) and a["id"] > 0] == list(range(1, 21))


# -- errors with their exact messages --------------------------------------------------------------


def test_module_missing_exact_message(tsim):
    tsim.faults.module_missing = True
    c = make(tsim)
    for call in (lambda: c.list_alerts([], 0, 1), lambda: c.list_intels(1)):
        with pytest.raises(TaniumModuleMissing) as e:
            call()
        assert e.value.message == EXPECTED_404 == MODULE_MISSING_MESSAGE
        assert str(e.value) == EXPECTED_404 and e.value.status == 404
    assert c.session_current()  # the platform answers; only the module is missing


def test_401_names_expiry_and_trusted_ips(tsim):
    c = make(tsim, api_key="token-wrong-but-also-secret")
    with pytest.raises(TaniumAuthError) as e:
        c.list_alerts([], 0, 1)
    msg = e.value.message
    assert "401" in msg and "invalid or expired" in msg and "trusted IP" in msg and "tanium.api_key" in msg
    assert "token-wrong-but-also-secret" not in msg
    with pytest.raises(TaniumAuthError):
        c.session_current()
    assert tsim.stats["alerts"] == 1  # not retried


def test_403_names_missing_permissions(tsim):
    tsim.faults.forbidden = True
    with pytest.raises(TaniumPermissionError) as e:
        make(tsim).list_alerts([], 0, 1)
    assert "403" in e.value.message and "lacks Threat Response permissions" in e.value.message


def test_400_is_not_retried_and_shows_the_reason(tsim):
    with pytest.raises(TaniumResponseError) as e:
        make(tsim, max_retries=3).list_alerts([("alertedAtFrom", "last tuesday")], 0, 1)
    assert "HTTP 400" in e.value.message and "alertedAtFrom" in e.value.message
    assert tsim.stats["alerts"] == 1 and not e.value.retryable


def test_malformed_json_is_a_response_error(tsim):
    tsim.faults.malformed_next = 1
    with pytest.raises(TaniumResponseError) as e:
        make(tsim).list_alerts([], 0, 50)
    assert "not valid JSON" in e.value.message and "/alerts" in e.value.message


def where(sim_or_host, port=None, protocol="http"):
    host = sim_or_host if isinstance(sim_or_host, str) else sim_or_host.host
    port = port if port is not None else sim_or_host.port
    return [f"host {host}", f"port {port}", f"protocol {protocol}"]


def test_connection_refused(tsim):
    port = free_port()
    c = TaniumClient(TaniumSection(host="127.0.0.1", port=port, protocol="http", api_key=KEY, max_retries=3))
    with pytest.raises(TaniumConnectionError) as e:
        c.list_alerts([], 0, 1)
    assert "refused" in e.value.message and all(w in e.value.message for w in where("127.0.0.1", port))
    assert "tanium.port" in e.value.message


def test_dns_failure():
    c = TaniumClient(TaniumSection(host="tanium.invalid", port=8443, protocol="https", api_key=KEY))
    with pytest.raises(TaniumConnectionError) as e:
        c.session_current()
    msg = e.value.message
    assert "resolve" in msg and "'tanium.invalid'" in msg
    assert all(w in msg for w in where("tanium.invalid", 8443, "https"))
    assert "DNS" in msg


def test_read_timeout_after_a_stall(tsim):
    tsim.faults.stall_next, tsim.faults.stall_seconds = 1, 10
    with pytest.raises(TaniumConnectionError) as e:
        make(tsim, timeout=0.4, max_retries=0).list_alerts([], 0, 1)
    msg = e.value.message
    assert "did not answer within tanium.timeout = 0.4 s" in msg and all(w in msg for w in where(tsim))


def test_read_timeout_is_retried(tsim):
    m = Metrics("t")
    tsim.faults.stall_next, tsim.faults.stall_seconds = 1, 10
    assert len(make(tsim, m, timeout=1.5, max_retries=1).list_alerts([], 0, 3).items) == 3
    assert tsim.stats["alerts"] == 2 and sample(m, "source_retries_total", reason="network") == 1


def test_connection_reset_mid_body_is_retried_then_reported(tsim):
    m = Metrics("t")
    tsim.faults.reset_next = 1
    assert len(make(tsim, m, max_retries=2).list_alerts([], 0, 100).items) == 100
    assert sample(m, "source_retries_total", reason="network") == 1
    tsim.faults.reset_rate = 1.0
    with pytest.raises(TaniumConnectionError) as e:
        make(tsim, max_retries=1).list_alerts([], 0, 100)
    assert "reset or closed" in e.value.message and e.value.retryable


# -- retries ---------------------------------------------------------------------------------------


def test_5xx_retried_then_success(tsim):
    m = Metrics("t")
    tsim.faults.error_next = 2
    assert len(make(tsim, m, max_retries=3).list_alerts([], 0, 5).items) == 5
    assert tsim.stats["alerts"] == 3
    assert sample(m, "source_retries_total", reason="5xx") == 2
    assert sample(m, "source_requests_total", endpoint="alerts", code_class="5xx") == 2
    assert sample(m, "source_requests_total", endpoint="alerts", code_class="2xx") == 1


def test_5xx_gives_up_after_max_retries(tsim):
    tsim.faults.error_rate = 1.0
    with pytest.raises(TaniumResponseError) as e:
        make(tsim, max_retries=2).list_alerts([], 0, 5)
    assert tsim.stats["alerts"] == 3 and "HTTP 503" in e.value.message and "3 attempts" in e.value.message
    assert e.value.retryable and e.value.status == 503


def test_429_honours_retry_after_seconds(tsim):
    m = Metrics("t")
    tsim.faults.rate_limit_next, tsim.faults.retry_after = 1, "1"
    assert len(make(tsim, m, max_retries=2).list_alerts([], 0, 5).items) == 5
    assert tsim.stats["alerts"] == 2
    assert sample(m, "source_rate_limited_seconds_total") == 1.0
    assert sample(m, "source_retries_total", reason="429") == 1


def test_429_honours_retry_after_http_date(tsim):
    m = Metrics("t")
    when = datetime.now(UTC) + timedelta(seconds=1)
    tsim.faults.rate_limit_next = 1
    tsim.faults.retry_after = email.utils.format_datetime(when, usegmt=True)
    assert make(tsim, m, max_retries=1).list_alerts([], 0, 1).items
    assert tsim.stats["alerts"] == 2
    assert 0 <= sample(m, "source_rate_limited_seconds_total") <= 1.0


def test_429_storm_without_retry_after_uses_backoff_then_fails(tsim):
    m = Metrics("t")
    tsim.faults.rate_limit_rate, tsim.faults.retry_after = 1.0, None
    with pytest.raises(TaniumResponseError) as e:
        make(tsim, m, max_retries=3).list_alerts([], 0, 1)
    assert "rate limited (HTTP 429)" in e.value.message and e.value.retryable
    assert tsim.stats["alerts"] == 4 and sample(m, "source_retries_total", reason="429") == 3
    assert 0 <= sample(m, "source_rate_limited_seconds_total") <= 3 * 0.05


def test_retry_after_parsing():
    assert retry_after("3") == 3.0
    assert retry_after(" 0 ") == 0.0
    assert retry_after("-5") == 0.0
    assert retry_after(None) is None and retry_after("soon") is None
    future = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 <= retry_after(future) <= 30
    past = email.utils.format_datetime(datetime.now(UTC) - timedelta(hours=1), usegmt=True)
    assert retry_after(past) == 0.0


def test_close_interrupts_a_retry_wait(tsim):
    tsim.faults.rate_limit_rate, tsim.faults.retry_after = 1.0, "120"
    c = make(tsim, max_retries=5)
    caught: list[Exception] = []

    def call():
        try:
            c.list_alerts([], 0, 1)
        except TaniumError as e:
            caught.append(e)

    t = threading.Thread(target=call)
    t.start()
    deadline = time.monotonic() + 10
    while tsim.faults.served["rate_limit"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    c.close()
    t.join(10)
    assert not t.is_alive() and caught and "closed" in caught[0].message


def test_metrics_requests_pages_and_durations(tsim):
    m = Metrics("t")
    c = make(tsim, m)
    pages(c, limit=250, page_size=100)
    c.get_intel(tsim.intel_doc_ids[0])
    c.get_intel(999_999)
    assert sample(m, "source_pages_total") == 3
    assert sample(m, "source_requests_total", endpoint="alerts", code_class="2xx") == 3
    assert sample(m, "source_requests_total", endpoint="intel", code_class="2xx") == 1
    assert sample(m, "source_requests_total", endpoint="intel", code_class="4xx") == 1
    assert sample(m, "source_request_duration_seconds_count", endpoint="alerts") == 3
    assert KEY.encode() not in m.render()


# -- TLS -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    trustme = pytest.importorskip("trustme")
    d = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(str(d / "server.pem"))
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    return d


@pytest.fixture
def tls_sim(certs):
    with Simulator(alerts=20, api_key=KEY, certfile=str(certs / "server.pem")) as s:
        yield s


def test_tls_self_signed_fails_when_verifying(tls_sim):
    with pytest.raises(TaniumConnectionError) as e:
        make(tls_sim, max_retries=3).list_alerts([], 0, 1)
    msg = e.value.message
    assert "TLS certificate verification failed" in msg and "tanium.ca_bundle" in msg
    assert all(w in msg for w in where(tls_sim, protocol="https"))
    assert tls_sim.stats["alerts"] == 0  # never got past the handshake, not retried


def test_tls_with_ca_bundle(tls_sim, certs, monkeypatch):
    # a CA bundle in the environment (common on corporate machines) must not override tanium.ca_bundle
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/nonexistent/ca.pem")
    assert len(make(tls_sim, ca_bundle=str(certs / "ca.pem")).list_alerts([], 0, 5).items) == 5


def test_tls_without_verification_warns_once(tls_sim, caplog):
    caplog.set_level(logging.WARNING)
    c = make(tls_sim, verify_ssl=False)
    for _ in range(3):
        assert c.list_alerts([], 0, 2).items
    warned = [r for r in caplog.records if "verification is OFF" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING


def test_https_client_against_plain_http_server(tsim):
    with pytest.raises(TaniumConnectionError) as e:
        make(tsim, protocol="https").list_alerts([], 0, 1)
    assert "does not seem to speak HTTPS" in e.value.message and "tanium.protocol" in e.value.message


# -- proxies ---------------------------------------------------------------------------------------


@pytest.fixture
def proxy():
    p = ForwardProxy()
    yield p
    p.close()


def test_proxy_setting_is_used_and_beats_the_environment(tsim, proxy, monkeypatch):
    for var in ("http_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")  # nothing there
    c = make(tsim, proxy=f"http://127.0.0.1:{proxy.server_address[1]}")
    assert len(c.list_alerts([], 0, 3).items) == 3
    assert proxy.seen and proxy.seen[0][0].startswith(tsim.url) and proxy.seen[0][1] == KEY


def test_environment_proxy_is_honoured(tsim, proxy, monkeypatch):
    for var in ("NO_PROXY", "no_proxy", "http_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.server_address[1]}")
    assert make(tsim).list_alerts([], 0, 1).items
    assert len(proxy.seen) == 1


def test_dead_proxy_error_hides_proxy_credentials(tsim, monkeypatch):
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    c = make(tsim, proxy=f"http://alice:pr0xy-PASS@127.0.0.1:{free_port()}")
    with pytest.raises(TaniumConnectionError) as e:
        c.list_alerts([], 0, 1)
    assert "proxy" in e.value.message and "pr0xy-PASS" not in e.value.message


# -- the key never leaks ---------------------------------------------------------------------------


def test_key_never_in_messages_tracebacks_or_debug_logs(tsim, certs, caplog):
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []

    def attempt(fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 (every failure mode below must be a TaniumError)
            assert isinstance(e, TaniumError), repr(e)
            texts.extend([str(e), repr(e), e.message, "".join(traceback.format_exception(e))])

    c = make(tsim, max_retries=1, timeout=0.5)
    texts.append(repr(c))
    attempt(lambda: pages(c, 150, 100))
    attempt(lambda: c.get_intel(tsim.intel_doc_ids[0]))
    f = tsim.faults
    for setup in (
        lambda: setattr(f, "error_rate", 1.0),
        lambda: setattr(f, "rate_limit_rate", 1.0),
        lambda: setattr(f, "reset_rate", 1.0),
        lambda: setattr(f, "malformed_next", 1),
        lambda: setattr(f, "module_missing", True),
        lambda: setattr(f, "forbidden", True),
        lambda: setattr(f, "wrong_token", True),
        lambda: (setattr(f, "stall_rate", 1.0), setattr(f, "stall_seconds", 5)),
    ):
        f.reset()
        f.retry_after = "0"
        setup()
        attempt(lambda: c.list_alerts([("computerName", "x")], 0, 5))
        attempt(c.session_current)
    f.reset()
    attempt(lambda: c.list_alerts([("alertedAtFrom", "bad")], 0, 5))
    attempt(lambda: make(tsim, protocol="https").list_alerts([], 0, 1))
    attempt(lambda: TaniumClient(TaniumSection(host="tanium.invalid", api_key=KEY)).session_current())
    attempt(
        lambda: TaniumClient(
            TaniumSection(host="127.0.0.1", port=free_port(), protocol="http", api_key=KEY)
        ).session_current()
    )
    with Simulator(alerts=3, api_key=KEY, certfile=str(certs / "server.pem")) as s:
        attempt(lambda: make(s).list_alerts([], 0, 1))
    assert len(texts) > 20
    logs = caplog.text + "".join(r.getMessage() for r in caplog.records)
    assert "tanium GET" in logs and "attempt" in logs  # the debug request log ran
    for text in texts + [logs]:
        assert KEY not in text
