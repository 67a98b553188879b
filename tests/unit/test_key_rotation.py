"""A rotated `tanium.api_key_file` reaches Tanium without a restart: TaniumClient against the real
simulator, whose accepted key is switched at runtime. The file is rewritten in place and swapped the
way Kubernetes updates a mounted Secret (a new timestamped directory behind the `..data` symlink);
a change the file's stamp does not show is read after a 401 and the request retried once. A key
Tanium keeps rejecting sets `tanium_connector_source_unauthorized` and is logged once per streak
with the expiry/trusted-IP hint; an empty or missing file keeps the last good key. The log filter
masks every key read, the rotated ones too. A model-based test rewrites, swaps, empties and
removes the file and switches the simulator's key in random order."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from pathlib import Path

import pytest
from helpers import SecretDir, wait_until
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from connector import cli
from connector.config import TaniumSection
from connector.metrics import NO_METRICS, Metrics
from connector.simulator import Simulator
from connector.tanium import TaniumAuthError, TaniumClient

OLD, NEW, NEWER = "token-old-1f2e3d", "token-new-9a8b7c6d", "token-newer-5e4f3a2b1c"


def client(sim: Simulator, path: str, metrics: Metrics = NO_METRICS) -> TaniumClient:
    t = TaniumSection(**sim.settings(api_key=None, api_key_file=path, max_retries=0))
    return TaniumClient(t, metrics)


def keyed_client(sim: Simulator, tmp_path, key: str = OLD):
    """A client reading its key from a file holding `key`: (the file, its metrics, the client)."""
    keyfile = tmp_path / "key"
    keyfile.write_text(key)
    m = Metrics("p")
    return keyfile, m, client(sim, str(keyfile), m)


def sample(m: Metrics, name: str, **labels) -> float | None:
    return m.registry.get_sample_value("tanium_connector_" + name, {"pipeline": m.pipeline, **labels})


@pytest.fixture
def ksim():
    with Simulator(alerts=20, intel_docs=3, seed=3, history=3600, api_key=OLD) as s:
        yield s


def test_an_in_place_rewrite_is_used_by_the_next_request(ksim, tmp_path):
    keyfile, m, c = keyed_client(ksim, tmp_path, OLD + "\n")
    assert len(c.list_alerts([], 0, 5).items) == 5
    keyfile.write_text(NEW + "\n")
    ksim.api_key = NEW  # the old token is revoked
    assert len(c.list_alerts([], 5, 5).items) == 5
    assert sample(m, "source_requests_total", endpoint="alerts", code_class="2xx") == 2
    assert sample(m, "source_requests_total", endpoint="alerts", code_class="4xx") is None  # no 401 on the way
    assert sample(m, "source_api_key_reloads_total", result="changed") == 1
    c.close()


def test_a_kubernetes_secret_update_is_used_by_every_endpoint(ksim, tmp_path):
    """The `..data` swap keeps the path, changes the file behind it: alerts, IntelDocs and the session
    check (the enricher, the validation engine and `check` share these calls) all send the new key."""
    secret = SecretDir(tmp_path, OLD)
    c = client(ksim, secret.path)
    doc_id = ksim.intel_doc_ids[0]
    assert c.get_intel(doc_id) and c.session_current()
    secret.swap(NEW)
    ksim.api_key = NEW
    assert c.list_alerts([], 0, 1).items
    assert c.get_intel(doc_id)["id"] == doc_id
    assert c.list_intels(1) and c.session_current()
    c.close()


def test_a_change_the_file_stamp_hides_is_read_after_a_401_and_the_request_retried_once(ksim, tmp_path):
    """Same inode, size and mtime (a filesystem with coarse timestamps): only the 401 shows the rotation."""
    keyfile, m, c = keyed_client(ksim, tmp_path)
    assert c.list_alerts([], 0, 1).items
    st_before = keyfile.stat()
    same_length = "token-xxx-" + OLD[len("token-xxx-") :][::-1]
    assert len(same_length) == len(OLD) and same_length != OLD
    keyfile.write_text(same_length)
    os.utime(keyfile, ns=(st_before.st_atime_ns, st_before.st_mtime_ns))
    ksim.api_key = same_length
    before = ksim.stats["alerts"]
    assert c.list_alerts([], 0, 1).items
    assert ksim.stats["alerts"] - before == 2  # the 401, then the retry with the new key
    assert sample(m, "source_requests_total", endpoint="alerts", code_class="4xx") == 1
    assert sample(m, "source_unauthorized") == 0
    c.close()


def test_threads_sharing_a_client_lose_no_request_to_a_rotation(ksim, tmp_path):
    """The enricher's threads share the pipeline's client. A rotation as in Tanium: the new token is
    valid before the Secret is updated, and the old one is revoked right after. A request that went out
    with the old key just before gets its 401, re-reads the file and goes through: no request fails.
    The next rotation waits until every thread has finished two requests (none is still on its way
    from before the last one)."""
    secret = SecretDir(tmp_path, OLD)
    c = client(ksim, secret.path)
    doc_id = ksim.intel_doc_ids[0]
    errors: list[BaseException] = []
    done = threading.Event()
    finished = [0] * 8

    def work(i: int) -> None:
        try:
            while not done.is_set():
                c.list_alerts([], 0, 1)
                c.get_intel(doc_id)
                finished[i] += 1
        except BaseException as e:  # noqa: BLE001 (reported by the main thread)
            errors.append(e)

    def every_thread_twice() -> None:
        start = list(finished)
        wait_until(
            lambda: errors or all(n >= s + 2 for n, s in zip(finished, start, strict=True)), timeout=10, what="requests"
        )

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        for key in (NEW, NEWER, OLD + "-again"):
            every_thread_twice()
            ksim.old_keys, ksim.api_key = {ksim.api_key}, key
            secret.swap(key)
            ksim.old_keys = set()
        every_thread_twice()
    finally:
        done.set()
        for t in threads:
            t.join(10)
    assert not errors, errors[0]
    assert ksim.stats["alerts"] > 8 * 8  # the threads did work through every rotation
    c.close()


def test_a_revoked_key_is_reported_once_per_streak_and_recovers_when_the_file_is_fixed(ksim, tmp_path, caplog):
    keyfile, m, c = keyed_client(ksim, tmp_path)
    assert sample(m, "source_unauthorized") == 0  # exists from the first scrape
    assert c.list_alerts([], 0, 1).items
    ksim.api_key = NEW  # revoked, and the file not updated
    caplog.set_level(logging.INFO, logger="connector")
    before = ksim.stats["alerts"]
    for _ in range(3):
        with pytest.raises(TaniumAuthError) as e:
            c.list_alerts([], 0, 1)
        assert "invalid or expired" in e.value.message and "trusted IP" in e.value.message
    assert ksim.stats["alerts"] - before == 3  # the same key after the re-read: not retried
    assert sample(m, "source_unauthorized") == 1
    streak = [r for r in caplog.records if "401" in r.getMessage()]
    assert len(streak) == 1 and streak[0].levelno == logging.ERROR
    line = streak[0].getMessage()
    assert "expired" in line and "trusted IP" in line and "tanium.api_key_file" in line
    keyfile.write_text(NEW)
    assert c.list_alerts([], 0, 1).items
    assert sample(m, "source_unauthorized") == 0
    assert "Tanium accepts the API token again (after 3 requests answered 401)" in caplog.text
    assert not any(k in caplog.text for k in (OLD, NEW))
    c.close()


def test_an_empty_or_missing_file_keeps_the_last_good_key(ksim, tmp_path, caplog):
    keyfile, m, c = keyed_client(ksim, tmp_path)
    caplog.set_level(logging.WARNING, logger="connector")
    keyfile.write_text("  \n")
    assert c.list_alerts([], 0, 1).items
    assert c.list_alerts([], 0, 1).items
    keyfile.unlink()
    assert c.list_alerts([], 0, 1).items
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "is empty" in warnings[0] and str(keyfile) in warnings[0]
    assert sample(m, "source_api_key_reloads_total", result="failed") == 2  # the empty file, then the missing one
    keyfile.write_text(NEW)
    ksim.api_key = NEW
    assert c.list_alerts([], 0, 1).items
    assert sample(m, "source_api_key_reloads_total", result="changed") == 1
    assert OLD not in caplog.text and NEW not in caplog.text
    c.close()


def test_the_log_filter_masks_a_rotated_key(ksim, tmp_path):
    keyfile = tmp_path / "key"
    keyfile.write_text(OLD)
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(
        f'[pipeline]\nname = "p"\n[tanium]\nprotocol = "http"\nhost = "{ksim.host}"\nport = {ksim.port}\n'
        f'api_key_file = "{keyfile}"\n'
    )
    cfg = cli.load(str(pipeline))
    c = TaniumClient(cfg.tanium)
    keyfile.write_text(NEW)
    ksim.api_key = NEW
    assert c.list_alerts([], 0, 1).items
    record = logging.LogRecord("kafka", logging.ERROR, __file__, 1, "leaked %s and %s", (OLD, NEW), None)
    cli.REDACT.filter(record)
    assert record.getMessage() == "leaked *** and ***"
    c.close()


class Rotation(RuleBasedStateMachine):
    """Invariant (the guarantee): every request is sent with the key the file holds at that moment, or,
    while it is empty or missing, with the last key read from it; it succeeds exactly when Tanium
    accepts that key, and the unauthorized gauge says whether the last request was rejected. Keys
    have distinct lengths, so two different keys never share a file stamp (the 401 test covers that)."""

    @initialize(kubernetes=st.booleans())
    def start(self, kubernetes):
        self.tmp = tempfile.TemporaryDirectory()
        self.written = 0
        self.key = self.sent = self.fresh()  # in the file; last sent
        self.secret = SecretDir(Path(self.tmp.name), self.key) if kubernetes else None
        self.path = self.secret.path if self.secret else os.path.join(self.tmp.name, "key")
        if not self.secret:
            Path(self.path).write_text(self.key)
        self.sim = Simulator(alerts=5, seed=1, history=600, api_key=self.key).start()
        self.m = Metrics("p")
        self.client = client(self.sim, self.path, self.m)
        self.ok: bool | None = None

    def fresh(self) -> str:
        self.written += 1
        return "k" * self.written + f"-{self.written}"

    @rule(accept=st.booleans())
    def rotate(self, accept):
        """A new key in the file (in place, or swapped in like a Secret); Tanium may switch to it."""
        self.key = self.fresh()
        if self.secret:
            self.secret.swap(self.key)
        else:
            Path(self.path).write_text(self.key)
        if accept:
            self.sim.api_key = self.key

    @precondition(lambda self: self.key)
    @rule()
    def tanium_accepts_the_file_key(self):
        self.sim.api_key = self.key

    @rule()
    def revoke(self):
        self.sim.api_key = "revoked"

    @precondition(lambda self: self.secret is None)
    @rule(missing=st.booleans())
    def break_file(self, missing):
        if missing:
            Path(self.path).unlink(missing_ok=True)
        else:
            Path(self.path).write_text("")
        self.key = ""

    @rule()
    def request(self):
        self.sent = self.key or self.sent
        try:
            self.client.list_alerts([], 0, 1)
            self.ok = True
        except TaniumAuthError:
            self.ok = False
        assert self.ok == (self.sim.api_key == self.sent), (self.sim.api_key, self.sent)

    @invariant()
    def gauge_follows_the_last_answer(self):
        if getattr(self, "ok", None) is not None:
            assert sample(self.m, "source_unauthorized") == (0 if self.ok else 1)

    def teardown(self):
        if hasattr(self, "client"):
            self.client.close()
            self.sim.stop()
            self.tmp.cleanup()


Rotation.TestCase.settings = settings(max_examples=25, stateful_step_count=15, derandomize=True, deadline=None)
test_requests_use_the_key_last_written = Rotation.TestCase
