"""fleet: several stream pipelines in one process.

`tanium-connector run A.toml B.toml` (or a directory of pipeline files) runs each pipeline exactly
as it runs alone: its own Tanium client and token, cursor, checkpoint, retries and rate budget, its
own threads (processing, source, IntelDoc lookups) and its own delivery bookkeeping. So one slow or
unreachable Tanium server never delays another: only that pipeline's source thread waits on it.

What the process shares: the pipeline files' checks (distinct names, since a name keys the
checkpoint and the metrics; stream mode only; one metrics listener), one metrics listener whose
/metrics holds every pipeline's series under its `pipeline` label, the signals (SIGTERM stops
every pipeline, each within its own pipeline.shutdown_timeout), one Kafka producer per producer
settings for the at-least-once pipelines (stream/producers.py; exactly-once ones keep their
transactional producer), and the CPU: one thread at a time does the connector's CPU work
(connector/gate.py), so many busy pipelines take turns page by page instead of a hundred threads
fighting over the GIL. /readyz answers with one JSON object per pipeline and is 503 only when no
pipeline is ready (the process itself cannot work: Kafka is unreachable, say); /healthz is 503 when
any pipeline's poll loop is stuck, since only a restart frees it. A pipeline that fails ends alone
(its error is logged, /readyz names it, the exit code is 1) and the others keep running — unless it
belongs to a fleet: then the worker stops (exit 1), since it would hold the pipeline in the group and
no other worker would run it.

Costs (`bench --fleet`, docs/performance.md "Fleet"): idle, a pipeline costs a worker about 1.1 MiB
and 0.02 % of a core; busy, one worker's pipelines share one core's worth of Python (one GIL), so
their total stays below one pipeline alone's (about one worker per core carries more).
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from connector.config import ConfigError, PipelineConfig
from connector.stream.leader import GroupMember, group_member

log = logging.getLogger(__name__)


def pipeline_files(args: list[str]) -> list[Path]:
    """The pipeline files named on the command line: files as given, directories as their *.toml
    files in name order."""
    out: list[Path] = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            found = sorted(p for p in path.glob("*.toml") if p.is_file())
            if not found:
                raise ConfigError(f"{arg}: the directory holds no pipeline file (*.toml)")
            out += found
        else:
            out.append(path)
    return out


def check_together(named: list[tuple[Path, PipelineConfig]]) -> None:
    """Pipelines that share a process: distinct names, stream mode, one metrics listener."""
    names: dict[str, Path] = {}
    listens: dict[str, Path] = {}
    for path, cfg in named:
        name = cfg.pipeline.name
        if name in names:
            raise ConfigError(
                f"{path}: pipeline.name {name!r} is also the name in {names[name]}; pipelines run "
                "together need distinct names (a name keys the checkpoint and the metrics)"
            )
        names[name] = path
        if cfg.pipeline.mode != "stream":
            raise ConfigError(
                f"{path}: a validation pipeline runs alone (`tanium-connector run {path}`); "
                "only stream pipelines run several to a process"
            )
        if cfg.metrics.enabled:
            listens.setdefault(cfg.metrics.listen, path)
    if len(listens) > 1:
        (a, pa), (b, pb) = list(listens.items())[:2]
        raise ConfigError(
            f"metrics.listen differs: {a!r} in {pa}, {b!r} in {pb}; the pipelines of one process share "
            "one metrics listener, so give them the same metrics.listen"
        )


def group_members(cfgs: list[PipelineConfig], metrics) -> dict[str, GroupMember]:
    """One group member per fleet (`fleet.group_id`) among these pipelines: the pipelines of one
    fleet share this process's heartbeat. Their group timeouts must agree."""
    members: dict[str, GroupMember] = {}
    for cfg in cfgs:
        f = cfg.fleet
        if f is None:
            continue
        m = members.get(f.group_id)
        if m is None:
            members[f.group_id] = group_member(cfg, metrics)
        elif (m.session_timeout_ms, m.heartbeat_interval_ms) != (f.session_timeout_ms, f.heartbeat_interval_ms):
            raise ConfigError(
                f"{cfg.pipeline.name}: fleet {f.group_id!r} has session_timeout_ms {m.session_timeout_ms} and "
                f"heartbeat_interval_ms {m.heartbeat_interval_ms} in another pipeline file; the pipelines of one "
                "fleet share these settings"
            )
    return members


class Fleet:
    """Runs StreamPipelines side by side, one thread each (each pipeline starts its own)."""

    def __init__(self, pipelines: list):
        self.pipelines = pipelines
        self.codes: dict[str, int] = {}
        self.ended: dict[str, str] = {}  # why a pipeline stopped before the process did
        self.stopping = False

    def run(self) -> int:
        threads = [
            threading.Thread(target=self._run_one, args=(p,), name=f"pipeline {p.cfg.pipeline.name}")
            for p in self.pipelines
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return max(self.codes.values(), default=0)

    def _run_one(self, pipe) -> None:
        name = pipe.cfg.pipeline.name
        try:
            code = pipe.run()
        except Exception as e:  # noqa: BLE001 (one pipeline's end must not end the others)
            message = getattr(e, "message", None) or str(e)
            log.error("pipeline %s stopped: %s", name, message)
            self.ended[name] = f"stopped: {message}"
            code = 1
        self.codes[name] = code
        log.info("summary %s: %s", name, json.dumps(pipe.summary.as_dict()))
        if code and not self.stopping:
            self.ended.setdefault(name, "stopped: " + "; ".join(pipe.summary.errors or ["an error"]))
            if pipe.cfg.fleet is not None:
                # its worker still holds it in the group, so no other worker would run it
                log.error(
                    "pipeline %s of fleet %s failed: stopping this worker, so that the group hands its "
                    "pipelines to the other workers",
                    name,
                    pipe.cfg.fleet.group_id,
                )
                self.stop()

    def stop(self) -> None:
        self.stopping = True
        for p in self.pipelines:
            p.stop()

    def readiness(self) -> tuple[bool, str]:
        states = {
            p.cfg.pipeline.name: (False, self.ended[p.cfg.pipeline.name])
            if p.cfg.pipeline.name in self.ended
            else p.readiness()
            for p in self.pipelines
        }
        body = {name: {"ready": ok, "reason": why} for name, (ok, why) in states.items()}
        return any(ok for ok, _ in states.values()), json.dumps(body, sort_keys=True)

    def liveness(self) -> tuple[bool, str]:
        stuck = {p.cfg.pipeline.name: why for p in self.pipelines for ok, why in [p.liveness()] if not ok}
        if stuck:
            return False, "; ".join(f"{name}: {why}" for name, why in sorted(stuck.items()))
        return True, "ok"
