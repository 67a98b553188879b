"""Alert lifecycle in the simulator: analysts' state changes, and the alerts list in updatedAt order.

State changes, as Threat Response 4.x takes them: `PUT {TR_PATH}/alerts/{id}` with the body
`{"state": "<state>"}` changes one alert, `PUT {TR_PATH}/alerts/?id=1&id=2` with the same body several
at once. The state is one of unresolved, inprogress, resolved, suppressed. A change sets `state` and
`updatedAt`, `ackedAt` on the first move off unresolved, and `suppressedAt` (the change's time when
suppressed, else null). `updatedAt` is now, never before the newest updatedAt of any alert (the
server clock does not go back) and always after the alert's own previous one; one request gives all
its alerts the same time, so a bulk change makes ties. Replies: `{"data": alert}` or
`{"data": [alerts]}`; 400 for a body that is not a JSON object with a known state or a bulk request
without ids, 404 for an unknown or pruned id (then nothing changes). Every change is logged in
`changes` (id, guid, state, updatedAt), so tests know the truth.

Sorting by updatedAt: `sort=-updatedAt` (or `updatedAt`, optionally followed by `id` in the same
direction) without filters is served from an index of (updatedAt, id) kept in step with changes and
new alerts, built on first use (a million history alerts take a few seconds), so a client that reads
from the top pays for its page, not for the list. Pruned alerts are skipped as the index is read.

Live mode (`Simulator(live_updates=N)`, `simulate --live-updates N`): N changes per second, each
moving a recent alert one step on: unresolved → inprogress → resolved (four in five) or suppressed.
"""

from __future__ import annotations

import bisect
import random
from typing import Any

import orjson

from connector.simulator.clock import iso_ms, now_ms, to_ms
from connector.simulator.data import Data

STATES = ("unresolved", "inprogress", "resolved", "suppressed")
_ID_BITS = 24  # index key: updatedAt (ms) << 24 | id
_ID_MASK = (1 << _ID_BITS) - 1
LIVE_WINDOW = 200  # live changes pick among the newest alerts


class ChangeError(Exception):
    """A state change the server refuses: `status` (400 or 404) and a message naming the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_state(body: bytes) -> str:
    """The state a PUT body asks for; ChangeError(400) naming what is wrong."""
    try:
        doc = orjson.loads(body or b"null")
    except orjson.JSONDecodeError:
        doc = None
    state = doc.get("state") if isinstance(doc, dict) else None
    if state not in STATES:
        raise ChangeError(400, f'the body must be a JSON object {{"state": …}} with a state of {", ".join(STATES)}')
    return state


class Lifecycle:
    """State changes and the updatedAt index of one simulator's alerts (all under data.lock)."""

    def __init__(self, data: Data, seed: int):
        self.data = data
        self.changes: list[tuple[int, Any, str, str]] = []  # (id, guid, state, updatedAt), in order
        self._updated: dict[int, int] = {}  # alert id → its updatedAt (ms) after a change
        self._keys: list[int] | None = None  # sorted index keys, None until first needed
        self._indexed = 0  # alerts (by position) in the index
        self._rng = random.Random(seed ^ 0x5747E)

    # -- the index ---------------------------------------------------------------------------------
    def _updated_ms(self, pos: int) -> int:
        aid = pos + 1
        if aid in self._updated:
            return self._updated[aid]
        data = self.data
        if pos < data.n_base:
            return data.base_updated(pos)
        value = data.extra[pos - data.n_base].get("updatedAt")
        try:
            return to_ms(value) if isinstance(value, str) else 0
        except ValueError:  # an injected hostile value: it sorts as the oldest
            return 0

    def _index(self) -> list[int]:
        """The index, brought up to date with alerts added since (caller holds data.lock)."""
        keys = self._keys
        total = self.data.total()
        if total >= 1 << _ID_BITS:
            raise ValueError(f"the updatedAt index holds at most {1 << _ID_BITS} alerts")
        if keys is None:
            keys = self._keys = sorted(self._updated_ms(p) << _ID_BITS | (p + 1) for p in range(total))
        else:
            for p in range(self._indexed, total):
                bisect.insort(keys, self._updated_ms(p) << _ID_BITS | (p + 1))
        self._indexed = total
        return keys

    def page(self, desc: bool, offset: int, limit: int) -> list[int]:
        """Positions of the alerts at `offset` (up to `limit`) in updatedAt order (ties by id)."""
        data = self.data
        out: list[int] = []
        with data.lock:
            keys, pruned = self._index(), data.pruned
            for key in reversed(keys) if desc else keys:
                aid = key & _ID_MASK
                if aid <= pruned:
                    continue
                if offset:
                    offset -= 1
                    continue
                if len(out) >= limit:
                    break
                out.append(aid - 1)
        return out

    # -- changes -----------------------------------------------------------------------------------
    def set_state(self, ids: list[int], state: str) -> list[dict]:
        """Moves the alerts `ids` to `state` at one updatedAt; returns them as served."""
        if state not in STATES:
            raise ChangeError(400, f"unknown state {state!r}; allowed: {', '.join(STATES)}")
        if not ids:
            raise ChangeError(400, "no alert ids: give them as ?id=1&id=2")
        data = self.data
        with data.lock:
            for aid in ids:
                if not data.pruned < aid <= data.total():
                    raise ChangeError(404, f"alert {aid} not found")
            keys = self._index()
            # the clock does not go back, and a change is later than the alert's previous one
            when = max(now_ms(), keys[-1] >> _ID_BITS if keys else 0, *(self._updated_ms(a - 1) + 1 for a in ids))
            stamp = iso_ms(when)
            for aid in dict.fromkeys(ids):
                pos = aid - 1
                old = data.top(pos)
                fields: dict[str, Any] = {
                    "state": state,
                    "updatedAt": stamp,
                    "suppressedAt": stamp if state == "suppressed" else None,
                }
                if old.get("ackedAt") is None and state != "unresolved":
                    fields["ackedAt"] = stamp
                old_key = self._updated_ms(pos) << _ID_BITS | aid
                i = bisect.bisect_left(keys, old_key)
                if i < len(keys) and keys[i] == old_key:
                    del keys[i]
                bisect.insort(keys, when << _ID_BITS | aid)
                self._updated[aid] = when
                if pos < data.n_base:
                    data.changed[aid] = {**data.changed.get(aid, {}), **fields}
                else:  # a new dict: a reply being serialized keeps the one it has
                    data.extra[pos - data.n_base] = {**data.extra[pos - data.n_base], **fields}
                self.changes.append((aid, old.get("guid"), state, stamp))
            return [dict(data.alert(aid - 1)) for aid in dict.fromkeys(ids)]

    def live_step(self) -> bool:
        """One live change: a recent alert not yet closed moves one step on. False when none was found."""
        data, rng = self.data, self._rng
        with data.lock:
            low, total = data.pruned + 1, data.total()
            if total < low:
                return False
            for _ in range(8):
                aid = rng.randint(max(low, total - LIVE_WINDOW + 1), total)
                state = data.top(aid - 1).get("state")
                if state in ("unresolved", "inprogress"):
                    break
            else:
                return False
        to = "inprogress" if state == "unresolved" else "resolved" if rng.random() < 0.8 else "suppressed"
        self.set_state([aid], to)
        return True
