"""Short, safe renderings of untrusted values for error messages and warnings."""

from __future__ import annotations

from typing import Any


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
