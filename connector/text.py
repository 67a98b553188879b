"""Short, safe renderings of untrusted values for error messages and warnings, and URLs without
their user information (a proxy's user:password) for anything the connector shows."""

from __future__ import annotations

import re
from typing import Any

# scheme://userinfo@ : the userinfo runs to the last "@" before the host (a password may hold an
# unencoded "@"), so it stops at the first "/" or white space
_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^/\s]*@")


def mask_userinfo(text: str) -> str:
    """`text` with the user information of every URL in it replaced by '***'."""
    return _USERINFO.sub(r"\1***@", text)


def shorten(text: str, limit: int = 160) -> str:
    """`text` on one line (runs of white space folded), cut to `limit` characters with '…'."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def show(value: Any, limit: int = 80) -> str:
    """repr() of `value`, cut to `limit` characters with '…'."""
    try:
        text = repr(value)
    except ValueError:  # ints beyond the str() digit limit
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def json_type(value: Any) -> str:
    """The JSON type of a decoded value, with its article: 'an object', 'a number', 'null'…"""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
