"""terms: HA, the part of StreamPipeline that runs one term of polling and publishing per election
won (a mixin: it works on the pipeline's election, sink, session and store).

HA (`ha.enabled`): the pipeline polls only while connector/stream/leader.py says this process is the
leader; on losing the lead it stops the source and the sink at once and stands by again. Each
term starts from the shared Kafka checkpoint, and ends before another process can lead: with
at-least-once delivery the records already handed to Kafka get their answers and the checkpoint
moves past them within the lease's margin, so the next leader re-reads at most what was still in
flight; with exactly-once delivery no page commits after the step-down.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from connector.stream.checkpoint import CheckpointError
from connector.stream.leader import LeaderError

log = logging.getLogger("connector.stream.pipeline")

# an HA leader that steps down stops flushing this long before another process may lead, so that
# the checkpoint it then writes is in Kafka before the next leader reads it
STEP_DOWN_RESERVE = 0.25


class Terms:
    """HA terms for StreamPipeline."""

    # what the pipeline provides (set in StreamPipeline.__init__)
    cfg: Any
    sink: Any
    session: Any
    election: Any
    summary: Any
    fenced: Any
    exactly_once: bool
    term: int
    stop_event: threading.Event
    _active: Callable[[], bool]
    _report_ready: Callable[[], None]
    _open_sink: Callable[[], Any]
    _term: Callable[[], bool]
    _commit: Callable[..., None]

    def _run_ha(self) -> None:
        try:
            self.election.start()
        except LeaderError as e:
            log.error("%s", e)
            self.summary.errors.append(str(e))
            return
        log.info("HA: pipeline %s waits to be elected (group %s)", self.cfg.pipeline.name, self.election.group)
        fenced_term = None  # the election term in which another instance fenced our producer
        try:
            while not self.stop_event.is_set():
                if not self.election.wait_leader(0.5):
                    self._report_ready()
                    continue
                term = self.term = self.election.terms
                if term == fenced_term:
                    # still the group's leader, but another producer owns the transactional id:
                    # write again only once elected anew, never fight over it
                    self._report_ready()
                    self.stop_event.wait(0.5)
                    continue
                self.fenced = None
                # in exactly-once mode this fences the previous leader's producer
                self.sink = self._open_sink()
                if self.sink is None:
                    continue
                done = False
                try:
                    done = self._term()
                except CheckpointError as e:  # Kafka trouble while loading: a new term tries again
                    log.error("%s", e)
                    self.stop_event.wait(1)
                if self.fenced is not None:
                    fenced_term = term
                elif not done and not self._active():
                    log.warning("HA: lost the lead; stopped polling and publishing, standing by")
                self._end_term()  # before leaving the group below: a standby takes over at once
                if done:
                    break
        finally:
            self.election.close()

    def _end_term(self) -> None:
        """Ends a term as leader, leaving the next leader as little to repeat as can be avoided.
        At-least-once: while no other process can have been given the lead yet
        (election.safe_until()), the records already handed to Kafka get their answers and the
        checkpoint moves past the confirmed ones; then the producer closes at once, dropping what
        it had not sent yet (read again after the checkpoint). So the next leader repeats at most
        what was still on the wire (kafka.max_unacked at most). Exactly-once: every page commits or
        aborts in _process_tx and none starts its commit after a step-down; the next leader's
        producer aborts a transaction left open, and fences this one's."""
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.stop()
            if not self.exactly_once:
                until = self.election.safe_until() - STEP_DOWN_RESERVE
                left = min(until - time.monotonic(), self.cfg.pipeline.shutdown_timeout)
                if left > 0:
                    sink.flush(left)
                left = min(until - time.monotonic(), self.cfg.pipeline.shutdown_timeout)
                if self.session is not None and (self.election.is_leader or left > 0):
                    self._commit(self.session, timeout=max(0.1, left))  # a failed save is logged there
            try:
                sink.close(0)
            except Exception as e:  # noqa: BLE001 (the producer of a finished term)
                log.debug("closing the producer of the last term: %s", e)
        self.session = None
