"""The Kafka consumer-group runner of Security Validation mode (`tanium-connector run` with
mode = "validation"); the file runner, the clocks and `drive` are in runners.py.

Exactly one verdict (detected / missed) per action id, across partitions, restarts and hand-overs:
- One owner per id: an action is judged on its home partition, the one a record keyed by its id
  goes to (murmur2, as every Kafka client places keys). A copy consumed on another partition is
  forwarded there (keyed by id, with a `forwarded-from` header; a forwarded copy is never forwarded
  again) and its own offset finishes once Kafka confirmed the forward. So copies of an action meet
  one runner, which skips a copy while the action is open and consults the ledger after.
- The job-action offset is committed only after the action's verdict was acknowledged by Kafka
  (publish → flush → commit). Committing first could lose a verdict; publishing first alone could
  repeat one when a runner stops between the two steps, or when it finished actions out of order
  (offsets commit as a contiguous prefix, so a finished action behind an unfinished one stays
  uncommitted and is re-delivered to the next owner).
- So right before publishing (retries included), a runner reads the results topic's partition for
  the action id (results are keyed by action id) from `started_at − max_clock_skew − 15 min` (no
  verdict can be older: actions are accepted at most max_clock_skew before they start; 15 min for
  clocks of other runners) and skips actions that already have a detected/missed verdict; it still
  commits their offsets. When the results topic cannot be read, the verdicts are held and retried,
  never published unchecked. A killed runner's actions are re-delivered to the next owner, judged
  again, and published only if the killed runner had not published them.
- Revocation happens inside `poll()`, on this runner's only thread, after the previous loop
  iteration flushed its verdicts; the revoked partitions' unfinished actions are dropped there, so
  the old owner publishes nothing for them once the new owner has them. The new owner re-evaluates
  them from scratch (their past windows run at once).
- Remaining gap: a runner frozen longer than max.poll.interval while publishing could race the new
  owner by milliseconds; both check the results topic, which makes that window tiny. Rejections are
  per record (an invalid record gets its own `rejected` result).

Devices are published once across restarts: the devices topic (compacted, keyed by device name,
created if missing) is read at start; a device whose record Kafka did not confirm is published again
when next seen. Two runners that see a new device at the same moment may both publish it.

Evidence before verdict: an action's matched and suspicious-event records are tracked until Kafka
answers; before its verdict is published, the runner waits for them and sends failed ones again.
A verdict whose evidence is still not delivered is held back (its offset stays open) and retried,
so a committed verdict always has its events on the events topic. Evidence is at least once: an
action judged again after a restart or hand-over publishes its events again.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import orjson
from kafka import ConsumerRebalanceListener

from connector.config import ConfigError
from connector.kafka import SinkError, client_settings
from connector.metrics import NO_METRICS, Metrics
from connector.tanium import TaniumClient, TaniumError
from connector.timeutil import parse_ts
from connector.validation.engine import ValidationEngine, count_verdict
from connector.validation.ledger import FINAL, VerdictLedger, key_partition, known_devices
from connector.validation.rules import JobAction, Rejection, check_start, parse_job_action_bytes
from connector.validation.runners import SystemClock

log = logging.getLogger(__name__)
LEDGER_MARGIN = timedelta(minutes=15)  # clock skew between runners
RETRY_SECONDS = 5.0  # before sending results records again that Kafka did not confirm
FORWARDED = "forwarded-from"  # header of a job action forwarded to its home partition


class _Offsets:
    """Per partition: offsets consumed and not finished; commit point = first unfinished."""

    def __init__(self):
        self.open: set[int] = set()
        self.next: int | None = None
        self.committed: int | None = None

    def consumed(self, offset: int) -> None:
        self.open.add(offset)
        self.next = max(self.next or 0, offset + 1)

    def committable(self) -> int | None:
        return min(self.open) if self.open else self.next


class _Evidence:
    """The matched and suspicious-event records of one action: how many Kafka has not answered yet,
    and those it failed to deliver (sent again before the verdict may go out)."""

    def __init__(self):
        self.lock = threading.Lock()  # delivery outcomes arrive on the producer's I/O thread
        self.pending = 0
        self.failed: list[tuple[str, str | None, dict]] = []

    @property
    def settled(self) -> bool:
        with self.lock:
            return self.pending == 0 and not self.failed


@dataclass
class _Out:
    """A record to publish before a job-action offset may be committed: a results-topic record
    (`verdict`: a verdict or a rejection) or a job action forwarded to its home partition."""

    topic: str
    key: str | None
    value: bytes
    verdict: dict | None = None
    headers: list = field(default_factory=list)


class KafkaValidationRunner:
    """Consumes job actions in a consumer group, judges them, publishes verdicts, commits offsets."""

    def __init__(
        self,
        cfg,
        stop_event: threading.Event,
        metrics: Metrics = NO_METRICS,
        *,
        client=None,
        clock=None,
        consumer_options: dict[str, Any] | None = None,
        poll_ms: int = 500,
        max_open: int = 50000,
    ):
        from kafka import KafkaConsumer

        from connector.stream.sink import KafkaSink

        if cfg.kafka is None:
            raise ConfigError(
                f"{cfg.pipeline.name}: validation mode reads job actions from Kafka; "
                "add a [kafka] section (or use `tanium-connector validate … --job-actions FILE`)"
            )
        self.cfg, self.stop, self.metrics = cfg, stop_event, metrics
        self.v = cfg.validation
        self.clock = clock or SystemClock()
        self.poll_ms, self.max_open = poll_ms, max_open
        known = known_devices(cfg.kafka, self.v.devices_topic) if self.v.discover_network_devices else set()
        self.client = client or TaniumClient(cfg.tanium, metrics)
        self.sink = KafkaSink(cfg.kafka, metrics)
        self.headers = [("pipeline", cfg.pipeline.name.encode())]
        self.engine = ValidationEngine(cfg, self.client, self._publish, metrics=metrics)
        self.engine.remember_devices(known)
        self.ledger = VerdictLedger(cfg.kafka, self.v.results_topic)
        self.offsets: dict[Any, _Offsets] = {}
        self.parked: dict[Any, list] = {}  # revoked, waiting for the new assignment
        self.parked_offsets: dict[Any, _Offsets] = {}
        self.retry: dict[Any, list] = {}  # results records Kafka did not confirm
        self.parked_retry: dict[Any, list] = {}
        self.retry_at = 0.0
        self.failed_sends = 0
        self.evidence: dict[str, _Evidence] = {}  # action id → its event records' delivery state
        self.tanium_ok = True
        self.published: list[dict] = []  # verdicts this runner published (tests, summaries)
        opts = {
            "group_id": self.v.group_id,
            "session_timeout_ms": int(self.v.session_timeout * 1000),
            "heartbeat_interval_ms": int(self.v.session_timeout * 1000 / 3),
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "max_poll_records": 500,
            **(consumer_options or {}),
        }
        self.consumer = KafkaConsumer(**client_settings(cfg.kafka), **opts)
        self.consumer.subscribe([self.v.job_actions_topic], listener=_Listener(self))

    # ---- publishing -------------------------------------------------------------------------
    def _send(self, topic: str, key: str | None, value: bytes, headers: list, on_done) -> None:
        def done(ok: bool, exc: Exception | None) -> None:
            if not ok:
                self.failed_sends += 1
                log.warning("validation record for %s not delivered to %s: %s", key, topic, exc)
            on_done(ok)

        self.sink.send(topic, key.encode() if key else None, value, self.headers + headers, done)

    def _publish(self, topic: str, key: str | None, value: dict) -> None:
        """The engine's outputs: matched / suspicious events (the evidence of action `key`, tracked
        until delivered) and devices (forgotten when not delivered, so published again later)."""
        ev = None
        if key and topic in (self.v.events_topic, self.v.suspicious_topic):
            ev = self.evidence.setdefault(key, _Evidence())
            with ev.lock:
                ev.pending += 1

        def done(ok: bool) -> None:
            if ev is not None:
                with ev.lock:
                    ev.pending -= 1
                    if not ok:
                        ev.failed.append((topic, key, value))
            elif not ok and topic == self.v.devices_topic and key:
                self.engine.forget_device(key)

        self._send(topic, key, orjson.dumps(value), [], done)

    def _deliver(self, outs: list[_Out]) -> list[bool]:
        """Publishes the records and waits for Kafka; ok flag per record."""
        oks = [False] * len(outs)

        def mark(i):
            return lambda ok: oks.__setitem__(i, ok)

        for i, o in enumerate(outs):
            self._send(o.topic, o.key, o.value, o.headers, mark(i))
        self.sink.flush(self.cfg.kafka.delivery_timeout_ms / 1000)
        return oks

    # ---- the loop ---------------------------------------------------------------------------
    def readiness(self) -> tuple[bool, str]:
        if not self.tanium_ok:
            return False, "last Tanium query failed"
        return self.sink.health()

    def run(self) -> int:
        try:
            while not self.stop.is_set():
                wake = self.engine.next_wakeup()
                timeout = self.poll_ms
                if wake is not None:
                    timeout = max(0, min(timeout, int((wake - self.clock.now()).total_seconds() * 1000)))
                self._pause_if_full()
                batch = self.consumer.poll(timeout_ms=timeout)
                finished: list[tuple[Any, int, _Out | None]] = []
                for tp, recs in batch.items():
                    for rec in recs:
                        finished.extend(self._take(tp, rec))
                wake = self.engine.next_wakeup()
                if wake is not None and wake <= self.clock.now():
                    finished.extend(self._tick())
                if self.retry and time.monotonic() >= self.retry_at:
                    finished.extend((tp, off, rec) for tp, items in self.retry.items() for off, rec in items)
                    self.retry = {}
                if finished:
                    self._finish(finished)
                self.metrics.ready.labels(self.metrics.pipeline).set(1 if self.readiness()[0] else 0)
            return 0
        finally:
            self.close()

    def _home(self, action_id: str) -> int | None:
        """The job-actions partition that judges this id (the one a record keyed by it goes to), so
        that copies of an action on several partitions meet one owner; None with one partition."""
        parts = self.consumer.partitions_for_topic(self.v.job_actions_topic)
        return key_partition(action_id, parts) if parts and len(parts) > 1 else None

    def _take(self, tp, rec) -> list:
        self.offsets.setdefault(tp, _Offsets()).consumed(rec.offset)
        item = parse_job_action_bytes(rec.value if rec.value is not None else b"null")
        if isinstance(item, JobAction):
            item = check_start(item, self.clock.now(), self.v.max_clock_skew) or item
        if isinstance(item, Rejection):
            log.warning("job action at %s[%d]@%d rejected: %s", tp.topic, tp.partition, rec.offset, item.reason)
            value = item.record(self.cfg.pipeline.name)
            return [(tp, rec.offset, _Out(self.v.results_topic, item.action_id, orjson.dumps(value), value))]
        home = self._home(item.id)
        forwarded = any(k == FORWARDED for k, _ in rec.headers or ())
        if home is not None and home != tp.partition and not forwarded:  # a forwarded copy stays put
            log.info(
                "job action %s at %s[%d]@%d goes to its home partition %d",
                item.id,
                tp.topic,
                tp.partition,
                rec.offset,
                home,
            )
            origin = [(FORWARDED, f"{tp.partition}@{rec.offset}".encode())]
            return [(tp, rec.offset, _Out(self.v.job_actions_topic, item.id, rec.value, headers=origin))]
        if not self.engine.add(item, tag=(tp, rec.offset, rec.timestamp)):
            log.warning(
                "job action %s at %s[%d]@%d is already open here; the duplicate record is skipped",
                item.id,
                tp.topic,
                tp.partition,
                rec.offset,
            )
            return [(tp, rec.offset, None)]
        return []

    def _tick(self) -> list:
        try:
            verdicts = self.engine.tick(self.clock.now())
            self.tanium_ok = True
        except TaniumError as e:
            self.tanium_ok = False
            log.error("validation query failed, retrying in %.0fs: %s", self.v.query_interval, e.message)
            return []
        out = []
        for v in verdicts:
            tp, offset, _ = self.engine.closed[v["action_id"]]
            out.append((tp, offset, _Out(self.v.results_topic, v["action_id"], orjson.dumps(v), v)))
        return out

    def _already_decided(self, decided: list[tuple[int, dict]]) -> set[int]:
        """Indexes of the verdicts not to publish: a verdict for the same action id is on the results
        topic already, or comes earlier in `decided`. Raises when the results topic cannot be read."""
        skew = timedelta(minutes=self.v.max_clock_skew) + LEDGER_MARGIN
        # a verdict is published after its action was accepted, i.e. at most max_clock_skew before
        # its start (by the clock of the runner that published it: hence the margin)
        since = {v["action_id"]: int((parse_ts(v["started_at"]) - skew).timestamp() * 1000) for _, v in decided}
        already = self.ledger.published(since)
        skip, first = set(), set()
        for i, v in decided:
            aid = v["action_id"]
            if aid in already or aid in first:
                log.info("action %s already has a verdict; not repeating it", aid)
                skip.add(i)
            first.add(aid)
        return skip

    def _settle_evidence(self, action_ids: set[str]) -> set[str]:
        """Waits for the outcome of these actions' event records, sends the failed ones once more,
        and returns the actions whose evidence is still not all delivered."""
        mine = {aid: self.evidence[aid] for aid in action_ids if aid in self.evidence}
        if all(ev.settled for ev in mine.values()):
            return set()
        timeout = self.cfg.kafka.delivery_timeout_ms / 1000
        self.sink.flush(timeout)
        again = []
        for ev in mine.values():
            with ev.lock:
                again += ev.failed
                ev.failed = []
        if again:
            log.warning("%d matched-event records were not delivered; sending them again first", len(again))
            for topic, key, value in again:
                self._publish(topic, key, value)
            self.sink.flush(timeout)
        return {aid for aid, ev in mine.items() if not ev.settled}

    def _finish(self, finished: list) -> None:
        """Publish the records of finished job actions, then mark their offsets finished and commit.
        A verdict goes out only when the results topic has none for its action id yet and all its
        evidence (matched / suspicious events) is delivered; otherwise it is held and retried."""
        from kafka.structs import OffsetAndMetadata

        outs = [(i, o) for i, (_, _, o) in enumerate(finished) if o is not None]
        # detected/missed verdicts (their results-topic key is their action id)
        decided = [(i, o.verdict) for i, o in outs if o.verdict is not None and o.verdict.get("result") in FINAL]
        skip: set[int] = set()
        held: set[int] = set()
        if decided:
            try:
                skip = self._already_decided(decided)
            except Exception as e:  # noqa: BLE001 (any broker trouble: hold them; publishing could repeat one)
                log.warning("cannot check %s for earlier verdicts (%s); holding the verdicts", self.v.results_topic, e)
                held = {i for i, _ in decided}
            for i, v in decided:
                if i in skip:
                    self.evidence.pop(v["action_id"], None)
            unsettled = self._settle_evidence({v["action_id"] for i, v in decided if i not in skip | held})
            held |= {i for i, v in decided if v["action_id"] in unsettled and i not in skip}
        to_send = [(i, o) for i, o in outs if i not in skip | held]
        oks = self._deliver([o for _, o in to_send]) if to_send else []
        failed = held | {i for (i, _), ok in zip(to_send, oks, strict=True) if not ok}
        for (_, o), ok in zip(to_send, oks, strict=True):
            if ok and o.verdict is not None:
                self.evidence.pop(o.key, None)
                self.published.append(o.verdict)
                count_verdict(self.metrics, o.verdict)
        if failed:
            # not delivered (or held): the offsets stay open and the records are tried again later
            log.error(
                "%d records were not confirmed by Kafka (%d verdicts held back); retrying in %.0fs",
                len(failed),
                len(held),
                RETRY_SECONDS,
            )
            for i in failed:
                tp, offset, rec = finished[i]
                self.retry.setdefault(tp, []).append((offset, rec))
            self.retry_at = time.monotonic() + RETRY_SECONDS
        for i, (tp, offset, _) in enumerate(finished):
            if i not in failed and tp in self.offsets:
                self.offsets[tp].open.discard(offset)
        commit = {}
        assigned = self.consumer.assignment()
        for tp, st in self.offsets.items():
            pos = st.committable()
            if tp in assigned and pos is not None and pos != st.committed:
                commit[tp] = OffsetAndMetadata(pos, "", -1)
        if commit:
            try:
                self.consumer.commit(commit)
                for tp, om in commit.items():
                    self.offsets[tp].committed = om.offset
            except Exception as e:  # noqa: BLE001 (a rebalance in between: the next owner re-checks)
                log.warning("offset commit failed (%s); the results topic check prevents repeats", e)

    def _pause_if_full(self) -> None:
        assigned = self.consumer.assignment()
        if len(self.engine.open) >= self.max_open:
            self.consumer.pause(*assigned)
        elif self.consumer.paused():
            self.consumer.resume(*self.consumer.paused())

    def revoked(self, partitions) -> None:
        """Eager rebalance: park the partitions' actions; `assigned` restores those that come back
        (the consumer keeps their positions, so their records are not delivered again)."""
        gone = set(partitions)
        for st in self.engine.take(lambda st: st.tag is not None and st.tag[0] in gone):
            self.parked.setdefault(st.tag[0], []).append(st)
        for tp in gone:
            if tp in self.offsets:
                self.parked_offsets[tp] = self.offsets.pop(tp)
            if tp in self.retry:
                self.parked_retry[tp] = self.retry.pop(tp)

    def assigned(self, partitions) -> None:
        back = set(partitions)
        handed: list[str] = []
        for tp, states in self.parked.items():
            if tp in back:
                self.engine.restore(states)
            else:
                handed.extend(st.action.id for st in states)
        for tp, offs in self.parked_offsets.items():
            if tp in back:
                self.offsets[tp] = offs
        for tp, items in self.parked_retry.items():
            if tp in back:
                self.retry[tp] = items
            else:
                handed.extend(o.key for _, o in items if o is not None and o.key)
        self.parked, self.parked_offsets, self.parked_retry = {}, {}, {}
        for aid in handed:  # the new owner judges them again, evidence included
            self.evidence.pop(aid, None)
        if handed:
            log.info("%d unfinished actions handed over to another runner: %s", len(handed), ", ".join(handed[:20]))

    def lost(self, partitions) -> None:
        """Removed from the group: the partitions restart from their committed offsets wherever
        they go next (here too), so their actions are forgotten, not parked."""
        gone = set(partitions)
        dropped = self.engine.take(lambda st: st.tag is not None and st.tag[0] in gone)
        for st in dropped:
            self.evidence.pop(st.action.id, None)
        for tp in gone:
            self.offsets.pop(tp, None)
            self.retry.pop(tp, None)
        if dropped:
            log.warning(
                "lost partitions %s (session expired); %d unfinished actions dropped",
                sorted(f"{tp.topic}[{tp.partition}]" for tp in gone),
                len(dropped),
            )

    def close(self) -> None:
        try:
            self.consumer.close()  # leaves the group: the other runners take over at once
        except Exception as e:  # noqa: BLE001
            log.warning("closing the job-action consumer: %s", e)
        self.ledger.close()
        self.sink.close(self.cfg.pipeline.shutdown_timeout)
        if self.engine.enricher is not None:
            self.engine.enricher.close()
        self.client.close()


class _Listener(ConsumerRebalanceListener):
    """kafka-python rebalance listener (sync: it only updates local state, no broker calls, since
    sync listeners run on the consumer's event loop)."""

    def __init__(self, runner: KafkaValidationRunner):
        self.runner = runner

    def on_partitions_revoked(self, revoked) -> None:
        self.runner.revoked(revoked)

    def on_partitions_lost(self, lost) -> None:
        self.runner.lost(lost)

    def on_partitions_assigned(self, assigned) -> None:
        self.runner.assigned(assigned)
        log.info("job-action partitions assigned: %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))


def run_validation(cfg, stop_event: threading.Event, metrics: Metrics = NO_METRICS, serve=None, **kw) -> int:
    """`tanium-connector run PIPELINE` for mode = "validation": runs until stop_event is set.
    `serve(readiness)` starts the health listener once the runner exists. Exit code 0 after a
    stop, 1 when Kafka cannot be used at start."""
    from kafka.errors import KafkaError

    try:
        runner = KafkaValidationRunner(cfg, stop_event, metrics, **kw)
    except (SinkError, KafkaError) as e:
        print(
            f"error: validation mode cannot use Kafka at {', '.join(cfg.kafka.bootstrap_servers)}: {e}", file=sys.stderr
        )
        return 1
    if serve:
        serve(runner.readiness)
    return runner.run()
