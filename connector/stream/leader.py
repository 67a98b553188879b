"""HA poller: which of several processes running the same stream pipeline polls Tanium.

Every process joins one Kafka consumer group on a single-partition coordination topic
(`<state topic>.leader`); the member the group assigns partition 0 is the leader, the others
stand by. When the leader dies, the group coordinator drops it after `ha.session_timeout_ms`
without heartbeats and gives partition 0 to a standby, which resumes from the shared Kafka
checkpoint. Nothing is ever written to or read from the coordination topic: only membership
matters.

A leader steps down at once when the group takes the partition away (revoked or lost), and on
its own when its lease runs out (`Lease`): the coordinator cannot have given partition 0 to
anyone else before `session_timeout_ms` after the last request of ours it answered (counted from
when we sent it), nor, while a rebalance runs, before the rebalance timeout (kafka-python's
`max_poll_interval_ms`) counted from the last answer that showed the group settled. The leader
steps down `heartbeat_interval_ms` before the earlier of the two, whatever the member's state
(joining, syncing or stable): a leader cut off from the coordinator, even in mid-rebalance, stops
before another can start. `safe_until()` tells the pipeline how long it may still finish up after
stepping down (flush, checkpoint).

Takeover after the leader dies: the coordinator drops it `session_timeout_ms` after its last
heartbeat, a standby hears of the rebalance at its next heartbeat (`heartbeat_interval_ms`) and
joins; tests/integration/test_ha.py bounds kill -9 → new leader polling.
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
from kafka.errors import KafkaError, RebalanceInProgressError, TopicAlreadyExistsError

from connector.config import KafkaSection
from connector.kafka import client_settings, describe_servers
from connector.metrics import NO_METRICS, Metrics

log = logging.getLogger(__name__)


class LeaderError(Exception):
    """The election cannot work (Kafka unreachable, topic unusable); str() is for the user."""


def leader_topic(state_topic: str) -> str:
    return f"{state_topic}.leader"


def group_id(pipeline: str) -> str:
    return f"tanium-connector.{pipeline}.leader"


def rebalance_timeout_ms(session_timeout_ms: int) -> int:
    """The group's rebalance timeout (kafka-python's max_poll_interval_ms): how long the coordinator
    waits for members to rejoin. Twice the session, so that a rebalance slowed by a dead member
    (dropped after a session) does not run a healthy leader's lease out; the poll loop runs every
    200 ms, so it never trips the poll timeout that the same setting also is."""
    return max(2 * session_timeout_ms, 10000)


class Lease:
    """Whether this member may act as leader, from what the group coordinator has answered it.

    Pure (times are passed in, seconds on a monotonic clock), so that tests/unit/test_lease_model.py
    checks it against a model of the coordinator. The coordinator (classic group protocol) hands
    partition 0 to another member only after dropping its holder, and drops a member only when
    `session_ms` passed since it last heard from it (heartbeat, JoinGroup, SyncGroup), or, in a
    rebalance the member has not rejoined, `rebalance_ms` after the rebalance began. A request it
    answered was heard no earlier than it was sent; a rebalance still running began no earlier
    than the last answer that showed the group settled (a heartbeat answered without error, a
    JoinGroup or SyncGroup completed). Hence nobody else holds partition 0 before

        expiry = min(last answered request's send time + session,
                     last settling answer's request send time + rebalance)

    and the member leads while it holds partition 0 and now < expiry - margin; the margin
    (`heartbeat_interval_ms`) covers noticing the expiry and stopping.
    """

    def __init__(self, session_ms: int, rebalance_ms: int, margin_ms: int):
        self.session, self.rebalance, self.margin = session_ms / 1000, rebalance_ms / 1000, margin_ms / 1000
        self.holds = False  # partition 0 is ours in the last assignment we heard of
        self.heard = float("-inf")  # send time of the latest request the coordinator answered
        self.settled = float("-inf")  # send time of the latest request answered with "no rebalance running"

    def answered(self, sent_at: float, settled: bool) -> None:
        """The coordinator answered a request sent at `sent_at` as to a member of the group;
        `settled`: the answer also says no rebalance that began before it is still running."""
        self.heard = max(self.heard, sent_at)
        if settled:
            self.settled = max(self.settled, sent_at)

    def assigned(self) -> None:
        self.holds = True

    def revoked(self) -> None:
        """Partition 0 taken away, or lost with our membership."""
        self.holds = False

    def expiry(self) -> float:
        return min(self.heard + self.session, self.settled + self.rebalance)

    def leads(self, now: float) -> bool:
        return self.holds and now < self.expiry() - self.margin

    def safe_until(self) -> float:
        """Until when no other member can hold partition 0 (-inf once it was taken away)."""
        return self.expiry() if self.holds else float("-inf")


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
        metrics: Metrics = NO_METRICS,
        on_change: Callable[[bool], None] | None = None,
    ):
        self.kafka, self.topic, self.group = kafka, topic, group
        self.session_timeout_ms = session_timeout_ms
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.on_change = on_change
        self.gauge = metrics.ha_leader.labels(metrics.pipeline)
        self.gauge.set(0)
        self.lease = Lease(session_timeout_ms, rebalance_timeout_ms(session_timeout_ms), heartbeat_interval_ms)
        self._leader = threading.Event()
        self._closing = threading.Event()
        self._lock = threading.Lock()  # the lease (fed on kafka-python's threads) and leadership changes
        self._consumer: KafkaConsumer | None = None
        self._thread: threading.Thread | None = None
        self.terms = 0  # times this process became leader
        self.joined = threading.Event()  # set once this member has synced with a group (has an assignment)
        self.error: str | None = None

    # -- public ------------------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self._leader.is_set()

    def wait_leader(self, timeout: float | None = None) -> bool:
        return self._leader.wait(timeout)

    def safe_until(self) -> float:
        """Monotonic time until which no other process can be the leader (see Lease)."""
        with self._lock:
            return self.lease.safe_until()

    def start(self) -> LeaderElection:
        self._ensure_topic()
        try:
            self._consumer = KafkaConsumer(
                **client_settings(self.kafka),
                group_id=self.group,
                enable_auto_commit=False,
                session_timeout_ms=self.session_timeout_ms,
                heartbeat_interval_ms=self.heartbeat_interval_ms,
                max_poll_interval_ms=rebalance_timeout_ms(self.session_timeout_ms),
                request_timeout_ms=max(30000, self.session_timeout_ms + 5000),
                # cooperative + sticky: a standby joining or leaving does not take partition 0
                # away from the leader (an eager rebalance would stop it each time)
                partition_assignment_strategy=(CooperativeStickyAssignor,),
            )
            self._watch(self._consumer._coordinator)
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

    def _watch(self, coordinator) -> None:
        """Feeds the lease with every answer of the group coordinator, timed by when its request was
        sent: kafka-python (pinned, 3.0.x) hands each response with its send time to these three
        methods, on its own thread. A JoinGroup or SyncGroup that succeeded settles the group, and
        a heartbeat answered without error shows it settled; REBALANCE_IN_PROGRESS still proves
        membership."""

        def timed(handle, on_success=None):
            def answer(response, send_time):
                try:
                    result = handle(response, send_time)
                except RebalanceInProgressError:
                    self._answered(send_time, settled=False)
                    raise
                self._answered(send_time, settled=True)
                if on_success is not None:
                    on_success()
                return result

            return answer

        coordinator._handle_heartbeat_response = timed(coordinator._handle_heartbeat_response)
        coordinator._process_join_group_response = timed(coordinator._process_join_group_response)
        coordinator._process_sync_group_response = timed(coordinator._process_sync_group_response, self._synced)

    def _synced(self) -> None:
        if not self.joined.is_set():
            log.info("HA: joined group %s", self.group)
            self.joined.set()

    def _answered(self, sent_at: float, settled: bool) -> None:
        with self._lock:
            self.lease.answered(sent_at, settled)

    def _loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None, "start() creates the consumer before the loop runs"
        try:
            while not self._closing.is_set():
                try:
                    consumer.poll(timeout_ms=200)
                except KafkaError as e:  # the coordinator moved or is unreachable: keep trying
                    log.warning("HA group %s: %s", self.group, e)
                    self._closing.wait(0.5)
                self._decide()
        finally:
            self._set(False)
            try:
                consumer.close()  # leaves the group: a standby takes over at once
            except Exception as e:  # noqa: BLE001 (closing on the way out; nothing to save)
                log.debug("closing the HA consumer: %s", e)

    def _decide(self) -> None:
        """Leader exactly while the lease says so: steps down when it runs out, and takes the lead
        up again when the coordinator answers in time while partition 0 is still ours."""
        with self._lock:
            leads, holds = self.lease.leads(time.monotonic()), self.lease.holds
        if self._closing.is_set():
            return
        if self.is_leader and holds and not leads:
            log.warning(
                "HA: the group coordinator did not answer in time (session %d ms, heartbeat %d ms); "
                "stepping down before the group can give the lead to another process",
                self.session_timeout_ms,
                self.heartbeat_interval_ms,
            )
        self._set(leads)

    def _assigned(self, partitions) -> None:
        if TopicPartition(self.topic, 0) in set(partitions):
            with self._lock:
                self.lease.assigned()
            self._decide()

    def _revoked(self, partitions) -> None:
        if TopicPartition(self.topic, 0) in set(partitions):
            with self._lock:
                self.lease.revoked()
            self._set(False)

    def _set(self, leader: bool) -> None:
        with self._lock:
            if leader == self._leader.is_set():
                return
            if leader:
                self.terms += 1  # before the event: a waiter sees the new term's number
                self._leader.set()
            else:
                self._leader.clear()
        log.info("HA: this process is %s for group %s", "the LEADER (polling)" if leader else "standing by", self.group)
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
