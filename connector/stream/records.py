"""records: turns a page of (alert, position) into the Kafka records the pipeline sends — for each
alert the normalized event and each configured standard format (connector/formats), each on its
own topic, or one dead-letter record with the reason.

Every record of an alert carries the alert's position and only its last one is final: the
checkpoint passes the alert once all its records are acknowledged (AckWindow). Sizes are kept
under kafka.max_request_size here, since a record Kafka refuses for its size would be refused again
on every re-read: an oversized event goes without `raw`, and a dead-letter record keeps only as much
of the raw alert as fits.

An alert's `details` arrives as Tanium's text (connector/tanium.py); it is decoded just before the
alert is normalized and the alert gets the text back once its documents are serialized, so the
decoded objects (hundreds per alert) are freed while still in the CPU's cache, and neither the page
nor the records waiting for Kafka hold them. `raw` and dead-letter records carry the text.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import orjson

from connector import __version__
from connector.formats import FORMATS, SCHEMA_VERSIONS, encode, render_all
from connector.formats import Settings as FormatSettings
from connector.gate import CPU
from connector.metrics import NO_METRICS, Metrics
from connector.stream.normalize import SCHEMA_VERSION, NormalizeError, serialize
from connector.stream.source import Position
from connector.stream.updates import MARK
from connector.tanium import decode_details
from connector.timeutil import utcnow

RECORD_OVERHEAD = 16 * 1024  # key, headers and batch framing, kept free under kafka.max_request_size
DLQ_RAW_MAX = 256 * 1024  # a dead-letter record keeps at most this much of the raw record


class Record(NamedTuple):
    """One Kafka record of an alert. `kind` is "published" (an event), "dlq", or "mark" (no Kafka
    record: the update watermark passing the AckWindow, see stream/updates.py); `final` marks the
    alert's last record; `created` is the alert's createdAt on that record (freshness), else None."""

    alert: Any
    position: Position
    topic: str
    key: bytes | None
    value: bytes
    headers: list
    kind: str
    final: bool
    created: str | None


class RecordMaker:
    """Enrich, normalize, render the formats and serialize: a page in, its records out."""

    def __init__(self, cfg, enricher, normalizer, metrics: Metrics = NO_METRICS):
        self.enricher, self.normalizer, self.metrics = enricher, normalizer, metrics
        self._m_source_sent = metrics.records_sent.labels(metrics.pipeline, "source")
        self._m_dlq: dict[str, Any] = {}  # DLQ reason code -> its counter child
        self.pipeline = cfg.pipeline.name
        self.topic = cfg.kafka.topic if cfg.kafka else "dry-run"
        self.dlq_topic = cfg.kafka.dlq_topic if cfg.kafka else "dry-run.dlq"
        self.max_value = (cfg.kafka.max_request_size if cfg.kafka else 1024 * 1024) - RECORD_OVERHEAD
        self.headers = [
            ("schema_version", str(SCHEMA_VERSION).encode()),
            ("pipeline", cfg.pipeline.name.encode()),
            ("connector_version", __version__.encode()),
        ]
        # output formats (connector/formats): each alert becomes one record per format, on that
        # format's topic; the standard formats say which they are in a `format` header
        self.formats = cfg.output.formats
        self.format_settings = FormatSettings.of(cfg)
        topics = cfg.kafka.topics if cfg.kafka else {f: f"dry-run.{f}" for f in FORMATS[1:]}
        self.outputs = {"normalized": (self.topic, self.headers)}
        for fmt in FORMATS[1:]:
            version = SCHEMA_VERSIONS[fmt].encode()
            self.outputs[fmt] = (
                topics[fmt],
                [("format", fmt.encode()), ("schema_version", version), *self.headers[1:]],
            )

    def records(self, page: list) -> list[Record]:
        """The records of the page in read order, made in one pass over it: one per output format of
        each alert, or one DLQ record; kind is "published" or "dlq"; `final` marks an alert's last
        record (the checkpoint may pass the alert only there); `created` is the alert's createdAt on
        that record (for the freshness histogram), else None. Metric children are looked up once."""
        if self.enricher:
            with CPU.outside():  # it may wait for IntelDocs from Tanium
                self.enricher.enrich([a for a, _ in page if isinstance(a, dict)])
        alerts = [a for a, _ in page if a is not MARK]
        intel: dict[int, orjson.Fragment] = {}  # the page's IntelDocs, each encoded once (see _raw)
        self._m_source_sent.inc(len(alerts))
        events = self.normalizer.normalize_each(alerts)
        out: list[Record] = []
        add = out.append
        formats, outputs, fit = self.formats, self.outputs, self.fit
        only_normalized = formats == ["normalized"]
        topic, headers = outputs["normalized"]
        for alert, pos in page:
            if alert is MARK:  # a new update watermark (stream/updates.py): a window entry, no Kafka record
                add(Record(alert, pos, "", None, b"", [], "mark", True, None))
                continue
            # decoded here and given back its text below (see the module docstring): freeing the
            # decoded objects with the whole page instead cost as much again as decoding them
            text = decode_details(alert) if alert.__class__ is dict else None
            event = next(events)
            # an update event's position says which change it reports (stream/updates.py)
            action = getattr(pos, "change", None)
            reason = None
            try:
                if isinstance(event, NormalizeError):
                    raise event
                if event.get("raw") is alert:
                    event["raw"] = _raw(alert, text, intel)
                docs = render_all(formats, alert, event, self.format_settings, action)
                if only_normalized:  # the default: no other document to encode
                    values = [fit(event, serialize(event))]
                else:
                    values = [
                        fit(doc, serialize(doc)) if fmt == "normalized" else encode(fmt, doc, self.max_value)
                        for fmt, doc in zip(formats, docs, strict=True)
                    ]
            except NormalizeError as e:
                reason = e.reason
            if text is not None:
                alert["details"] = text
            if reason is not None:
                add(Record(alert, pos, self.dlq_topic, None, *self.dlq_record(alert, reason), "dlq", True, None))
                continue
            key = str(event.get("uid") or "").encode() or None
            created = alert.get("createdAt")
            if created.__class__ is not str or action is not None:  # an update is not a new alert's freshness
                created = None
            if only_normalized:
                add(Record(alert, pos, topic, key, values[0], headers, "published", True, created))
                continue
            guid = alert.get("guid")
            guid_key = guid.encode() if isinstance(guid, str) and guid else key
            # every record of the alert carries its position, and only the last one is final: the
            # checkpoint passes the alert once all its formats are acknowledged
            last = len(values) - 1
            for i, (fmt, value) in enumerate(zip(formats, values, strict=True)):
                ftopic, fheaders = outputs[fmt]
                final = i == last
                fkey = key if fmt == "normalized" else guid_key
                add(Record(alert, pos, ftopic, fkey, value, fheaders, "published", final, created if final else None))
        events.close()  # the normalizer's counters move
        return out

    def fit(self, event: dict, value: bytes) -> bytes:
        """Kafka refuses records over max_request_size, and a refused record would be re-read
        forever: an oversized event goes without `raw` (normalized fields intact, warning noted);
        if even that is too big, NormalizeError sends it to the DLQ."""
        if len(value) <= self.max_value:
            return value
        size = len(value)
        if event.get("raw") is not None:
            event["raw"] = None
            event["normalization_warnings"].append(
                f"raw: left out, the event was {size} bytes and kafka.max_request_size is "
                f"{self.max_value + RECORD_OVERHEAD}"
            )
            value = serialize(event)
        if len(value) > self.max_value:
            raise NormalizeError(
                f"too large: the event is {len(value)} bytes even without raw "
                f"(kafka.max_request_size {self.max_value + RECORD_OVERHEAD})"
            )
        return value

    def dlq_record(self, alert, reason: str) -> tuple[bytes, list]:
        code = reason.split(":")[0][:40]
        child = self._m_dlq.get(code)
        if child is None:
            child = self._m_dlq[code] = self.metrics.dlq_records.labels(self.metrics.pipeline, code)
        child.inc()
        raw = orjson.dumps(alert, option=orjson.OPT_NON_STR_KEYS, default=repr).decode()
        keep = DLQ_RAW_MAX
        while True:  # as much of raw as Kafka takes (a record over max_request_size is refused every time)
            record = {
                "reason": reason,
                "pipeline": self.pipeline,
                "received_at": utcnow().isoformat(),
                "raw": raw[:keep],
                "raw_bytes": len(raw),
                "raw_truncated": len(raw) > keep,
            }
            value = orjson.dumps(record)
            if len(value) <= self.max_value or not keep:
                return value, self.headers + [("reason", reason.encode())]
            keep //= 2


def _raw(alert: dict, details: str | bytes | None, intel: dict[int, orjson.Fragment]) -> dict:
    """The event's `raw` as it is serialized: the alert with `details` as the text it was decoded
    from and its IntelDoc encoded once per page, both inserted as they are (orjson.Fragment), rather
    than encoding their hundreds of objects again for every alert (half of serializing an event).
    The JSON is the same value: the text decoded to this very object."""
    raw = alert.copy()
    if details is not None:
        raw["details"] = orjson.Fragment(details)
    doc = raw.get("intelDoc")
    if doc.__class__ is dict:
        encoded = intel.get(id(doc))  # the page's alerts keep their docs alive, so an id stays theirs
        if encoded is None:
            encoded = intel[id(doc)] = orjson.Fragment(serialize(doc))
        raw["intelDoc"] = encoded
    return raw
