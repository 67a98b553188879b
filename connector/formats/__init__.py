"""Output formats: the normalized event, OCSF 1.7.0 Detection Finding and ECS 9.4.0 alert.

The normalized event is connector/stream/normalize.py's; the two standard shapes are built from the
enriched alert and that event — OCSF Detection Finding (ocsf.py) and ECS external alert (ecs.py).
`output.formats` chooses which are published, each to its own topic (docs/formats.md has the mapping
tables and the topics).

Pure functions, no I/O and no state. Per-alert cost: the alert is read once (alert.Facts) for every
standard format of the alert and its JSON text (`raw_data` / `event.original`) is encoded once; no
schema validation per alert (the tests prove the shapes against the official schemas). Documents
share constant parts (product, profiles, observer): serialize them, do not mutate them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from connector.config import OUTPUT_FORMATS
from connector.formats import ecs, ocsf
from connector.formats.alert import Facts
from connector.stream.normalize import NormalizeError, serialize

FORMATS = OUTPUT_FORMATS
SCHEMA_VERSIONS = {"ocsf": ocsf.VERSION, "ecs": ecs.VERSION}


@dataclass(frozen=True)
class Settings:
    """What the standard formats take from the pipeline's settings."""

    pipeline: str  # OCSF metadata.tenant_uid, ECS agent.name
    include_raw: bool = True  # the alert's JSON text in OCSF raw_data / ECS event.original
    observer_host: str = ""  # the Tanium server: ECS observer.hostname

    @classmethod
    def of(cls, cfg) -> Settings:
        return cls(cfg.pipeline.name, cfg.output.include_raw, cfg.tanium.host)


# what an event says happened to the alert (normalized `event_action`): its creation, or a change of
# its state (connector/stream/updates.py), a change to resolved or suppressed being its close
ACTIONS = ("created", "updated", "closed")
OCSF_ACTIVITY = {"created": 1, "updated": 2, "closed": 3}  # Create, Update, Close


def render_all(
    formats: Sequence[str], alert: dict, event: dict, settings: Settings, action: str | None = None
) -> list[dict]:
    """One document per format of `formats`, in order, for an alert the normalizer turned into `event`;
    `action` is "updated" or "closed" for an update event (stream/updates.py), else None (its creation)."""
    action = action or "created"
    event["event_action"] = action
    out: list[dict] = []
    facts = raw = None
    for fmt in formats:
        if fmt == "normalized":
            out.append(event)
            continue
        if facts is None:
            facts = Facts(alert, event)
            raw = _raw(alert) if settings.include_raw else None
        if fmt == "ocsf":
            out.append(ocsf.render(facts, settings.pipeline, raw, OCSF_ACTIVITY[action]))
        elif fmt == "ecs":
            out.append(ecs.render(facts, settings.pipeline, settings.observer_host, raw, action))
        else:
            raise ValueError(f"unknown output format {fmt!r}; allowed: {', '.join(FORMATS)}")
    return out


def render(fmt: str, alert: dict, event: dict, settings: Settings, action: str | None = None) -> dict:
    """The document of one format (see render_all)."""
    return render_all((fmt,), alert, event, settings, action)[0]


def encode(fmt: str, doc: dict, max_bytes: int) -> bytes:
    """JSON of an OCSF or ECS document in at most `max_bytes`: Kafka refuses bigger records, and a
    refused record would be re-read forever. An oversized document goes without the alert's raw
    text (a warning says why; OCSF also sets metadata.is_truncated); NormalizeError (→ the DLQ)
    if even that is too big."""
    value = serialize(doc)
    if len(value) <= max_bytes:
        return value
    size = len(value)
    if fmt == "ocsf":
        leftovers, had_raw = doc["unmapped"], doc.pop("raw_data", None) is not None
        if had_raw:
            doc["metadata"]["is_truncated"] = True
            doc["metadata"]["untruncated_size"] = size
    else:
        leftovers, had_raw = doc["tanium"], doc["event"].pop("original", None) is not None
    if had_raw:
        note = (
            f"raw: left out, the {fmt} record was {size} bytes and a record may hold {max_bytes} "
            "(kafka.max_request_size less framing)"
        )
        # a new list: the warnings list is shared with the alert's other formats
        leftovers["normalization_warnings"] = [*leftovers.get("normalization_warnings", ()), note]
        value = serialize(doc)
    if len(value) > max_bytes:
        raise NormalizeError(
            f"too large: the {fmt} record is {len(value)} bytes even without the raw alert (limit {max_bytes})"
        )
    return value


def _raw(alert: dict) -> str:
    try:
        return orjson.dumps(alert).decode()
    except orjson.JSONEncodeError as e:
        raise NormalizeError(f"not serializable: {e}") from None
