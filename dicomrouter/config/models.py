"""The configuration schema: pydantic models of the YAML file, and their keyed error messages.

Every value goes through the parsers of ``base.py`` (strict: ``"5"`` is not a port, ``yes`` is
not a boolean) and every mapping refuses unknown keys with a "did you mean". A
``ValidationError`` becomes one ConfigError whose key is the path as the user wrote it
(``destinations.pacs.port``, ``routes[1].to``), never pydantic's wording or a traceback.
A new destination type is one model here (``DESTINATION_MODELS``) and one class in
``destinations/registry.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Discriminator,
    Tag,
    ValidationError,
    model_validator,
)

from ..rules import literal_values, parse_when
from ..schedule import parse_window
from ..schema import (
    CHECK_SECRETS,
    AETitle,
    Bool,
    Choice,
    Duration,
    Int,
    Size,
    Strict,
    Text,
    env_set,
    parsed,
    readable,
)
from ..schema import keyed_error as generic_keyed_error
from ..sweep import parse as parse_sweep
from ..transforms import parse as parse_transforms
from .base import (
    DEFAULT_AE_TITLE,
    DEFAULT_FOLDER_TEMPLATE,
    DEFAULT_PORT,
    Config,
    ConfigError,
    DestinationConfig,
    KnownAE,
    Limits,
    ListenerConfig,
    RetryPolicy,
    RouteConfig,
    SourceConfig,
    StateConfig,
    TlsConfig,
    WebConfig,
    is_loopback,
    parse_ae_title,
    parse_choice,
    parse_duration,
    parse_int,
    parse_size,
    parse_str,
    parse_transfer_syntaxes,
    show,
    study_level,
    template_keywords,
)

_v = parsed
_Strict = Strict
_readable = readable
_env_set = env_set


def _template(value: Any, key: str) -> str:
    template_keywords(parse_str(value, key), key)
    return str(value)


def _when(value: Any, key: str) -> tuple[Any, ...]:

    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ConfigError(key, f"expected a mapping, got {type(value).__name__}")
    return parse_when(value, "")  # keys relative to "when": the location adds routes[i].when


def _expect(value: Any, key: str) -> dict[str, Any] | None:
    """``expect: {series: [descriptions] | series_count: N | instances: N}``."""
    if value is None:
        return None
    if not isinstance(value, dict) or not value:
        raise ConfigError(key, "expected a mapping: series, series_count and/or instances")
    out: dict[str, Any] = {}
    for k, v in value.items():
        if k == "series":
            if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
                raise ConfigError("series", "expected a list of SeriesDescription values")
            out[k] = tuple(v)
        elif k in ("series_count", "instances"):
            out[k] = parse_int(v, k, 1, 10_000_000)
        else:
            raise ConfigError(str(k), "unknown key (series, series_count, instances)")
    return out


def _sweep(value: Any, key: str) -> Any:
    return parse_sweep(value, "")


def _transforms(value: Any, key: str) -> tuple[Any, ...]:
    return parse_transforms(value, "")


def _to(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        raise ConfigError(key, "required: the destination names this route sends to")
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ConfigError(key, "needs at least one destination")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ConfigError(f"[{i}]", f"expected a destination name, got {show(item)}")
    return tuple(dict.fromkeys(items))


def _ae_list(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(key, "expected a list of AE titles")
    return tuple(parse_ae_title(a, f"[{i}]") for i, a in enumerate(value))


def _log_level(value: Any, key: str) -> str:
    level = value.upper() if isinstance(value, str) else value
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(key, f"one of DEBUG, INFO, WARNING, ERROR; got {show(level)}")
    return str(level)


TlsVersion = Annotated[str, _v(parse_choice, ("TLSv1.2", "TLSv1.3"))]


class TlsServerModel(_Strict):
    """A listener's ``tls:`` (PS3.15 Secure Transport Connection Profiles)."""

    cert: Text
    key: Text
    ca: Text | None = None
    verify_client: Bool = False
    min_version: TlsVersion = "TLSv1.2"
    subject_aes: dict[str, Annotated[tuple[str, ...], _v(_ae_list)]] | None = None

    @model_validator(mode="after")
    def _files(self) -> TlsServerModel:
        if self.verify_client and not self.ca:
            raise ConfigError("ca", "verify_client needs the CA that signs client certificates")
        if self.subject_aes and not self.verify_client:
            raise ConfigError("subject_aes", "needs verify_client: true")
        return self


class TlsClientModel(_Strict):
    """``tls:`` of a dicom/move destination or a dicom source."""

    ca: Text | None = None  # default: the system's CAs
    cert: Text | None = None  # our client certificate (with key)
    key: Text | None = None
    check_hostname: Bool = True
    min_version: TlsVersion = "TLSv1.2"

    @model_validator(mode="after")
    def _pair(self) -> TlsClientModel:
        if bool(self.key) and not self.cert:
            raise ConfigError("key", "needs cert")
        return self


class RetryModel(_Strict):
    initial: Duration | None = None
    max_delay: Duration | None = None
    max_attempts: Int(1, 1_000_000) | None = None

    def policy(self, base: RetryPolicy) -> RetryPolicy:
        """This retry block over ``base`` (the global policy, for a destination's own)."""
        return RetryPolicy(
            initial=base.initial if self.initial is None else self.initial,
            max_delay=base.max_delay if self.max_delay is None else self.max_delay,
            max_attempts=base.max_attempts if self.max_attempts is None else self.max_attempts)


class _Destination(_Strict):
    concurrency: Int(1, 64) = 1
    retry: RetryModel = RetryModel()
    transforms: Annotated[tuple[Any, ...], _v(_transforms)] = ()  # tag morphing on the copies
    deliver_between: Text | None = None  # "20:00-06:00": deliveries wait outside it
    days: list[Any] | None = None  # [mon, tue, ...]: the days the window opens on
    timezone: Text | None = None  # default: the router's local time zone

    def options(self) -> dict[str, Any]:
        return self.model_dump(exclude={"type", "concurrency", "retry", "deliver_between",
                                        "days", "timezone", "transforms"})

    @model_validator(mode="after")
    def _window(self) -> _Destination:
        parse_window(self.deliver_between, self.days, self.timezone)
        return self

    def window(self) -> Any:
        return parse_window(self.deliver_between, self.days, self.timezone)

    def _env_set(self, *keys: str) -> None:
        """Secrets are named by environment variable: each named one must be set now."""
        for key in keys:
            _env_set(key, getattr(self, key))


class FolderModel(_Destination):
    type: Literal["folder"]
    path: Text
    template: Annotated[str, _v(_template)] | None = None  # default: the tree, or a zip name
    staging: Text | None = None  # a folder (relative to path) the study is written in first
    zip: Bool = False  # one zip per study instead of a tree

    @model_validator(mode="after")
    def _staging_needs_a_study_folder(self) -> FolderModel:
        template = self.template or DEFAULT_FOLDER_TEMPLATE
        if self.staging and not self.zip and study_level(template) is None:
            raise ConfigError("staging", "needs a folder level of template holding "
                              "{StudyInstanceUID} (that folder is moved into place whole)")
        return self


class DicomModel(_Destination):
    type: Literal["dicom"]
    ae_title: AETitle
    host: Text
    port: Int(1, 65535)
    calling_ae_title: AETitle | None = None
    max_pdu: Int(0, 2**32 - 1) = 0
    timeout: Duration = 60.0
    sender: Choice("fast", "pynetdicom") = "fast"
    associations: Int(1, 16) = 1
    transfer_syntaxes: Annotated[tuple[str, ...], _v(parse_transfer_syntaxes)] = ()
    tls: TlsClientModel | None = None
    storage_commitment: Bool = False  # delivered only once the peer committed the instances
    commitment_timeout: Duration = 60.0  # how long to wait for the N-EVENT-REPORT
    # c-find: delivered only once the peer's C-FIND (Study Root, IMAGE level) lists the
    # instance (a peer may answer success for an instance it did not keep)
    verify: Choice("none", "c-find") = "none"

    @model_validator(mode="after")
    def _verify(self) -> DicomModel:
        if self.verify != "none" and self.storage_commitment:
            raise ConfigError("verify", "give verify or storage_commitment, not both (storage "
                              "commitment is the peer's own confirmation)")
        return self


class PeerModel(_Strict):
    """A DICOM peer: ``{ae_title, host, port}``."""

    ae_title: AETitle
    host: Text
    port: Int(1, 65535)


class MoveModel(_Destination):
    type: Literal["move"]
    source: PeerModel  # the peer that holds the studies and performs the C-MOVE
    move_destination: AETitle  # where it sends them (an AE title the source knows)
    calling_ae_title: AETitle | None = None
    query_model: Choice("study", "patient") = "study"
    timeout: Duration = 600.0  # association set-up, and between two C-MOVE responses
    tls: TlsClientModel | None = None


def _tls(value: Any, key: str) -> bool | str:
    """``verify_tls``: true / false, or the path of a CA bundle."""
    if isinstance(value, bool):
        return value
    return parse_str(value, key)


def _http_credentials(model: Any) -> None:
    """An HTTP peer's URL and credentials (a DICOMweb destination, an HTTP source)."""
    if not model.url.startswith(("http://", "https://")):
        raise ConfigError("url", f"expected an http:// or https:// URL, got {show(model.url)}")
    if model.username and not (model.password_env or model.password_file):
        raise ConfigError("username", "needs password_env or password_file (a password is "
                          "never written in the configuration)")
    if model.username and (model.token_env or model.token_file):
        raise ConfigError("token_env", "either username/password or a token, not both")
    model._env_set("password_env", "token_env")


class _HttpPeer(_Strict):
    """An HTTP peer's keys: a DICOMweb destination, an HTTP source."""

    url: Text
    username: Text | None = None
    password_env: Text | None = None
    password_file: Text | None = None
    token_env: Text | None = None
    token_file: Text | None = None
    verify_tls: Annotated[bool | str, _v(_tls)] = True
    timeout: Duration = 120.0

    @model_validator(mode="after")
    def _credentials(self) -> _HttpPeer:
        _http_credentials(self)
        return self


class DicomwebModel(_Destination, _HttpPeer):
    type: Literal["dicomweb"]
    batch_size: Int(1, 100_000) = 100
    batch_bytes: Size = 100_000_000
    # qido: after each batch, an instance counts as delivered only once the server's QIDO-RS
    # lists it (a server may answer 200 for an instance it did not keep)
    verify: Choice("none", "qido") = "none"


class _S3Access(_Strict):
    """The keys of one S3 bucket (the s3 destination, the shared spool); secrets by name."""

    bucket: Text
    endpoint_url: Text | None = None  # default: AWS
    region: Text | None = None
    access_key_env: Text | None = None  # default: the standard AWS credential chain
    secret_key_env: Text | None = None
    verify_tls: Annotated[bool | str, _v(lambda v, k: _tls(v, k))] = True

    @model_validator(mode="after")
    def _s3_credentials(self) -> _S3Access:
        if bool(self.access_key_env) != bool(self.secret_key_env):
            raise ConfigError("access_key_env", "access_key_env and secret_key_env go together")
        _env_set("access_key_env", self.access_key_env)
        _env_set("secret_key_env", self.secret_key_env)
        return self


class S3Model(_Destination, _S3Access):
    type: Literal["s3"]
    mode: Choice("zip", "instances") = "zip"
    key: Annotated[str, _v(_template)] | None = None  # default depends on mode (s3.py)
    timeout: Duration = 60.0


DESTINATION_MODELS: dict[str, type[_Destination]] = {
    "folder": FolderModel, "dicom": DicomModel, "dicomweb": DicomwebModel, "s3": S3Model,
    "move": MoveModel}
DESTINATION_TYPES = tuple(DESTINATION_MODELS)


def _destination_type(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else None
    return kind if isinstance(kind, str) or kind is None else show(kind)


AnyDestination = Annotated[
    Annotated[FolderModel, Tag("folder")] | Annotated[DicomModel, Tag("dicom")]
    | Annotated[DicomwebModel, Tag("dicomweb")] | Annotated[S3Model, Tag("s3")]
    | Annotated[MoveModel, Tag("move")],
    Discriminator(_destination_type),
]


#: a study's instance count at a dicom/dicomweb source must stay the same this long before
#: it is pulled (Orthanc's own StableAge default)
DEFAULT_SOURCE_STABLE_AGE = 60.0


class _Source(_Strict):
    interval: Duration = 30.0  # between two polls

    def options(self) -> dict[str, Any]:
        return self.model_dump(exclude={"type", "interval"})

    _env_set = _Destination._env_set

    @model_validator(mode="after")
    def _positive_interval(self) -> _Source:
        if self.interval < 0.1:
            raise ConfigError("interval", "must be at least 100ms")
        return self


def _lookback(value: Any, key: str) -> float:
    """``all`` (0: no date window) or a duration."""
    if value == "all":
        return 0.0
    return parse_duration(value, key)


class DicomSourceModel(_Source):
    type: Literal["dicom"]
    ae_title: AETitle
    host: Text
    port: Int(1, 65535)
    calling_ae_title: AETitle | None = None
    retrieve: Choice("move", "get") = "move"
    move_destination: AETitle | None = None  # default: the router's own ae_title
    lookback: Annotated[float, _v(_lookback)] = 7 * 86400.0
    source_stable_age: Duration = DEFAULT_SOURCE_STABLE_AGE
    query_model: Choice("study", "patient") = "study"
    timeout: Duration = 600.0
    tls: TlsClientModel | None = None


class _HttpSource(_Source, _HttpPeer):
    pass


class DicomwebSourceModel(_HttpSource):
    type: Literal["dicomweb"]
    lookback: Annotated[float, _v(_lookback)] = 7 * 86400.0
    source_stable_age: Duration = DEFAULT_SOURCE_STABLE_AGE


class OrthancSourceModel(_HttpSource):
    type: Literal["orthanc"]
    delete_after_pull: Bool = False
    batch: Int(1, 10_000) = 100  # changes read per request

    @model_validator(mode="before")
    @classmethod
    def _no_stable_age(cls, data: Any) -> Any:
        if isinstance(data, dict) and "source_stable_age" in data:
            raise ConfigError("source_stable_age", "not for an orthanc source: it pulls a "
                              "study at Orthanc's StableStudy event (Orthanc's StableAge "
                              "setting says when a study is stable there)")
        return data


SOURCE_MODELS: dict[str, type[_Source]] = {
    "dicom": DicomSourceModel, "dicomweb": DicomwebSourceModel, "orthanc": OrthancSourceModel}
SOURCE_TYPES = tuple(SOURCE_MODELS)

AnySource = Annotated[
    Annotated[DicomSourceModel, Tag("dicom")] | Annotated[DicomwebSourceModel, Tag("dicomweb")]
    | Annotated[OrthancSourceModel, Tag("orthanc")],
    Discriminator(lambda v: _destination_type(v)),
]


class StateModel(_Strict):
    """``state:``: where the router keeps its state. ``sqlite`` (the embedded default: a file
    in the spool) or ``postgresql`` (several routers share it; the DSN comes from an
    environment variable or a file, never from the YAML)."""

    type: Choice("sqlite", "postgresql") = "sqlite"
    dsn_env: Text | None = None
    dsn_file: Text | None = None
    lease: Duration = 30.0  # a node that stops heartbeating this long is gone; its jobs resume
    pool_size: Int(2, 500) = 8
    connect_timeout: Duration = 10.0

    @model_validator(mode="after")
    def _dsn(self) -> StateModel:
        if self.type == "sqlite":
            for key in ("dsn_env", "dsn_file"):
                if getattr(self, key):
                    raise ConfigError(key, "only for type: postgresql")
            return self
        if not self.dsn_env and not self.dsn_file:
            raise ConfigError("dsn_env", "required for type: postgresql (the environment "
                              "variable holding the connection string, e.g. DICOMROUTER_DSN)")
        if self.dsn_env and self.dsn_file:
            raise ConfigError("dsn_file", "give dsn_env or dsn_file, not both")
        _env_set("dsn_env", self.dsn_env)
        _readable(self.dsn_file, "dsn_file")
        if self.lease < 3:
            raise ConfigError("lease", "must be at least 3 s (heartbeats renew it every "
                              "third of it)")
        return self


class SharedSpoolModel(_S3Access):
    """``shared_spool:``: the instances of every node in one S3 bucket (cluster mode)."""

    type: Literal["s3"]
    prefix: Text = ""
    timeout: Duration = 10.0  # per S3 request: a C-STORE waits for it in ack_after: shared

    @model_validator(mode="after")
    def _prefix(self) -> SharedSpoolModel:
        if self.prefix.startswith("/") or ".." in self.prefix.split("/"):
            raise ConfigError("prefix", "must be a relative key prefix (no leading /, no ..)")
        return self


def _node_id(value: Any, key: str) -> str:
    text = parse_str(value, key)
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", text):
        raise ConfigError(key, f"{show(text)} is not a node id (letters, digits, '.', '_', "
                          "'-'; at most 64)")
    return text


class WebModel(_Strict):
    """``web:``. Off loopback, every endpoint but /health (and /metrics with
    ``metrics_public``) needs the token: the pages list patients and their studies."""

    enabled: Bool = True
    bind: Text = "127.0.0.1"
    port: Int(1, 65535) = 8080
    token_env: Text | None = None
    metrics_public: Bool = False  # /metrics without the token off loopback (a scraper)

    @model_validator(mode="after")
    def _token(self) -> WebModel:
        _Destination._env_set(self, "token_env")  # type: ignore[arg-type]
        if self.token_env and CHECK_SECRETS.get() and \
                not os.environ.get(self.token_env, "").strip():
            raise ConfigError("token_env", f"environment variable {self.token_env} is empty")
        if self.enabled and not is_loopback(self.bind) and not self.token_env:
            raise ConfigError("token_env", f"required with web.bind {self.bind}, which is not "
                              "a loopback address: the status page and the REST API list "
                              "patients and their studies; name an environment variable "
                              "holding a token (or bind 127.0.0.1)")
        return self


class ListenerModel(_Strict):
    """One more port (``listeners:``); unset keys are taken from the top level."""

    name: Text | None = None
    ae_title: AETitle | None = None
    bind: Text | None = None
    port: Int(1, 65535)
    allowed_calling_aes: Annotated[tuple[str, ...], _v(_ae_list)] | None = None
    check_called_ae: Bool | None = None
    tls: TlsServerModel | None = None

    @model_validator(mode="before")
    @classmethod
    def _port_required(cls, data: Any) -> Any:
        if isinstance(data, dict) and "port" not in data:
            raise ConfigError("port", "required: the port this listener listens on")
        return data


class KnownAEModel(_Strict):
    host: Text
    port: Int(1, 65535)
    calling_ae: AETitle | None = None
    count_query: Bool = False


class RouteModel(_Strict):
    name: Text | None = None
    when: Annotated[tuple[Any, ...], _v(_when)] = ()
    to: Annotated[tuple[str, ...], _v(_to)] = None  # type: ignore[assignment]
    stop: Bool = False
    fallback: Bool = False
    transforms: Annotated[tuple[Any, ...], _v(_transforms)] = ()
    stable_age: Duration | None = None  # overrides the global one for this route
    expect: Annotated[dict[str, Any] | None, _v(_expect)] = None  # complete when all are in
    level: Choice("study", "series") = "study"  # series: each series sent once it is stable
    deliver_between: Text | None = None  # jobs this route creates wait for the window
    days: list[Any] | None = None
    timezone: Text | None = None

    def window(self) -> Any:
        return parse_window(self.deliver_between, self.days, self.timezone)

    @model_validator(mode="after")
    def _fallback_has_no_conditions(self) -> RouteModel:
        self.window()  # a bad window is a keyed error
        if self.fallback and self.when:
            raise ConfigError("fallback", "a fallback route fires when no other route "
                              "matched: it takes no when")
        if self.fallback and self.stop:
            raise ConfigError("stop", "a fallback route is always the last one to fire")
        return self

    @model_validator(mode="before")
    @classmethod
    def _to_required(cls, data: Any) -> Any:
        if isinstance(data, dict) and "to" not in data:
            raise ConfigError("to", "required: the destination names this route sends to")
        return data


class ConfigModel(_Strict):
    """The whole file; the defaults are the router's defaults."""

    ae_title: AETitle = DEFAULT_AE_TITLE
    bind: Text = "0.0.0.0"
    port: Int(1, 65535) = DEFAULT_PORT
    max_pdu: Int(0, 2**32 - 1) = 0
    receiver: Choice("fast", "pynetdicom") = "fast"
    receivers: Int(1, 16) = 1
    allowed_calling_aes: Annotated[tuple[str, ...], _v(_ae_list)] = ()
    check_called_ae: Bool = False
    spool: Text = "spool"
    stable_age: Duration = 3.0
    keep_after_delivery: Bool = False
    retention: Duration = 0.0
    max_spool_size: Size = 0
    retry: RetryModel = RetryModel()
    destinations: dict[str, AnyDestination] | None = None
    routes: list[RouteModel] | None = None
    log_level: Annotated[str, _v(_log_level)] = "INFO"
    query_retrieve: Bool = True
    commitment_scp: Bool = True
    known_aes: dict[AETitle, KnownAEModel] | None = None
    sources: dict[str, AnySource] | None = None
    web: WebModel = WebModel()
    tls: TlsServerModel | None = None  # DICOM TLS on the top-level listener
    listeners: list[ListenerModel] | None = None
    sweep: Annotated[Any, _v(lambda v, k: _sweep(v, k))] = None
    force_complete_after: Duration = 0.0  # a study receiving this long completes anyway
    force_complete: Choice("route", "hold") = "route"  # ... or is held for an operator
    # several routers (docs/scale-out.md)
    state: StateModel = StateModel()
    shared_spool: SharedSpoolModel | None = None
    ack_after: Choice("shared", "local") | None = None  # default: shared (with shared_spool)
    node_id: Annotated[str, _v(_node_id)] | None = None  # default: the host name
    max_query_results: Int(1, 10_000_000) = Limits.max_query_results
    # listener limits (docs/security.md)
    acse_timeout: Duration = Limits.acse_timeout
    network_timeout: Duration = Limits.network_timeout
    dimse_timeout: Duration = Limits.dimse_timeout
    max_associations: Int(1, 10_000) = Limits.max_associations
    max_pending_connections: Int(1, 10_000) = Limits.max_pending_connections
    max_associate_rq_size: Annotated[int, _v(parse_size, 1024, 16 * 2**20)] = \
        Limits.max_associate_rq_size
    min_free_disk: Size = Limits.min_free_disk
    max_sequence_depth: Int(1, 100) = Limits.max_sequence_depth

    @model_validator(mode="after")
    def _consistent(self) -> ConfigModel:
        for key in ("acse_timeout", "network_timeout", "dimse_timeout"):
            if getattr(self, key) <= 0:
                raise ConfigError(key, "must be more than 0")
        if self.web.enabled and self.web.port == self.port:
            raise ConfigError("web.port", f"is the DICOM port ({self.port}); choose another")
        ports = {self.port: "port"}
        names = {"main"}
        for i, lst in enumerate(self.listeners or []):
            if lst.port in ports or (self.web.enabled and lst.port == self.web.port):
                raise ConfigError(f"listeners[{i}].port", f"{lst.port} is already used by "
                                  f"{ports.get(lst.port, 'web.port')}")
            ports[lst.port] = f"listeners[{i}]"
            name = lst.name or f"listener{i + 2}"
            if name in names:
                raise ConfigError(f"listeners[{i}].name", f"{name!r} is used twice")
            names.add(name)
        if (self.tls or any(lst.tls for lst in self.listeners or [])) and \
                self.receiver != "fast":
            raise ConfigError("tls", "DICOM TLS needs 'receiver: fast'")
        if self.shared_spool is not None and self.state.type != "postgresql":
            raise ConfigError("shared_spool", "needs 'state: {type: postgresql, ...}': the "
                              "nodes sharing the instances must share their state")
        if self.ack_after is not None and self.shared_spool is None:
            raise ConfigError("ack_after", "only with shared_spool (without it an instance "
                              "is acknowledged once fsync'd in the local spool)")
        if self.receivers > 1 and self.receiver != "fast":
            raise ConfigError("receivers", "several receiver processes need 'receiver: fast'")
        known = list(self.destinations or {})
        sources = list(self.sources or {})
        for i, route in enumerate(self.routes or []):
            wrong = [v for v in literal_values(route.when, "Listener") if v not in names]
            if wrong:
                raise ConfigError(f"routes[{i}].when.Listener", f"unknown listener "
                                  f"{show(wrong[0])} (listeners: {', '.join(sorted(names))})")
            unknown = [v for v in literal_values(route.when, "Source") if v not in sources]
            if unknown:
                raise ConfigError(f"routes[{i}].when.Source", f"unknown source "
                                  f"{show(unknown[0])} (sources: "
                                  f"{', '.join(sources) or 'none defined'})")
            for dest in route.to:
                if dest not in known:
                    raise ConfigError(f"routes[{i}].to", f"unknown destination {show(dest)} "
                                      f"(known: {', '.join(known) or 'none defined'})")
        return self

    @staticmethod
    def _source_options(name: str, model: Any, path: Any) -> dict[str, Any]:
        options = model.options()
        _tls_client(options, path, f"sources.{name}")
        return dict(options)

    def _listeners(self, path: Any) -> tuple[ListenerConfig, ...]:
        out = [ListenerConfig("main", self.ae_title, self.bind, self.port,
                              self.allowed_calling_aes, self.check_called_ae,
                              _tls_server(self.tls, path, "tls"))]
        for i, lst in enumerate(self.listeners or []):
            out.append(ListenerConfig(
                lst.name or f"listener{i + 2}", lst.ae_title or self.ae_title,
                lst.bind or self.bind, lst.port,
                self.allowed_calling_aes if lst.allowed_calling_aes is None
                else lst.allowed_calling_aes,
                self.check_called_ae if lst.check_called_ae is None else lst.check_called_ae,
                _tls_server(lst.tls, path, f"listeners[{i}].tls")))
        return tuple(out)

    def build(self, base_dir: Path, source: str) -> Config:
        """The router's Config: relative paths taken from ``base_dir``."""
        def path(value: str) -> Path:
            p = Path(os.path.expanduser(value))
            return p if p.is_absolute() else base_dir / p

        retry = self.retry.policy(RetryPolicy())
        destinations = {}
        for name, d in (self.destinations or {}).items():
            options = d.options()
            if d.type == "folder":
                options["path"] = str(path(options["path"]))
            _tls_client(options, path, f"destinations.{name}")
            destinations[str(name)] = DestinationConfig(
                name=str(name), type=d.type, options=options, concurrency=d.concurrency,
                retry=d.retry.policy(retry), schedule=d.window(), transforms=d.transforms)
        routes = tuple(RouteConfig(name=r.name or f"route {i + 1}", when=r.when, to=r.to,
                                   stop=r.stop, fallback=r.fallback, transforms=r.transforms,
                                   stable_age=r.stable_age, schedule=r.window(),
                                   expect=r.expect, level=r.level)
                       for i, r in enumerate(self.routes or []))
        limits = Limits(**{k: getattr(self, k) for k in Limits.__dataclass_fields__})
        return Config(
            ae_title=self.ae_title, bind=self.bind, port=self.port, max_pdu=self.max_pdu,
            allowed_calling_aes=self.allowed_calling_aes, spool=path(self.spool),
            stable_age=self.stable_age, keep_after_delivery=self.keep_after_delivery,
            retention=self.retention, max_spool_size=self.max_spool_size, retry=retry,
            destinations=destinations, routes=routes, log_level=self.log_level,
            receiver=self.receiver, receivers=self.receivers, limits=limits,
            check_called_ae=self.check_called_ae, query_retrieve=self.query_retrieve,
            commitment_scp=self.commitment_scp,
            known_aes={str(k): KnownAE(str(k), v.host, v.port, v.calling_ae, v.count_query)
                       for k, v in (self.known_aes or {}).items()},
            sources={str(k): SourceConfig(str(k), v.type, v.interval,
                                          self._source_options(k, v, path))
                     for k, v in (self.sources or {}).items()},
            web=WebConfig(**self.web.model_dump()),
            listeners=self._listeners(path),
            sweep=self.sweep, force_complete_after=self.force_complete_after,
            force_complete=self.force_complete,
            state=StateConfig(self.state.type, _dsn(self.state, path), self.state.lease,
                              self.state.pool_size, self.state.connect_timeout),
            shared_spool=self.shared_spool.model_dump() if self.shared_spool else None,
            ack_after=self.ack_after or ("shared" if self.shared_spool else "local"),
            node_id=self.node_id or _default_node_id(),
            source=source)


def _dsn(model: StateModel, path: Any) -> str:
    """The PostgreSQL connection string (from its environment variable or file)."""
    if model.dsn_env:
        return os.environ[model.dsn_env]
    if model.dsn_file:
        with open(path(model.dsn_file), encoding="utf-8") as f:
            return f.readline().strip()
    return ""


def _default_node_id() -> str:
    import re
    import socket

    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64].strip("-.")
    return name or "node"


def _tls_server(model: TlsServerModel | None, path: Any, key: str) -> TlsConfig | None:
    if model is None:
        return None
    files = {k: str(path(getattr(model, k))) if getattr(model, k) else None
             for k in ("cert", "key", "ca")}
    for k, f in files.items():
        _readable(f, f"{key}.{k}")
    return TlsConfig(cert=files["cert"] or "", key=files["key"] or "", ca=files["ca"],
                     verify_client=model.verify_client, min_version=model.min_version,
                     subject_aes={str(k): tuple(v) for k, v in (model.subject_aes or {}).items()})


def _tls_client(options: dict[str, Any], path: Any, key: str) -> None:
    """Make a destination's or source's ``tls`` file paths absolute (and check them)."""
    tls = options.get("tls")
    if not tls:
        return
    for k in ("ca", "cert", "key"):
        if tls.get(k):
            tls[k] = str(path(tls[k]))
            _readable(tls[k], f"{key}.tls.{k}")


def keyed_error(err: ValidationError, data: Any) -> ConfigError:
    """The first error of a ValidationError, as ``key.path: problem`` (the destination and
    source unions named by their ``type``)."""
    return generic_keyed_error(err, data, {"destinations": ("destination", DESTINATION_TYPES),
                                          "sources": ("source", SOURCE_TYPES)})


def from_dict(raw: Any, base_dir: Path, source: str, secrets: bool = True) -> Config:
    """Validate a parsed YAML document; relative paths are taken from ``base_dir``.
    ``secrets=False``: the environment variables naming destinations' and sources' secrets
    need not be set (for commands that only read the state)."""
    token = CHECK_SECRETS.set(secrets)
    try:
        model = ConfigModel.model_validate({} if raw is None else raw)
        return model.build(base_dir, source)
    except ValidationError as err:
        raise keyed_error(err, raw) from None
    finally:
        CHECK_SECRETS.reset(token)


__all__ = ["DESTINATION_MODELS", "DESTINATION_TYPES", "SOURCE_MODELS", "SOURCE_TYPES",
           "ConfigModel",
           "from_dict", "keyed_error"]
