"""ECS 9.4.0 external alert (`event.kind: alert`) for one Threat Response alert, so Tanium alerts
appear among Elastic Security's external alerts.

The mapping, field by field, is the table in docs/formats.md; the value checks are in alert.py.
The document is nested JSON (`{"event": {"kind": …}}`), as Elasticsearch indexes it. Tanium fields
with no ECS home are under `tanium.*` (see Facts.leftovers); the connector itself is the `agent`.
"""

from __future__ import annotations

from connector import __version__
from connector.formats.alert import Facts, Process

VERSION = "9.4.0"
DATASET = "tanium.threat_response"
# Tanium severity → event.severity (the same 1–5 scale as OCSF severity_id) and event.risk_score
# (Elastic Security's default risk scores per rule severity; info sits below low)
SEVERITY = {
    "info": (1, 0.0),
    "informational": (1, 0.0),
    "low": (2, 21.0),
    "medium": (3, 47.0),
    "high": (4, 73.0),
    "critical": (5, 99.0),
}
# match type → event.category
CATEGORIES = {
    "file": ["malware", "file"],
    "process": ["intrusion_detection", "process"],
    "port": ["intrusion_detection", "network"],
}
# event.type: "info" for every alert (expected by each category above); a state change adds "change"
TYPES = {"created": ["info"], "updated": ["info", "change"], "closed": ["info", "change"]}
OS_TYPES = {"windows": "windows", "linux": "linux", "macos": "macos", "mac": "macos"}
OBSERVER = {"vendor": "Tanium", "product": "Threat Response", "type": "edr"}


def render(facts: Facts, pipeline: str, observer_host: str, raw: str | None, action: str = "created") -> dict:
    """The ECS document of one alert; `raw` is the alert as JSON text (None: left out); `action` is
    "created", or "updated"/"closed" for a change of the alert's state (event.type gains "change")."""
    f = facts
    event: dict = {
        "kind": "alert",
        "category": CATEGORIES.get(f.match_type or "", ["intrusion_detection"]),
        "type": TYPES[action],
        "action": action,
        "id": f.guid or f.uid,
        "dataset": DATASET,
        "module": "tanium",
    }
    if f.created is not None:
        event["created"] = f.created[1]
    start = f.first_seen or f.alerted
    if start is not None:
        event["start"] = start[1]
    if f.last_seen is not None:
        event["end"] = f.last_seen[1]
    sev = SEVERITY.get(f.severity.strip().lower()) if f.severity else None
    if sev:
        event["severity"], event["risk_score"] = sev
    if raw is not None:
        event["original"] = raw
    doc: dict = {
        "@timestamp": f.event_time[1],
        "ecs": {"version": VERSION},
        "message": f.title,
        "event": event,
        "rule": _rule(f),
        "agent": {"type": "tanium-tr-connector", "version": __version__, "name": pipeline},
        "observer": {**OBSERVER, "hostname": observer_host} if observer_host else OBSERVER,
    }
    if f.techniques:
        doc["threat"] = _threat(f.techniques)
    related: dict[str, dict] = {"ip": {}, "hosts": {}, "user": {}, "hash": {}}
    host = _host(f)
    if host:
        doc["host"] = host
        if f.host:
            related["hosts"][f.host] = None
        if f.host_ip:
            related["ip"][f.host_ip] = None
    if f.process:
        doc["process"] = _process(f.process, related, parent=True)
    if f.user:
        doc["user"] = {"name": f.user.name, **({"domain": f.user.domain} if f.user.domain else {})}
    if f.file:
        doc["file"] = _file(f.file, related)
    for key, addr, port in (("source", f.src_ip, f.src_port), ("destination", f.dst_ip, f.dst_port)):
        if addr or port is not None:
            ep: dict = {}
            if addr:
                ep["ip"] = related["ip"][addr] = addr
            if port is not None:
                ep["port"] = port
            doc[key] = ep
    lists = {k: list(v) for k, v in related.items() if v}
    if lists:
        doc["related"] = lists
    doc["tanium"] = f.leftovers()
    return doc


def _rule(f: Facts) -> dict:
    rule = {}
    for key, v in (
        ("id", f.doc_id),
        ("name", f.doc_name),
        ("description", f.doc_desc),
        ("category", f.doc_type),
        ("version", f.doc_version),
    ):
        if v:
            rule[key] = v
    return rule


def _threat(techniques: tuple) -> dict:
    ids: dict[str, str | None] = {}  # technique id → name, first seen wins
    subs: dict[str, str | None] = {}
    for tid, name in techniques:
        parent, _, sub = tid.partition(".")
        tname, _, sname = (name or "").partition(": ")
        if ids.get(parent) is None:
            ids[parent] = tname or None
        if sub:
            subs[tid] = sname or None
    technique: dict = {
        "id": list(ids),
        "reference": [f"https://attack.mitre.org/techniques/{t}/" for t in ids],
    }
    names = [n for n in ids.values() if n]
    if names:
        technique["name"] = names
    if subs:
        technique["subtechnique"] = {
            "id": list(subs),
            "reference": [f"https://attack.mitre.org/techniques/{t.replace('.', '/')}/" for t in subs],
        }
        snames = [n for n in subs.values() if n]
        if snames:
            technique["subtechnique"]["name"] = snames
    return {"framework": "MITRE ATT&CK", "technique": technique}


def _host(f: Facts) -> dict | None:
    host: dict = {}
    if f.host:
        host["name"] = host["hostname"] = f.host
    if f.host_ip:
        host["ip"] = [f.host_ip]
    if f.host_id:
        host["id"] = f.host_id
    si = f.system_info
    os: dict = {}
    name, platform, version = si.get("os"), si.get("platform"), si.get("patch_level")
    if name.__class__ is str and name:
        os["full"] = os["name"] = name
    if platform.__class__ is str and platform:
        os["platform"] = platform.lower()
        if platform.lower() in OS_TYPES:
            os["type"] = OS_TYPES[platform.lower()]
    if version.__class__ is str and version:
        os["version"] = version
    if os:
        host["os"] = os
    return host or None


def _hashes(hashes: tuple, related: dict) -> dict:
    for _, v in hashes:
        related["hash"][v] = None
    return dict(hashes)


def _file(file, related: dict) -> dict:
    out: dict = {}
    if file.path:
        out["path"] = file.path
    if file.name:
        out["name"] = file.name
    if file.hashes:
        out["hash"] = _hashes(file.hashes, related)
    if file.size is not None:
        out["size"] = file.size
    return out


def _process(p: Process, related: dict, parent: bool) -> dict:
    out: dict = {}
    if p.pid is not None:
        out["pid"] = p.pid
    if p.name:
        out["name"] = p.name
    if p.cmd:
        out["command_line"] = p.cmd
    if p.file:
        if p.file.path:
            out["executable"] = p.file.path
        if p.file.hashes:
            out["hash"] = _hashes(p.file.hashes, related)
    if p.user:
        out["user"] = {"name": p.user.name}
        related["user"][p.user.name] = None
    if p.start is not None:
        out["start"] = p.start[1]
    if p.uid:
        out["entity_id"] = p.uid
    if parent and p.parent:  # ECS has one parent level; the rest of the chain is in event.original
        out["parent"] = _process(p.parent, related, parent=False)
    return out
