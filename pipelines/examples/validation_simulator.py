"""The TR simulator loaded for the Security Validation example (job-actions.jsonl next to this file).

    .venv/bin/python pipelines/examples/validation_simulator.py [--port 8443]

Starts the project's simulator (seed 1, 1000 history alerts from 50 endpoints over the 12 hours
before 2026-01-15T14:00:00Z, key $TANIUM_API_KEY or token-demo) and injects the alerts the example
job actions are about. Expected verdicts: sv-1001 detected + alerted, sv-1002 detected, sv-1003
detected, sv-1004 missed, sv-1005 missed (suspicious: port 8443, not 443), sv-1006 missed
(suspicious: file hash differs).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from connector.simulator import Simulator  # noqa: E402

EP1, EP2, EP3 = (
    ("msv-endpoint-01.lab.local", "10.60.0.11"),
    ("msv-endpoint-02.lab.local", "10.60.0.12"),
    ("msv-endpoint-03.lab.local", "10.60.0.13"),
)
# (computer, ip, alertedAt, overrides)
ALERTS = [
    (
        *EP1,
        "2026-01-15T12:00:03Z",
        dict(
            match_type="process",
            intel_doc_id=217,
            severity="critical",
            process_name="rundll32.exe",
            args="rundll32.exe C:\\ProgramData\\update.dll,DllRegisterServer",
        ),
    ),
    (*EP2, "2026-01-15T12:10:07Z", dict(match_type="process", intel_doc_id=103, severity="high")),
    (
        *EP1,
        "2026-01-15T12:20:02Z",
        dict(
            match_type="port",
            intel_doc_id=134,
            severity="high",
            local_ip=EP1[1],
            local_port=51515,
            remote_ip="10.60.0.40",
            remote_port=445,
        ),
    ),
    (
        *EP2,
        "2026-01-15T12:40:05Z",
        dict(
            match_type="port",
            intel_doc_id=164,
            severity="medium",
            local_ip=EP2[1],
            local_port=52000,
            remote_ip="198.51.100.20",
            remote_port=8443,
        ),
    ),
    (*EP3, "2026-01-15T12:50:06Z", dict(match_type="file", intel_doc_id=114, severity="high")),
]


def start(port: int = 8443, api_key: str | None = None, host: str = "127.0.0.1") -> Simulator:
    sim = Simulator(
        host,
        port,
        seed=1,
        alerts=1000,
        hosts=50,
        history=12 * 3600,
        end="2026-01-15T14:00:00Z",
        api_key=api_key or os.environ.get("TANIUM_API_KEY") or "token-demo",
    ).start()
    for name, ip, alerted, extra in ALERTS:
        sim.inject(computer_name=name, ip=ip, alerted_at=alerted, **extra)
    return sim


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8443)
    args = p.parse_args()
    sim = start(args.port)
    print(f"simulator with the Security Validation example alerts on {sim.url}; Ctrl-C to stop", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
