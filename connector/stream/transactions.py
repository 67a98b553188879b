"""transactions: exactly-once delivery, the part of StreamPipeline that runs each page as one Kafka
transaction (a mixin: it works on the pipeline's sink, store, summary and flags).

Exactly-once (`pipeline.delivery = "exactly-once"`): each page is one Kafka transaction holding
its events, its DLQ records and the checkpoint of its last record (transactional_id
`tanium-connector.<pipeline name>`, so a restarted instance fences the old one and aborts its
open transaction). A transaction that fails is aborted and the source rewinds to the checkpoint
read back from Kafka, i.e. to the last committed transaction. A producer that Kafka reports fenced
(another instance initialised the same id) is never replaced, since a replacement would fence the
other in turn and the two would take turns for ever: without HA the process exits 1 with one line
naming the transactional id; with HA it stands by until it is elected anew.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from kafka.errors import KafkaError

from connector.kafka import ProducerFenced, SinkError, is_fenced
from connector.stream.checkpoint import CheckpointError
from connector.stream.sink import KafkaSink

log = logging.getLogger("connector.stream.pipeline")


class Transactions:
    """Exactly-once delivery and the producer's lifecycle around it, for StreamPipeline."""

    # what the pipeline provides (set in StreamPipeline.__init__)
    cfg: Any
    sink: Any  # KafkaSink (or a test's sink); None between HA terms
    store: Any
    summary: Any
    election: Any
    transactional_id: str | None
    fenced: ProducerFenced | None
    stop_event: threading.Event
    delivery_failed: threading.Event
    _active: Callable[[], bool]
    _freshness: Callable[[str | None], None]
    _committed: Callable[[dict, Any], None]
    _new_sink: Callable[[], KafkaSink]
    _records: Callable[[list], Iterable]

    def _process_tx(self, page: list) -> None:
        """One transaction: the page's events and DLQ records plus the checkpoint of its last
        record. On a failure the transaction is aborted and delivery_failed set (→ rewind); when
        another producer fenced this one, the pipeline stops writing instead (_stop_writing)."""
        sink, failed, counts, last, created = self.sink, [], {"published": 0, "dlq": 0}, None, []

        def on_done(ok: bool, exc: Exception | None = None) -> None:
            if not ok:
                failed.append(exc)

        try:
            sink.begin()
            for _, pos, topic, key, value, headers, kind, _, created_at in self._records(page):
                last = pos
                if kind == "mark":  # the update watermark (stream/updates.py): in the checkpoint, not a record
                    continue
                counts[kind] += 1
                if created_at:
                    created.append(created_at)
                if not sink.send(topic, key, value, headers, on_done):
                    break
            if failed:
                raise SinkError(f"Kafka did not take a record: {failed[0]}") from failed[0]
            if not self._active():  # stepped down mid-page: nothing of this term commits any more
                self._abort()
                return
            assert last is not None, "a page holds at least one record"
            checkpoint = last.to_checkpoint()
            sink.commit(records=[self.store.record(checkpoint)], timeout=self._tx_timeout())
        except (SinkError, CheckpointError, KafkaError) as e:
            if isinstance(e, ProducerFenced) or sink.fenced or is_fenced(e):
                self._stop_writing()
                return
            self.summary.delivery_failures += 1
            if self._active() and not self.stop_event.is_set():
                log.error("Kafka transaction failed, aborting it: %s", e)
            self._abort()
            self.delivery_failed.set()
            return
        for created_at in created:  # a transaction's events are delivered when it commits
            self._freshness(created_at)
        self.summary.published += counts["published"]
        self.summary.dlq += counts["dlq"]
        self._committed(checkpoint, last)

    def _tx_timeout(self) -> float:
        return self.cfg.kafka.delivery_timeout_ms / 1000 + 5

    def _abort(self) -> None:
        try:
            self.sink.abort(timeout=self._tx_timeout())
        except ProducerFenced:
            self._stop_writing()
        except (SinkError, KafkaError) as e:
            # a producer that cannot abort (timed out, broken) is replaced: the new one's
            # init_transactions aborts whatever the old one left open
            log.warning("could not abort the Kafka transaction (%s); opening a new producer", e)
            self._replace_sink()

    def _stop_writing(self) -> None:
        """Another instance initialised our transactional id: it is the writer now, and it aborted
        our open transaction. A new producer of ours would fence it in turn, and the two would take
        turns for ever; so this one stops writing: without HA the process exits (run() raises), with
        HA it stands by until it is elected again (terms.py)."""
        then = (
            "standing by until elected again"
            if self.election
            else "stopping (run one instance per pipeline, or enable [ha] so that the others stand by)"
        )
        self.fenced = ProducerFenced(
            f"pipeline {self.cfg.pipeline.name}: another instance took over transactional.id "
            f"{self.transactional_id!r} and fenced this one's producer; {then}"
        )
        if self.election is not None:
            log.error("%s", self.fenced)
        self.sink.stop()

    def _replace_sink(self) -> None:
        old, self.sink = self.sink, None
        old.stop()
        try:
            old.close(1)
        except Exception as e:  # noqa: BLE001 (a broken producer; the new one takes over)
            log.debug("closing the old producer: %s", e)
        self.sink = self._open_sink()

    def _open_sink(self) -> KafkaSink | None:
        """A new sink, retried while Kafka refuses; None when stopped or no longer leader."""
        backoff = 1.0
        while not self.stop_event.is_set() and self._active():
            try:
                return self._new_sink()
            except SinkError as e:
                log.error("%s; retrying in %.0fs", e, backoff)
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, 30)
        return None

    def _reload(self) -> tuple[dict | None, bool]:
        """(checkpoint, ok) read back from the store, retried while Kafka fails."""
        backoff = 1.0
        while not self.stop_event.is_set() and self._active():
            try:
                return self.store.load(), True
            except CheckpointError as e:
                log.error("%s; retrying in %.0fs", e, backoff)
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, 30)
        return None, False
