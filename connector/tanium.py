"""Client for the Tanium Threat Response 4.x REST API (alerts, IntelDocs, session check).

Every call sends `session: <api key>` and `Accept: application/json`; replies are unwrapped from the
4.x `{"data": …, "meta": …}` envelope (a bare array or object, as 3.x sends, is accepted too). The key
follows `tanium.api_key_file` (connector/secrets.py): a changed file is used by the next request, and
a 401 re-reads the file and, if the key changed, sends the request once more with the new key.
429, 5xx, connection resets and read timeouts are retried with capped full-jitter exponential
backoff, honouring `Retry-After`; everything else fails at once with a `TaniumError` whose
`.message` says what is wrong and what to check. The API key never appears in a message, a log
record or a metric: messages are built here from scrubbed parts, never from the request headers.
Redirects are followed within the origin (scheme, host, port) asked only: requests would carry the
`session` header to any other host (it strips only `Authorization`), so such a redirect fails.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import orjson
import requests
import urllib3
from requests.adapters import HTTPAdapter

from connector import __version__
from connector.config import TaniumSection
from connector.gate import CPU
from connector.metrics import NO_METRICS, WORKER, Metrics
from connector.secrets import ApiKey
from connector.tanium_http import classify, retry_after, root_reason
from connector.text import json_type, mask_userinfo, shorten

log = logging.getLogger(__name__)

TR_PATH = "/plugin/products/threat-response/api/v1"
SESSION_PATH = "/api/v2/session/current"
MAX_PAGE = 500
# names this worker, so Tanium's request logs (and the simulator's) show which process polled
USER_AGENT = f"tanium-tr-connector/{__version__} ({WORKER})"
MODULE_MISSING_MESSAGE = (
    "Tanium returned 404 for the Threat Response API: the Threat Response module is missing or not "
    "configured on this Tanium server (the Threat Response plugin is required)"
)
RETRY_AFTER_CAP = 300.0  # a hostile or confused server must not park us for a day


class TaniumError(Exception):
    """Base class; `.message` is for the user and never contains the API key. `.retryable` says
    whether trying again later may help (rate limits, 5xx, network trouble)."""

    def __init__(self, message: str, status: int | None = None, retryable: bool = False):
        super().__init__(message)
        self.message = message
        self.status = status
        self.retryable = retryable

    def __str__(self) -> str:
        return self.message


class TaniumAuthError(TaniumError):
    """401: the token is invalid or expired, or the client IP is not trusted."""


class TaniumPermissionError(TaniumError):
    """403: the token lacks Threat Response permissions."""


class TaniumModuleMissing(TaniumError):
    """404 on a Threat Response path."""


class TaniumConnectionError(TaniumError):
    """TLS, DNS, refused, timeout, reset: the server was not (properly) reached."""


class TaniumResponseError(TaniumError):
    """Malformed body, another 4xx, or 429/5xx after the last retry."""


class _OtherHostRedirect(requests.RequestException):
    """Raised inside requests before it would follow a redirect to another origin."""

    def __init__(self, url: str):
        super().__init__(url)
        u = urlsplit(url)
        self.target = f"{u.scheme}://{u.hostname}" + (f":{u.port}" if u.port else "")


class _Session(requests.Session):
    def rebuild_auth(self, prepared_request, response):
        # requests' own test for "another origin" (the one that drops Authorization)
        if self.should_strip_auth(response.request.url, prepared_request.url):
            raise _OtherHostRedirect(prepared_request.url)
        super().rebuild_auth(prepared_request, response)


@dataclass
class AlertPage:
    items: list
    total: int | None
    filtered: int | None


class TaniumClient:
    """One client per pipeline; safe to share between threads (one HTTP session per thread)."""

    def __init__(
        self,
        settings: TaniumSection,
        metrics: Metrics = NO_METRICS,
        *,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
    ):
        if settings.api_key is None or not settings.api_key.get_secret_value():
            raise ValueError("tanium.api_key is empty")
        self.settings = settings
        self.metrics = metrics
        self.base_url = settings.base_url
        self.max_retries = settings.max_retries
        self.backoff_base, self.backoff_cap = backoff_base, backoff_cap
        self._key = ApiKey(settings.api_key.get_secret_value(), settings.api_key_file, metrics)
        self._timeout = (settings.timeout, settings.timeout)
        if not settings.verify_ssl:
            self._verify: bool | str = False
        else:
            self._verify = settings.ca_bundle or True
        self._proxies = {"http": settings.proxy, "https": settings.proxy} if settings.proxy else None
        self._where = (
            f"{settings.protocol}://{self.base_url.split('://', 1)[1]} "
            f"(host {settings.host}, port {settings.port}, protocol {settings.protocol})"
        )
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._rng = random.Random()
        if settings.protocol == "https" and not settings.verify_ssl:
            log.warning(
                "TLS certificate verification is OFF for Tanium at %s (tanium.verify_ssl = false): "
                "the connection can be intercepted; prefer tanium.ca_bundle",
                self.base_url,
            )
            # we said it once; urllib3 would repeat it on every request
            warnings.filterwarnings("ignore", category=urllib3.exceptions.InsecureRequestWarning)

    def __repr__(self) -> str:
        return f"TaniumClient({self.base_url!r})"

    def close(self) -> None:
        """Close the HTTP sessions and cut short any retry wait (it raises TaniumError)."""
        self._closed.set()
        with self._lock:
            for s in self._sessions:
                s.close()
            self._sessions.clear()

    # -- API -----------------------------------------------------------------------------------------
    def session_current(self) -> dict:
        """GET /api/v2/session/current: proves the token is accepted."""
        body = self._get_json("session", SESSION_PATH)
        data, _ = _unwrap(body)
        if not isinstance(data, dict) or not data:
            raise TaniumAuthError(
                self._scrub(
                    f"Tanium at {self._where} did not accept the API token: /api/v2/session/current returned no "
                    "session data. Check tanium.api_key (or tanium.api_key_file)."
                ),
                status=200,
            )
        return data

    def list_alerts(
        self, params: list[tuple[str, str]], offset: int, limit: int, sort: str = "createdAt,id", *, decode: bool = True
    ) -> AlertPage:
        """One page of alerts, `details` decoded (see decode_details) unless `decode` is False: the
        stream decodes it as it processes the page, so the pages it fetched ahead stay small."""
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be between 1 and {MAX_PAGE}, not {limit}")
        if offset < 0:
            raise ValueError(f"offset must be >= 0, not {offset}")
        query = list(params) + [("sort", sort), ("limit", str(limit)), ("offset", str(offset))]
        body = self._get_json("alerts", f"{TR_PATH}/alerts", query)
        data, meta = _unwrap(body)
        items = self._as_list(data, "alerts")
        if decode:
            with CPU.slot():
                for alert in items:
                    if isinstance(alert, dict):
                        decode_details(alert)
        self.metrics.pages.labels(self.metrics.pipeline).inc()
        total = filtered = None
        if isinstance(meta, dict):
            total = meta.get("totalCount") if isinstance(meta.get("totalCount"), int) else None
            filtered = meta.get("filteredCount") if isinstance(meta.get("filteredCount"), int) else None
        return AlertPage(items, total, filtered)

    def get_intel(self, doc_id: int) -> dict | None:
        """One IntelDoc, or None when Tanium says 404 (deleted or unknown doc)."""
        body = self._get_json("intel", f"{TR_PATH}/intels/{quote(str(doc_id), safe='')}", none_on_404=True)
        if body is None:
            return None
        data, _ = _unwrap(body)
        if not isinstance(data, dict):
            raise TaniumResponseError(
                self._scrub(f"Tanium sent IntelDoc {doc_id} as {json_type(data)}, expected an object"), status=200
            )
        decode_intel_doc(data)
        return data

    def list_intels(self, limit: int = 1) -> list:
        body = self._get_json("intels", f"{TR_PATH}/intels", [("limit", str(limit))])
        data, _ = _unwrap(body)
        items = self._as_list(data, "intels")
        for doc in items:
            if isinstance(doc, dict):
                decode_intel_doc(doc)
        return items

    # -- transport -----------------------------------------------------------------------------------
    def _session(self, key: str) -> requests.Session:
        """This thread's session, sending `key`."""
        s = getattr(self._local, "session", None)
        if s is None:
            if self._closed.is_set():
                raise TaniumError("the Tanium client is closed")
            s = _Session()
            s.headers.update({"Accept": "application/json", "User-Agent": USER_AGENT})
            adapter = HTTPAdapter(pool_connections=1, pool_maxsize=4, max_retries=0)
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            self._local.session = s
            with self._lock:
                self._sessions.append(s)
        s.headers["session"] = key
        return s

    def _get_json(
        self, endpoint: str, path: str, params: list[tuple[str, str]] | None = None, none_on_404: bool = False
    ) -> Any:
        key = self._key.current()
        resp, body = self._request(endpoint, path, params, key)
        if resp.status_code == 401 and (fresh := self._key.reload()) != key:  # rotated: once more with the new key
            resp, body = self._request(endpoint, path, params, fresh)
        code = resp.status_code
        if code != 401:
            self._key.accepted()  # any other answer (429 and 5xx were retried or raised) passed authentication
        if code == 404 and none_on_404:
            return None
        if code >= 400:
            raise self._status_error(resp, body, path)
        with CPU.slot():  # connector/gate.py
            return self._parse(resp, body, path)

    def _request(
        self, endpoint: str, path: str, params: list[tuple[str, str]] | None, key: str
    ) -> tuple[requests.Response, bytes]:
        """The response and its whole body, after retries."""
        url = self.base_url + path
        shown = path + ("?" + urlencode(params) if params else "")
        attempts = self.max_retries + 1
        m = self.metrics
        for attempt in range(1, attempts + 1):
            t0 = time.monotonic()
            try:
                # verify and proxies per request: on a Session, REQUESTS_CA_BUNDLE and *_PROXY from the
                # environment would override them (requests merges the environment over session settings)
                resp = self._session(key).get(
                    url, params=params, timeout=self._timeout, verify=self._verify, proxies=self._proxies, stream=True
                )
                # the body in one read: requests alone reads it in 10 KiB pieces, 4x the CPU on a 3 MB
                # alert page; read here, so a reset mid-body is retried like any network error
                body = b"".join(resp.iter_content(chunk_size=None))
            except _OtherHostRedirect as e:
                m.requests.labels(m.pipeline, endpoint, "3xx").inc()
                raise TaniumResponseError(
                    self._scrub(
                        f"Tanium at {self._where} redirected GET {path} to another host ({e.target}); the connector "
                        "follows redirects only within the host it was given, so the API key is not sent there. If "
                        f"{e.target} is your Tanium server, set tanium.host, tanium.port and tanium.protocol to it; "
                        "otherwise check the proxy or load balancer in front of Tanium."
                    ),
                    status=None,
                ) from None
            except requests.RequestException as e:
                elapsed = time.monotonic() - t0
                kind, retryable = classify(e)
                m.requests.labels(m.pipeline, endpoint, "error").inc()
                m.request_duration.labels(m.pipeline, endpoint).observe(elapsed)
                log.debug(
                    "tanium GET %s failed after %.0f ms (attempt %d/%d): %s",
                    self._scrub(shown),
                    elapsed * 1000,
                    attempt,
                    attempts,
                    kind,
                )
                if retryable and attempt < attempts:
                    self._wait("network", self._backoff(attempt), attempt)
                    continue
                raise self._connection_error(kind, e, attempt) from None
            elapsed = time.monotonic() - t0
            code = resp.status_code
            # 429 has its own class: the dashboard and alerts watch the 429/5xx share
            m.requests.labels(m.pipeline, endpoint, "429" if code == 429 else f"{code // 100}xx").inc()
            m.request_duration.labels(m.pipeline, endpoint).observe(elapsed)
            log.debug(
                "tanium GET %s -> %d in %.0f ms (attempt %d/%d)",
                self._scrub(shown),
                code,
                elapsed * 1000,
                attempt,
                attempts,
            )
            if code == 429 or code >= 500:
                reason = "429" if code == 429 else "5xx"
                if attempt < attempts:
                    after = retry_after(resp.headers.get("Retry-After"))
                    wait = min(after, RETRY_AFTER_CAP) if after is not None else self._backoff(attempt)
                    resp.close()
                    self._wait(reason, wait, attempt)
                    continue
                what = "rate limited (HTTP 429)" if code == 429 else f"answered HTTP {code}"
                raise TaniumResponseError(
                    self._scrub(
                        f"Tanium at {self._where} {what} for GET {path} on all {attempts} attempts "
                        f"(tanium.max_retries = {self.max_retries}); try again later"
                    ),
                    status=code,
                    retryable=True,
                )
            return resp, body
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int) -> float:
        """Full jitter: uniform between 0 and the capped exponential step."""
        return self._rng.uniform(0, min(self.backoff_cap, self.backoff_base * 2 ** (attempt - 1)))

    def _wait(self, reason: str, seconds: float, attempt: int) -> None:
        m = self.metrics
        m.retries.labels(m.pipeline, reason).inc()
        if reason == "429":
            m.rate_limited.labels(m.pipeline).inc(seconds)
        log.debug("tanium retry %d (%s) in %.2f s", attempt, reason, seconds)
        if self._closed.wait(seconds):
            raise TaniumError("the Tanium client was closed while waiting to retry")

    def _parse(self, resp: requests.Response, content: bytes, path: str) -> Any:
        try:
            return orjson.loads(content)
        except orjson.JSONDecodeError as e:
            err = e
        try:
            content.decode("utf-8")
        except UnicodeDecodeError:
            # a few bad bytes must not cost a whole page: replace them and flag the records that had them
            try:
                body = orjson.loads(content.decode("utf-8", errors="replace"))
            except orjson.JSONDecodeError:
                pass
            else:
                log.warning("tanium GET %s: reply had invalid UTF-8 bytes, replaced with U+FFFD", path)
                _flag_replaced(body)
                return body
        raise TaniumResponseError(
            self._scrub(
                f"Tanium at {self._where} sent a reply that is not valid JSON for GET {path} "
                f"(HTTP {resp.status_code}, {len(content)} bytes: {shorten(str(err))})"
            ),
            status=resp.status_code,
            retryable=True,
        )

    def _as_list(self, data: Any, what: str) -> list:
        if isinstance(data, list):
            return data
        if isinstance(data, dict):
            return [data]  # some servers send a single match as an object
        if data is None:
            return []
        raise TaniumResponseError(self._scrub(f"Tanium sent {what} as {json_type(data)}, expected a list"), status=200)

    # -- errors --------------------------------------------------------------------------------------
    def _status_error(self, resp: requests.Response, body: bytes, path: str) -> TaniumError:
        code = resp.status_code
        if code == 401:
            error = TaniumAuthError(
                self._scrub(
                    f"Tanium at {self._where} answered 401 Unauthorized: the API token is invalid or expired, or "
                    "this client's IP address is not in the token's trusted IP list. Check tanium.api_key (or "
                    "tanium.api_key_file), the token's expiry, and its trusted IP addresses "
                    "(Administration > Permissions > API Tokens)."
                ),
                status=401,
            )
            self._key.rejected(error.message)
            return error
        if code == 403:
            return TaniumPermissionError(
                self._scrub(
                    f"Tanium at {self._where} answered 403 Forbidden for GET {path}: the API token lacks Threat "
                    "Response permissions. Give the token's user a role with Threat Response access "
                    "(Threat Response Alerts Read and Threat Response Use API)."
                ),
                status=403,
            )
        if code == 404 and path.startswith(TR_PATH):
            return TaniumModuleMissing(MODULE_MISSING_MESSAGE, status=404)
        detail = _error_detail(resp, body)
        hint = " Is this a Tanium server? Check tanium.host and tanium.port." if code == 404 else ""
        return TaniumResponseError(
            self._scrub(
                f"Tanium at {self._where} rejected GET {path} with HTTP {code}{': ' + detail if detail else ''}.{hint}"
            ),
            status=code,
        )

    def _connection_error(self, kind: str, exc: Exception, attempts: int) -> TaniumConnectionError:
        s = self.settings
        where = self._where
        reason = shorten(root_reason(exc))
        if kind == "tls":
            if "WRONG_VERSION_NUMBER" in reason.upper() or "wrong version" in reason.lower():
                msg = (
                    f"TLS handshake with Tanium at {where} failed ({reason}): the server does not seem to speak "
                    "HTTPS on this port. Check tanium.protocol and tanium.port."
                )
            else:
                msg = (
                    f"TLS certificate verification failed for Tanium at {where} ({reason}). Set tanium.ca_bundle "
                    "to the CA that signed the server certificate (or fix the server certificate / host name); "
                    "verify_ssl = false works but is insecure."
                )
        elif kind == "dns":
            msg = (
                f"Cannot resolve the Tanium host name {s.host!r} for {where} ({reason}). Check tanium.host and "
                "this machine's DNS settings."
            )
        elif kind == "refused":
            msg = (
                f"Connection to Tanium at {where} was refused. Check tanium.host, tanium.port and "
                "tanium.protocol, that the server is running, and that no firewall blocks the port."
            )
        elif kind == "connect_timeout":
            msg = (
                f"Connecting to Tanium at {where} timed out after {s.timeout:g} s. Check tanium.host and "
                "tanium.port, the network path and firewalls (or tanium.proxy / HTTPS_PROXY)."
            )
        elif kind == "read_timeout":
            msg = (
                f"Tanium at {where} did not answer within tanium.timeout = {s.timeout:g} s "
                f"({attempts} attempt{'s' if attempts != 1 else ''}). Check the server's load and the network, "
                "or raise tanium.timeout."
            )
        elif kind == "proxy":
            msg = (
                f"Cannot reach Tanium at {where} through the proxy ({reason}). Check tanium.proxy or "
                "HTTPS_PROXY / NO_PROXY."
            )
        else:
            msg = (
                f"The connection to Tanium at {where} was reset or closed mid-reply ({reason}; "
                f"{attempts} attempt{'s' if attempts != 1 else ''}). Check the network and any proxy or load "
                "balancer in between, and that tanium.protocol matches the server."
            )
        return TaniumConnectionError(self._scrub(msg), retryable=kind not in ("tls", "dns"))

    def _scrub(self, text: str) -> str:
        return mask_userinfo(self._key.scrub(text))


def _unwrap(body: Any) -> tuple[Any, Any]:
    """4.x `{"data": …, "meta": …}` → (data, meta); a bare value → (value, None)."""
    if isinstance(body, dict) and "data" in body:
        return body["data"], body.get("meta")
    return body, None


def decode_details(alert: dict) -> str | bytes | None:
    """Decode `details` (a JSON string) in place and return the text it decoded; when it is not JSON,
    null or not an object, keep the original value, set `detailsError` to a short reason and return
    None (None too when it was an object already)."""
    if "details" not in alert:
        alert["detailsError"] = "details is missing"
        return None
    raw = alert["details"]
    if isinstance(raw, dict):
        return None  # already an object (3.x fixtures, or decoded before)
    if raw is None:
        alert["detailsError"] = "details is null"
        return None
    if not isinstance(raw, (str, bytes)):
        alert["detailsError"] = f"details is {json_type(raw)}, expected a JSON string"
        return None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        alert["detailsError"] = f"details is not valid JSON ({shorten(str(e), 80)})"
        return None
    if isinstance(value, dict):
        alert["details"] = value
        return raw
    alert["detailsError"] = f"details is JSON but {json_type(value)}, not an object"
    return None


def decode_intel_doc(doc: dict) -> dict:
    """`mitreAttack` / `compiled` as objects, in place: 4.x sends objects, 3.x JSON-encoded strings.
    Text that is not JSON is kept."""
    for key in ("mitreAttack", "compiled"):
        v = doc.get(key)
        if isinstance(v, str) and v[:1] in ("{", "[", '"'):
            try:
                doc[key] = orjson.loads(v)
            except orjson.JSONDecodeError:
                pass
    return doc


def _flag_replaced(body: Any) -> None:
    data, _ = _unwrap(body)
    for item in data if isinstance(data, list) else [data]:
        if isinstance(item, dict) and "\ufffd" in orjson.dumps(item).decode():
            item["encodingError"] = "invalid UTF-8 bytes replaced with U+FFFD"


def _error_detail(resp: requests.Response, content: bytes) -> str:
    try:
        text = content.decode(resp.encoding or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        text = content.decode("utf-8", errors="replace")
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        return shorten(text.strip(), 200)
    if isinstance(body, dict):
        errors = body.get("errors")
        if isinstance(errors, list):
            texts = [str(x.get("description") or x.get("code")) for x in errors if isinstance(x, dict)]
            if texts:
                return shorten("; ".join(texts), 200)
        for key in ("text", "message", "Message", "error"):
            if isinstance(body.get(key), str):
                return shorten(body[key], 200)
    return shorten(text.strip(), 200)
