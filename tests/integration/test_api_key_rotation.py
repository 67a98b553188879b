"""`tanium-connector run` with `tanium.api_key_file` in a Kubernetes-style Secret volume, against the
real broker and the simulator, while alerts keep arriving. The key is rotated twice (the `..data`
swap, then an in-place rewrite) as the simulator switches to it: the process is never restarted and
every alert reaches the topic. Then the key is revoked and not replaced: the unauthorized gauge goes
to 1 and the log names expiry and trusted IPs once for the streak; after the file is fixed the gauge
is 0 again, delivery resumes, and no key appears in the log or /metrics."""

from __future__ import annotations

import json

from helpers import Cli, SecretDir, ids_of, metric, read_topic, scrape, stream_sections, wait_until, write_pipeline

from connector.simulator import Simulator
from connector.tools.embedded import free_port

KEYS = ("token-first-4b1d2c", "token-second-77e0a1f3", "token-third-0c9d8e7f6a", "token-fourth-a1b2c3d4e5f6")


def test_rotation_and_revocation_without_a_restart(broker, topic_prefix, tmp_path):
    first, second, third, fourth = KEYS
    (tmp_path / "secret").mkdir()
    secret = SecretDir(tmp_path / "secret", first)
    port = free_port()
    with Simulator(alerts=40, intel_docs=4, seed=23, history=3600, api_key=first) as sim:
        sections = stream_sections(
            topic_prefix,
            sim,
            broker.bootstrap,
            tmp_path / "state",
            metrics_port=port,
            tanium={"api_key": None, "api_key_file": secret.path, "max_retries": 0},
        )
        run = Cli(["run", str(write_pipeline(tmp_path / "p.toml", sections)), "--log-format", "json"], tmp_path / "log")

        def gauge() -> float | None:
            return metric(scrape(port)[1], "source_unauthorized")

        def delivered(n: int) -> None:
            wait_until(
                lambda: not run.alive or (metric(scrape(port)[1], "records_sent_total", stage="sink") or 0) >= n,
                timeout=60,
                what=f"{n} alerts published",
            )
            assert run.alive, run.logs()

        def more(n: int) -> None:
            for _ in range(n):
                sim.inject()

        try:
            delivered(40)
            assert gauge() == 0
            sim.old_keys, sim.api_key = {first}, second  # a new token in Tanium, the old one still valid
            secret.swap(second)  # the kubelet's update of a mounted Secret
            sim.old_keys = set()  # the first token revoked
            more(10)
            delivered(50)
            sim.old_keys, sim.api_key = {second}, third
            with open(secret.path, "w", encoding="utf-8") as f:  # in place, through the symlinks
                f.write(third + "\n")
            sim.old_keys = set()
            more(10)
            delivered(60)
            assert metric(scrape(port)[1], "source_api_key_reloads_total", result="changed") == 2

            sim.api_key = fourth  # revoked, the file not updated
            more(10)
            wait_until(lambda: gauge() == 1, timeout=30, what="the unauthorized gauge at 1")
            wait_until(
                lambda: (metric(scrape(port)[1], "source_auth_failures_total") or 0) >= 3,
                timeout=30,
                what="three polls answered 401",
            )
            secret.swap(fourth)
            wait_until(lambda: gauge() == 0, timeout=30, what="the unauthorized gauge back at 0")
            delivered(70)
            assert run.alive
            metrics_text = scrape(port)[1]
        finally:
            run.stop()
        ids = ids_of(read_topic(broker.bootstrap, f"{topic_prefix}.events", expect=70))
        assert sorted(ids) == list(range(1, sim.alert_count + 1)) and sim.alert_count == 70  # all, none twice

    logs = run.logs()
    lines = [json.loads(line)["msg"] for line in logs.splitlines() if line.startswith("{")]
    streak = [m for m in lines if "Tanium rejects the key" in m]
    assert len(streak) == 1, streak
    assert "expired" in streak[0] and "trusted IP" in streak[0] and secret.path in streak[0]
    assert any("accepts the API token again" in m for m in lines)
    for key in KEYS:
        assert key not in logs and key not in metrics_text
