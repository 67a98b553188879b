"""normalize: applies the field map to an enriched alert (engine: see the normalize issue)."""
from __future__ import annotations

_P = "details.match.properties"
# Normalized field → candidate source columns, first present non-empty value wins.
DEFAULT_FIELD_MAP: dict[str, list[str]] = {
    "uid": ["guid", "id"],
    "event_time": ["alertedAt", "details.finding.first_seen", "createdAt"],
    "description": ["intelDoc.name", "path", "matchType"],
    "computer": ["computerName"],
    "host": ["computerName"],
    "additional_hosts": ["computerName", "computerIpAddress", f"{_P}.local_ip", f"{_P}.remote_ip"],
    "src_ip": [f"{_P}.local_ip", "computerIpAddress"],
    "src_port": [f"{_P}.local_port"],
    "dest_ip": [f"{_P}.remote_ip", "computerIpAddress"],
    "dest_port": [f"{_P}.remote_port"],
    "user": [f"{_P}.user", f"{_P}.process.user"],
    "process": [f"{_P}.name", f"{_P}.process.name"],
    "command_line": [f"{_P}.args", f"{_P}.process.args"],
    "file_path": [f"{_P}.fullpath", f"{_P}.file.fullpath", f"{_P}.process.file.fullpath", "path"],
    "file_md5": [f"{_P}.md5", f"{_P}.file.md5", f"{_P}.process.file.md5"],
    "file_sha1": [f"{_P}.sha1", f"{_P}.file.sha1", f"{_P}.process.file.sha1"],
    "file_sha256": [f"{_P}.sha256", f"{_P}.file.sha256", f"{_P}.process.file.sha256"],
    "signature_id": ["intelDocId"],
    "signature": ["intelDoc.name"],
    "severity": ["severity"],
    "priority": ["priority"],
    "state": ["state"],
    "match_type": ["matchType", "details.match.type"],
    "mitre_techniques": ["intelDoc.mitreAttack.techniques[].id"],
    "url": [],
    "domain": [],
    "email_sender": [],
    "email_recipient": [],
    "email_subject": [],
}
