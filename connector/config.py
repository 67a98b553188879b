"""Pipeline definition files (TOML): loading, `${ENV}` interpolation, validation, masking.

pydantic does the type and range checks; this module turns its errors into one line per problem
that names the file, the key, the bad value and what is allowed, and never shows a secret.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from connector.fieldmap import DEFAULT_FIELD_MAP, check_field_map
from connector.text import mask_userinfo, show

# Output formats (connector/formats): the normalized event first, then the standard schemas
OUTPUT_FORMATS = ("normalized", "ocsf", "ecs")
# Alert filter parameters documented for GET …/alerts (see ../shared/reference/tanium-tr-api.md 3.1).
ALERT_FILTERS = frozenset(
    {
        "state",
        "type",
        "matchType",
        "path",
        "priority",
        "severity",
        "intelDocId",
        "intelType",
        "intelDocName",
        "intelSource",
        "labelName",
        "mitreId",
        "scanConfigId",
        "computerName",
        "computerIpAddress",
        "platform",
        "details",
        "guid",
        "alertedAtFrom",
        "alertedAtUntil",
    }
)
# set by the validation engine from each action's query window, so never part of a correlation query
WINDOW_FILTERS = ("alertedAtFrom", "alertedAtUntil")
SECRET_KEYS = ("api_key", "sasl_plain_password", "ssl_password")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """A pipeline file is unusable; str() is the message for the user (exit code 2)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    def __repr_args__(self):  # repr() and str() show URLs without user:password
        for name, value in super().__repr_args__():
            yield name, mask_userinfo(value) if isinstance(value, str) else value


class PipelineSection(_Section):
    name: Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    mode: Literal["stream", "validation"] = "stream"
    delivery: Literal["at-least-once", "exactly-once"] = "at-least-once"
    shutdown_timeout: Annotated[float, Field(gt=0, le=600)] = 30
    # /healthz answers 503 after this many seconds without a poll attempt (None: see liveness_bound)
    liveness_timeout: Annotated[float | None, Field(gt=0, le=86400)] = None
    # a record Kafka refuses this many times goes to the dead-letter topic (with Kafka's error)
    max_delivery_attempts: Annotated[int, Field(ge=1, le=100)] = 5
    # wait before re-reading after a failed delivery: doubles per failure in a row, up to the max
    rewind_backoff: Annotated[float, Field(gt=0, le=600)] = 1
    rewind_backoff_max: Annotated[float, Field(gt=0, le=3600)] = 60

    @model_validator(mode="after")
    def _backoff(self) -> PipelineSection:
        if self.rewind_backoff > self.rewind_backoff_max:
            raise ValueError(f"rewind_backoff: must not exceed rewind_backoff_max ({self.rewind_backoff_max:g})")
        return self


class TaniumSection(_Section):
    protocol: Literal["https", "http"] = "https"
    host: str
    port: Annotated[int, Field(ge=1, le=65535)] = 443
    api_key: SecretStr | None = None
    api_key_file: str | None = None
    verify_ssl: bool = True
    ca_bundle: str | None = None
    timeout: Annotated[float, Field(gt=0, le=600)] = 30
    proxy: str | None = None
    page_size: Annotated[int, Field(ge=1, le=500)] = 500
    enrich_intel_docs: bool = True
    limit: Annotated[int, Field(ge=1)] = 10000
    poll_interval: Annotated[float, Field(gt=0, le=86400)] = 30
    max_retries: Annotated[int, Field(ge=0, le=20)] = 5

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        v = v.strip()
        if not v or re.search(r"[/\s]", v) or v.count(":") == 1:
            raise ValueError(
                "must be a hostname or IP address only, without scheme, port or path (e.g. tanium.example.com)"
            )
        return v

    @field_validator("proxy")
    @classmethod
    def _proxy(cls, v: str | None) -> str | None:
        if v and not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("must be an http:// or https:// proxy URL (e.g. http://proxy.example.com:3128)")
        return v or None

    @field_validator("ca_bundle")
    @classmethod
    def _ca(cls, v: str | None) -> str | None:
        if v and not Path(v).is_file():
            raise ValueError("is not a readable file (give the path of a PEM CA bundle)")
        return v or None

    @model_validator(mode="after")
    def _one_key(self) -> TaniumSection:
        key, path = self.api_key, self.api_key_file
        if (key is None or not key.get_secret_value()) == (not path):
            raise ValueError("api_key: exactly one of tanium.api_key or tanium.api_key_file is required")
        if path:
            try:
                text = Path(path).read_text(encoding="utf-8").strip()
            except OSError as e:
                raise ValueError(f"api_key_file: cannot read {path!r} ({e.strerror or e})") from None
            if not text:
                raise ValueError(f"api_key_file: {path!r} is empty")
            self.api_key = SecretStr(text)
        return self

    @property
    def base_url(self) -> str:
        default = 443 if self.protocol == "https" else 80
        port = "" if self.port == default else f":{self.port}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.protocol}://{host}{port}"


class SourceSection(_Section):
    start_from: str = "24h"
    # also publish an update event when a published alert changes (connector/stream/updates.py)
    track_updates: bool = True

    @field_validator("start_from")
    @classmethod
    def _start(cls, v: str) -> str:
        from connector.timeutil import (
            parse_start,  # checks the value; the source resolves it at start
        )

        parse_start(v)
        return v


class EnrichSection(_Section):
    cache_size: Annotated[int, Field(ge=1, le=10_000_000)] = 10000
    cache_ttl: Annotated[float, Field(gt=0)] = 3600
    negative_ttl: Annotated[float, Field(ge=0)] = 60
    concurrency: Annotated[int, Field(ge=1, le=64)] = 8
    # seconds an alert waits for its IntelDoc; then it goes without (enrichment_error) while the
    # lookup goes on for later alerts
    timeout: Annotated[float, Field(gt=0, le=600)] = 5


_TOPIC = r"^[A-Za-z0-9._-]{1,249}$"


class OutputSection(_Section):
    include_raw: bool = True
    # every format listed is published for every alert, each to its own topic (kafka.topic for
    # "normalized", kafka.topics.<format> for the others), in this order
    formats: list[str] = ["normalized"]

    @field_validator("formats", mode="before")
    @classmethod
    def _formats(cls, v: Any) -> list[str]:
        allowed = ", ".join(OUTPUT_FORMATS)
        if not isinstance(v, list) or not all(isinstance(name, str) for name in v):
            raise ValueError(f'must be a list of format names, such as ["normalized", "ocsf"]; allowed: {allowed}')
        if not v:
            raise ValueError(f"needs at least one format; allowed: {allowed}")
        for name in v:
            if name not in OUTPUT_FORMATS:
                raise ValueError(f"unknown format {name!r}; allowed: {allowed}")
        dup = sorted({name for name in v if v.count(name) > 1})
        if dup:
            raise ValueError(f"{', '.join(map(repr, dup))} listed twice; each format is published once")
        return v


class KafkaSection(_Section):
    bootstrap_servers: str | list[str] = "127.0.0.1:9092"
    topic: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,249}$")] = "tanium.threat-response.events"
    dlq_topic: Annotated[str | None, Field(pattern=r"^[A-Za-z0-9._-]{1,249}$")] = None
    # topic per standard output format; a format not named here goes to "<topic>.<format>"
    topics: dict[str, str] = Field(default_factory=dict)
    client_id: str = "tanium-connector"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: SecretStr | None = None
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "none"
    linger_ms: Annotated[int, Field(ge=0, le=60000)] = 20
    batch_size: Annotated[int, Field(ge=1024, le=16 * 1024 * 1024)] = 1_000_000
    max_unacked: Annotated[int, Field(ge=1, le=1_000_000)] = 20000
    delivery_timeout_ms: Annotated[int, Field(ge=1000)] = 120000
    max_request_size: Annotated[int, Field(ge=65536, le=100 * 1024 * 1024)] = 1048576
    # producer library: kafka-python (default) or confluent (librdkafka, optional extra)
    client: Literal["kafka-python", "confluent"] = "kafka-python"

    @field_validator("bootstrap_servers")
    @classmethod
    def _servers(cls, v: str | list[str]) -> list[str]:
        items = [s.strip() for s in (v.split(",") if isinstance(v, str) else v) if s.strip()]
        for s in items:
            if not re.match(r"^[A-Za-z0-9._\[\]:-]+:\d{1,5}$", s):
                raise ValueError(f"{s!r} is not host:port")
        if not items:
            raise ValueError("needs at least one host:port")
        return items

    @field_validator("compression")
    @classmethod
    def _codec(cls, v: str) -> str:
        module = {"snappy": "snappy", "lz4": "lz4", "zstd": "zstandard"}.get(v)
        if module:
            try:
                __import__(module)
            except ImportError:
                raise ValueError(
                    f"needs the Python package {module!r} (pip install {module}); "
                    "gzip and none work without extra packages"
                ) from None
        return v

    @field_validator("client")
    @classmethod
    def _client(cls, v: str) -> str:
        if v == "confluent":
            try:
                __import__("confluent_kafka")
            except ImportError:
                raise ValueError(
                    "'confluent' needs the Python package 'confluent-kafka' "
                    "(pip install 'tanium-tr-connector[confluent]'); or use 'kafka-python'"
                ) from None
        return v

    @field_validator("topics")
    @classmethod
    def _topics(cls, v: dict[str, str]) -> dict[str, str]:
        allowed = ", ".join(OUTPUT_FORMATS[1:])
        for fmt, topic in v.items():
            if fmt == "normalized":
                raise ValueError("normalized events go to kafka.topic; kafka.topics names the other formats' topics")
            if fmt not in OUTPUT_FORMATS:
                raise ValueError(f"unknown format {fmt!r}; allowed: {allowed}")
            if not isinstance(topic, str) or not re.match(_TOPIC, topic):
                raise ValueError(f"{fmt} = {show(topic)} is not a topic name (1–249 of A-Z a-z 0-9 . _ -)")
        return v

    @model_validator(mode="after")
    def _dlq(self) -> KafkaSection:
        if self.dlq_topic is None:
            self.dlq_topic = f"{self.topic}.dlq"
        return self

    @model_validator(mode="after")
    def _format_topics(self) -> KafkaSection:
        for fmt in OUTPUT_FORMATS[1:]:
            self.topics.setdefault(fmt, f"{self.topic}.{fmt}")
        # one topic per kind of record, so a consumer never meets two shapes on one topic
        seen = {self.topic: "kafka.topic", self.dlq_topic: "kafka.dlq_topic"}
        for fmt in OUTPUT_FORMATS[1:]:
            topic = self.topics[fmt]
            if topic in seen:
                raise ValueError(f"topics.{fmt}: {topic!r} is also {seen[topic]}; each format needs its own topic")
            seen[topic] = f"kafka.topics.{fmt}"
        return self


class StateSection(_Section):
    backend: Literal["file", "kafka"] = "file"
    path: str = ".state"
    topic: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,249}$")] = "tanium-connector.state"


class _GroupSection(_Section):
    """Kafka group membership (connector/stream/leader.py)."""

    session_timeout_ms: Annotated[int, Field(ge=1000, le=300000)] = 10000
    heartbeat_interval_ms: Annotated[int, Field(ge=100, le=100000)] = 3000

    @model_validator(mode="after")
    def _heartbeat(self) -> _GroupSection:
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError(
                f"heartbeat_interval_ms: {self.heartbeat_interval_ms} must be at most a third of "
                f"session_timeout_ms ({self.session_timeout_ms})"
            )
        return self


class HaSection(_GroupSection):
    """HA poller: processes running the same stream pipeline elect one poller (a fleet of one pipeline)."""

    enabled: bool = False


class FleetSection(_GroupSection):
    """Workers given the same pipeline files share them: Kafka's group assigns each pipeline of the
    fleet `group_id` to one worker at a time."""

    group_id: Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]


class MetricsSection(_Section):
    listen: Annotated[str, Field(pattern=r"^(\[[0-9A-Fa-f:]+\]|[A-Za-z0-9.-]*):\d{1,5}$")] = "127.0.0.1:9464"
    enabled: bool = True


class ValidationSection(_Section):
    query_time: Annotated[float, Field(gt=0, le=1440)] = 5
    query_interval: Annotated[float, Field(gt=0)] = 30
    delay_time: Annotated[float, Field(ge=0, le=1440)] = 0
    correlation_query_enabled: bool = False
    correlation_query: str = ""
    correlation_query_interval: Annotated[float, Field(gt=0)] = 5
    discover_network_devices: bool = True
    save_suspicious_events: bool = False
    event_time_adjustment: float = 0
    # minutes a job action's started_at may lie ahead of this host's clock; later ones are rejected
    max_clock_skew: Annotated[float, Field(ge=0, le=1440)] = 5
    # seconds a due window may wait so that windows due close together share one query round
    # (rounds are at least this far apart): the bound on lateness, and on rounds per second
    max_lateness: Annotated[float, Field(ge=0, le=60)] = 0.5
    # seconds without heartbeats before the group hands a runner's job actions to another runner
    # (after a crash); heartbeats are sent every third of it
    session_timeout: Annotated[float, Field(ge=6, le=300)] = 10
    job_actions_topic: str = "security-validation.job-actions"
    group_id: str = "tanium-connector-validation"
    events_topic: str = "security-validation.events"
    suspicious_topic: str = "security-validation.suspicious-events"
    results_topic: str = "security-validation.results"
    devices_topic: str = "security-validation.devices"

    @field_validator("correlation_query")
    @classmethod
    def _corr(cls, v: str) -> str:
        clash = [k for k, _ in parse_alert_filter(v) if k in WINDOW_FILTERS]
        if clash:
            raise ValueError(
                f"{', '.join(dict.fromkeys(clash))} is set by the connector from each action's window; "
                "remove it from the query"
            )
        return v

    @model_validator(mode="after")
    def _corr_needed(self) -> ValidationSection:
        if self.correlation_query_enabled and not self.correlation_query.strip():
            raise ValueError("correlation_query: must be set when correlation_query_enabled = true")
        return self


def parse_alert_filter(query: str) -> list[tuple[str, str]]:
    """`intelDocId=700&severity=high` → [(k, v)]; only documented alert filter parameters."""
    pairs = []
    for part in filter(None, query.strip().lstrip("?").split("&")):
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise ValueError(f"{part!r} is not name=value")
        if key not in ALERT_FILTERS:
            raise ValueError(f"unknown alert filter parameter {key!r}; allowed: {', '.join(sorted(ALERT_FILTERS))}")
        pairs.append((key, value))
    return pairs


class PipelineConfig(_Section):
    pipeline: PipelineSection
    tanium: TaniumSection
    source: SourceSection = SourceSection()
    enrich: EnrichSection = EnrichSection()
    field_map: dict[str, Any] = Field(default_factory=dict)
    output: OutputSection = OutputSection()
    kafka: KafkaSection | None = None
    state: StateSection = StateSection()
    ha: HaSection = HaSection()
    fleet: FleetSection | None = None
    metrics: MetricsSection = MetricsSection()
    validation: ValidationSection = ValidationSection()

    @field_validator("field_map")
    @classmethod
    def _fm(cls, v: Any) -> dict[str, list[str]]:
        return check_field_map(v)

    @model_validator(mode="after")
    def _modes(self) -> PipelineConfig:
        if self.pipeline.delivery == "exactly-once" and self.state.backend != "kafka":
            raise ValueError('pipeline.delivery: "exactly-once" requires state.backend = "kafka"')
        if self.ha.enabled:
            if self.pipeline.mode != "stream":
                raise ValueError('ha.enabled: the HA poller is for pipeline.mode = "stream" only')
            if self.state.backend != "kafka":
                raise ValueError('ha.enabled: requires state.backend = "kafka" (the processes share the checkpoint)')
        if self.fleet is not None:
            if self.ha.enabled:
                raise ValueError("fleet: a pipeline of a fleet has no [ha] too (HA is the fleet of one pipeline)")
            if self.pipeline.mode != "stream":
                raise ValueError('fleet: is for pipeline.mode = "stream" only')
            if self.state.backend != "kafka":
                raise ValueError('fleet: requires state.backend = "kafka" (the workers share the checkpoint)')
            if len(self.state.topic) + len(self.pipeline.name) + 8 > 249:  # "<state.topic>.leader.<name>"
                raise ValueError("fleet: state.topic and pipeline.name together are too long for a topic name")
        return self

    @property
    def liveness_bound(self) -> float:
        """Seconds without a poll attempt after which the stream pipeline counts as stuck:
        pipeline.liveness_timeout, else the longest of a minute, five poll intervals, and twice what
        one poll attempt may take with every retry timing out (room for the backoffs between)."""
        if self.pipeline.liveness_timeout is not None:
            return self.pipeline.liveness_timeout
        t = self.tanium
        return max(60.0, 5 * t.poll_interval, 2 * (t.max_retries + 1) * t.timeout)

    @property
    def effective_field_map(self) -> dict[str, list[str]]:
        return {**DEFAULT_FIELD_MAP, **self.field_map}

    def masked(self) -> dict:
        """Effective settings as plain data, every secret replaced by '***' and the user information
        of every URL (a proxy's user:password) too."""
        data = self.model_dump(mode="json")
        data["field_map"] = self.effective_field_map
        for section in data.values():
            if isinstance(section, dict):
                for k in SECRET_KEYS:
                    if section.get(k):
                        section[k] = "***"
                for k, v in section.items():
                    if isinstance(v, str):
                        section[k] = mask_userinfo(v)
        return data

    def __repr__(self) -> str:  # pydantic's repr already masks SecretStr; keep it short too
        return f"PipelineConfig(pipeline={self.pipeline.name!r}, tanium={self.tanium.base_url!r})"


def _interpolate(value: Any, key: str, errors: list[str]) -> Any:
    if isinstance(value, str):

        def sub(m: re.Match) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:  # ${NAME:-default}
                return default
            errors.append(f"{key}: environment variable ${{{name}}} is not set")
            return ""

        return _ENV.sub(sub, value)
    if isinstance(value, dict):
        return {k: _interpolate(v, f"{key}.{k}" if key else k, errors) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{key}[{i}]", errors) for i, v in enumerate(value)]
    return value


def _describe(err: Mapping[str, Any], raw: dict) -> str:
    loc = [str(p) for p in err["loc"]]
    msg = err["msg"].removeprefix("Value error, ")
    # model validators report "key: message" against the section; fold the key into the location
    if err["type"] == "value_error" and re.match(r"^[a-z_][a-z_.]*: ", msg):
        sub, msg = msg.split(": ", 1)
        loc = loc + sub.split(".")
    key = ".".join(loc)
    if err["type"] == "missing":
        return f"{key}: required setting is missing"
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown setting (check the spelling; see docs/configuration.md)"
    if any(s in key for s in SECRET_KEYS):
        return f"{key}: {msg}"
    value: Any = raw
    for p in loc:
        value = value.get(p) if isinstance(value, dict) else None
    # masked before it is cut, so a cut never leaves part of a password; a pasted blob must not flood the error
    text = mask_userinfo(show(value, 100_000))
    text = text if len(text) <= 200 else text[:199] + "…"
    shown = f" = {text}" if value is not None and not isinstance(value, dict) else ""
    return f"{key}{shown}: {msg}"


def load_pipeline(path: str | os.PathLike) -> PipelineConfig:
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: file not found") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML ({e})") from None
    return parse_pipeline(raw, str(p))


def parse_pipeline(raw: dict, source: str = "<pipeline>") -> PipelineConfig:
    errors: list[str] = []
    data = _interpolate(raw, "", errors)
    if errors:
        raise ConfigError("\n".join(f"{source}: {e}" for e in errors))
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        lines = [f"{source}: {_describe(err, data)}" for err in e.errors(include_url=False)]
        raise ConfigError("\n".join(lines)) from None
