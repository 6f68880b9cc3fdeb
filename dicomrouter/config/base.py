"""What a validated configuration is (frozen dataclasses the router reads) and the value
parsers the schema uses: durations, sizes, AE titles, ranges, templates, syntaxes, conditions.

Every parser raises ConfigError(key, problem); the schema (models.py) prefixes the key path, so
the person reading it, an integration engineer editing a YAML file, sees ``routes[1].to: ...``.
"""

from __future__ import annotations

import ipaddress
import math
import re
import reprlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.datadict import tag_for_keyword

DEFAULT_AE_TITLE = "DICOMROUTER"
DEFAULT_PORT = 11112
CONFIG_ENV = "DICOMROUTER_CONFIG"
AE_PSEUDO_KEYS = ("CallingAE", "CalledAE", "Source", "Listener", "SourceHost")


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlist = _REPR.maxdict = _REPR.maxtuple = 4
_REPR.maxlevel = 2


def _show(value: Any) -> str:
    """A bounded repr for error messages: a YAML alias bomb must not be expanded into one."""
    return _REPR.repr(value)


class ConfigError(ValueError):
    """An invalid configuration; the message starts with the key path."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}" if key else problem)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, None: 1,
}


def parse_duration(value: Any, key: str) -> float:
    """``3s``, ``500ms``, ``2m``, ``1h``, ``1d`` or a number of seconds → seconds."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a duration like 3s, 500ms or 2m, got {_show(value)}")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ConfigError(key, f"expected a finite duration, got {_show(value)}")
        if value < 0:
            raise ConfigError(key, f"must not be negative, got {_show(value)}")
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ConfigError(key, f"expected a duration like 3s, 500ms or 2m, got {_show(value)}")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_size(value: Any, key: str, lo: int = 0, hi: int | None = None) -> int:
    """``50GB``, ``500MB``, ``2GiB`` or a number of bytes → bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        size = value
    else:
        m = _SIZE.match(value) if isinstance(value, str) else None
        if not m:
            raise ConfigError(key, f"expected a size like 500MB or 50GB, got {_show(value)}")
        unit = m.group(2).lower() if m.group(2) else None
        size = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if size < lo or (hi is not None and size > hi):
        raise ConfigError(key, f"expected a size from {lo} to {hi} bytes, got {_show(value)}")
    return size


def _ae_title(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, f"expected an AE title (1-16 characters), got {_show(value)}")
    v = value.strip()
    if len(v) > 16 or "\\" in v or any(ord(c) < 32 for c in v):
        raise ConfigError(key, "an AE title is 1-16 characters without backslash, got "
                          f"{_show(value)}")
    return v


def _str(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"expected a non-empty string, got {_show(value)}")
    return value


def _int(value: Any, key: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(key, f"expected a whole number from {lo} to {hi}, got {_show(value)}")
    return value


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"expected true or false, got {_show(value)}")
    return value


def _choice(value: Any, key: str, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ConfigError(key, f"one of {', '.join(options)}; got {_show(value)}")
    return str(value)


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
_TEMPLATE_FIELD = re.compile(r"{([^{}]*)}")


def template_keywords(template: str, key: str) -> list[str]:
    """The tag keywords a path template uses; each must be a DICOM keyword."""
    words = _TEMPLATE_FIELD.findall(template)
    for w in words:
        if tag_for_keyword(w) is None:
            raise ConfigError(key, f"{{{w}}} is not a DICOM keyword")
    return words


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


def _transfer_syntaxes(raw: Any, key: str) -> tuple[str, ...]:
    """A preference list of syntaxes to propose: UIDs or pydicom keywords, lossless only."""
    from pydicom.uid import UID

    from ..transcode import TARGETS

    by_name = {str(u): str(u) for u in TARGETS} | {UID(u).keyword: str(u) for u in TARGETS}
    if not isinstance(raw, list):
        raise ConfigError(key, f"expected a list of transfer syntaxes, got {_show(raw)}")
    out: list[str] = []
    for i, item in enumerate(raw):
        uid = by_name.get(item.strip()) if isinstance(item, str) else None
        if uid is None:
            known = ", ".join(UID(u).keyword for u in TARGETS)
            raise ConfigError(f"{key}[{i}]", f"{_show(item)} is not a syntax the router can send "
                              f"in (lossless only): one of {known}, or their UIDs")
        if uid not in out:
            out.append(uid)
    return tuple(out)


@dataclass(frozen=True)
class Matcher:
    """One ``when`` condition: a tag keyword (or CallingAE/CalledAE) and accepted values."""

    keyword: str
    values: tuple[str, ...]
    patterns: tuple[re.Pattern[str], ...]

    def accepts(self, value: str) -> bool:
        v = value.strip()
        return v in self.values or any(p.search(v) for p in self.patterns)


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


def regex_literal(text: str) -> tuple[str, int] | None:
    """``/pattern/`` → (pattern, 0) and ``/pattern/i`` → (pattern, re.IGNORECASE), else None
    (a plain value)."""
    if len(text) >= 2 and text.startswith("/") and text.endswith("/"):
        return text[1:-1], 0
    if len(text) >= 3 and text.startswith("/") and text.endswith("/i"):
        return text[1:-2], re.IGNORECASE
    return None


def _matcher(keyword: str, raw: Any, key: str) -> Matcher:
    if keyword not in AE_PSEUDO_KEYS and tag_for_keyword(keyword) is None:
        raise ConfigError(key, "not a DICOM keyword (nor CallingAE / CalledAE / Source / "
                          "Listener / SourceHost)")
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise ConfigError(key, "needs at least one value")
    values: list[str] = []
    patterns: list[re.Pattern[str]] = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]" if isinstance(raw, list) else key
        if isinstance(item, bool) or item is None or isinstance(item, dict | list):
            raise ConfigError(where, f"expected a value or /regex/, got {_show(item)}")
        text = str(item)
        regex = regex_literal(text)
        if regex is not None:
            pattern, flags = regex
            try:
                patterns.append(re.compile(pattern, flags))
            except re.error as exc:
                raise ConfigError(where, f"invalid regular expression {text}: {exc}") from None
        else:
            values.append(text.strip())
    return Matcher(keyword, tuple(values), tuple(patterns))


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


def is_loopback(host: str) -> bool:
    """``host`` (an address or a name) reaches only this machine."""
    if host.strip().lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[] ")).is_loopback
    except ValueError:
        return False


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
