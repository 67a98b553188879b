"""Sharing Tanium queries between job actions never changes a verdict or the matched events.

Property (hypothesis): for any set of actions, query windows, noise alerts and `tanium.limit`,
judging the actions together gives each action the same verdict and the same matched, suspicious
and correlated events as judging it alone. The alerts come from `TRFake`, a small in-memory
implementation of our own `list_alerts` interface with the TR semantics the engine relies on
(alertedAtFrom inclusive, alertedAtUntil exclusive, sorted by createdAt then id, offset paging,
filteredCount), so each example runs in milliseconds.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from connector.config import parse_pipeline
from connector.tanium import AlertPage
from connector.timeutil import format_ts, parse_ts
from connector.validation.engine import ValidationEngine
from connector.validation.rules import parse_job_action
from connector.validation.runners import FakeClock, drive

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
HOSTS = ("ws-1", "ws-2", "ws-3")  # actor hosts; noise comes from other endpoints too
NOISE = ("srv-a", "srv-b")


class TRFake:
    """`list_alerts` over a fixed list of alerts, as the TR alerts endpoint pages them."""

    def __init__(self, alerts: list[dict]):
        self.alerts = sorted(alerts, key=lambda a: (a["createdAt"], a["id"]))
        self.requests = 0

    def list_alerts(self, params, offset, limit, sort="createdAt,id") -> AlertPage:
        assert sort == "createdAt,id"
        self.requests += 1
        items = self.alerts
        for key, value in params:
            if key == "alertedAtFrom":
                items = [a for a in items if parse_ts(a["alertedAt"]) >= parse_ts(value)]
            elif key == "alertedAtUntil":
                items = [a for a in items if parse_ts(a["alertedAt"]) < parse_ts(value)]
            else:
                items = [a for a in items if str(a.get(key)) == value]
        return AlertPage(items[offset : offset + limit], len(self.alerts), len(items))

    def get_intel(self, doc_id):
        return None

    def close(self) -> None:
        pass


def alert(n: int, host: str, alerted: datetime, delay_s: int, severity: str) -> dict:
    return {
        "id": n,
        "guid": f"g-{n}",
        "type": "detect.match",
        "computerName": host,
        "computerIpAddress": f"10.9.0.{HOSTS.index(host) + 1 if host in HOSTS else 200}",
        "alertedAt": format_ts(alerted),
        "createdAt": format_ts(alerted + timedelta(seconds=delay_s)),
        "severity": severity,
        "matchType": "process",
        "details": {"match": {"type": "process", "properties": {"args": "cmd.exe /c whoami" if n % 3 else "calc"}}},
    }


actions_st = st.lists(
    st.tuples(
        st.integers(0, 6 * 60),  # start, seconds after T0
        st.sampled_from(HOSTS),
        st.booleans(),  # expects a command-line marker (some events become suspicious)
    ),
    min_size=1,
    max_size=4,
)
alerts_st = st.lists(
    st.tuples(
        st.sampled_from(HOSTS + NOISE),
        st.integers(-3 * 60, 9 * 60),  # alertedAt, seconds after T0
        st.integers(0, 300),  # stored this long after alertedAt
        st.sampled_from(("high", "low")),
    ),
    min_size=4,
    max_size=40,
)


def judge(actions, alerts, cfg, start):
    """Verdicts and published records (by action id) of `actions` judged in one engine."""
    client = TRFake(alerts)
    out: list[tuple[str, str | None, dict]] = []
    engine = ValidationEngine(cfg, client, lambda topic, key, value: out.append((topic, key, value)))
    for a in actions:
        assert engine.add(parse_job_action(a))
    verdicts: list[dict] = []
    drive(engine, FakeClock(start), verdicts.append)
    timing = ("decided_at", "first_reported_at", "requests", "requests_attributed", "requests_shared_total")
    by_id = {v["action_id"]: {k: x for k, x in v.items() if k not in timing} for v in verdicts}
    for v in by_id.values():
        v["windows"] = {k: x for k, x in v["windows"].items() if not k.endswith("query_at")}
    records = {
        a["id"]: sorted(
            (
                topic,
                rec["event"]["uid"],
                rec["window"]["index"] if rec["window"]["index"] is not None else -1,
                rec["correlated"],
                tuple(rec["matched_rules"]),
            )
            for topic, key, rec in out
            if key == a["id"]
        )
        for a in actions
    }
    return by_id, records


@settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None
)
@given(
    actions=actions_st,
    noise=alerts_st,
    limit=st.integers(1, 6),
    page_size=st.integers(1, 5),
    window=st.sampled_from([(1, 20), (1, 30), (2, 45), (0.5, 10)]),  # (query_time minutes, interval seconds)
    adjust=st.sampled_from([0, -40, 25]),
    correlation=st.booleans(),
    clock=st.sampled_from(["before", "after"]),
)
@example(  # a1's alert stored first: a query shared with a0, capped at 1, holds only a1's alert
    actions=[(0, "ws-1", False), (120, "ws-2", False)],
    noise=[("ws-1", 10, 300, "low"), ("ws-2", 120, 0, "low")],
    limit=1,
    page_size=1,
    window=(1, 20),
    adjust=0,
    correlation=False,
    clock="after",
)
def test_judging_actions_together_equals_judging_each_alone(
    actions, noise, limit, page_size, window, adjust, correlation, clock
):
    query_time, interval = window
    validation = {
        "query_time": query_time,
        "query_interval": interval,
        "event_time_adjustment": adjust,
        "save_suspicious_events": True,
        "discover_network_devices": False,
    }
    if correlation:
        validation |= {"correlation_query_enabled": True, "correlation_query": "severity=high"}
    cfg = parse_pipeline(
        {
            "pipeline": {"name": "batching", "mode": "validation"},
            "tanium": {"host": "tr.invalid", "api_key": "k", "limit": limit, "page_size": page_size},
            "metrics": {"enabled": False},
            "validation": validation,
        }
    )
    alerts = [alert(n, h, T0 + timedelta(seconds=s), d, sev) for n, (h, s, d, sev) in enumerate(noise, 1)]
    acts = [
        {
            "id": f"a{i}",
            "job_id": "j",
            "name": f"action {i}",
            "type": "host_cli",
            "started_at": format_ts(T0 + timedelta(seconds=s)),
            "source": {"hostnames": [h]},
            **({"expected": {"command_line_contains": ["whoami"]}} if marker else {}),
        }
        for i, (s, h, marker) in enumerate(actions)
    ]
    start = T0 - timedelta(minutes=5) if clock == "before" else T0 + timedelta(hours=2)
    together, records = judge(acts, alerts, cfg, start)
    for a in acts:
        alone, alone_records = judge([a], alerts, cfg, start)
        assert together[a["id"]] == alone[a["id"]]
        assert records[a["id"]] == alone_records[a["id"]]
