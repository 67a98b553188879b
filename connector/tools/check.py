"""`tanium-connector check`: connectivity test, step by step, each failure explained.

Route: the one `run` takes. Without a proxy the first steps are a TCP connection (and TLS
handshake) to the Tanium host; through a proxy (tanium.proxy, else HTTPS_PROXY / HTTP_PROXY /
ALL_PROXY unless NO_PROXY names the host, as requests decides for the client) the first step
is a TCP connection to the proxy, and the client's requests through it test the rest.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

from requests.utils import get_environ_proxies, select_proxy

from connector.tanium import TaniumClient, TaniumError
from connector.text import mask_userinfo


@dataclass
class Step:
    name: str
    ok: bool
    message: str


def _tcp(t) -> str:
    with socket.create_connection((t.host, t.port), timeout=t.timeout):
        return f"{t.host}:{t.port} accepts TCP connections"


def _tls(t) -> str:
    ctx = ssl.create_default_context(cafile=t.ca_bundle) if t.verify_ssl else ssl._create_unverified_context()
    with socket.create_connection((t.host, t.port), timeout=t.timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=t.host) as tls:
            note = "" if t.verify_ssl else " (certificate NOT verified: tanium.verify_ssl = false)"
            return f"{tls.version()} handshake with {t.host}:{t.port}{note}"


def proxy_route(t) -> tuple[str, str] | None:
    """(proxy URL, where it was configured) the client uses for Tanium, or None for a direct route."""
    if t.proxy:
        return t.proxy, "tanium.proxy"
    url = t.base_url
    proxy = select_proxy(url, get_environ_proxies(url))  # {} when NO_PROXY names the host
    return (proxy, f"{t.protocol.upper()}_PROXY / ALL_PROXY in the environment") if proxy else None


def _proxy_tcp(proxy: str, source: str) -> str:
    u = urlsplit(proxy)
    with socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout=10):
        return f"{mask_userinfo(proxy)} ({source}) accepts TCP connections; Tanium is reached through it"


def _explain_proxy(proxy: str, source: str, e: Exception) -> str:
    shown = mask_userinfo(proxy)
    fix = f"check {source}" + (", or add the Tanium host to NO_PROXY to go direct" if source != "tanium.proxy" else "")
    if isinstance(e, socket.gaierror):
        return f"cannot resolve the proxy host of {shown}: {fix}"
    if isinstance(e, ConnectionRefusedError):
        return f"connection refused by the proxy {shown}: {fix}"
    if isinstance(e, (socket.timeout, TimeoutError)):
        return f"no answer from the proxy {shown} within 10s: {fix}"
    return f"TCP connection to the proxy {shown} failed ({e}): {fix}"


def _explain_socket(t, step: str, e: Exception) -> str:
    where = f"{t.protocol}://{t.host}:{t.port}"
    if isinstance(e, socket.gaierror):
        return f"cannot resolve host {t.host!r} ({where}): check tanium.host and DNS"
    if isinstance(e, ConnectionRefusedError):
        return f"connection refused by {where}: check tanium.port and that the Tanium server is up"
    if isinstance(e, (socket.timeout, TimeoutError)):
        return f"no answer from {where} within {t.timeout:g}s: check firewalls, routing and tanium.proxy"
    if isinstance(e, ssl.SSLCertVerificationError):
        return (
            f"TLS certificate of {where} could not be verified ({e.verify_message}): set tanium.ca_bundle to "
            "the CA that signed it, or tanium.verify_ssl = false for a test server"
        )
    if isinstance(e, ssl.SSLError):
        return f"TLS handshake with {where} failed ({e.reason or e}): check tanium.protocol (https or http)"
    return f"{step} to {where} failed: {e}"


def run_checks(cfg) -> list[Step]:
    t = cfg.tanium
    steps: list[Step] = []

    def attempt(name, fn, explain) -> bool:
        try:
            steps.append(Step(name, True, mask_userinfo(fn())))
            return True
        except Exception as e:  # noqa: BLE001 (every failure becomes a reported step)
            steps.append(Step(name, False, mask_userinfo(explain(e))))
            return False

    socket_explain = lambda name: (lambda e: _explain_socket(t, name, e))  # noqa: E731
    route = proxy_route(t)
    if route:  # through a proxy the client's requests are the reachability test
        if not attempt("proxy", lambda: _proxy_tcp(*route), lambda e: _explain_proxy(*route, e)):
            return steps
    else:
        if not attempt("tcp", lambda: _tcp(t), socket_explain("TCP connection")):
            return steps
        if t.protocol == "https" and not attempt("tls", lambda: _tls(t), socket_explain("TLS handshake")):
            return steps
    client = TaniumClient(t)
    tanium_explain = lambda e: e.message if isinstance(e, TaniumError) else str(e)  # noqa: E731
    try:
        if not attempt("credentials", lambda: _session(client), tanium_explain):
            return steps
        if not attempt("threat_response", lambda: _alerts(client), tanium_explain):
            return steps
        if t.enrich_intel_docs and not attempt("intel_docs", lambda: _intels(client), tanium_explain):
            return steps
    finally:
        client.close()
    if cfg.kafka is not None:
        attempt("kafka", lambda: _kafka(cfg.kafka), lambda e: _explain_kafka(cfg.kafka, e))
    return steps


def _session(client) -> str:
    client.session_current()
    return "API token accepted (/api/v2/session/current)"


def _alerts(client) -> str:
    page = client.list_alerts([], offset=0, limit=1)
    total = f"{page.total} alerts" if page.total is not None else "alerts endpoint answers"
    return f"Threat Response API reachable: {total}"


def _intels(client) -> str:
    client.list_intels(limit=1)
    return "IntelDocs endpoint reachable (enrichment on)"


def _kafka(kafka) -> str:
    from kafka import KafkaAdminClient  # noqa: PLC0415 (only when a sink is configured)

    from connector.kafka import bounded_start, client_settings  # noqa: PLC0415

    # bounded: kafka-python waits forever on a TLS handshake that never completes
    admin = bounded_start(lambda: KafkaAdminClient(**client_settings(kafka), request_timeout_ms=10000), kafka, 40)
    try:
        topics = admin.list_topics()
    finally:
        admin.close()
    return f"Kafka at {','.join(kafka.bootstrap_servers)} answers ({len(topics)} topics)"


def _explain_kafka(kafka, e: Exception) -> str:
    return (
        f"cannot reach Kafka at {','.join(kafka.bootstrap_servers)} "
        f"({type(e).__name__}: {e}): check kafka.bootstrap_servers and kafka.security_protocol"
    )


def verdict(steps: list[Step]) -> tuple[bool, str]:
    for s in steps:
        if not s.ok:
            return False, f"Unhealthy: {s.name}: {s.message}"
    return True, "Healthy"
