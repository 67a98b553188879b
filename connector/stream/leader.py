"""Which process polls a pipeline: the HA poller (`[ha]`) and the fleet (`[fleet]`).

Every process joins a Kafka consumer group on one single-partition coordination topic per pipeline
(`<state topic>.leader` for `[ha]`, whose group is the pipeline's own; `<state topic>.leader.<name>`
for each pipeline of a fleet, whose group is the fleet's); the member the group assigns a topic's
partition 0 is that pipeline's leader, the others stand by. One process has one group member per
group (GroupMember: one consumer, one heartbeat) and one LeaderElection, with its own Lease, per
pipeline. A pipeline only some workers of a fleet were given (their files differ, as in a roll-out)
is refused: the fleet's assignor (FleetAssignor) assigns as cooperative sticky does and tells every
member which pipelines not every member subscribes to; the member holding such a pipeline does not
lead it, and says so, until every worker has it. Only the lead is withheld: the assignment stays
what cooperative sticky makes it, so a refusal moves no partition and costs no rebalance. When a
leader dies, the group coordinator drops it after `session_timeout_ms` without heartbeats and gives
its partitions to the others, which resume from the shared Kafka checkpoint. Nothing is ever
written to or read from a coordination topic: only membership matters.

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
joins; tests/integration/test_ha.py and test_fleet.py bound kill -9 → new leader polling.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

from kafka import (
    ConsumerRebalanceListener,
    KafkaAdminClient,
    KafkaConsumer,
)
from kafka.admin import NewTopic
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.errors import KafkaError, RebalanceInProgressError, TopicAlreadyExistsError

from connector.config import KafkaSection
from connector.kafka import client_settings, describe_servers
from connector.metrics import NO_METRICS, WORKER, Metrics

log = logging.getLogger(__name__)


class LeaderError(Exception):
    """The election cannot work (Kafka unreachable, topic unusable); str() is for the user."""


def leader_topic(state_topic: str) -> str:
    return f"{state_topic}.leader"


def group_id(pipeline: str) -> str:
    return f"tanium-connector.{pipeline}.leader"


def fleet_group(group_id: str) -> str:
    return f"tanium-connector.fleet.{group_id}"


def fleet_topic(state_topic: str, pipeline: str) -> str:
    """A fleet pipeline's coordination topic: one per pipeline, so a worker that was not given a
    pipeline never subscribes to it and the group can only assign it among the workers that run it."""
    return f"{state_topic}.leader.{pipeline}"


def group_member(cfg, metrics: Metrics = NO_METRICS) -> GroupMember:
    """The group member for a fleet pipeline's `[fleet]` section (shared by a process's pipelines
    of the same fleet)."""
    f = cfg.fleet
    return GroupMember(
        cfg.kafka,
        fleet_group(f.group_id),
        session_timeout_ms=f.session_timeout_ms,
        heartbeat_interval_ms=f.heartbeat_interval_ms,
        metrics=metrics,
        fleet=True,
    )


def election_for(cfg, metrics, on_change, member: GroupMember | None = None) -> LeaderElection:
    """The election of a stream pipeline with `[ha]` (a group of its own) or `[fleet]` (the
    fleet's group, through `member` when the process shares one)."""
    if cfg.fleet is None:
        h = cfg.ha
        return LeaderElection(
            cfg.kafka,
            leader_topic(cfg.state.topic),
            group_id(cfg.pipeline.name),
            session_timeout_ms=h.session_timeout_ms,
            heartbeat_interval_ms=h.heartbeat_interval_ms,
            metrics=metrics,
            on_change=on_change,
        )
    member = member or group_member(cfg, metrics)
    topic = fleet_topic(cfg.state.topic, cfg.pipeline.name)
    return LeaderElection(cfg.kafka, topic, member.group, member=member, metrics=metrics, on_change=on_change)


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


class FleetAssignor(CooperativeStickyAssignor):
    """Cooperative sticky assignment, plus the pipelines not every member subscribes to (their
    pipeline files differ, e.g. in the middle of a ConfigMap roll-out) in every member's assignment
    (its user data): the member that is assigned one does not run it. Assigning them anyway keeps
    the assignment itself what cooperative sticky makes it, so refusing moves no partition."""

    name = "tanium-fleet"

    def __init__(self, member: GroupMember):
        super().__init__()
        self.member = member

    def assign(self, cluster, members):
        topics = [set(self.parse_member_metadata(m.metadata).subscription) for m in members]
        refused = sorted(set().union(*topics) - set.intersection(*topics)) if topics else []
        out = super().assign(cluster, members)
        for assignment in out.values():
            assignment.user_data = json.dumps(refused).encode() if refused else b""
        return out

    def on_assignment(self, assignment, generation):
        super().on_assignment(assignment, generation)
        self.member.refuse(set(json.loads(assignment.user_data)) if assignment.user_data else set())


class GroupMember:
    """One member of a Kafka consumer group, subscribed to one coordination topic per pipeline it may
    run; the member the group assigns a topic's partition 0 runs that pipeline. `[ha]` has one
    pipeline per group; the pipelines of a `[fleet]` share one group, and the pipelines of one
    process share one member (one consumer, one heartbeat). Each pipeline's LeaderElection holds
    its own Lease; the member feeds every lease with the coordinator's answers."""

    def __init__(
        self,
        kafka: KafkaSection,
        group: str,
        *,
        session_timeout_ms: int = 10000,
        heartbeat_interval_ms: int = 3000,
        metrics: Metrics = NO_METRICS,
        fleet: bool = False,
    ):
        self.kafka, self.group, self.fleet = kafka, group, fleet
        self.refused: set[str] = set()  # coordination topics the fleet's assignment refuses
        self.session_timeout_ms = session_timeout_ms
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.metrics = metrics
        self.elections: dict[str, LeaderElection] = {}  # by coordination topic
        self.joined = threading.Event()  # set once this member has synced with a group (has an assignment)
        self.rebalances = 0
        self._closing = threading.Event()
        self._start_lock = threading.Lock()
        self._started = False
        self._error: LeaderError | None = None
        self._open = 0  # elections started and not closed: the member leaves the group with the last
        self._consumer: KafkaConsumer | None = None
        self._thread: threading.Thread | None = None

    def add(self, election: LeaderElection) -> None:
        if self._started:
            raise RuntimeError("every pipeline joins the member before it starts")
        self.elections[election.topic] = election

    def start(self) -> None:
        """Joins the group (once, for every election of this member); raises LeaderError."""
        with self._start_lock:
            self._open += 1
            if self._error is not None:
                raise self._error
            if self._started:
                return
            try:
                self._join()
            except LeaderError as e:
                self._error = e
                raise
            self._started = True

    def release(self) -> None:
        """One election is done; the last one out leaves the group (a standby takes over at once)."""
        with self._start_lock:
            self._open -= 1
            last = self._open <= 0
        if last:
            self._closing.set()
            if self._thread is not None:
                self._thread.join(10)

    def _join(self) -> None:
        self._ensure_topics()
        try:
            self._consumer = KafkaConsumer(
                **client_settings(self.kafka),
                group_id=self.group,
                enable_auto_commit=False,
                session_timeout_ms=self.session_timeout_ms,
                heartbeat_interval_ms=self.heartbeat_interval_ms,
                max_poll_interval_ms=rebalance_timeout_ms(self.session_timeout_ms),
                request_timeout_ms=max(30000, self.session_timeout_ms + 5000),
                # cooperative + sticky: a member joining or leaving does not take a pipeline away
                # from the member running it, unless the group moves it to balance the load. A fleet
                # also offers plain cooperative sticky, which the group agrees on while a worker of a
                # release without FleetAssignor is a member (a rolling upgrade): no refusals meanwhile
                partition_assignment_strategy=(
                    (FleetAssignor(self), CooperativeStickyAssignor) if self.fleet else (CooperativeStickyAssignor,)
                ),
            )
            self._watch(self._consumer._coordinator)
            self._consumer.subscribe(sorted(self.elections), listener=_Listener(self))
        except KafkaError as e:
            raise LeaderError(f"cannot join the group {self.group!r} on {describe_servers(self.kafka)}: {e}") from None
        self._thread = threading.Thread(target=self._loop, name="group-member", daemon=True)
        self._thread.start()

    def _ensure_topics(self) -> None:
        try:
            admin = KafkaAdminClient(**client_settings(self.kafka), request_timeout_ms=30000)
        except (KafkaError, OSError) as e:
            raise LeaderError(
                f"cannot reach Kafka at {describe_servers(self.kafka)} for the group {self.group!r}: {e}"
            ) from None
        try:
            existing = set(admin.list_topics())
            missing = [t for t in sorted(self.elections) if t not in existing]
            if missing:
                brokers = len(admin.describe_cluster().get("brokers") or []) or 1
                try:
                    admin.create_topics([NewTopic(t, 1, min(3, brokers)) for t in missing])
                    log.info("created coordination topics %s", ", ".join(missing))
                except TopicAlreadyExistsError:
                    pass  # another member created them first
        except KafkaError as e:
            raise LeaderError(f"cannot create the coordination topics of group {self.group!r}: {e}") from None
        finally:
            admin.close()

    def _watch(self, coordinator) -> None:
        """Feeds the leases with every answer of the group coordinator, timed by when its request
        was sent: kafka-python (pinned, 3.0.x) hands each response with its send time to these three
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
        for e in self.elections.values():
            e.answered(sent_at, settled)

    def _loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None, "_join creates the consumer before the loop runs"
        try:
            while not self._closing.is_set():
                try:
                    consumer.poll(timeout_ms=200)
                except KafkaError as err:  # the coordinator moved or is unreachable: keep trying
                    log.warning("group %s: %s", self.group, err)
                    self._closing.wait(0.5)
                for e in self.elections.values():
                    e.decide()
        finally:
            for e in self.elections.values():
                e.set(False)
            try:
                consumer.close()  # leaves the group: another member takes over at once
            except Exception as err:  # noqa: BLE001 (closing on the way out; nothing to save)
                log.debug("closing the group consumer: %s", err)

    def refuse(self, topics: set[str]) -> None:
        """The fleet's assignment refuses these pipelines' topics (not every worker has them)."""
        mine = {t for t in topics if t in self.elections}
        for t in sorted(mine - self.refused):
            log.error(
                "fleet group %s: pipeline %s is refused: not every worker of the fleet was given it (their "
                "pipeline files differ); no worker runs it until every worker has it",
                self.group,
                self.elections[t].pipeline,
            )
        for t in sorted(self.refused - mine):
            log.info("fleet group %s: every worker has pipeline %s now", self.group, self.elections[t].pipeline)
        self.refused = mine
        for t, e in self.elections.items():
            e.refused = t in mine
            e.decide()
        self._observe()

    def _assigned(self, partitions) -> None:
        """Called once per completed rebalance (with the partitions added, maybe none)."""
        for tp in partitions:
            e = self.elections.get(tp.topic)
            if e is not None and tp.partition == 0:
                e.assigned()
        self._observe(rebalanced=True)

    def _revoked(self, partitions) -> None:
        for tp in partitions:
            e = self.elections.get(tp.topic)
            if e is not None and tp.partition == 0:
                e.revoked()
        self._observe()

    def _observe(self, rebalanced: bool = False) -> None:
        if rebalanced:
            self.rebalances += 1
        m = self.metrics
        held = sum(1 for e in self.elections.values() if e.lease.holds and not e.refused)
        m.fleet_pipelines.labels(self.group, WORKER).set(held)
        if rebalanced:
            m.fleet_rebalances.labels(self.group, WORKER).inc()
            m.fleet_last_rebalance.labels(self.group, WORKER).set_to_current_time()


class LeaderElection:
    """One pipeline's election: `start()`, then `is_leader` / `wait_leader(timeout)`;
    `on_change(leader: bool)` is called on the member's thread at every change (keep it short);
    `close()` leaves the group (with the member's last election) so a standby takes over without
    waiting for the session timeout. `member`: a GroupMember shared with the other pipelines of this
    process (its timeouts apply); without one, the election has a member of its own."""

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
        member: GroupMember | None = None,
    ):
        self.member = member or GroupMember(
            kafka,
            group,
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=heartbeat_interval_ms,
            metrics=metrics,
        )
        self.topic, self.group = topic, self.member.group
        self.pipeline = metrics.pipeline or topic
        self.session_timeout_ms = self.member.session_timeout_ms
        self.heartbeat_interval_ms = self.member.heartbeat_interval_ms
        self.on_change = on_change
        self.gauge = metrics.ha_leader.labels(metrics.pipeline)
        self.gauge.set(0)
        self.owner = metrics.fleet_owner.labels(metrics.pipeline, WORKER)
        self.owner.set(0)
        s, hb = self.session_timeout_ms, self.heartbeat_interval_ms
        self.lease = Lease(s, rebalance_timeout_ms(s), hb)
        self._leader = threading.Event()
        self._closing = threading.Event()
        self._lock = threading.Lock()  # the lease (fed on kafka-python's threads) and leadership changes
        self.terms = 0  # times this process became leader
        self.refused = False  # set by the member: the fleet refuses this pipeline (FleetAssignor)
        self.joined = self.member.joined
        self.member.add(self)

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
        self.member.start()
        return self

    def close(self, timeout: float = 10) -> None:
        if self._closing.is_set():
            return
        self._closing.set()
        self.set(False)
        self.member.release()

    # -- fed by the member -------------------------------------------------------------------

    def answered(self, sent_at: float, settled: bool) -> None:
        with self._lock:
            self.lease.answered(sent_at, settled)

    def decide(self) -> None:
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
        self.set(leads and not self.refused)

    def assigned(self) -> None:
        with self._lock:
            self.lease.assigned()
        self.decide()

    def revoked(self) -> None:
        with self._lock:
            self.lease.revoked()
        self.set(False)

    def set(self, leader: bool) -> None:
        with self._lock:
            if leader == self._leader.is_set():
                return
            if leader:
                self.terms += 1  # before the event: a waiter sees the new term's number
                self._leader.set()
            else:
                self._leader.clear()
        log.info(
            "HA: this process is %s for %s in group %s",
            "the LEADER (polling)" if leader else "standing by",
            self.topic,
            self.group,
        )
        self.gauge.set(1 if leader else 0)
        self.owner.set(1 if leader else 0)
        if self.on_change is not None:
            try:
                self.on_change(leader)
            except Exception:
                log.exception("HA leadership callback failed")


class _Listener(ConsumerRebalanceListener):
    def __init__(self, member: GroupMember):
        self.member = member

    def on_partitions_revoked(self, revoked):
        self.member._revoked(revoked)

    def on_partitions_assigned(self, assigned):
        self.member._assigned(assigned)

    def on_partitions_lost(self, lost):
        self.member._revoked(lost)
