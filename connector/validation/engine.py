"""The shared-query engine of Security Validation mode.

Cost: Tanium requests must not grow with the number of open job actions. At each tick the engine
takes every window that is due (run time ≤ now) across all open actions, merges their time ranges,
and fetches each merged range once (alertedAtFrom inclusive, alertedAtUntil exclusive, offset paging
sorted by createdAt,id so alerts stored meanwhile land at the end instead of shifting pages). Each
alert is enriched and normalized once and then handed to every action whose due window covers it
(an index of host names / IPs picks the candidate actions). Ticks are at least one query interval
apart, so the number of queries over a period depends on its length, not on how many actions it
holds; a window can therefore run up to one interval (at most a minute) after its scheduled time,
never before.

Overlapping windows return the same alert many times: per action, each event counts once (uid).
A failed Tanium call leaves the due windows pending; the next tick re-runs them and the uid sets
make that idempotent.

Event time adjustment: the Normalizer adds it to `event_time`; the fetch range is shifted by the
opposite amount (raw alertedAt = event_time − adjustment), and matching uses event_time as is.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from connector.config import ConfigError, parse_alert_filter
from connector.stream.normalize import NormalizeError
from connector.stream.stages import build_stages
from connector.timeutil import format_ts
from connector.validation.rules import (
    JobAction,
    Schedule,
    action_tokens,
    event_time,
    identity_tokens,
    match_event,
)

log = logging.getLogger(__name__)

Publish = Callable[[str, "str | None", dict], None]  # (topic, key, value)
SORT = "createdAt,id"
_MS = timedelta(milliseconds=1)
MAX_GAP_SECONDS = 60.0


@dataclass
class ActionState:
    action: JobAction
    schedule: Schedule
    tag: Any = None  # the runner's bookkeeping (e.g. Kafka partition/offset)
    done: int = 0  # windows 0 … done−1 have been queried
    matched: set = field(default_factory=set)
    suspicious: set = field(default_factory=set)
    correlated: set = field(default_factory=set)
    first_detection: datetime | None = None
    first_reported_at: datetime | None = None
    first_query_at: datetime | None = None
    last_query_at: datetime | None = None
    requests: int = 0
    limit_hits: int = 0

    @property
    def finished(self) -> bool:
        return self.done >= self.schedule.count


@dataclass
class _Range:
    start: datetime  # raw alertedAt bounds (closed)
    end: datetime
    states: list = field(default_factory=list)


@dataclass
class FetchStats:
    requests: int = 0
    alerts: int = 0
    limited: bool = False
    filtered: int | None = None


class ValidationEngine:
    def __init__(self, cfg, client, publish: Publish, *, metrics=None, technology_version: str | None = None):
        v = cfg.validation
        self.cfg, self.client, self.publish, self.metrics = cfg, client, publish, metrics
        self.pipeline = cfg.pipeline.name
        self.adjust = timedelta(seconds=v.event_time_adjustment)
        # ticks are at least this far apart: queries per period then depend on its length only
        self.gap = timedelta(seconds=min(v.query_interval, MAX_GAP_SECONDS))
        self.corr_params: list[tuple[str, str]] | None = None
        if v.correlation_query_enabled:
            try:
                self.corr_params = parse_alert_filter(v.correlation_query)
            except ValueError as e:
                raise ConfigError(f"validation.correlation_query = {v.correlation_query!r}: {e}") from None
            clash = [k for k, _ in self.corr_params if k in ("alertedAtFrom", "alertedAtUntil")]
            if clash:
                raise ConfigError(
                    f"validation.correlation_query: {', '.join(clash)} is set by the connector "
                    "from each action's window; remove it from the query"
                )
        self.corr_every = timedelta(minutes=v.correlation_query_interval)
        stages = build_stages(cfg, client, metrics)  # the event-time adjustment is applied there
        self.enricher, self.normalizer = stages.enricher, stages.normalizer
        self.technology = {
            "vendor": "Tanium",
            "product": "Threat Response",
            "version": technology_version,
            "host": cfg.tanium.host,
        }
        self.open: dict[str, ActionState] = {}
        self._index: dict[str, set[str]] = {}
        self._devices: set[str] = set()
        self.last_tick: datetime | None = None
        self.closed: dict[str, Any] = {}  # action id → tag of the actions the last tick decided
        self.last_correlation: datetime | None = None
        self.stats = {
            "requests": 0,
            "queries": 0,
            "correlation_queries": 0,
            "alerts": 0,
            "ticks": 0,
            "limit_reached": 0,
            "normalize_errors": 0,
            "devices": 0,
        }
        self.trace: deque = deque(maxlen=2000)  # recent ticks: when, which windows, which ranges

    # ---- actions --------------------------------------------------------------------------
    def add(self, action: JobAction, tag: Any = None) -> bool:
        """Opens an action; False when an action with this id is already open (a duplicate)."""
        if action.id in self.open:
            return False
        v = self.cfg.validation
        st = ActionState(action, Schedule.of(action.started_at, v.query_time, v.query_interval, v.delay_time), tag)
        self.open[action.id] = st
        for tok in action_tokens(action):
            self._index.setdefault(tok, set()).add(action.id)
        self._gauge()
        return True

    def take(self, which: Callable[[ActionState], bool]) -> list[ActionState]:
        """Removes the open actions for which which() is true and returns their states, progress
        included (a runner parks them during a rebalance and may `restore` them)."""
        gone = [st for st in self.open.values() if which(st)]
        for st in gone:
            self._remove(st.action.id)
        return gone

    def restore(self, states: list[ActionState]) -> None:
        for st in states:
            if st.action.id not in self.open:
                self.open[st.action.id] = st
                for tok in action_tokens(st.action):
                    self._index.setdefault(tok, set()).add(st.action.id)
        self._gauge()

    def _remove(self, aid: str) -> None:
        st = self.open.pop(aid)
        for tok in action_tokens(st.action):
            ids = self._index.get(tok)
            if ids:
                ids.discard(aid)
                if not ids:
                    del self._index[tok]
        self._gauge()

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.actions_in_flight.labels(self.pipeline).set(len(self.open))

    # ---- timing ---------------------------------------------------------------------------
    def next_wakeup(self) -> datetime | None:
        """When the next tick has work: the earliest pending run time (or correlation run), but at
        least one query interval after the previous tick."""
        if not self.open:
            return None
        t = min(st.schedule.window(st.done).run_at for st in self.open.values())
        if self.corr_params is not None and self.last_correlation is not None:
            t = min(t, self.last_correlation + self.corr_every)
        if self.last_tick is not None:
            t = max(t, self.last_tick + self.gap)
        return t

    # ---- the tick -------------------------------------------------------------------------
    def tick(self, now: datetime) -> list[dict]:
        """Runs every query due at `now`; returns the verdicts of actions whose last window ran.
        Raises TaniumError when Tanium fails; the due windows then stay pending."""
        due: dict[str, tuple[int, int]] = {}
        for aid, st in self.open.items():
            hi = st.schedule.due_until(now)
            if hi > st.done:
                due[aid] = (st.done, hi)
        finishing = [aid for aid, (lo, hi) in due.items() if hi >= self.open[aid].schedule.count]
        corr_due = (
            self.corr_params is not None
            and self.open
            and (finishing or self.last_correlation is None or now - self.last_correlation >= self.corr_every)
        )
        if not due and not corr_due:
            return []
        self.last_tick = now
        self.stats["ticks"] += 1
        ranges = self._ranges({aid: self.open[aid].schedule.span(lo, hi) for aid, (lo, hi) in due.items()})
        self.trace.append(
            {
                "at": now,
                "windows": dict(due) if len(due) <= 50 else {"count": len(due)},
                "ranges": [(r.start, r.end) for r in ranges],
                "kind": "windows",
            }
        )
        for r in ranges:
            fs = self._fetch([], r, lambda events, r=r: self._distribute(events, r, due, now))
            self.stats["queries"] += 1
            for aid in r.states:
                st = self.open[aid]
                st.requests += fs.requests
                if fs.limited:
                    st.limit_hits += 1
        if corr_due:
            self._correlate(
                now,
                list(self.open)
                if (self.last_correlation is None or now - self.last_correlation >= self.corr_every)
                else finishing,
            )
        for aid, (_, hi) in due.items():  # only now: a failure above leaves them pending
            st = self.open[aid]
            st.done = hi
            st.first_query_at = st.first_query_at or now
            st.last_query_at = now
        verdicts = []
        self.closed = {}
        for aid in finishing:
            verdicts.append(self._verdict(self.open[aid], now))
            self.closed[aid] = self.open[aid].tag
            self._remove(aid)
        return verdicts

    def _ranges(self, spans: dict[str, list[tuple[datetime, datetime]]]) -> list[_Range]:
        """Merged raw-time ranges (event time − adjustment) and the actions each one serves."""
        pieces = sorted((s - self.adjust, e - self.adjust, aid) for aid, sp in spans.items() for s, e in sp)
        out: list[_Range] = []
        for s, e, aid in pieces:
            if out and s <= out[-1].end + self.gap:
                cur = out[-1]
                cur.end = max(cur.end, e)
                if not cur.states or cur.states[-1] != aid:
                    cur.states.append(aid)
            else:
                out.append(_Range(s, e, [aid]))
        for r in out:
            r.states = list(dict.fromkeys(r.states))
        return out

    def _fetch(self, params: list[tuple[str, str]], r: _Range, handle: Callable[[list[dict]], None]) -> FetchStats:
        """Pages through one time range (capped at tanium.limit), enriching and normalizing each
        page once, and hands the events to `handle`."""
        t = self.cfg.tanium
        q = list(params) + [("alertedAtFrom", format_ts(r.start)), ("alertedAtUntil", format_ts(r.end + _MS))]
        fs = FetchStats()
        offset = 0
        while fs.alerts < t.limit:
            want = min(t.page_size, t.limit - fs.alerts)
            page = self.client.list_alerts(q, offset, want, sort=SORT)
            fs.requests += 1
            fs.filtered = page.filtered
            items = [a for a in page.items if isinstance(a, dict)]
            fs.alerts += len(page.items)
            offset += len(page.items)
            if items:
                if self.enricher is not None:
                    before = self.enricher.stats["requests"]
                    self.enricher.enrich(items)
                    fs.requests += self.enricher.stats["requests"] - before
                handle(self._normalize(items))
            if len(page.items) < want:
                break
        else:
            fs.limited = fs.filtered is None or fs.filtered > fs.alerts
        self.stats["requests"] += fs.requests
        self.stats["alerts"] += fs.alerts
        if self.metrics:
            self.metrics.validation_queries.labels(self.pipeline).inc()
        if fs.limited:
            self.stats["limit_reached"] += 1
            more = f" of {fs.filtered}" if fs.filtered is not None else ""
            log.warning(
                "validation query %s–%s stopped at tanium.limit = %d alerts%s; later alerts of this "
                "range were not examined",
                format_ts(r.start),
                format_ts(r.end),
                t.limit,
                more,
            )
            if self.metrics:
                skipped = max(1, (fs.filtered or 0) - fs.alerts)
                self.metrics.records_dropped.labels(self.pipeline, "validation", "limit").inc(skipped)
        return fs

    def _normalize(self, alerts: list[dict]) -> list[dict]:
        out = []
        for a in alerts:
            try:
                out.append(self.normalizer.normalize(a))
            except NormalizeError as e:
                self.stats["normalize_errors"] += 1
                log.warning("validation: alert %r cannot be normalized (%s); skipped", a.get("id"), e)
        if self.cfg.validation.discover_network_devices:
            for ev in out:
                self._discover(ev)
        return out

    # ---- outputs --------------------------------------------------------------------------
    def _record(self, st: ActionState, ev: dict, window: dict, rules: list[str], correlated: bool) -> dict:
        event = dict(ev)
        rec = {
            "action_id": st.action.id,
            "job_id": st.action.job_id,
            "window": window,
            "matched_rules": rules,
            "correlated": correlated,
            "pipeline": self.pipeline,
        }
        if self.cfg.validation.discover_network_devices:
            rec["security_technology"] = dict(self.technology)
        else:
            event.pop("observer", None)  # no product information when discovery is off
        rec["event"] = event
        return rec

    def _discover(self, ev: dict) -> None:
        name = ev.get("computer") or ev.get("host")
        if not isinstance(name, str) or not name.strip() or name.lower() in self._devices:
            return
        self._devices.add(name.lower())
        self.stats["devices"] += 1
        ips = [ev.get("src_ip")]
        raw = ev.get("raw")
        if isinstance(raw, dict):
            ips.append(raw.get("computerIpAddress"))
        ips = list(dict.fromkeys(i for i in ips if isinstance(i, str) and i))
        self.publish(
            self.cfg.validation.devices_topic,
            name.lower(),
            {
                "computer_name": name,
                "ips": ips,
                "first_seen": ev.get("event_time"),
                "security_technology": dict(self.technology),
                "pipeline": self.pipeline,
            },
        )

    def _candidates(self, ev: dict, allowed) -> list[str]:
        ids: set[str] = set()
        for tok in identity_tokens(ev):
            ids |= self._index.get(tok, set())
        return [aid for aid in ids if aid in allowed]

    def _distribute(self, events: list[dict], r: _Range, due: dict[str, tuple[int, int]], now: datetime) -> None:
        v = self.cfg.validation
        for ev in events:
            uid = str(ev.get("uid") or (ev.get("raw") or {}).get("id"))
            t = event_time(ev)
            for aid in self._candidates(ev, due):
                st = self.open[aid]
                lo, hi = due[aid]
                if t is None:
                    window = st.schedule.window(lo)
                else:
                    window = st.schedule.first_covering(t, lo, hi)
                    if window is None:
                        continue  # outside this action's due windows
                m = match_event(st.action, ev)
                if m is None:
                    continue
                if t is None:
                    m.failed.insert(0, {"field": "event_time", "reason": "missing"})
                if m.matched:
                    if uid in st.matched:
                        continue
                    st.matched.add(uid)
                    if st.first_detection is None or t < st.first_detection:
                        st.first_detection = t
                    st.first_reported_at = st.first_reported_at or now
                    self.publish(
                        v.events_topic, aid, self._record(st, ev, window.describe(), ["time"] + m.rules, False)
                    )
                elif uid not in st.suspicious:
                    st.suspicious.add(uid)
                    if v.save_suspicious_events:
                        rec = self._record(st, ev, window.describe(), (["time"] if t else []) + m.rules, False)
                        rec["failed_fields"] = m.failed
                        self.publish(v.suspicious_topic, aid, rec)

    def _correlate(self, now: datetime, aids: list[str]) -> None:
        """The correlation query over each action's overall window [T − Q, T + Q]; a match sets
        `alerted` and is published like an event, with correlated = true."""
        self.last_correlation = now
        spans = {aid: [(self.open[aid].schedule.first_start, self.open[aid].schedule.last_end)] for aid in aids}
        for r in self._ranges(spans):

            def handle(events, r=r):
                for ev in events:
                    t = event_time(ev)
                    uid = str(ev.get("uid"))
                    for aid in self._candidates(ev, r.states):
                        st = self.open[aid]
                        sch = st.schedule
                        if t is None or not sch.first_start <= t <= sch.last_end or uid in st.correlated:
                            continue
                        m = match_event(st.action, ev)
                        if m is None or not m.matched:
                            continue
                        st.correlated.add(uid)
                        window = {"index": None, "start": format_ts(sch.first_start), "end": format_ts(sch.last_end)}
                        self.publish(
                            self.cfg.validation.events_topic,
                            aid,
                            self._record(st, ev, window, ["time"] + m.rules, True),
                        )

            fs = self._fetch(self.corr_params or [], r, handle)
            self.stats["correlation_queries"] += 1
            self.trace.append(
                {"at": now, "kind": "correlation", "ranges": [(r.start, r.end)], "actions": len(r.states)}
            )
            for aid in r.states:
                self.open[aid].requests += fs.requests
                if fs.limited:
                    self.open[aid].limit_hits += 1

    def _verdict(self, st: ActionState, now: datetime) -> dict:
        a, sch = st.action, st.schedule
        latency = (st.first_detection - a.started_at).total_seconds() if st.first_detection else None
        notes = []
        if st.limit_hits:
            notes.append(
                f"tanium.limit ({self.cfg.tanium.limit}) was reached in {st.limit_hits} "
                "queries covering this action; results may be incomplete"
            )
        if st.suspicious and not self.cfg.validation.save_suspicious_events:
            notes.append(f"{len(st.suspicious)} suspicious events not saved (save_suspicious_events is off)")
        detected = bool(st.matched)
        return {
            "action_id": a.id,
            "job_id": a.job_id,
            "name": a.name,
            "type": a.type,
            "result": "detected" if detected else "missed",
            "detected": detected,
            "alerted": bool(st.correlated),
            "matched_events": len(st.matched),
            "suspicious_events": len(st.suspicious),
            "correlated_events": len(st.correlated),
            "started_at": format_ts(a.started_at),
            "first_detection_time": format_ts(st.first_detection) if st.first_detection else None,
            "latency_seconds": latency,
            "first_reported_at": format_ts(st.first_reported_at) if st.first_reported_at else None,
            "windows": {
                "queried": st.done,
                "total": sch.count,
                "first_start": format_ts(sch.first_start),
                "last_end": format_ts(sch.last_end),
                "first_query_at": format_ts(st.first_query_at) if st.first_query_at else None,
                "last_query_at": format_ts(st.last_query_at) if st.last_query_at else None,
            },
            "requests": st.requests,
            "notes": notes,
            **({"metadata": a.raw["metadata"]} if isinstance(a.raw.get("metadata"), dict) else {}),
            "pipeline": self.pipeline,
            "decided_at": format_ts(now),
        }


def count_verdict(metrics, verdict: dict) -> None:
    """Verdict metrics, recorded where a verdict is actually published or printed."""
    if metrics is None:
        return
    metrics.verdicts.labels(metrics.pipeline, verdict.get("result", "rejected")).inc()
    if verdict.get("latency_seconds") is not None:
        metrics.detection_latency.labels(metrics.pipeline).observe(max(0.0, verdict["latency_seconds"]))
