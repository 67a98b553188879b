"""`tanium-connector demo` (what `make demo` runs): the TR simulator in live mode (new alerts, and
analysts moving alerts through in progress to resolved or suppressed), the embedded broker, and
pipelines/demo.toml pointed at both; progress while it streams, then a summary that is checked
against the topic itself (creation and update events)."""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
import tomllib
from collections import Counter
from pathlib import Path

from connector.config import ConfigError, parse_pipeline
from connector.metrics import HealthServer, Metrics
from connector.simulator import Simulator
from connector.stream.pipeline import StreamPipeline
from connector.tools.embedded import EmbeddedBroker


def count_topic(bootstrap: str, topic: str, expect: int, timeout: float = 20) -> tuple[int, Counter]:
    """Distinct event keys read back from the topic and the events per `event_action` (stops once
    `expect` records arrived, or at timeout)."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    keys: set[bytes] = set()
    actions: Counter = Counter()
    deadline = time.monotonic() + timeout
    try:
        while actions.total() < expect and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                keys.update(r.key for r in records)
                actions.update(json.loads(r.value).get("event_action") for r in records)
        return len(keys), actions
    finally:
        consumer.close()


def run_demo(args) -> int:
    path = Path(args.pipeline)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    out = sys.stdout
    with (
        tempfile.TemporaryDirectory(prefix="tanium-demo-") as tmp,
        EmbeddedBroker(log=str(Path(tmp) / "broker.log")) as broker,
        Simulator(
            alerts=args.alerts,
            live_rate=args.rate,
            live_updates=args.rate / 5,
            late_fraction=0.1,
            late_by=(600, 3 * 3600),
            history=6 * 3600,
        ) as sim,
    ):
        raw["tanium"] = {**raw.get("tanium", {}), **sim.settings()}
        raw["kafka"] = {**raw.get("kafka", {}), "bootstrap_servers": broker.bootstrap}
        raw["state"] = {"path": str(Path(tmp) / "state")}
        raw["metrics"] = {"listen": "127.0.0.1:0"}
        cfg = parse_pipeline(raw, str(path))
        assert cfg.kafka is not None  # set just above
        metrics = Metrics(cfg.pipeline.name)
        pipe = StreamPipeline(cfg, metrics=metrics)
        health = HealthServer(metrics, cfg.metrics.listen, pipe.readiness).start()
        print(
            f"simulator  {sim.url}  ({sim.alert_count} alerts, {args.rate:g} new/s, 10% arriving late, "
            f"{sim.live_updates:g} state changes/s)",
            file=out,
        )
        print(f"broker     {broker.bootstrap}  (tansu, in memory)", file=out)
        print(f"metrics    http://127.0.0.1:{health.port}/metrics", file=out)
        print(f"streaming for {args.seconds:g}s …", file=out)
        runner = threading.Thread(target=pipe.run, name="pipeline")
        runner.start()
        t_end = time.monotonic() + args.seconds
        while time.monotonic() < t_end and runner.is_alive():
            time.sleep(min(2.0, max(0.0, t_end - time.monotonic())))
            s = pipe.summary
            print(
                f"  fetched {s.fetched:>6}  published {s.published:>6}  dlq {s.dlq:>3}  "
                f"simulator has {sim.alert_count}, {len(sim.lifecycle.changes)} state changes",
                file=out,
                flush=True,
            )
        sim.live_rate = sim.live_updates = 0
        # let the next poll pick up the last live alerts, so the summary covers everything created
        catch_up = time.monotonic() + 2 * cfg.tanium.poll_interval + 10
        while (pipe.committed or {}).get("id") != sim.alert_count and runner.is_alive() and time.monotonic() < catch_up:
            time.sleep(0.2)
        pipe.stop()
        runner.join()
        health.stop()
        s = pipe.summary
        in_topic, actions = count_topic(broker.bootstrap, cfg.kafka.topic, s.published)
        print("\nsummary", file=out)
        print(f"  alerts fetched         {s.fetched}", file=out)
        print(
            f"  events published       {s.published}  (read back from {cfg.kafka.topic}: {in_topic} distinct)", file=out
        )
        print(
            f"  update events          {actions['updated'] + actions['closed']}  ({actions['closed']} closing an "
            f"alert; {len(sim.lifecycle.changes)} state changes in the simulator)",
            file=out,
        )
        print(f"  dead-letter records    {s.dlq}", file=out)
        print(
            f"  IntelDoc requests      {sim.stats['intel']} for {s.fetched} alerts ({s.cache_hits} cache hits)",
            file=out,
        )
        print(f"  checkpoint             {s.checkpoint}", file=out)
        print(
            "\nread the topic of a real cluster with:\n"
            f"  kafka-console-consumer.sh --bootstrap-server <host:9092> --topic {cfg.kafka.topic} "
            "--from-beginning",
            file=out,
        )
        return 0 if s.published == s.fetched and not s.errors else 1
