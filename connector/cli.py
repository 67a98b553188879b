"""`tanium-connector` command line. Logs go to stderr; data (events, verdicts, reports) to stdout."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from urllib.parse import urlsplit

from connector import __version__
from connector.config import ConfigError, load_pipeline
from connector.secrets import on_new_key
from connector.simulator import command as simulator_command
from connector.text import mask_userinfo
from connector.timeutil import parse_ts
from connector.tools import bench
from connector.tuning import tune_interpreter

log = logging.getLogger("connector")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            # names the pipeline when several share the process ("pipeline NAME", "source NAME")
            "thread": record.threadName,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


class RedactFilter(logging.Filter):
    """Last line of defence: no log line may carry a secret or a URL's user:password, whatever code
    produced it.

    An exception a library logs (kafka-python logs its own socket races at shutdown with a traceback)
    becomes one line, its type and message: the library recovers from it, and a traceback into its
    internals tells an operator nothing. `--log-level debug` keeps the traceback. The connector's own
    exceptions always keep theirs.

    `secrets` are the configuration's (set by `load`); a key read later from a rotated
    tanium.api_key_file is added before its first use (connector/secrets.py calls `add`)."""

    def __init__(self):
        super().__init__()
        self.secrets: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if record.exc_info:
            _, exc, _ = record.exc_info
            ours = record.name == "connector" or record.name.startswith("connector.")
            if ours or logging.getLogger().isEnabledFor(logging.DEBUG):
                msg_exc = logging.Formatter().formatException(record.exc_info)
            else:
                msg_exc = f"{type(exc).__name__}: {exc}"
            record.exc_info, record.exc_text = None, None
            msg = f"{msg}\n{msg_exc}"
        for s in self.secrets:
            msg = msg.replace(s, "***")
        record.msg, record.args = mask_userinfo(msg), None
        return True

    def add(self, secret: str) -> None:
        if secret and secret not in self.secrets:
            self.secrets = [*self.secrets, secret]  # a new list: filter() may be iterating the old one


REDACT = RedactFilter()
on_new_key(REDACT.add)


def setup_logging(level: str, fmt: str | None) -> None:
    fmt = fmt or ("text" if sys.stderr.isatty() else "json")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(REDACT)
    handler.setFormatter(
        JsonFormatter()
        if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s [%(threadName)s]: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("kafka").setLevel(max(logging.WARNING, root.level))


def load(path: str):
    cfg = load_pipeline(path)
    # several pipelines may share the process: every one's secrets stay masked
    REDACT.secrets += [s for s in _secrets(cfg) if s and s not in REDACT.secrets]
    return cfg


def _secrets(cfg) -> list[str]:
    out = [cfg.tanium.api_key.get_secret_value()]
    if cfg.tanium.proxy:
        out.append(urlsplit(cfg.tanium.proxy).password or "")
    if cfg.kafka:
        for s in (cfg.kafka.sasl_plain_password, cfg.kafka.ssl_password):
            if s is not None:
                out.append(s.get_secret_value())
    return out


# ---- commands ----------------------------------------------------------------------------------


def cmd_validate_config(args) -> int:
    cfg = load(args.pipeline)
    print(json.dumps(cfg.masked(), indent=2))
    return 0


def cmd_check(args) -> int:
    from connector.tools.check import run_checks, verdict

    cfg = load(args.pipeline)
    steps = run_checks(cfg)
    healthy, line = verdict(steps)
    if args.json:
        print(json.dumps({"healthy": healthy, "summary": line, "steps": [s.__dict__ for s in steps]}, indent=2))
    else:
        for s in steps:
            print(f"{'ok    ' if s.ok else 'FAILED'} {s.name:<16} {s.message}")
        print(line)
    return 0 if healthy else 1


def _serve_metrics(cfg, metrics, readiness, liveness=None):
    from connector.metrics import HealthServer

    if not cfg.metrics.enabled:
        return None
    try:
        return HealthServer(metrics, cfg.metrics.listen, readiness, liveness).start()
    except OSError as e:
        raise ConfigError(f"metrics.listen = {cfg.metrics.listen!r}: cannot listen ({e.strerror or e})") from None


def _stop_on_signals(stop) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop())


def cmd_run(args) -> int:
    from connector.metrics import Metrics
    from connector.stream.fleet import pipeline_files
    from connector.stream.pipeline import StreamPipeline

    files = pipeline_files(args.pipeline)
    if len(files) > 1:
        return _run_fleet(args, files)
    cfg = load(str(files[0]))
    if cfg.pipeline.mode == "validation":
        from connector.validation.kafka_runner import run_validation

        metrics = Metrics(cfg.pipeline.name)
        stop = threading.Event()
        _stop_on_signals(stop.set)
        servers = []
        try:
            return run_validation(
                cfg, stop, metrics, serve=lambda ready: servers.append(_serve_metrics(cfg, metrics, ready))
            )
        finally:
            for server in filter(None, servers):
                server.stop()
    _check_since(args.since)
    metrics = Metrics(cfg.pipeline.name)
    pipe = StreamPipeline(cfg, metrics=metrics, dry_run=args.dry_run, once=args.once, since=args.since)
    tune_interpreter()
    _stop_on_signals(pipe.stop)
    server = None if args.dry_run else _serve_metrics(cfg, metrics, pipe.readiness, pipe.liveness)
    progress = _progress(pipe) if sys.stderr.isatty() and not args.dry_run else None
    try:
        code = pipe.run()
    finally:
        if progress:
            progress.set()
        if server:
            server.stop()
    log.info("summary: %s", json.dumps(pipe.summary.as_dict()))
    return code


def _check_since(since: str | None) -> None:
    if since:
        from connector.timeutil import parse_start

        try:
            parse_start(since)
        except ValueError as e:
            raise ConfigError(f"--since: {e}") from None


def _run_fleet(args, files) -> int:
    """Several stream pipelines in this process (connector/stream/fleet.py)."""
    from connector.metrics import Metrics
    from connector.stream.fleet import Fleet, check_together, group_members
    from connector.stream.pipeline import StreamPipeline

    named = [(path, load(str(path))) for path in files]  # a ConfigError names its file
    check_together(named)
    _check_since(args.since)
    cfgs = [cfg for _, cfg in named]
    metrics = Metrics(cfgs[0].pipeline.name)
    members = group_members(cfgs, metrics)
    kw = {"dry_run": args.dry_run, "once": args.once, "since": args.since}
    fleet = Fleet(
        [
            StreamPipeline(
                cfg,
                metrics=metrics.for_pipeline(cfg.pipeline.name),
                member=members.get(cfg.fleet.group_id) if cfg.fleet else None,
                **kw,
            )
            for cfg in cfgs
        ]
    )
    tune_interpreter()
    _stop_on_signals(fleet.stop)
    served = next((cfg for cfg in cfgs if cfg.metrics.enabled), None)
    server = None
    if served is not None and not args.dry_run:
        server = _serve_metrics(served, metrics, fleet.readiness, fleet.liveness)
    log.info("running %d pipelines: %s", len(cfgs), ", ".join(cfg.pipeline.name for cfg in cfgs))
    try:
        return fleet.run()
    finally:
        if server:
            server.stop()


def _progress(pipe) -> threading.Event:
    """One status line on a terminal: rates, totals, lag, cache hit ratio."""
    done = threading.Event()

    def loop():
        last, t0 = 0, time.monotonic()
        while not done.wait(2):
            s, now = pipe.summary, time.monotonic()
            rate = (s.fetched - last) / (now - t0)
            last, t0 = s.fetched, now
            lag = "-"
            created = (s.checkpoint or {}).get("created_at")
            if created:
                lag = f"{time.time() - parse_ts(created).timestamp():.0f}s"
            stats = pipe.enricher.stats if pipe.enricher else {"lookups": 0, "hits": 0}
            ratio = f"{stats['hits'] / stats['lookups']:.0%}" if stats["lookups"] else "-"
            sys.stderr.write(
                f"\r{rate:8.0f} alerts/s  published {s.published:>9}  dlq {s.dlq:>5}  "
                f"lag {lag:>6}  cache hits {ratio:>4} "
            )
            sys.stderr.flush()

    threading.Thread(target=loop, daemon=True, name="progress").start()
    return done


def cmd_simulate(args) -> int:
    return simulator_command.run(args) or 0


def cmd_validate(args) -> int:
    from connector.validation.runners import validate_file

    cfg = load(args.pipeline)
    return validate_file(cfg, args.job_actions, args.json)


def cmd_demo(args) -> int:
    from connector.tools.demo import run_demo

    return run_demo(args)


def cmd_bench(args) -> int:
    return bench.run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    def global_options(default):
        g = argparse.ArgumentParser(add_help=False)
        g.add_argument(
            "--log-level",
            choices=["debug", "info", "warning", "error"],
            default="info" if default else argparse.SUPPRESS,
        )
        g.add_argument(
            "--log-format",
            choices=["text", "json"],
            default=None if default else argparse.SUPPRESS,
            help="default: text on a terminal, json otherwise",
        )
        return g

    common = global_options(False)  # accepted after the command too, without resetting the defaults
    p = argparse.ArgumentParser(
        prog="tanium-connector", parents=[global_options(True)], description="Tanium Threat Response → Kafka connector"
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, fn, help_):
        sp = sub.add_parser(name, parents=[common], help=help_, description=help_)
        sp.set_defaults(fn=fn)
        return sp

    sp = add("run", cmd_run, "run a pipeline (or several) until stopped")
    sp.add_argument(
        "pipeline",
        nargs="+",
        help="pipeline file (TOML); several files or a directory of them run side by side in this process",
    )
    sp.add_argument("--once", action="store_true", help="drain what exists now, then exit")
    sp.add_argument(
        "--since",
        metavar="TIMESTAMP",
        help="start here (RFC 3339, 'now' or a duration such as 7d), ignoring the checkpoint",
    )
    sp.add_argument(
        "--dry-run",
        action="store_true",
        help="print normalized events as JSON lines (dead-letter records go to the log on stderr); "
        "publish nothing, commit no checkpoint",
    )
    sp = add("check", cmd_check, "test connectivity to Tanium (and Kafka) step by step")
    sp.add_argument("pipeline")
    sp.add_argument("--json", action="store_true", help="machine-readable report")
    sp = add("validate-config", cmd_validate_config, "print the effective settings (secrets masked)")
    sp.add_argument("pipeline")
    sp = add("validate", cmd_validate, "judge job actions from a file against Tanium")
    sp.add_argument("pipeline")
    sp.add_argument("--job-actions", required=True, metavar="FILE", help="JSON lines, one job action each")
    sp.add_argument("--json", action="store_true", help="one JSON verdict per line")
    sp = add("simulate", cmd_simulate, "run the Tanium Threat Response simulator")
    simulator_command.add_arguments(sp)
    sp = add("demo", cmd_demo, "simulator + embedded broker + demo pipeline, then a summary")
    sp.add_argument("--pipeline", default="pipelines/demo.toml", help="pipeline file (default: %(default)s)")
    sp.add_argument("--alerts", type=int, default=5000, help="alerts the simulator starts with")
    sp.add_argument("--rate", type=float, default=50, help="new live alerts per second")
    sp.add_argument("--seconds", type=float, default=20, help="how long to stream live alerts")
    sp = add("bench", cmd_bench, "measure sink, source and pipeline throughput")
    bench.add_arguments(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        # Kafka unusable at start, an unreadable checkpoint: the message says what to check
        from connector.kafka import SinkError
        from connector.stream.checkpoint import CheckpointError

        if not isinstance(e, (SinkError, CheckpointError)):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
