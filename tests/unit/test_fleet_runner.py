"""The runner of several pipelines in one process (connector/stream/fleet.py), with pipelines that
stand in for StreamPipeline (its run/stop/readiness/liveness/summary interface): a pipeline that
fails ends alone, unless it belongs to a fleet — then the worker stops, so that the group hands its
pipelines to the other workers instead of keeping a pipeline that runs nowhere."""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace

from connector.stream.fleet import Fleet


class FakePipeline:
    def __init__(self, name: str, fleet: bool = False, fail: bool = False):
        self.cfg = SimpleNamespace(
            pipeline=SimpleNamespace(name=name), fleet=SimpleNamespace(group_id="g") if fleet else None
        )
        self.fail = fail
        self.stopped = threading.Event()
        self.started = threading.Event()
        self.summary = SimpleNamespace(as_dict=lambda: {}, errors=[])

    def run(self) -> int:
        self.started.set()
        if self.fail:
            raise RuntimeError("boom")
        self.stopped.wait(30)
        return 0

    def stop(self) -> None:
        self.stopped.set()

    def readiness(self):
        return True, "ready"

    def liveness(self):
        return True, "ok"


def _run(fleet: Fleet) -> tuple[threading.Thread, dict]:
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("code", fleet.run()), daemon=True)
    t.start()
    return t, out


def test_a_failed_pipeline_without_a_fleet_ends_alone_and_is_reported_not_ready():
    ok, bad = FakePipeline("ok"), FakePipeline("bad", fail=True)
    fleet = Fleet([ok, bad])
    t, out = _run(fleet)
    assert ok.started.wait(10) and bad.started.wait(10)
    for _ in range(200):
        if "bad" in fleet.codes:
            break
        threading.Event().wait(0.01)
    assert not ok.stopped.is_set(), "the other pipeline keeps running"
    ready, body = fleet.readiness()
    assert ready
    assert json.loads(body)["bad"] == {"ready": False, "reason": "stopped: boom"}
    fleet.stop()
    t.join(10)
    assert out["code"] == 1


def test_a_failed_fleet_pipeline_stops_the_worker():
    ok, bad = FakePipeline("ok", fleet=True), FakePipeline("bad", fleet=True, fail=True)
    t, out = _run(Fleet([ok, bad]))
    t.join(10)
    assert not t.is_alive() and ok.stopped.is_set()
    assert out["code"] == 1
