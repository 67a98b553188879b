"""Reliability under real damage: kill -9 at random points, a black-holed broker, a slow broker.

Everything runs against the project's TR simulator over HTTP and the real broker (tansu); the
connector runs as the `tanium-connector` CLI in a subprocess where a crash must be real.
Helpers here (`write_pipeline`, `Cli`, `scrape`) are shared with test_hostile*/test_security*.
"""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers import Cli, ids_of, metric, read_topic, scrape, stream_sections, wait_until, write_pipeline

from connector.simulator import Simulator
from connector.stream.checkpoint import FileCheckpointStore
from connector.tools.embedded import free_port

# ---- 1. kill -9 twenty times --------------------------------------------------------------------

KILL_KINDS = ("random", "after_checkpoint", "in_flight", "mid_request")


def kill_and_restart(sim, cfg_file, tmp_path, port, store, kinds, rng, poll_timeout=30):
    """Runs the CLI and kill -9s it once per entry of `kinds`, restarting each time. Kill points:
    "random" (a random moment), "after_checkpoint" (right after a checkpoint commit),
    "in_flight" (records handed to Kafka and unacknowledged: mid-page, mid-flush or inside a
    transaction), "mid_request" (an alerts request on the wire). → (kills, kills per kind,
    checkpoint offset after each kill, logs)."""
    kills, counts, checkpoints, logs = 0, {k: 0 for k in KILL_KINDS}, [], []
    for i, kind in enumerate(kinds):
        cli = Cli(["--log-format", "json", "run", str(cfg_file)], tmp_path / f"run{i}.log")
        try:
            served = sim.stats["alerts"]
            # the process is up and polling (each restart re-reads from the checkpoint)
            wait_until(
                lambda: sim.stats["alerts"] > served or not cli.alive,  # noqa: B023 (waited for in this iteration)
                timeout=poll_timeout,
                what=f"run {i} to poll",
            )
            assert cli.alive, cli.logs()[-3000:]
            if kind == "random":
                time.sleep(rng.uniform(0.0, 2.0))  # the kill point itself, not a synchronisation
            elif kind == "after_checkpoint":
                before = metric(scrape(port)[1], "checkpoint_commits_total") or 0
                wait_until(
                    lambda: (metric(scrape(port)[1], "checkpoint_commits_total") or 0) > before,  # noqa: B023 (as above)
                    timeout=30,
                    what="a checkpoint commit",
                )
                time.sleep(rng.uniform(0.0, 0.05))
            elif kind == "in_flight":
                wait_until(
                    lambda: (metric(scrape(port)[1], "sink_inflight_records") or 0) > 0,
                    timeout=30,
                    what="records in flight to Kafka",
                )
            else:  # mid_request: slow replies so the kill lands while a page is on the wire
                sim.faults.latency = 0.3
                served = sim.stats["alerts"]
                wait_until(lambda: sim.stats["alerts"] > served, timeout=30, what="an alerts request")  # noqa: B023
                time.sleep(rng.uniform(0.0, 0.2))
            assert cli.alive, f"run {i} exited by itself before the kill:\n{cli.logs()[-3000:]}"
            assert cli.kill9() == -9
            kills += 1
            counts[kind] += 1
        finally:
            sim.faults.latency = 0
            cli.stop()
        logs.append(cli.logs())
        checkpoints.append((store.load() or {}).get("offset", 0))
    return kills, counts, checkpoints, logs


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kill_9_twenty_times_loses_no_alert(broker, topic_prefix, tmp_path):
    """The stream CLI is SIGKILLed 20 times against a live simulator (new alerts all the time) and
    restarted each time; then live creation stops and a `--once` run drains. Every alert the
    simulator created is in the topic (at least once), nothing else is, and the checkpoint never
    went backwards. Kill points, drawn from a seeded RNG, cover: a random moment after start-up,
    just after the checkpoint file changed, while records are handed to Kafka and unacknowledged
    (small page, small max_unacked, linger: mid-page and mid-flush), and while an alerts request is
    in flight at the simulator (mid-page fetch)."""
    rng = random.Random(7_2024)
    kinds = [k for k in KILL_KINDS for _ in range(5)]
    rng.shuffle(kinds)
    with Simulator(alerts=1500, intel_docs=12, seed=17, history=3600, live_rate=60) as sim:
        port = free_port()
        state_dir = tmp_path / "state"
        cfg_file = write_pipeline(
            tmp_path / "p.toml",
            stream_sections(
                topic_prefix,
                sim,
                broker.bootstrap,
                state_dir,
                metrics_port=port,
                tanium={"page_size": 40, "limit": 400},
                kafka={"linger_ms": 40, "max_unacked": 30},
            ),
        )
        store = FileCheckpointStore(state_dir, topic_prefix)
        kills, counts, checkpoints, logs = kill_and_restart(sim, cfg_file, tmp_path, port, store, kinds, rng)
        created = stop_live(sim)
        drain = Cli(["--log-format", "json", "run", str(cfg_file), "--once"], tmp_path / "drain.log")
        code, _ = drain.wait(120)
        logs.append(drain.logs())
        assert code == 0, drain.logs()[-3000:]
        assert store.load()["id"] == created and store.load()["offset"] == created

    ids = ids_of(read_topic(broker.bootstrap, f"{topic_prefix}.events", timeout=90))
    missing = set(range(1, created + 1)) - set(ids)
    assert not missing, f"{len(missing)} alerts lost, e.g. {sorted(missing)[:10]}"
    assert set(ids) <= set(range(1, created + 1)), "an event that the simulator never created"
    # only records after the durable checkpoint repeat: per crash at most the page sent since the
    # last commit (page_size 40) plus the records not yet acknowledged at that commit (at most
    # max_unacked = 30: the sink's back pressure; one broker acknowledges in send order)
    dups = len(ids) - len(set(ids))
    assert dups <= kills * (40 + 30), (
        f"{dups} duplicates for {kills} kills; the design allows at most {kills} x (page_size 40 + max_unacked 30)"
    )
    assert checkpoints == sorted(checkpoints), f"the checkpoint went backwards: {checkpoints}"
    assert checkpoints[-1] > 1500, "the killed runs made progress"
    for text in logs:
        assert "Traceback" not in text
    assert read_topic(broker.bootstrap, f"{topic_prefix}.events.dlq", timeout=2) == []
    figures = {
        "kills": kills,
        "kill_points": counts,
        "alerts": created,
        "events_in_topic": len(ids),
        "duplicates": len(ids) - len(set(ids)),
        "lost": 0,
        "duplicate_ratio": round((len(ids) - len(set(ids))) / created, 4),
        "live_rate_per_s": 60,
        "page_size": 40,
        "max_unacked": 30,
        "linger_ms": 40,
        "checkpoints_after_each_kill": checkpoints,
    }
    (tmp_path / "crash_figures.json").write_text(json.dumps(figures, indent=2))
    print(f"\nCRASH TEST FIGURES: {json.dumps(figures)}")


def stop_live(sim) -> int:
    """Stop the simulator's live alerts; → how many alerts exist from now on."""
    sim.live_total = sim.live_created
    wait_until(
        lambda: not any(t.name == "simulator-live" for t in threading.enumerate()),
        what="the simulator to stop creating alerts",
    )
    return sim.alert_count


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# ---- 2. the broker black-holed for 30 s ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_broker_black_holed_for_30s_then_healed(proxied, proxy, topic_prefix, tmp_path):
    """The CLI streams live alerts through a proxy that then black-holes the broker for 30 s (every
    connection held open, no byte moves). Meanwhile the process stays up, /healthz answers, /readyz
    turns 503 with the reason, Tanium is still polled, and the checkpoint stays where it was. After
    the proxy heals, /readyz is 200 again, every alert arrives, SIGTERM exits 0, and no traceback
    was ever logged."""
    with Simulator(alerts=1000, intel_docs=6, seed=41, history=3600, live_rate=40) as sim:
        port = free_port()
        state_dir = tmp_path / "state"
        cfg_file = write_pipeline(
            tmp_path / "p.toml",
            stream_sections(
                topic_prefix, sim, proxied.bootstrap, state_dir, metrics_port=port, tanium={"page_size": 100}
            ),
        )
        store = FileCheckpointStore(state_dir, topic_prefix)
        cli = Cli(["--log-format", "json", "run", str(cfg_file)], tmp_path / "run.log")
        try:
            wait_until(lambda: (store.load() or {}).get("offset", 0) >= 1000, what="the history delivered")
            wait_until(lambda: scrape(port, "/readyz")[0] == 200, what="ready")
            proxy.stall()
            t0 = time.monotonic()
            wait_until(lambda: scrape(port, "/readyz")[0] == 503, timeout=40, what="/readyz to turn 503")
            assert "Kafka" in scrape(port, "/readyz")[1]
            held, polls = store.load(), sim.stats["alerts"]
            samples = 0
            while time.monotonic() - t0 < 30:  # the rest of the 30 s black hole, sampled
                assert cli.alive, cli.logs()[-3000:]
                assert store.load() == held, "the checkpoint moved while Kafka was unreachable"
                assert scrape(port, "/healthz")[0] == 200
                assert scrape(port, "/readyz")[0] == 503
                samples += 1
                time.sleep(0.5)  # sampling interval, not a synchronisation
            assert samples >= 10
            assert sim.stats["alerts"] > polls, "Tanium is still polled during the outage"
            text = scrape(port)[1]
            assert metric(text, "ready") == 0
            assert (metric(text, "sink_inflight_records") or 0) > 0
            proxy.resume()
            wait_until(lambda: scrape(port, "/readyz")[0] == 200, timeout=120, what="ready again after healing")
            created = stop_live(sim)
            wait_until(
                lambda: (store.load() or {}).get("offset") == created,
                timeout=120,
                what="everything delivered after healing",
            )
            assert store.load()["offset"] > held["offset"]
        finally:
            cli.proc.terminate()
            code, _ = cli.wait(60)
        assert code == 0, cli.logs()[-3000:]
        logs = cli.logs()
        assert "Traceback" not in logs and '"level": "critical"' not in logs
    records = read_topic(proxied.bootstrap, f"{topic_prefix}.events", expect=created, timeout=60)
    ids = ids_of(records)
    assert set(ids) == set(range(1, created + 1))
    print(f"\nPARTITION TEST: {created} alerts, {len(ids) - len(set(ids))} duplicates")


# ---- 4. a slow broker: back pressure ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_slow_broker_bounds_memory_and_slows_polling(slowed, slow_link, topic_prefix, tmp_path):
    """The broker link is slowed (every chunk held 0.1 s). Sampled from the CLI's /metrics and
    /proc: records held (fetched from Tanium − acknowledged by Kafka) never exceed max_unacked +
    the page queue, RSS stays under 160 MB (about 70 MB in practice), and Tanium pages fetched
    never run ahead of what Kafka acknowledged. Over equal sampling windows, the slowed phase
    makes a fraction of the Tanium requests of the full-speed phase that follows. At the end
    every alert is in the topic."""
    total, page, max_unacked = 15000, 100, 200
    bound = max_unacked + (4 + 2) * page  # pipeline.QUEUE_PAGES pages queued, one in hand, one being put
    with Simulator(alerts=total, intel_docs=6, seed=42, history=3600) as sim:
        port = free_port()
        state_dir = tmp_path / "state"
        cfg_file = write_pipeline(
            tmp_path / "p.toml",
            stream_sections(
                topic_prefix,
                sim,
                slowed.bootstrap,
                state_dir,
                metrics_port=port,
                tanium={"page_size": page, "poll_interval": 5},
                kafka={"max_unacked": max_unacked, "batch_size": 16384},
                # the pages bound below counts creation pages; the update scan adds a small request
                # per cycle that reads no new alert (its records pass the same bounded queue)
                source={"start_from": "30d", "track_updates": False},
            ),
        )
        slow_link.delay = 0.1
        cli = Cli(["--log-format", "json", "run", str(cfg_file)], tmp_path / "run.log")
        store = FileCheckpointStore(state_dir, topic_prefix)

        def sample():
            text = scrape(port)[1]
            fetched = metric(text, "records_received_total", stage="source") or 0
            acked = metric(text, "records_sent_total", stage="sink") or 0
            return fetched, acked, metric(text, "source_pages_total") or 0

        peak_rss = [0]

        def window(seconds: float) -> tuple[int, float, float]:
            """Tanium requests, records acknowledged, max held, during `seconds` of sampling."""
            r0, (_, a0, _) = sim.stats["alerts"], sample()
            most_held = 0.0
            t0 = time.monotonic()
            while time.monotonic() - t0 < seconds:
                fetched, acked, pages = sample()
                held = fetched - acked
                most_held = max(most_held, held)
                assert held <= bound, f"{held} records held (bound {bound})"
                # polling follows acknowledgements: no page is fetched that could not be held (the
                # first request is the start probe; later pages repeat one record: the overlap)
                assert (pages - 1) * (page - 1) <= acked + bound, (pages, acked)
                peak_rss[0] = max(peak_rss[0], rss_bytes(cli.proc.pid))
                assert peak_rss[0] < 160 * 2**20
                assert cli.alive, cli.logs()[-3000:]
                time.sleep(0.2)  # sampling interval
            return sim.stats["alerts"] - r0, sample()[1] - a0, most_held

        try:
            wait_until(lambda: (store.load() or {}).get("offset", 0) > 0, timeout=60, what="a first delivery")
            slow_requests, slow_acked, slow_held = window(8)
            assert slow_held > max_unacked, "the slow link never made the pipeline hold back"
            slow_link.delay = 0
            fast_requests, fast_acked, _ = window(8)
            assert fast_acked > 3 * slow_acked, (slow_acked, fast_acked)
            assert slow_requests * 3 < fast_requests, (slow_requests, fast_requests)
            wait_until(lambda: (store.load() or {}).get("offset") == total, timeout=120, what="all delivered")
        finally:
            cli.proc.terminate()
            code, _ = cli.wait(60)
        assert code == 0, cli.logs()[-3000:]
        assert "Traceback" not in cli.logs()
    ids = ids_of(read_topic(slowed.bootstrap, f"{topic_prefix}.events", expect=total, timeout=90))
    assert set(ids) == set(range(1, total + 1))
    print(
        f"\nSLOW BROKER: Tanium requests slowed {slow_requests} vs full speed {fast_requests}; "
        f"acked {slow_acked} vs {fast_acked}; most held {slow_held} (bound {bound}); "
        f"peak RSS {peak_rss[0] / 2**20:.0f} MB"
    )


# ---- start-up failures: a clear message and exit code 1, never a traceback or a hang -------------


def test_start_with_kafka_refusing_or_a_corrupt_checkpoint_is_a_clear_error(broker, sim, topic_prefix, tmp_path):
    state_dir = tmp_path / "state"
    closed = write_pipeline(
        tmp_path / "closed.toml", stream_sections(topic_prefix, sim, f"127.0.0.1:{free_port()}", state_dir)
    )
    code, _ = (c := Cli(["run", str(closed), "--once"], tmp_path / "closed.log")).wait(60)
    last = c.logs().strip().splitlines()[-1]
    assert code == 1 and "Traceback" not in c.logs(), c.logs()[-3000:]
    assert last.startswith("error: cannot reach Kafka at 127.0.0.1:") and "kafka.bootstrap_servers" in last

    state_dir.mkdir()
    (state_dir / f"{topic_prefix}.json").write_text("{not json")
    ok = write_pipeline(tmp_path / "ok.toml", stream_sections(topic_prefix, sim, broker.bootstrap, state_dir))
    code, _ = (c := Cli(["run", str(ok), "--once"], tmp_path / "corrupt.log")).wait(60)
    last = c.logs().strip().splitlines()[-1]
    assert code == 1 and "Traceback" not in c.logs(), c.logs()[-3000:]
    assert last.startswith("error: checkpoint file") and "corrupt" in last and "delete it" in last, last


@pytest.mark.slow
def test_start_with_ssl_against_a_plaintext_listener_is_a_clear_error_not_a_hang(broker, sim, topic_prefix, tmp_path):
    """kafka-python bounds the TCP connect and the API-version exchange by bootstrap_timeout_ms,
    but not the TLS handshake: `security_protocol = "SSL"` against a plaintext listener (tansu reads
    the ClientHello as the start of a huge request and waits for the rest), or a TLS terminator that
    hangs, would leave `run` starting forever: connector.kafka.bounded_start gives up after
    max_block_ms + 5 s with a message naming kafka.security_protocol, and `run` exits 1."""
    p = write_pipeline(
        tmp_path / "p.toml",
        stream_sections(topic_prefix, sim, broker.bootstrap, tmp_path / "s", kafka={"security_protocol": "SSL"}),
    )
    c = Cli(["run", str(p), "--once"], tmp_path / "run.log")
    try:
        c.proc.wait(60)
    except subprocess.TimeoutExpired:
        pass
    finally:
        c.stop()
    assert c.proc.returncode == 1, "still starting after 60 s"
    last = c.logs().strip().splitlines()[-1]
    assert last.startswith("error: cannot reach Kafka at") and "kafka.security_protocol" in last, last
    assert "Traceback" not in c.logs()
