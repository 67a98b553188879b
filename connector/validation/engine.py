"""The shared-query engine of Security Validation mode.

Cost: Tanium requests must not grow with the number of open job actions. At each tick the engine
takes every window that is due (run time ≤ now) across all open actions and fetches windows whose
time ranges overlap (or nearly touch) with one shared query (alertedAtFrom inclusive,
alertedAtUntil exclusive, offset paging sorted by createdAt,id so alerts stored meanwhile land at
the end instead of shifting pages). Each alert is enriched and normalized once and then handed to
every action whose window covers it (an index of host names / IPs picks the candidate actions).

Timing: the engine wakes at the next due time (the earliest run time of a pending window, or the
next correlation run), never before it, and ticks are at least `validation.max_lateness` seconds
apart (default 0.5): a window runs at most that long after its due time (plus the time the tick's
queries take), and windows due within that span share one query round. The number of query rounds
thus follows the distinct due times (at most one round per max_lateness), not the number of
actions; a larger max_lateness trades punctuality for fewer rounds.

`tanium.limit` belongs to one window: each window sees exactly the alerts its own query, capped at
the limit, would return (the first `limit` of its range in createdAt,id order), however many windows
share a query. A shared query is capped at the limit too, so every alert it returns is among the
first `limit` of each window it falls in. When it stops at the limit, the windows that held every
returned alert (or whose range is the whole query) have their answer and reached the limit; the
others are fetched again, split into smaller groups (down to one window per query if need be), so
a noisy period costs at most about twice the queries of one query per window. Sharing
is thereby only an optimisation: verdicts and matched events equal those of judging each action
alone (tests/unit/test_validation_batching.py). The correlation query works the same way, with
each action's [T − Q, T + Q] as its one window.

Requests: each query's requests (pages and IntelDoc lookups) are divided equally among the actions
it served (a verdict's `requests_attributed`); `requests_shared_total` counts them whole.

Overlapping windows return the same alert many times: per action, each event counts once (uid),
attributed to the lowest-index window that returned it. Events are published only after every
query of a tick succeeded: a failed Tanium call publishes nothing and leaves the due windows
pending; the next tick re-runs them.

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

from connector.config import parse_alert_filter
from connector.metrics import NO_METRICS, Metrics
from connector.stream.normalize import NormalizeError
from connector.stream.stages import build_stages
from connector.timeutil import format_ts
from connector.validation.batching import FetchStats, Group, Unit, group_units, split_units
from connector.validation.rules import (
    JobAction,
    action_tokens,
    event_time,
    identity_tokens,
    match_event,
)
from connector.validation.windows import Schedule

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
    requests_attributed: float = 0.0  # its share: each query's requests divided among the actions it served
    requests_shared_total: int = 0  # all requests of the queries that served it
    limited_windows: set = field(default_factory=set)  # window indexes whose query reached tanium.limit
    correlation_limited: bool = False

    @property
    def finished(self) -> bool:
        return self.done >= self.schedule.count


class ValidationEngine:
    def __init__(
        self, cfg, client, publish: Publish, *, metrics: Metrics = NO_METRICS, technology_version: str | None = None
    ):
        v = cfg.validation
        self.cfg, self.client, self.publish, self.metrics = cfg, client, publish, metrics
        self.pipeline = cfg.pipeline.name
        self.adjust = timedelta(seconds=v.event_time_adjustment)
        # ranges this close share one query (the alerts between them cost less than another query)
        self.gap = timedelta(seconds=min(v.query_interval, MAX_GAP_SECONDS))
        self.min_tick_gap = timedelta(seconds=v.max_lateness)
        # checked when the pipeline file was loaded (config.ValidationSection)
        self.corr_params = parse_alert_filter(v.correlation_query) if v.correlation_query_enabled else None
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
        self.metrics.actions_in_flight.labels(self.pipeline).set(len(self.open))

    # ---- timing ---------------------------------------------------------------------------
    def next_wakeup(self) -> datetime | None:
        """When the next tick has work: the earliest pending run time (or correlation run), but at
        least max_lateness after the previous tick."""
        if not self.open:
            return None
        t = min(st.schedule.window(st.done).run_at for st in self.open.values())
        if self.corr_params is not None and self.last_correlation is not None:
            t = min(t, self.last_correlation + self.corr_every)
        if self.last_tick is not None:
            t = max(t, self.last_tick + self.min_tick_gap)
        return t

    def waiting_for(self, t: datetime) -> str:
        """What a tick at `t` will run, for people watching a wait: the first action's next window."""
        pending = [(aid, st) for aid, st in self.open.items() if st.schedule.window(st.done).run_at <= t]
        if not pending:
            return "the correlation query"
        aid, st = pending[0]
        more = f" and {len(pending) - 1} more actions" if len(pending) > 1 else ""
        return f"window {st.done + 1} of {st.schedule.count} of action {aid}{more}"

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
        units = [
            Unit(aid, w.index, w.start - self.adjust, w.end - self.adjust)
            for aid, (lo, hi) in due.items()
            for w in (self.open[aid].schedule.window(k) for k in range(lo, hi))
        ]
        trace: dict[str, Any] = {
            "at": now,
            # the most overdue window of this tick, in seconds (the benchmark's lateness figure)
            "late": max(
                (now - self.open[aid].schedule.window(lo).run_at).total_seconds() for aid, (lo, _) in due.items()
            )
            if due
            else 0.0,
            "windows": dict(due) if len(due) <= 50 else {"count": len(due)},
            "ranges": [],
            "kind": "windows",
        }
        self.trace.append(trace)
        found: dict[tuple[str, str], tuple[int, dict, datetime | None]] = {}
        self._query(units, [], lambda events, g: self._collect(events, g, found), trace["ranges"])
        self.stats["queries"] += len(trace["ranges"])
        correlated: dict[tuple[str, str], dict] = {}
        if corr_due:
            periodic = self.last_correlation is None or now - self.last_correlation >= self.corr_every
            self.last_correlation = now
            self._correlate(now, list(self.open) if periodic else finishing, correlated)
        # every query succeeded: only now record and publish (a failure above leaves them pending)
        self._apply(found, correlated, now)
        for aid, (_, hi) in due.items():
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

    def _query(
        self,
        units: list[Unit],
        params: list[tuple[str, str]],
        collect: Callable[[list[dict], Group], None],
        ranges: list,
    ) -> None:
        """Fetches `units` with shared queries so that each unit gets exactly the alerts its own
        query would (see the module docstring); `collect(events, group)` sees every page."""
        limit = self.cfg.tanium.limit
        work = group_units(units, self.gap)
        while work:
            g = work.pop(0)
            ranges.append((g.start, g.end))

            def page(events: list[dict], g: Group = g) -> None:
                collect(events, g)

            fs = self._fetch(params, g.start, g.end, page)
            served = dict.fromkeys(u.aid for u in g.units)
            for aid in served:
                st = self.open[aid]
                st.requests_attributed += fs.requests / len(served)
                st.requests_shared_total += fs.requests
            if fs.alerts < limit:
                continue
            # the query returned `limit` alerts: the units that hold all of them reached the limit
            # (as their own query would have); the others may be missing alerts when more exist
            capped = [u for u in g.units if fs.complete_for(u, g)]
            rest = [u for u in g.units if not fs.complete_for(u, g)] if fs.limited else []
            for u in capped:
                st = self.open[u.aid]
                if u.k is None:
                    st.correlation_limited = True
                else:
                    st.limited_windows.add(u.k)
            if capped and fs.limited:
                self.stats["limit_reached"] += 1
                more = f" of {fs.filtered}" if fs.filtered is not None else ""
                log.warning(
                    "validation query %s–%s stopped at tanium.limit = %d alerts%s; %d windows reached "
                    "the limit, later alerts of their ranges were not examined",
                    format_ts(g.start),
                    format_ts(g.end),
                    limit,
                    more,
                    len(capped),
                )
                skipped = max(1, (fs.filtered or 0) - fs.alerts)
                self.metrics.records_dropped.labels(self.pipeline, "validation", "limit").inc(skipped)
            if rest:
                log.debug(
                    "shared query %s–%s reached the limit: %d windows are fetched again in smaller groups",
                    format_ts(g.start),
                    format_ts(g.end),
                    len(rest),
                )
                work.extend(split_units(rest, self.gap))

    def _fetch(
        self, params: list[tuple[str, str]], start: datetime, end: datetime, handle: Callable[[list[dict]], None]
    ) -> FetchStats:
        """Pages through one raw time range (capped at tanium.limit), enriching and normalizing each
        page once, and hands the events to `handle`."""
        t = self.cfg.tanium
        q = list(params) + [("alertedAtFrom", format_ts(start)), ("alertedAtUntil", format_ts(end + _MS))]
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
            fs.saw(page.items)
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
        self.metrics.validation_queries.labels(self.pipeline).inc()
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

    def remember_devices(self, names) -> None:
        """Devices published before (e.g. read from the devices topic): not published again."""
        self._devices |= {n.lower() for n in names}

    def forget_device(self, name: str) -> None:
        """A device whose record was not delivered: published again when next seen."""
        self._devices.discard(name.lower())

    def _candidates(self, ev: dict, allowed) -> list[str]:
        ids: set[str] = set()
        for tok in identity_tokens(ev):
            ids |= self._index.get(tok, set())
        return [aid for aid in ids if aid in allowed]

    def _collect(self, events: list[dict], g: Group, found: dict) -> None:
        """Per (action, uid): the lowest-index window of this query's windows that covers it."""
        ks: dict[str, list[int]] = {}
        for u in g.units:
            if u.k is not None:  # window units (correlation units, k None, go to _correlate)
                ks.setdefault(u.aid, []).append(u.k)
        for ev in events:
            uid = str(ev.get("uid") or (ev.get("raw") or {}).get("id"))
            t = event_time(ev)
            for aid in self._candidates(ev, ks):
                sch = self.open[aid].schedule
                k: int | None
                if t is None:
                    k = min(ks[aid])
                else:
                    k = min((k for k in ks[aid] if sch.window(k).covers(t)), default=None)
                    if k is None:
                        continue  # outside this action's windows in this query
                prev = found.get((aid, uid))
                if prev is None or k < prev[0]:
                    found[(aid, uid)] = (k, ev, t)

    def _correlate(self, now: datetime, aids: list[str], found: dict) -> None:
        """The correlation query over each action's overall window [T − Q, T + Q] (one unit per
        action); a match sets `alerted` and is published like an event, with correlated = true."""
        units = []
        for aid in aids:
            sch = self.open[aid].schedule
            units.append(Unit(aid, None, sch.first_start - self.adjust, sch.last_end - self.adjust))
        trace: dict[str, Any] = {"at": now, "kind": "correlation", "ranges": [], "actions": len(units)}
        self.trace.append(trace)

        def collect(events: list[dict], g: Group) -> None:
            aids_here = {u.aid for u in g.units}
            for ev in events:
                t = event_time(ev)
                uid = str(ev.get("uid"))
                for aid in self._candidates(ev, aids_here):
                    sch = self.open[aid].schedule
                    if t is not None and sch.first_start <= t <= sch.last_end:
                        found.setdefault((aid, uid), ev)

        self._query(units, self.corr_params or [], collect, trace["ranges"])
        self.stats["correlation_queries"] += len(trace["ranges"])

    def _apply(self, found: dict, correlated: dict, now: datetime) -> None:
        """Records and publishes what a tick's queries found, lowest window first."""
        v = self.cfg.validation
        for (aid, uid), (k, ev, t) in sorted(found.items(), key=lambda item: item[1][0]):
            st = self.open[aid]
            m = match_event(st.action, ev)
            if m is None or uid in (st.matched if m.matched else st.suspicious):
                continue
            window = st.schedule.window(k).describe()
            if t is None:
                m.failed.insert(0, {"field": "event_time", "reason": "missing"})
            if m.matched:
                st.matched.add(uid)
                if st.first_detection is None or t < st.first_detection:
                    st.first_detection = t
                st.first_reported_at = st.first_reported_at or now
                self.publish(v.events_topic, aid, self._record(st, ev, window, ["time"] + m.rules, False))
            else:
                st.suspicious.add(uid)
                if v.save_suspicious_events:
                    rec = self._record(st, ev, window, (["time"] if t else []) + m.rules, False)
                    rec["failed_fields"] = m.failed
                    self.publish(v.suspicious_topic, aid, rec)
        for (aid, uid), ev in correlated.items():
            st = self.open[aid]
            if uid in st.correlated:
                continue
            m = match_event(st.action, ev)
            if m is None or not m.matched:
                continue
            st.correlated.add(uid)
            sch = st.schedule
            window = {"index": None, "start": format_ts(sch.first_start), "end": format_ts(sch.last_end)}
            self.publish(v.events_topic, aid, self._record(st, ev, window, ["time"] + m.rules, True))

    def _verdict(self, st: ActionState, now: datetime) -> dict:
        a, sch = st.action, st.schedule
        latency = (st.first_detection - a.started_at).total_seconds() if st.first_detection else None
        notes = []
        if st.limited_windows or st.correlation_limited:
            where = [f"{len(st.limited_windows)} of its {sch.count} windows"] if st.limited_windows else []
            where += ["its correlation query"] if st.correlation_limited else []
            notes.append(
                f"tanium.limit ({self.cfg.tanium.limit}) was reached in {' and '.join(where)}; "
                "results may be incomplete"
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
            "requests_attributed": st.requests_attributed,
            "requests_shared_total": st.requests_shared_total,
            "notes": notes,
            **({"metadata": a.raw["metadata"]} if isinstance(a.raw.get("metadata"), dict) else {}),
            "pipeline": self.pipeline,
            "decided_at": format_ts(now),
        }


def count_verdict(metrics: Metrics, verdict: dict) -> None:
    """Verdict metrics, recorded where a verdict is actually published or printed."""
    metrics.verdicts.labels(metrics.pipeline, verdict.get("result", "rejected")).inc()
    if verdict.get("latency_seconds") is not None:
        metrics.detection_latency.labels(metrics.pipeline).observe(max(0.0, verdict["latency_seconds"]))
