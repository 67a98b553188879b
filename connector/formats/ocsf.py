"""OCSF 1.7.0 Detection Finding (class_uid 2004, category 2 Findings) for one Threat Response alert.

The mapping, field by field, is the table in docs/formats.md; the value checks are in alert.py.
Profiles: `host` (the alert's endpoint as `device`) and `security_control` (the detection is an
alert that blocked nothing: action Allowed, disposition Alert, `attacks` beside
finding_info.attacks as the class description asks). `activity_id` is 1 Create for a new alert, 2
Update when its state changed, 3 Close when it changed to resolved or suppressed (the lifecycle,
connector/stream/updates.py); `status_id` is always the alert's state at reading. Tanium fields
with no OCSF home are under `unmapped` (see Facts.leftovers).
"""

from __future__ import annotations

from connector.formats.alert import Facts, Process

VERSION = "1.7.0"
CLASS_UID, CATEGORY_UID = 2004, 2
ACTIVITIES = {1: "Create", 2: "Update", 3: "Close"}
SEVERITY = {"info": 1, "informational": 1, "low": 2, "medium": 3, "high": 4, "critical": 5}
SEVERITY_NAMES = {0: "Unknown", 1: "Informational", 2: "Low", 3: "Medium", 4: "High", 5: "Critical"}
STATUS = {
    "unresolved": (1, "New"),
    "inprogress": (2, "In Progress"),
    "suppressed": (3, "Suppressed"),
    "resolved": (4, "Resolved"),
}
OS_TYPES = {"windows": (100, "Windows"), "linux": (200, "Linux"), "macos": (300, "macOS"), "mac": (300, "macOS")}
HASH_IDS = {"md5": (1, "MD5"), "sha1": (2, "SHA-1"), "sha256": (3, "SHA-256")}
PRODUCT = {"name": "Threat Response", "vendor_name": "Tanium"}
PROFILES = ["host", "security_control"]
_RULE = {"type_id": 1, "type": "Rule"}


def render(facts: Facts, pipeline: str, raw: str | None, activity_id: int = 1) -> dict:
    """The Detection Finding of one alert; `raw` is the alert as JSON text (None: left out)."""
    f = facts
    severity_id = 0 if f.severity is None else SEVERITY.get(f.severity.strip().lower(), 99)
    finding = {"uid": f.guid or f.uid, "title": f.title, "desc": f.desc, "analytic": _analytic(f)}
    attacks = _attacks(f.techniques)
    if attacks:
        finding["attacks"] = attacks
    for key, dt in (
        ("created_time", f.created),
        ("modified_time", f.updated),
        ("first_seen_time", f.first_seen),
        ("last_seen_time", f.last_seen),
    ):
        if dt is not None:
            finding[key] = dt[0]
    if f.match_type:
        finding["types"] = [f.match_type]
    if f.match_source:
        finding["data_sources"] = [f.match_source]
    metadata = {
        "version": VERSION,
        "product": PRODUCT,
        "profiles": PROFILES,
        "uid": f.uid,
        "tenant_uid": pipeline,
        "processed_time": f.ingested[0],
    }
    if f.alerted_text:
        metadata["original_time"] = f.alerted_text
    if f.created is not None:
        metadata["logged_time"] = f.created[0]
    if f.alert_type:
        metadata["event_code"] = f.alert_type
    out = {
        "activity_id": activity_id,
        "activity_name": ACTIVITIES[activity_id],
        "category_uid": CATEGORY_UID,
        "category_name": "Findings",
        "class_uid": CLASS_UID,
        "class_name": "Detection Finding",
        "type_uid": CLASS_UID * 100 + activity_id,
        "type_name": f"Detection Finding: {ACTIVITIES[activity_id]}",
        "severity_id": severity_id,
        "severity": f.severity if severity_id == 99 else SEVERITY_NAMES[severity_id],
        "time": f.event_time[0],
        "message": f.title,
        "is_alert": True,
        "action_id": 1,
        "action": "Allowed",
        "disposition_id": 19,
        "disposition": "Alert",
        "metadata": metadata,
        "finding_info": finding,
    }
    if f.state:
        status_id, status = STATUS.get(f.state.strip().lower(), (99, f.state))
        out["status_id"], out["status"] = status_id, status
    if attacks:
        out["attacks"] = attacks
    device = _device(f)
    if device:
        out["device"] = device
    evidence = _evidence(f)
    if evidence:
        out["evidences"] = [evidence]
    out["unmapped"] = f.leftovers()
    if raw is not None:
        out["raw_data"] = raw
    return out


def _analytic(f: Facts) -> dict:
    a = dict(_RULE)
    if f.doc_id:
        a["uid"] = f.doc_id
    if f.doc_name:
        a["name"] = f.doc_name
    if f.doc_desc:
        a["desc"] = f.doc_desc
    if f.doc_type:
        a["category"] = f.doc_type
    if f.doc_version:
        a["version"] = f.doc_version
    return a


def _attacks(techniques: tuple) -> list[dict]:
    out = []
    for tid, name in techniques:
        parent, _, sub = tid.partition(".")
        tname, _, sname = (name or "").partition(": ")
        technique = {"uid": parent, "src_url": f"https://attack.mitre.org/techniques/{parent}/"}
        if tname:
            technique["name"] = tname
        attack = {"technique": technique}
        if sub:
            s = {"uid": tid, "src_url": f"https://attack.mitre.org/techniques/{parent}/{sub}/"}
            if sname:
                s["name"] = sname
            attack["sub_technique"] = s
        out.append(attack)
    return out


def _device(f: Facts) -> dict | None:
    if not (f.host or f.host_ip or f.host_id):
        return None
    d: dict = {"type_id": 0, "type": "Unknown"}
    if f.host:
        d["hostname"] = f.host
    if f.host_ip:
        d["ip"] = f.host_ip
    if f.host_id:
        d["uid"] = f.host_id
    si = f.system_info
    name, platform = si.get("os"), si.get("platform")
    name = name if name.__class__ is str and name else None
    platform = platform if platform.__class__ is str and platform else None
    if name or platform:
        type_id, type_name = OS_TYPES.get((platform or "").lower(), (99, platform or "Other"))
        os = {"name": name or platform, "type_id": type_id, "type": type_name}
        for key, src in (("version", "patch_level"), ("build", "build_number")):
            v = si.get(src)
            if v.__class__ is str and v:
                os[key] = v
        bits = si.get("bits")
        if bits.__class__ is int and 0 < bits <= 1024:
            os["cpu_bits"] = bits
        d["os"] = os
    return d


def _file(file) -> dict:
    out: dict = {"type_id": 1, "type": "Regular File", "name": file.name or "unknown"}
    if file.path:
        out["path"] = file.path
    if file.hashes:
        out["hashes"] = [
            {"algorithm_id": HASH_IDS[a][0], "algorithm": HASH_IDS[a][1], "value": v} for a, v in file.hashes
        ]
    if file.size is not None:
        out["size"] = file.size
    return out


def _user(user) -> dict:
    out = {"name": user.name}
    if user.domain:
        out["domain"] = user.domain
    return out


def _process(p: Process) -> dict:
    out: dict = {}
    if p.pid is not None:
        out["pid"] = p.pid
    if p.name:
        out["name"] = p.name
    if p.cmd:
        out["cmd_line"] = p.cmd
    if p.file:
        out["file"] = _file(p.file)
    if p.user:
        out["user"] = _user(p.user)
    if p.start is not None:
        out["created_time"] = p.start[0]
    if p.uid:
        out["uid"] = p.uid
    if p.parent:
        out["parent_process"] = _process(p.parent)
    return out


def _evidence(f: Facts) -> dict:
    e: dict = {}
    if f.process:
        e["process"] = _process(f.process)
    if f.user:
        e["user"] = _user(f.user)
    if f.file:
        e["file"] = _file(f.file)
    for key, addr, port in (("src_endpoint", f.src_ip, f.src_port), ("dst_endpoint", f.dst_ip, f.dst_port)):
        if addr or port is not None:
            ep: dict = {}
            if addr:
                ep["ip"] = addr
            if port is not None:
                ep["port"] = port
            e[key] = ep
    return e
