"""The source's cursor against the simulator: page and poll boundaries, pruning (also past the
cursor's offset and across a restart), late arrivals, records that cannot be placed, the per-cycle
limit, what each costs in requests; and the checks on a checkpoint's fields."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from connector.config import parse_pipeline
from connector.simulator import Simulator
from connector.stream.records import RecordMaker
from connector.stream.source import AlertSource, Position
from connector.stream.stages import build_stages
from connector.tanium import AlertPage, TaniumClient


@pytest.fixture
def tr():
    with Simulator(alerts=500, intel_docs=4, seed=21, history=3600) as sim:
        cfg = parse_pipeline({"pipeline": {"name": "s"}, "tanium": sim.settings()})
        client = TaniumClient(cfg.tanium)
        yield sim, client
        client.close()


def drain(source):
    """One cycle → list of (id or None, position)."""
    return [(a.get("id") if isinstance(a, dict) else None, p) for page in source.cycle() for a, p in page]


def make(client, page_size=50, limit=10_000, checkpoint=None):
    src = AlertSource(client, page_size, limit)
    src.resume(checkpoint, datetime(2000, 1, 1, tzinfo=UTC))
    return src


def test_cycles_read_everything_once_in_server_order(tr):
    sim, client = tr
    src = make(client, page_size=50, limit=120)
    got = []
    for _ in range(6):
        got += [i for i, _ in drain(src)]
    assert got == list(range(1, 501))
    assert src.hit_limit is False
    assert drain(src) == []  # caught up: nothing repeats at the poll boundary


def test_late_arrival_is_delivered_although_its_alert_time_is_old(tr):
    sim, client = tr
    src = make(client)
    assert len(drain(src)) == 500
    old = datetime.now(UTC) - timedelta(days=3)
    late = sim.inject(computer_name="late.corp.local", alerted_at=old)
    assert [i for i, _ in drain(src)] == [late["id"]]


def test_pruning_below_the_cursor_neither_skips_nor_repeats(tr):
    sim, client = tr
    src = make(client, page_size=50, limit=200)
    first = [i for i, _ in drain(src)]
    assert first == list(range(1, 201))
    sim.prune(170)  # the list shifts left by 170: the stored offset now points too far
    rest = []
    for _ in range(3):
        rest += [i for i, _ in drain(src)]
    assert rest == list(range(201, 501))


def test_pruning_below_the_cursor_past_its_offset_finds_its_place_by_search(tr):
    """1,000 read, 900 pruned, 300 new: the page at the old offset is empty (the list shrank, it
    is not "nothing new"); the cost is that page, a binary search of limit=1 probes over the 400
    records left, then the pages of new alerts. The next poll is one aligned page again."""
    with Simulator(alerts=1000, intel_docs=4, seed=22, history=3600) as sim:
        cfg = parse_pipeline({"pipeline": {"name": "s"}, "tanium": sim.settings()})
        client = TaniumClient(cfg.tanium)
        src = make(client, page_size=100)
        assert [i for i, _ in drain(src)] == list(range(1, 1001))
        sim.prune(900)
        for _ in range(300):
            sim.inject()
        before = sim.stats["alerts"]
        got = drain(src)
        assert [i for i, _ in got] == list(range(1001, 1301))
        assert got[-1][1].offset == 400  # the offset counts the list as it is now
        assert sim.stats["alerts"] - before <= 1 + 9 + 4  # empty page, log2(400) probes, 4 pages of 99 new
        before = sim.stats["alerts"]
        assert drain(src) == []
        assert sim.stats["alerts"] - before == 1
        client.close()


def test_restart_from_a_checkpoint_below_which_everything_was_pruned(tr):
    sim, client = tr
    src = make(client, page_size=50)
    checkpoint = drain(src)[-1][1].to_checkpoint()
    assert checkpoint["id"] == 500
    sim.prune(500)  # the checkpoint's record and everything before it
    for _ in range(20):
        sim.inject()
    again = make(client, page_size=50, checkpoint=checkpoint)
    assert [i for i, _ in drain(again)] == list(range(501, 521))


def test_pruning_between_two_pages_of_one_cycle(tr):
    sim, client = tr
    src = make(client, page_size=50)
    got = []
    for n, page in enumerate(src.cycle()):
        got += [a["id"] for a, _ in page]
        if n == 1:
            sim.prune(30)
    assert got == list(range(1, 501))


def test_resume_from_a_checkpoint_position(tr):
    sim, client = tr
    src = make(client, page_size=50, limit=130)
    read = drain(src)
    pos: Position = read[-1][1]
    assert (pos.id, pos.offset) == (130, 130)
    again = make(client, page_size=50, checkpoint=pos.to_checkpoint())
    assert [i for i, _ in drain(again)] == list(range(131, 501))


def test_pages_fetched_ahead_keep_details_as_text_until_their_records_are_made(tr):
    """A busy pipeline holds several fetched pages; kept as Tanium's text, `details` is one string
    per alert instead of hundreds of objects. Making the page's records decodes it, the event's
    `raw` carries the text as it came, and each alert is given its text back once its records are
    made: the page sent to Kafka does not keep the decoded objects."""
    sim, client = tr
    page = next(make(client, page_size=20).cycle())
    assert all(isinstance(a["details"], str) for a, _ in page)
    # Tanium's own spelling of the text (spaces, escapes) is what `raw` carries
    texts = [json.dumps(orjson.loads(a["details"]), indent=1) for a, _ in page]
    for (alert, _), text in zip(page, texts, strict=True):
        alert["details"] = text
    cfg = parse_pipeline({"pipeline": {"name": "s"}, "tanium": sim.settings()})
    stages = build_stages(cfg, client)
    try:
        values = [r.value for r in RecordMaker(cfg, stages.enricher, stages.normalizer).records(page)]
    finally:
        stages.enricher.close()
    events = [orjson.loads(v) for v in values]
    assert [e["raw"]["id"] for e in events] == [a["id"] for a, _ in page]
    assert [e["raw"]["details"] for e in events] == [json.loads(t) for t in texts]
    assert all(t.encode() in v for t, v in zip(texts, values, strict=True))
    assert all(e["raw"]["intelDoc"]["id"] == e["raw"]["intelDocId"] for e in events)
    assert all(e["file_path"] for e in events)  # mapped from inside `details`
    assert [a["details"] for a, _ in page] == texts


def test_a_dead_letter_record_carries_details_as_tanium_sent_it(tr):
    sim, client = tr
    page = next(make(client, page_size=3).cycle())
    page[1][0]["id"] = "not a number"
    cfg = parse_pipeline({"pipeline": {"name": "s"}, "tanium": {**sim.settings(), "enrich_intel_docs": False}})
    stages = build_stages(cfg, client)
    records = RecordMaker(cfg, stages.enricher, stages.normalizer).records(page)
    assert [r.kind for r in records] == ["published", "dlq", "published"]
    raw = json.loads(json.loads(records[1].value)["raw"])
    assert raw["id"] == "not a number" and isinstance(raw["details"], str)
    assert json.loads(raw["details"])["match"]  # the text decodes to Tanium's details object


class CopyingTanium:
    """Serves a fixed list as Tanium does over HTTP: every answer holds new objects."""

    def __init__(self, items: list):
        self.items, self.requests = items, 0

    def list_alerts(self, params, offset, limit, sort="createdAt,id", decode=True):
        self.requests += 1
        page = orjson.loads(orjson.dumps(self.items[offset : offset + limit]))
        return AlertPage(page, len(self.items), len(self.items))


def test_a_page_of_keyless_records_is_continued_although_the_pipeline_changed_what_it_was_given():
    """A full page with no two keyed records is continued from its last record, matched by content.
    The pipeline adds to the alerts it is given (details decoded, the IntelDoc joined) while the
    source reads on; the source's match must not see those changes."""
    keyed = {"id": 1, "guid": "a1", "createdAt": "2026-01-01T00:00:00.000Z", "details": "{}", "intelDocId": 1}
    items = [keyed] + [{"guid": f"g{i}", "details": "{}", "intelDocId": 1} for i in range(700)]
    tanium = CopyingTanium(items)
    src = AlertSource(tanium, 500, 10_000)
    src.resume(None, datetime(2000, 1, 1, tzinfo=UTC))
    got = []
    for page in src.cycle():
        for alert, _ in page:
            alert["details"], alert["intelDoc"] = {}, {"id": 1}  # what the processing thread does
            got.append(alert["guid"])
    assert got == [a["guid"] for a in items]
    assert tanium.requests == 3  # finding the start, then two pages: the second continued the first


def test_records_that_cannot_be_placed_are_delivered_and_do_not_move_the_cursor(tr):
    sim, client = tr
    src = make(client, page_size=100)
    assert len(drain(src)) == 500
    for _ in range(120):
        sim.inject()
    sim.faults.garbage_kinds = ("non_object", "wrong_types", "huge_details")
    sim.faults.huge_details_bytes = 1000
    sim.faults.garbage_next = 2
    got = drain(src)
    real = [i for i, _ in got if isinstance(i, int) and i > 0]
    assert real == list(range(501, 621))
    assert len(got) - len(real) == 2 * 1  # one garbage record per faulty page, both delivered
    positions = [p for _, p in got]
    assert all(p.id is None or p.id > 0 for p in positions)
    assert [p.offset for p in positions] == sorted(p.offset for p in positions)
    assert src.key[1] == 620


def test_start_time_without_checkpoint_uses_binary_search(tr):
    sim, client = tr
    src = AlertSource(client, 50, 10_000)
    middle = sim.get_alert(400)["createdAt"]
    from connector.timeutil import parse_ts

    src.resume(None, parse_ts(middle))
    before = sim.stats["alerts"]
    assert [i for i, _ in drain(src)] == list(range(400, 501))
    assert sim.stats["alerts"] - before <= 1 + 9 + 3  # a first probe, log2(500) bisection probes, 3 pages


@pytest.mark.parametrize(
    ("checkpoint", "says"),
    [
        ({"created_at": "2026-01-01T00:00:00.000Z", "id": 3, "offset": "abc"}, "offset is 'abc'"),
        ({"created_at": "2026-01-01T00:00:00.000Z", "id": 3, "offset": -1}, "offset is -1"),
        ({"created_at": "2026-01-01T00:00:00.000Z", "id": 3, "offset": True}, "offset is True"),
        ({"created_at": "2026-01-01T00:00:00.000Z", "id": "x", "offset": 3}, "id is 'x'"),
        ({"created_at": "2026-01-01T00:00:00.000Z", "id": 0, "offset": 3}, "id is 0"),
        ({"created_at": 5, "id": 3, "offset": 3}, "created_at is 5"),
        ({"created_at": "yesterday", "id": 3, "offset": 3}, "created_at is 'yesterday'"),
        ({"created_at": None, "id": 3, "offset": 3}, "created_at is None"),
        ({"id": 3}, "created_at and offset missing"),
    ],
)
def test_a_checkpoint_with_a_missing_or_wrong_field_is_refused_with_what_is_allowed(checkpoint, says):
    with pytest.raises(ValueError, match="must") as e:
        Position.from_checkpoint(checkpoint)
    assert str(e.value).startswith(says)


def test_checkpoints_the_cursor_writes_are_accepted():
    for pos in (Position("2026-01-01T00:00:00.000Z", 3, 3), Position(None, None, 0)):
        assert Position.from_checkpoint({**pos.to_checkpoint(), "saved_at": "2026-01-02T00:00:00.000Z"}) == pos
