"""What a validated configuration is: the frozen dataclasses the router reads. The value
parsers are in ``values.py`` (re-exported here)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..values import (  # noqa: F401 - re-exported: config.X is where callers look
    AE_PSEUDO_KEYS,
    ConfigError,
    Matcher,
    is_loopback,
    parse_ae_title,
    parse_bool,
    parse_choice,
    parse_duration,
    parse_int,
    parse_matcher,
    parse_size,
    parse_str,
    parse_transfer_syntaxes,
    regex_literal,
    show,
    study_level,
    template_keywords,
)

DEFAULT_AE_TITLE = "DICOMROUTER"
DEFAULT_PORT = 11112
CONFIG_ENV = "DICOMROUTER_CONFIG"


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for failed deliveries."""

    initial: float = 5.0
    max_delay: float = 600.0
    max_attempts: int = 10

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt + 1`` after ``attempt`` failures."""
        return min(self.max_delay, self.initial * (2 ** max(0, attempt - 1)))


DEFAULT_FOLDER_TEMPLATE = "{PatientID}/{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"
@dataclass(frozen=True)
class DestinationConfig:
    """One destination; ``options`` are the type-specific keys, already validated."""

    name: str
    type: str
    options: dict[str, Any]
    concurrency: int = 1
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    schedule: Any = None  # schedule.Window: deliveries only inside it (None: any time)
    transforms: tuple[Any, ...] = ()  # transforms.Op, applied to the copies sent there


@dataclass(frozen=True)
class RouteConfig:
    name: str
    when: tuple[Any, ...]  # rules.Condition (value forms, operators, groups)
    to: tuple[str, ...]
    stop: bool = False  # first-match: no route after this one when it matched
    fallback: bool = False  # fires only when no other route matched
    transforms: tuple[Any, ...] = ()  # transforms.Op for the copies this route sends
    stable_age: float | None = None  # this route's own (None: the global stable_age)
    schedule: Any = None  # schedule.Window: the jobs this route creates wait for it
    expect: dict[str, Any] | None = None  # series / series_count / instances: complete early
    level: str = "study"  # series: each series delivered once it is stable on its own

    def expectation_met(self, instances: Sequence[Any]) -> str:
        """Why this route's ``expect`` is met by ``instances`` ('' if not, or none)."""
        if not self.expect or not instances:
            return ""
        series = {i.series_uid for i in instances}
        descriptions = {i.tags.get("SeriesDescription", "") for i in instances}
        want = self.expect
        if "series" in want and not set(want["series"]) <= descriptions:
            return ""
        if "series_count" in want and len(series) < want["series_count"]:
            return ""
        if "instances" in want and len(instances) < want["instances"]:
            return ""
        return "expected " + ", ".join(
            f"series {', '.join(want['series'])}" if k == "series" else f"{k} {want[k]}"
            for k in want) + " all in"


@dataclass(frozen=True)
class Limits:
    """What one peer may cost the listener (docs/security.md lists them with their reasons)."""

    acse_timeout: float = 30.0  # ARTIM: TCP connect → complete A-ASSOCIATE-RQ (and release)
    network_timeout: float = 60.0  # one PDU, once its header arrived (+ as much per MiB of it)
    dimse_timeout: float = 60.0  # an established association with no message for this long
    max_associations: int = 64  # established associations at the same time
    max_pending_connections: int = 32  # connections not yet associated; the oldest is dropped
    max_associate_rq_size: int = 65536  # bytes of an A-ASSOCIATE-RQ; larger ones are rejected
    min_free_disk: int = 1_000_000_000  # below it on the spool's disk: 0xA700, associations refused
    max_sequence_depth: int = 32  # nested sequences in a received dataset; deeper: 0xC000
    max_query_results: int = 10_000  # C-FIND responses to one query; more: the first ones + 0xA700


@dataclass(frozen=True)
class TlsConfig:
    """``tls:`` of a listener (DICOM TLS on receive)."""

    cert: str
    key: str
    ca: str | None = None
    verify_client: bool = False
    min_version: str = "TLSv1.2"
    #: client certificate subject ("CN=...") → the calling AE titles it may use
    subject_aes: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class ListenerConfig:
    """One port the router listens on; the first is made of the top-level keys."""

    name: str
    ae_title: str
    bind: str
    port: int
    allowed_calling_aes: tuple[str, ...] = ()
    check_called_ae: bool = False
    tls: TlsConfig | None = None


@dataclass(frozen=True)
class WebConfig:
    """``web:``: the status page, REST API and /metrics (loopback by default)."""

    enabled: bool = True
    bind: str = "127.0.0.1"
    port: int = 8080
    token_env: str | None = None  # the bearer token for state-changing calls
    metrics_public: bool = False  # /metrics needs no token even off loopback

    @property
    def protected(self) -> bool:
        """Every endpoint but /health needs the token (not bound to loopback only)."""
        return not is_loopback(self.bind)


@dataclass(frozen=True)
class SourceConfig:
    """A pull source (``sources.<name>``); ``options`` are its type's keys, validated."""

    name: str
    type: str
    interval: float
    options: dict[str, Any]


@dataclass(frozen=True)
class KnownAE:
    """A peer the router may open associations to (C-MOVE destinations, pull sources)."""

    ae_title: str
    host: str
    port: int
    calling_ae: str | None = None  # the router's AE title toward this peer (default: ae_title)
    count_query: bool = False  # ask it (C-FIND) how many instances a study it sends has


@dataclass(frozen=True)
class StateConfig:
    """``state:``: SQLite in the spool (embedded default) or a shared PostgreSQL."""

    type: str = "sqlite"
    dsn: str = field(default="", repr=False)  # a secret: from dsn_env / dsn_file
    lease: float = 30.0
    pool_size: int = 8
    connect_timeout: float = 10.0


@dataclass(frozen=True)
class Config:
    ae_title: str = DEFAULT_AE_TITLE
    bind: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    max_pdu: int = 0
    allowed_calling_aes: tuple[str, ...] = ()
    spool: Path = Path("spool")
    stable_age: float = 3.0
    keep_after_delivery: bool = False
    retention: float = 0.0
    max_spool_size: int = 0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    destinations: dict[str, DestinationConfig] = field(default_factory=dict)
    routes: tuple[RouteConfig, ...] = ()
    log_level: str = "INFO"
    receiver: str = "fast"
    receivers: int = 1
    limits: Limits = field(default_factory=lambda: Limits())
    check_called_ae: bool = False
    query_retrieve: bool = True  # answer C-FIND / C-MOVE / C-GET over the spool
    commitment_scp: bool = True  # answer storage commitment requests for what the spool holds
    known_aes: dict[str, KnownAE] = field(default_factory=dict)
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    web: WebConfig = field(default_factory=WebConfig)
    listeners: tuple[ListenerConfig, ...] = ()  # [0] is the top-level one (see ``listener``)
    sweep: Any = None  # sweep.SweepPlan: re-route stored studies against the current table
    force_complete_after: float = 0.0  # 0: never; else a study receiving this long completes
    force_complete: str = "route"  # route, or hold (state held, for an operator's reroute)
    state: StateConfig = field(default_factory=StateConfig)
    shared_spool: dict[str, Any] | None = None  # the S3 bucket every node's instances go to
    ack_after: str = "local"  # shared: acknowledged once in the shared store
    node_id: str = "node"

    @property
    def cluster(self) -> bool:
        """Several routers on one PostgreSQL state (and, usually, one shared spool)."""
        return self.state.type == "postgresql"

    @property
    def listener(self) -> ListenerConfig:
        """The first listener (top-level ``ae_title``/``bind``/``port``/... and ``tls``)."""
        if self.listeners:
            return self.listeners[0]
        return ListenerConfig("main", self.ae_title, self.bind, self.port,
                              self.allowed_calling_aes, self.check_called_ae)
    source: str = "embedded defaults"

    @property
    def state_db(self) -> Path:
        return self.spool / "state.db"
