"""Switchable misbehaviour of the simulator: rate limits, 5xx, resets, stalls, malformed JSON,
garbage records, a wrong token, a missing module."""

from __future__ import annotations

import logging
import random
import threading
from collections import Counter
from typing import Any

import orjson

log = logging.getLogger(__name__)
GARBAGE_KINDS = ("non_object", "missing_id", "wrong_types", "huge_details", "deep_nesting", "invalid_utf8")


class Faults:
    """Switchable misbehaviour. `*_next = N` hits the next N matching requests, `*_rate` a fraction of
    them (deterministic from the seed). `endpoints` restricts faults to some endpoint names
    (alerts, alert, intels, intel, intel_labels, session); None = all."""

    def __init__(self, seed: int = 0):
        self._lock = threading.Lock()
        self._rng = random.Random(seed ^ 0xFA17)
        self.reset()

    def reset(self) -> None:
        self.endpoints: set[str] | None = None
        self.latency = 0.0  # seconds before every reply
        self.rate_limit_next = 0  # 429
        self.rate_limit_rate = 0.0
        self.retry_after: str | None = "1"  # Retry-After value on 429 (seconds or HTTP date); None = omit
        self.error_next = 0  # 5xx
        self.error_rate = 0.0
        self.error_status = 503
        self.reset_next = 0  # connection reset after half the body
        self.reset_rate = 0.0
        self.stall_next = 0  # no reply for stall_seconds, then close
        self.stall_rate = 0.0
        self.stall_seconds = 30.0
        self.malformed_next = 0  # 200 with truncated JSON
        self.malformed_rate = 0.0
        self.garbage_next = 0  # alert pages with garbage records added
        self.garbage_rate = 0.0
        self.garbage_kinds: tuple[str, ...] = GARBAGE_KINDS
        self.garbage_per_page = 1
        self.huge_details_bytes = 10 * 1024 * 1024
        self.wrong_token = False  # 401 whatever the token
        self.module_missing = False  # 404 on every TR path
        self.forbidden = False  # 403 on every TR path (token without TR permissions)
        self.served: Counter = Counter()  # faults inflicted, by name
        self._garbage_turn = 0

    def applies(self, endpoint: str) -> bool:
        return self.endpoints is None or endpoint in self.endpoints

    def take(self, name: str) -> bool:
        """Consume one `<name>_next` or roll `<name>_rate`; count it when it hits."""
        with self._lock:
            left = getattr(self, f"{name}_next")
            hit = left > 0
            if hit:
                setattr(self, f"{name}_next", left - 1)
            else:
                rate = getattr(self, f"{name}_rate")
                hit = rate > 0 and self._rng.random() < rate
            if hit:
                self.served[name] += 1
            return hit

    def next_garbage_kind(self) -> str:
        with self._lock:
            kind = self.garbage_kinds[self._garbage_turn % len(self.garbage_kinds)]
            self._garbage_turn += 1
            return kind


def garbage_record(kind: str, gid: int, created: str, doc_id: int, huge_details_bytes: int) -> bytes:
    """One garbage record of `kind` (GARBAGE_KINDS) as JSON bytes; `gid` is its (negative) id."""
    base = {
        "id": gid,
        "state": "unresolved",
        "type": "detect.match",
        "guid": f"garbage-{-gid}",
        "intelDocId": doc_id,
        "computerName": "garbage.corp.local",
        "computerIpAddress": "10.255.255.1",
        "matchType": "process",
        "alertedAt": created,
        "createdAt": created,
        "details": "{}",
    }
    if kind == "non_object":
        return [b"42", b'"not an alert"', b"null", b"[1,2,3]", b"true"][-gid % 5]
    if kind == "missing_id":
        base.pop("id")
        return orjson.dumps(base)
    if kind == "wrong_types":
        return orjson.dumps(
            {
                "id": f"x{-gid}",
                "createdAt": 1697459178,
                "alertedAt": False,
                "computerName": ["a", "b"],
                "intelDocId": "seven",
                "details": 17,
                "state": {},
            }
        )
    if kind == "huge_details":
        base["details"] = orjson.dumps({"match": {"type": "file", "blob": "A" * huge_details_bytes}}).decode()
        return orjson.dumps(base)
    if kind == "deep_nesting":
        base["details"] = "[" * 100_000 + "]" * 100_000
        nested: Any = "bottom"
        for _ in range(200):  # stays under the usual JSON parser depth limits, deep for everything else
            nested = {"a": nested}
        base["nested"] = nested
        return orjson.dumps(base)
    if kind == "invalid_utf8":
        raw = orjson.dumps(base)
        return raw.replace(b"garbage.corp.local", b"bad-\xff\xfe-name.corp.local")
    raise ValueError(f"unknown garbage kind {kind!r}; allowed: {', '.join(GARBAGE_KINDS)}")
