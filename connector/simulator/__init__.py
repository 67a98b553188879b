"""A Tanium Threat Response 4.x server for the demo, the benchmark and every test.

Endpoints (all need the `session` header, else 401; a trailing slash is accepted):
  GET /plugin/products/threat-response/api/v1/alerts        list: filters, sort, limit, offset, expand
  GET /plugin/products/threat-response/api/v1/alerts/{id}
  PUT /plugin/products/threat-response/api/v1/alerts/{id}      {"state": …}: one alert's state (lifecycle.py)
  PUT /plugin/products/threat-response/api/v1/alerts/?id=1&id=2  the same for several at once
  GET /plugin/products/threat-response/api/v1/intels        list: name, description, type, labelId,
                                                              mitreTechniqueId, limit (50, max 500), offset
  GET /plugin/products/threat-response/api/v1/intels/{id}   404 for an unknown id
  GET /plugin/products/threat-response/api/v1/intels/{id}/labels
  GET /api/v2/session/current

Alerts list semantics: `limit` defaults to 100, more than 500 → 400; `offset` ≥ 0. Filters: `state`,
`severity`, `priority`, `type`, `matchType`, `intelType` match exactly; `intelDocId`, `scanConfigId` match
the number; `computerName`, `computerIpAddress`, `guid`, `path`, `intelDocName`, `intelSource`, `labelName`,
`mitreId`, `platform` (of the IntelDoc), `details` are case-insensitive "contains"; `alertedAtFrom` is
inclusive and `alertedAtUntil` exclusive (Z or offset, 0–9 fractional digits). The same parameter repeated
is OR, different parameters AND. `sort` is a comma list of columns, `-col` descending; ties are broken by
`id` in the direction of the first column (`-updatedAt` is served from an index). `expand=intelDoc`
adds the doc (without labelIds/contents).
Replies are `{"data": …, "meta": {"totalCount", "filteredCount"}}` (or bare with `bare=True`, like 3.x).

Data: deterministic from `seed`. `alerts` history alerts are virtual (computed from their id on demand,
so a million cost no memory) with createdAt spread evenly over `history` seconds before `end`; ids
increase with createdAt; alertedAt is 0–5 min before createdAt, whole seconds. Injected and live alerts
are stored; they always get the next id and createdAt ≥ every earlier one, so (createdAt, id) order is
id order. Garbage records (a fault) carry negative ids and their neighbour's createdAt so they can never
move a (createdAt, id) cursor past real alerts.

Runtime API: `Simulator(...)` is a context manager; `.url`, `.api_key` (change it to make the token
"expire"), `.old_keys` (accepted too: a rotated token's predecessor not yet revoked), `.faults` (see
`Faults`), `.stats` (requests per endpoint: alerts, alert, intels, intel, intel_labels, session,
update, unknown), `.polls` ((time, User-Agent) of each alert listing), `.inject(...)`,
`.set_state(ids, state)` (and `.lifecycle.changes`, every change made), `.bump_revision(doc_id)`,
`.get_alert(id)`,
`.alert_count`, `.intel_doc_ids`, `.settings(**tanium_overrides)`, `.stop()`.
Command line: `tanium-connector simulate` (`add_arguments`, `run`) or `python -m connector.simulator`.
"""

from connector.simulator.faults import GARBAGE_KINDS, Faults
from connector.simulator.server import TR_PATH, Simulator

__all__ = ["GARBAGE_KINDS", "TR_PATH", "Faults", "Simulator"]
