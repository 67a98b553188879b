"""`tanium-connector simulate` and `python -m connector.simulator`: the simulator as a server process."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import ssl
import sys
import threading

from connector.simulator.server import Simulator
from connector.timeutil import parse_duration

log = logging.getLogger(__name__)

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
    parser.add_argument(
        "--api-key",
        default=None,
        help="token clients must send in the session header (default: $TANIUM_API_KEY or token-demo)",
    )
    parser.add_argument("--live-rate", type=float, default=0.0, help="new alerts per second (default 0: none)")
    parser.add_argument(
        "--late-fraction",
        type=float,
        default=0.0,
        help="fraction of live alerts arriving late, alertedAt hours in the past (default 0)",
    )
    parser.add_argument("--live-total", type=int, default=None, help="stop live alerts after this many")
    parser.add_argument(
        "--live-updates",
        type=float,
        default=0.0,
        help="state changes per second: recent alerts move to inprogress, then resolved or suppressed (default 0)",
    )
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay added to every reply (default 0)")
    parser.add_argument(
        "--module-missing", action="store_true", help="answer 404 on every Threat Response path (module not installed)"
    )
    parser.add_argument("--tls-cert", default=None, help="PEM certificate: serve HTTPS")
    parser.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")


def run(args: argparse.Namespace) -> int:
    if args.tls_key and not args.tls_cert:
        print("simulate: --tls-key needs --tls-cert", file=sys.stderr)
        return 2
    try:
        history = parse_duration(args.history)
        sim = Simulator(
            args.host,
            args.port,
            seed=args.seed,
            alerts=args.alerts,
            intel_docs=args.intel_docs,
            revisions=args.revisions,
            hosts=args.hosts,
            history=history,
            api_key=args.api_key or os.environ.get("TANIUM_API_KEY") or "token-demo",
            live_rate=args.live_rate,
            late_fraction=args.late_fraction,
            live_total=args.live_total,
            live_updates=args.live_updates,
            latency=args.latency_ms / 1000,
            module_missing=args.module_missing,
            certfile=args.tls_cert,
            keyfile=args.tls_key,
        )
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
        live += f", {args.live_updates:g} state changes/s" if args.live_updates else ""
        missing = " [TR module missing: 404 on every TR path]" if args.module_missing else ""
        print(
            f"Tanium Threat Response simulator on {sim.url} ({args.alerts} alerts, {args.intel_docs} IntelDocs, "
            f"seed {args.seed}{live}){missing}; press Ctrl-C to stop",
            flush=True,
        )
        while not done.wait(0.5):
            pass
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m connector.simulator", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
