"""HA poller: which of several processes running the same stream pipeline polls Tanium.

Every process joins one Kafka consumer group on a single-partition coordination topic
(`<state topic>.leader`); the member the group assigns partition 0 is the leader, the others
stand by. When the leader dies, the group coordinator drops it after `ha.session_timeout_ms`
without heartbeats and gives partition 0 to a standby, which resumes from the shared Kafka
checkpoint. Nothing is ever written to or read from the coordination topic: only membership
matters.

A leader steps down at once when the group takes the partition away (revoked or lost), and on
its own when no heartbeat answer came for `session_timeout_ms - heartbeat_interval_ms`: by then
the coordinator may be about to hand the partition to someone else, and the leader may not
hear of it (a partitioned network). That lease check reads kafka-python's heartbeat clock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from kafka import (
    ConsumerRebalanceListener,
    KafkaAdminClient,
    KafkaConsumer,
    TopicPartition,
)
from kafka.admin import NewTopic
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.structs import MemberState

from connector.config import KafkaSection
from connector.kafka import client_settings, describe_servers

log = logging.getLogger(__name__)


class LeaderError(Exception):
    """The election cannot work (Kafka unreachable, topic unusable); str() is for the user."""


def leader_topic(state_topic: str) -> str:
    return f"{state_topic}.leader"


def group_id(pipeline: str) -> str:
    return f"tanium-connector.{pipeline}.leader"


class LeaderElection:
    """`start()`, then `is_leader` / `wait_leader(timeout)`; `on_change(leader: bool)` is called
    on the election thread at every change (keep it short); `close()` leaves the group so a
    standby takes over without waiting for the session timeout."""

    def __init__(
        self,
        kafka: KafkaSection,
        topic: str,
        group: str,
        *,
        session_timeout_ms: int = 10000,
        heartbeat_interval_ms: int = 3000,
        metrics=None,
        on_change: Callable[[bool], None] | None = None,
    ):
        self.kafka, self.topic, self.group = kafka, topic, group
        self.session_timeout_ms = session_timeout_ms
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.on_change = on_change
        self.gauge = metrics.ha_leader.labels(metrics.pipeline) if metrics else None
        if self.gauge is not None:
            self.gauge.set(0)
        self._leader = threading.Event()
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._consumer: KafkaConsumer | None = None
        self._thread: threading.Thread | None = None
        self.terms = 0  # times this process became leader
        self.joined = threading.Event()  # set once this member is in a stable group
        self.error: str | None = None

    # -- public ------------------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self._leader.is_set()

    def wait_leader(self, timeout: float | None = None) -> bool:
        return self._leader.wait(timeout)

    def start(self) -> LeaderElection:
        self._ensure_topic()
        try:
            self._consumer = KafkaConsumer(
                **client_settings(self.kafka),
                group_id=self.group,
                enable_auto_commit=False,
                session_timeout_ms=self.session_timeout_ms,
                heartbeat_interval_ms=self.heartbeat_interval_ms,
                # the poll loop below runs every 200 ms, so a stuck member is noticed quickly too
                max_poll_interval_ms=max(self.session_timeout_ms, 10000),
                request_timeout_ms=max(30000, self.session_timeout_ms + 5000),
                # cooperative + sticky: a standby joining or leaving does not take partition 0
                # away from the leader (an eager rebalance would stop it each time)
                partition_assignment_strategy=(CooperativeStickyAssignor,),
            )
            self._consumer.subscribe([self.topic], listener=_Listener(self))
        except KafkaError as e:
            raise LeaderError(
                f"cannot join the HA group {self.group!r} on {describe_servers(self.kafka)}: {e}"
            ) from None
        self._thread = threading.Thread(target=self._loop, name="ha-election", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 10) -> None:
        self._closing.set()
        self._set(False)
        if self._thread is not None:
            self._thread.join(timeout)

    # -- internals ---------------------------------------------------------------------------

    def _ensure_topic(self) -> None:
        try:
            admin = KafkaAdminClient(**client_settings(self.kafka), request_timeout_ms=30000)
        except (KafkaError, OSError) as e:
            raise LeaderError(
                f"cannot reach Kafka at {describe_servers(self.kafka)} for the HA election: {e}"
            ) from None
        try:
            brokers = len(admin.describe_cluster().get("brokers") or []) or 1
            admin.create_topics([NewTopic(self.topic, 1, min(3, brokers))])
            log.info("created HA coordination topic %s", self.topic)
        except TopicAlreadyExistsError:
            pass
        except KafkaError as e:
            raise LeaderError(f"cannot create the HA coordination topic {self.topic}: {e}") from None
        finally:
            admin.close()

    def _loop(self) -> None:
        consumer = self._consumer
        try:
            while not self._closing.is_set():
                try:
                    consumer.poll(timeout_ms=200)
                except KafkaError as e:  # the coordinator moved or is unreachable: keep trying
                    log.warning("HA group %s: %s", self.group, e)
                    self._closing.wait(0.5)
                self._check_lease()
        finally:
            self._set(False)
            try:
                consumer.close()  # leaves the group: a standby takes over at once
            except Exception as e:  # noqa: BLE001 (closing on the way out; nothing to save)
                log.debug("closing the HA consumer: %s", e)

    def _check_lease(self) -> None:
        coordinator = getattr(self._consumer, "_coordinator", None)
        last = getattr(getattr(coordinator, "heartbeat", None), "last_receive", None)
        state = getattr(coordinator, "state", None)
        if not isinstance(last, (int, float)) or state is None:
            return  # no clock to read (another kafka-python version): rely on the group alone
        now = time.monotonic()
        if state != MemberState.STABLE:
            # joining or syncing: heartbeats pause, and the coordinator keeps the member (and
            # its partition, cooperative protocol) while the rebalance runs; the lease restarts after
            self._since = now
            return
        self.joined.set()
        if self.is_leader and (now - max(last, self._since)) * 1000 >= self._lease_ms():
            log.warning(
                "HA: no heartbeat answer for %d ms; stepping down before the group can give "
                "the lead to another process",
                self._lease_ms(),
            )
            self._lapsed_at = now
            self._set(False)
        elif (
            not self.is_leader
            and self._lapsed_at is not None
            and last > self._lapsed_at
            and TopicPartition(self.topic, 0) in self._consumer.assignment()
        ):
            # the coordinator answered again and we are still the member holding partition 0
            # (an eviction would have come back as "lost"): the lead is still ours
            self._lapsed_at = None
            self._since = now
            self._set(True)

    def _lease_ms(self) -> int:
        return self.session_timeout_ms - self.heartbeat_interval_ms

    _since = 0.0  # start of the current term: the lease runs from here or the last heartbeat answer
    _lapsed_at: float | None = None

    def _assigned(self, partitions) -> None:
        if TopicPartition(self.topic, 0) in set(partitions):
            self._since = time.monotonic()
            self._lapsed_at = None
            self._set(True)

    def _revoked(self, partitions) -> None:
        if TopicPartition(self.topic, 0) in set(partitions):
            self._lapsed_at = None
            self._set(False)

    def _set(self, leader: bool) -> None:
        with self._lock:
            if leader == self._leader.is_set():
                return
            if leader:
                self._leader.set()
                self.terms += 1
            else:
                self._leader.clear()
        log.info("HA: this process is %s for group %s", "the LEADER (polling)" if leader else "standing by", self.group)
        if self.gauge is not None:
            self.gauge.set(1 if leader else 0)
        if self.on_change is not None:
            try:
                self.on_change(leader)
            except Exception:
                log.exception("HA leadership callback failed")


class _Listener(ConsumerRebalanceListener):
    def __init__(self, election: LeaderElection):
        self.election = election

    def on_partitions_revoked(self, revoked):
        self.election._revoked(revoked)

    def on_partitions_assigned(self, assigned):
        self.election._assigned(assigned)

    def on_partitions_lost(self, lost):
        self.election._revoked(lost)
