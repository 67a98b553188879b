"""The `details` JSON of a simulated alert: a template per shape (platform, match type, windows),
compiled once, into which each alert's values are poured as JSON text."""

from __future__ import annotations

import functools
import re
from typing import Any

import orjson

from connector.simulator.catalogue import SIGNERS


class _SlotNames(dict):
    """In template mode every value is a sentinel naming its slot."""

    def __missing__(self, key: str) -> str:
        return f"\x00{key}\x00"


_SLOTS = _SlotNames()
_SENTINEL = re.compile(r'"\\u0000([A-Za-z0-9_]+)\\u0000"')


def compile_template(tree: dict) -> str:
    """JSON text of a sentinel tree → a str.format template with one {slot} per sentinel."""
    text = orjson.dumps(tree).decode().replace("{", "{{").replace("}", "}}")
    return _SENTINEL.sub(r"{\1}", text)


def json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


@functools.lru_cache(maxsize=4096)
def json_cached(value: str) -> str:  # catalogue strings: paths, names, users
    return orjson.dumps(value).decode()


def process_nodes(v: dict, k: int, windows: bool, props_parent: Any, acting_parent: Any) -> tuple[dict, dict]:
    """Process number k of a chain in its two shapes: `match.properties` and `acting_artifact.process`."""
    node = {
        "pid": v[f"pid{k}"],
        "args": v[f"args{k}"],
        "file": {"md5": v[f"md5{k}"], "sha1": v[f"sha1{k}"], "sha256": v[f"sha256{k}"], "fullpath": v[f"path{k}"]},
        "name": v[f"name{k}"],
        "ppid": v[f"ppid{k}"],
        "user": v[f"user{k}"],
        "start_time": v[f"start{k}"],
        "recorder_unique_id": v[f"uid{k}"],
    }
    if props_parent is not None:
        node["parent"] = props_parent
    ffile = {"hash": {"md5": v[f"md5{k}"], "sha1": v[f"sha1{k}"], "sha256": v[f"sha256{k}"]}, "path": v[f"path{k}"]}
    if windows:
        issuer, subject = SIGNERS[k % 2]
        ffile["signature_data"] = {"issuer": issuer, "status": 1, "subject": subject}
    art = {
        "pid": v[f"pid{k}"],
        "file": {"file": ffile, "artifact_hash": v[f"ah{k}"], "instance_hash": v[f"ih{k}"]},
        "user": {"user": {"name": v[f"uname{k}"], "domain": v["domain"], "user_id": str(1000 + k)}},
        "handles": [],
        "arguments": v[f"args{k}"],
        "start_time": v[f"start{k}"],
        "tanium_unique_id": v[f"uid{k}"],
    }
    if acting_parent is not None:
        art["parent"] = {"process": acting_parent}
    return node, art


def details_tree(shape: tuple[bool, str, bool], v: dict) -> dict:
    """The structure of `details` for (windows, matchType, processInjection), filled from `v`."""
    windows, mt, injection = shape
    # the leaf process; its ancestors arrive as ready JSON (see Data._ancestry)
    props, acting = process_nodes(v, 0, windows, v["props_parent"], v["acting_parent"])
    intra = [{"id_v2": v["intra"]}]
    if mt == "file":
        fhash = {"md5": v["fmd5"], "sha1": v["fsha1"], "sha256": v["fsha256"]}
        match = {
            "hash": v["match_hash"],
            "type": "file",
            "source": "at_rest",
            "version": 1,
            "properties": {**fhash, "size": v["fsize"], "fullpath": v["fpath"]},
        }
        what = {
            "source_name": "at_rest",
            "intel_intra_ids": intra,
            "artifact_activity": {
                "relevant_actions": [
                    {
                        "target": {
                            "file": {"hash": fhash, "path": v["fpath"], "size_bytes": v["fsize"]},
                            "artifact_hash": v["match_hash"],
                            "instance_hash": v["ih"],
                            "is_intel_target": True,
                        }
                    }
                ]
            },
        }
    else:
        if mt == "port":
            proc = {k: x for k, x in props.items() if k not in ("parent", "recorder_unique_id")}
            proc["recorder_table_id"] = v["uid0"]
            net = {
                "local_ip": v["local_ip"],
                "remote_ip": v["remote_ip"],
                "local_port": v["local_port"],
                "remote_port": v["remote_port"],
            }
            match = {
                "hash": v["match_hash"],
                "type": "port",
                "source": "threatresponse_database",
                "version": 1,
                "properties": {"process": proc, **net},
            }
            action = {"verb": 4, "target": {"network": {**net, "protocol": "tcp"}}, "timestamp": v["ts"]}
        else:
            match = {
                "hash": v["match_hash"],
                "type": "process",
                "source": "recorder",
                "version": 1,
                "contexts": [
                    {
                        "file": {"uniqueEventId": v["event_id"]},
                        "event": {"fileCreate": {"path": v["target"]}, "timestampMs": v["ts_ms"]},
                    }
                ],
                "properties": props,
            }
            action = {
                "verb": 7,
                "target": {"file": {"path": v["target"]}, "artifact_hash": v["ah"], "instance_hash": v["ih2"]},
                "timestamp": v["ts"],
                "tanium_recorder_context": {
                    "file": {"unique_event_id": v["event_id"]},
                    "event": {"file_create": {"path": v["target"]}, "timestamp_ms": v["ts_ms"]},
                },
                "tanium_recorder_event_table_id": v["event_id"],
            }
        what = {
            "source_name": "recorder",
            "intel_intra_ids": intra,
            "artifact_activity": {
                "acting_artifact": {
                    "process": acting,
                    "artifact_hash": v["match_hash"],
                    "instance_hash": v["ih"],
                    "is_intel_target": True,
                },
                "relevant_actions": [action],
            },
        }
        if injection:
            what["intel_intra_ids"] = []
            what["security_event"] = {"timestamp": v["alerted"], "type_identifier": "Thread"}
            what["additional_fields"] = {
                "technique": "Thread",
                "execution_target_name": "LoadLibraryW",
                "execution_target_address": v["address"],
            }
    finding = {
        "whats": [what],
        "domain": "threatresponse",
        "hunt_id": v["hunt_id"],
        "intel_id": v["finding_intel_id"],
        "last_seen": v["seen"],
        "threat_id": v["threat_id"],
        "finding_id": v["finding_id"],
        "first_seen": v["seen"],
        "source_name": what["source_name"],
        "system_info": v["system_info"],
        "reporting_id": v["reporting_id"],
    }
    if injection:
        finding["description"] = "Thread"
    return {
        "match": match,
        "finding": finding,
        "intel_id": v["intel_id"],
        "config_id": v["config_id"],
        "config_rev_id": v["config_rev_id"],
    }
