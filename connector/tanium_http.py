"""How a failed Tanium request is read: which network failures are worth a retry (and which message
they get, see TaniumClient._connection_error), and the `Retry-After` of a 429 or 5xx."""

from __future__ import annotations

import email.utils
import socket
import ssl
from collections.abc import Iterator
from datetime import UTC, datetime

import requests
import urllib3


def classify(e: requests.RequestException) -> tuple[str, bool]:
    """→ (kind, retryable). Retried: resets and read timeouts; not: TLS, DNS, refused, connect timeout."""
    if isinstance(e, requests.exceptions.SSLError):
        return "tls", False
    if isinstance(e, requests.exceptions.ProxyError):
        return "proxy", False
    if isinstance(e, requests.exceptions.ConnectTimeout):
        return "connect_timeout", False
    if isinstance(e, requests.exceptions.ReadTimeout):
        return "read_timeout", True
    for x in _chain(e):
        if isinstance(x, (urllib3.exceptions.NameResolutionError, socket.gaierror)):
            return "dns", False
        if isinstance(x, ConnectionRefusedError):
            return "refused", False
        if isinstance(x, ssl.SSLError):
            return "tls", False
        if isinstance(x, (urllib3.exceptions.ReadTimeoutError, TimeoutError, socket.timeout)):
            return "read_timeout", True
    if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError)):
        return "reset", True
    return "reset", False


def _chain(e: BaseException) -> Iterator[BaseException]:
    """The exception and everything it wraps (args, .reason, causes)."""
    seen, stack = set(), [e]
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        nested = [a for a in getattr(x, "args", ()) if isinstance(a, BaseException)]
        nested += [r for r in (getattr(x, "reason", None), x.__cause__, x.__context__) if isinstance(r, BaseException)]
        stack.extend(nested)


def root_reason(e: BaseException) -> str:
    """The most specific message in the chain (no URLs of the pool wrapper when avoidable)."""
    for x in _chain(e):
        if isinstance(x, (ssl.SSLError, socket.gaierror, OSError)) and not isinstance(x, requests.RequestException):
            text = str(x)
            if text:
                return text
    return str(e)


def retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
