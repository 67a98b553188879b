"""The simulator's HTTP server: the Threat Response 4.x endpoints, query semantics (filters, sort,
paging), faults applied per request. See connector/simulator/__init__.py."""

from __future__ import annotations

import bisect
import functools
import logging
import random
import socket
import ssl
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, unquote

import orjson

from connector.simulator.catalogue import SOURCES
from connector.simulator.data import (
    MAX_ALERT_DELAY_MS,
    Data,
    iso_ms,
    mix_hash,
    now_ms,
    to_ms,
)
from connector.simulator.faults import Faults, garbage_record
from connector.simulator.handler import Handler, Server
from connector.simulator.lifecycle import ChangeError, Lifecycle, parse_state
from connector.simulator.query import (
    CONTAINS_FILTERS,
    DOC_FILTERS,
    EXACT_FILTERS,
    MAX_LIMIT,
    NUMBER_FILTERS,
    TR_PATH,
    BadRequest,
    expand_fields,
    int_param,
    intel_labels,
    list_intels,
    natural_order,
    sort_keys,
    sort_value,
    updated_order,
)
from connector.timeutil import parse_ts

log = logging.getLogger(__name__)


class Simulator:
    """See the module docstring. `port=0` picks a free port; `end` fixes the end of the history (for
    fully reproducible timestamps); `history` is in seconds."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        seed: int = 1,
        alerts: int = 1000,
        intel_docs: int = 20,
        revisions: int = 1,
        hosts: int = 50,
        history: float = 12 * 3600,
        end: datetime | str | None = None,
        api_key: str = "token-demo",
        live_rate: float = 0.0,
        late_fraction: float = 0.0,
        late_by: tuple[float, float] = (1800, 6 * 3600),
        live_total: int | None = None,
        live_updates: float = 0.0,
        latency: float = 0.0,
        module_missing: bool = False,
        certfile: str | None = None,
        keyfile: str | None = None,
        bare: bool = False,
    ):
        if alerts < 0 or intel_docs < 1 or hosts < 1 or history <= 0 or live_rate < 0 or live_updates < 0:
            raise ValueError(
                "alerts must be >= 0, intel_docs and hosts >= 1, history positive, live_rate and live_updates >= 0"
            )
        if not 0 <= late_fraction <= 1:
            raise ValueError(f"late_fraction must be between 0 and 1, not {late_fraction}")
        self.seed = seed
        self.api_key = api_key
        self.old_keys: set[str] = set()  # accepted too: the overlap of a token rotation
        self.live_rate, self.late_fraction, self.late_by = live_rate, late_fraction, late_by
        self.live_total = live_total
        self.live_updates = live_updates  # state changes per second (lifecycle.py)
        self.bare = bare
        end_ms = to_ms(end) if end is not None else now_ms()
        self.data = Data(seed, alerts, intel_docs, revisions, hosts, end_ms, int(history * 1000))
        self.faults = Faults(seed)
        self.lifecycle = Lifecycle(self.data, seed)
        self.faults.latency = latency
        self.faults.module_missing = module_missing
        self.stats: Counter = Counter()
        # (monotonic time, User-Agent) of each alert listing: which client polled when
        self.polls: deque[tuple[float, str]] = deque(maxlen=100_000)
        self.garbage_log: list[tuple[str, int | None]] = []
        self.live_created = self.live_changed = 0
        self._stop = threading.Event()
        self._live_rng = random.Random(seed ^ 0x11FE)
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._garbage_id = 0
        self._ssl = None
        if certfile:
            self._ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._ssl.load_cert_chain(certfile, keyfile)
        self.server = Server((host, port), Handler, self)
        self.host = host
        self.port = self.server.server_address[1]
        self._threads: list[threading.Thread] = []

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self._ssl else 'http'}://{h}:{self.port}"

    def settings(self, **overrides: Any) -> dict:
        """A `[tanium]` section (as a dict) pointing at this simulator."""
        base = {
            "protocol": "https" if self._ssl else "http",
            "host": self.host,
            "port": self.port,
            "api_key": self.api_key,
        }
        base.update(overrides)
        return base

    def start(self) -> Simulator:
        t = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, name=f"simulator-{self.port}", daemon=True
        )
        t.start()
        self._threads.append(t)
        if self.live_rate > 0 or self.live_updates > 0:
            lt = threading.Thread(target=self._live, name="simulator-live", daemon=True)
            lt.start()
            self._threads.append(lt)
        return self

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._threads:  # shutdown() waits for serve_forever(), which never ran otherwise
            self.server.shutdown()
        self.server.server_close()
        with self._conns_lock:
            for c in list(self._conns):
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- data API ----------------------------------------------------------------------------------
    @property
    def alert_count(self) -> int:
        return self.data.total()

    @property
    def intel_doc_ids(self) -> list[int]:
        return [d.id for d in self.data.docs]

    def get_alert(self, alert_id: int) -> dict | None:
        """The alert as served (details a JSON string), or None."""
        if not 1 <= alert_id <= self.data.total():
            return None
        return dict(self.data.alert(alert_id - 1))

    def intel_doc(self, doc_id: int) -> dict | None:
        d = self.data.doc_by_id.get(doc_id)
        return d.body(self.data.n_base) if d else None

    def prune(self, n: int) -> int:
        """Delete the `n` oldest alerts, as TR's periodic pruning does: offsets of the rest shift left."""
        with self.data.lock:
            self.data.pruned = min(self.data.total(), self.data.pruned + max(0, n))
            return self.data.pruned

    def bump_revision(self, doc_id: int) -> int:
        """New revision of an IntelDoc: later alerts carry it and /intels/{id} serves it."""
        d = self.data.doc_by_id[doc_id]
        with self.data.lock:
            d.revisions += 1
            return d.revisions

    def inject(
        self,
        computer_name: str | None = None,
        ip: str | None = None,
        alerted_at: datetime | str | None = None,
        created_at: datetime | str | None = None,
        match_type: str | None = None,
        intel_doc_id: int | None = None,
        **extra: Any,
    ) -> dict:
        """Add one alert now (next id; createdAt = now unless given, never before the newest alert).
        Keyword overrides: local_ip, remote_ip, local_port, remote_port, md5, sha1, sha256, size, args,
        path, process_name, user, state, severity, priority, scan_config_id, intel_doc_revision,
        details (any value: a str is served raw, None as null, others JSON-encoded), fields (dict of
        top-level fields set last). Returns the alert as served (details a JSON string)."""
        allowed = {
            "local_ip",
            "remote_ip",
            "local_port",
            "remote_port",
            "md5",
            "sha1",
            "sha256",
            "size",
            "args",
            "path",
            "process_name",
            "user",
            "state",
            "severity",
            "priority",
            "scan_config_id",
            "intel_doc_revision",
            "details",
            "fields",
        }
        unknown = set(extra) - allowed
        if unknown:
            raise TypeError(f"inject() got unknown overrides {sorted(unknown)}; allowed: {sorted(allowed)}")
        if match_type not in (None, "process", "file", "port"):
            raise ValueError(f"match_type must be process, file or port, not {match_type!r}")
        ov = dict(extra)
        for k, v in (
            ("computer_name", computer_name),
            ("ip", ip),
            ("match_type", match_type),
            ("intel_doc_id", intel_doc_id),
        ):
            if v is not None:
                ov[k] = v
        data = self.data
        doc = data.doc_by_id.get(intel_doc_id) if intel_doc_id is not None else None
        if doc is None and intel_doc_id is None:
            want = match_type or "process"
            doc = next((d for d in data.docs if d.match_type == want), data.docs[0])
        if doc and match_type is None:
            ov["match_type"] = doc.match_type
        with data.lock:
            last = data.last_created()
            if created_at is not None:
                created = to_ms(created_at)
                if created < last:
                    raise ValueError(
                        f"created_at {iso_ms(created)} is before the newest alert ({iso_ms(last)}); "
                        "ids increase with createdAt, so injected alerts must be the newest"
                    )
            else:
                created = max(now_ms(), last)
            alerted = to_ms(alerted_at) if alerted_at is not None else (created - 30_000) // 1000 * 1000
            return dict(data.append((created, alerted), doc, ov))

    def set_state(self, ids: list[int], state: str) -> list[dict]:
        """Moves alerts to `state`, as `PUT .../alerts/?id=…` does (see lifecycle.py); ChangeError if refused."""
        return self.lifecycle.set_state(ids, state)

    def _live(self) -> None:
        t0 = time.monotonic()
        tick = min(0.1, 1.0 / max(self.live_rate, self.live_updates))
        while not self._stop.wait(tick):
            changes = int((time.monotonic() - t0) * self.live_updates) - self.live_changed
            for _ in range(min(max(0, changes), max(1, int(self.live_updates)))):
                self.live_changed += 1
                self.lifecycle.live_step()
            due = int((time.monotonic() - t0) * self.live_rate) - self.live_created
            if self.live_total is not None:
                due = min(due, self.live_total - self.live_created)
            due = min(due, max(1, int(self.live_rate)))  # after a pause, catch up over a few seconds
            for _ in range(max(0, due)):
                self._live_one()
            if self.live_total is not None and self.live_created >= self.live_total and not self.live_updates:
                return

    def _live_one(self) -> None:
        data, rng = self.data, self._live_rng
        with data.lock:
            created = max(now_ms(), data.last_created())
            if rng.random() < self.late_fraction:
                alerted = created - int(rng.uniform(*self.late_by) * 1000)
            else:
                alerted = created - rng.randrange(300_000)
            u = rng.random()
            doc = data.docs[min(bisect.bisect_left(data.cum, u), len(data.docs) - 1)]
            data.append((created, alerted // 1000 * 1000), doc, {"match_type": doc.match_type})
            self.live_created += 1

    # -- request handling --------------------------------------------------------------------------
    def _route(self, path: str) -> tuple[str, int | None]:
        path = path.rstrip("/") or "/"
        if path == "/api/v2/session/current":
            return "session", None
        if not path.startswith(TR_PATH + "/"):
            return "unknown", None
        parts = path[len(TR_PATH) + 1 :].split("/")
        try:
            if parts == ["alerts"]:
                return "alerts", None
            if parts == ["intels"]:
                return "intels", None
            if len(parts) == 2 and parts[0] == "alerts":
                return "alert", int(parts[1])
            if len(parts) == 2 and parts[0] == "intels":
                return "intel", int(parts[1])
            if len(parts) == 3 and parts[0] == "intels" and parts[2] == "labels":
                return "intel_labels", int(parts[1])
        except ValueError:
            pass
        return "unknown", None

    def handle(self, req: Handler) -> None:
        raw_path, _, query = req.path.partition("?")
        path = unquote(raw_path)
        endpoint, ident = self._route(path)
        body = b""
        if req.command == "PUT":  # state changes (lifecycle.py); the body is read even when refused
            body = req.rfile.read(int(req.headers.get("Content-Length") or 0))
            target, endpoint = endpoint, "update" if endpoint in ("alert", "alerts") else "unknown"
        self.stats[endpoint] += 1
        if endpoint == "alerts":
            self.polls.append((time.monotonic(), req.headers.get("User-Agent", "")))
        f = self.faults
        if req.headers.get("session") not in (self.api_key, *self.old_keys) or f.wrong_token:
            return req.reply(
                401,
                {
                    "text": "Unauthorized",
                    "errors": [{"code": "Unauthorized", "description": "Invalid or expired session"}],
                },
            )
        is_tr = path.startswith(TR_PATH)
        if endpoint == "unknown" or (f.module_missing and is_tr):
            return req.reply(
                404, {"text": "Not Found", "errors": [{"code": "NotFound", "description": f"{path} does not exist"}]}
            )
        if f.forbidden and is_tr:
            return req.reply(
                403, {"text": "Forbidden", "errors": [{"code": "Forbidden", "description": "insufficient permissions"}]}
            )
        if endpoint == "update":
            return self._change(req, target, ident, query, body)
        faulty = f.applies(endpoint)
        if faulty and f.latency > 0:
            self._stop.wait(f.latency)
        if faulty and f.take("stall"):
            self._stop.wait(f.stall_seconds)
            return req.drop()
        if faulty and f.take("rate_limit"):
            headers = {"Retry-After": f.retry_after} if f.retry_after is not None else {}
            return req.reply(429, {"text": "Too Many Requests"}, headers)
        if faulty and f.take("error"):
            return req.reply(f.error_status, {"text": "Internal Server Error"})
        try:
            status, payload, page = self._answer(endpoint, ident, query)
        except BadRequest as e:
            return req.reply(400, {"text": "Bad Request", "errors": [{"code": "BadRequest", "description": str(e)}]})
        if status == 200 and page is not None and faulty and f.take("garbage"):
            body = self._with_garbage(payload, page)
        else:
            body = orjson.dumps(payload)
        if faulty and status == 200 and f.take("malformed"):
            body = body[: max(1, len(body) * 2 // 3)]
        if faulty and f.take("reset"):
            return req.reset(status, body)
        req.send_body(status, body)

    def _change(self, req: Handler, target: str, ident: int | None, query: str, body: bytes) -> None:
        try:
            state = parse_state(body)
            try:
                ids = [ident] if ident is not None else [int(v) for k, v in parse_qsl(query) if k == "id"]
            except ValueError:
                raise ChangeError(400, "alert ids must be integers: ?id=1&id=2") from None
            alerts = self.lifecycle.set_state(ids, state)
        except ChangeError as e:
            code = "NotFound" if e.status == 404 else "BadRequest"
            return req.reply(e.status, {"text": code, "errors": [{"code": code, "description": str(e)}]})
        out = alerts[0] if target == "alert" else alerts
        req.reply(200, out if self.bare else {"data": out})

    def _answer(self, endpoint: str, ident: int | None, query: str) -> tuple[int, Any, list | None]:
        """→ (status, payload, page items for list replies)."""
        params = parse_qsl(query, keep_blank_values=True)
        data = self.data
        if endpoint == "session":
            return (
                200,
                {
                    "data": {
                        "id": 4242,
                        "userId": 7,
                        "user": {"id": 7, "name": "svc-threat-response"},
                        "authType": "api_token",
                    }
                },
                None,
            )
        if endpoint == "alerts":
            items, total, filtered = self._list_alerts(params)
            body = items if self.bare else {"data": items, "meta": {"totalCount": total, "filteredCount": filtered}}
            return 200, body, items
        if endpoint == "alert":
            if ident is None or not 1 <= ident <= data.total():
                return (
                    404,
                    {"text": "Not Found", "errors": [{"code": "NotFound", "description": f"alert {ident} not found"}]},
                    None,
                )
            alert = data.alert(ident - 1)
            if "intelDoc" in expand_fields(params):
                alert = self.expanded(alert)
            return 200, alert if self.bare else {"data": alert}, None
        if endpoint == "intels":
            docs, meta = list_intels(data, params)
            return 200, docs if self.bare else {"data": docs, "meta": meta}, None
        doc = data.doc_by_id.get(ident)
        if doc is None:
            return (
                404,
                {"text": "Not Found", "errors": [{"code": "NotFound", "description": f"intel {ident} not found"}]},
                None,
            )
        body = doc.body(data.n_base) if endpoint == "intel" else intel_labels(data, doc)
        return 200, body if self.bare else {"data": body}, None

    def _list_alerts(self, params: list[tuple[str, str]]) -> tuple[list, int, int]:
        data = self.data
        limit = int_param(params, "limit", 100, 0, MAX_LIMIT)
        offset = int_param(params, "offset", 0, 0, None)
        keys = sort_keys(params)
        expand = expand_fields(params)
        filters: dict[str, list[str]] = {}
        t_from = t_until = None
        for k, v in params:
            if k in ("alertedAtFrom", "alertedAtUntil"):
                try:
                    ms = int(parse_ts(v).timestamp() * 1000)
                except ValueError:
                    raise BadRequest(f"{k}: {v!r} is not an ISO-8601 time such as 2023-01-01T11:00:00.000Z") from None
                if k == "alertedAtFrom":
                    t_from = ms if t_from is None else min(t_from, ms)  # repeated = OR: the widest window
                else:
                    t_until = ms if t_until is None else max(t_until, ms)
            elif k in EXACT_FILTERS or k in NUMBER_FILTERS or k in CONTAINS_FILTERS or k in DOC_FILTERS:
                filters.setdefault(k, []).append(v)
        with data.lock:
            n_total, p0 = data.total(), data.pruned
        # candidate positions: a createdAt range for history alerts (alertedAt ≤ createdAt ≤ alertedAt
        # + 5 min there), every stored alert (those may be late by hours)
        lo, hi = min(p0, data.n_base), data.n_base
        if t_from is not None:
            lo = max(lo, min(data.first_pos_created_at_least(t_from), data.n_base))
        if t_until is not None:
            hi = min(hi, data.first_pos_created_at_least(t_until + MAX_ALERT_DELAY_MS))
        timed = t_from is not None or t_until is not None

        def positions(reverse: bool):
            if reverse:
                yield from range(n_total - 1, max(data.n_base, p0) - 1, -1)
                yield from range(hi - 1, lo - 1, -1)
            else:
                yield from range(lo, hi)
                yield from range(max(data.n_base, p0), n_total)

        def alerted_ok(pos: int) -> bool:
            a = data.base_alerted(pos) if pos < data.n_base else data.extra_alerted[pos - data.n_base]
            return (t_from is None or a >= t_from) and (t_until is None or a < t_until)

        natural = natural_order(keys)
        by_update = updated_order(keys) if not filters and not timed else None
        chosen: Sequence[int]
        if by_update is not None:
            count = n_total - p0
            chosen = self.lifecycle.page(by_update == "desc", offset, limit)
        elif natural is not None and not filters and not timed:
            count = n_total - p0
            if natural == "asc":
                chosen = range(p0 + offset, min(p0 + offset + limit, n_total))
            else:
                chosen = range(n_total - 1 - offset, max(n_total - 1 - offset - limit, p0 - 1), -1)
        elif natural is not None:
            picked: list[int] = []
            count = 0
            for pos in positions(natural == "desc"):
                if timed and not alerted_ok(pos):
                    continue
                if filters and not self._matches(pos, filters):
                    continue
                if offset <= count < offset + limit:
                    picked.append(pos)
                count += 1
            chosen = picked
        else:
            matched = [
                p
                for p in positions(False)
                if (not timed or alerted_ok(p)) and (not filters or self._matches(p, filters))
            ]
            count = len(matched)
            tops = {p: data.top(p) for p in matched}
            first_desc = keys[0][1]
            order = keys + ([("id", first_desc)] if all(c != "id" for c, _ in keys) else [])
            for col, desc in reversed(order):  # stable sorts, least significant column first
                matched.sort(key=functools.partial(_column_value, tops, col), reverse=desc)
            chosen = matched[offset : offset + limit]
        items = [data.alert(p) for p in chosen]
        if "intelDoc" in expand:
            items = [self.expanded(a) for a in items]
        return items, n_total - p0, count

    def expanded(self, alert: dict) -> dict:
        d = self.data.doc_by_id.get(alert.get("intelDocId"))
        out = dict(alert)
        if d:
            out["intelDoc"] = d.body(self.data.n_base, full=False)
        return out

    def _matches(self, pos: int, filters: dict[str, list[str]]) -> bool:
        data = self.data
        top = data.top(pos)
        doc = None
        for k, vals in filters.items():
            if k in EXACT_FILTERS:
                if top.get(k) not in vals:
                    return False
            elif k in NUMBER_FILTERS:
                if not any(v.strip().isdigit() and top.get(k) == int(v) for v in vals):
                    return False
            elif k in CONTAINS_FILTERS:
                if k == "details" and pos < data.n_base:
                    top = data.alert(pos)
                have = top.get(k)
                have = have.lower() if isinstance(have, str) else ""
                if not any(v.lower() in have for v in vals):
                    return False
            else:
                doc = doc or data.doc_by_id.get(top.get("intelDocId"))
                if doc is None:
                    return False
                if k == "intelType":
                    if doc.kind not in vals:
                        return False
                    continue
                have = {
                    "intelDocName": [doc.name],
                    "intelSource": [SOURCES.get(doc.source, "")],
                    "labelName": doc.label_names,
                    "mitreId": doc.technique_ids,
                    "platform": doc.platforms,
                }[k]
                if not any(v.lower() in h.lower() for v in vals for h in have):
                    return False
        return True

    def _with_garbage(self, payload: Any, page: list) -> bytes:
        """Serialize an alerts reply with garbage records mixed into the page."""
        rng = random.Random(mix_hash(self.seed, len(self.garbage_log)))
        after: dict[int, list[bytes]] = {}  # real record index → garbage records following it
        for _ in range(self.faults.garbage_per_page):
            kind = self.faults.next_garbage_kind()
            k = rng.randrange(len(page)) if page else -1
            created = page[k]["createdAt"] if page else iso_ms(now_ms())
            with self.data.lock:
                self._garbage_id += 1
                gid = -self._garbage_id
                self.garbage_log.append((kind, None if kind in ("non_object", "missing_id", "wrong_types") else gid))
            after.setdefault(k, []).append(
                garbage_record(kind, gid, created, self.data.docs[0].id, self.faults.huge_details_bytes)
            )
        items = after.pop(-1, [])
        for k, alert in enumerate(page):
            items.append(orjson.dumps(alert))
            items.extend(after.get(k, ()))
        arr = b"[" + b",".join(items) + b"]"
        if self.bare:
            return arr
        return b'{"data":' + arr + b',"meta":' + orjson.dumps(payload["meta"]) + b"}"


def _column_value(tops: dict[int, dict], column: str, pos: int) -> tuple:
    return sort_value(tops[pos].get(column))
