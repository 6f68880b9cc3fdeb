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
    ValidationError,
    model_validator,
)

from ..rules import literal_values
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
from .base import (
    DEFAULT_AE_TITLE,
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
    parse_size,
    parse_str,
    show,
)
from .peers import (
    DESTINATION_MODELS,
    DESTINATION_TYPES,
    SOURCE_MODELS,
    SOURCE_TYPES,
    AnyDestination,
    AnySource,
    RetryModel,
    S3Access,
    TlsServerModel,
)
from .validators import (
    ae_list,
    expect_value,
    log_level_value,
    sweep_value,
    to_value,
    transforms_value,
    when_value,
)

_v = parsed
_Strict = Strict
_readable = readable
_env_set = env_set


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


class SharedSpoolModel(S3Access):
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
        env_set("token_env", self.token_env)
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
    allowed_calling_aes: Annotated[tuple[str, ...], _v(ae_list)] | None = None
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
    when: Annotated[tuple[Any, ...], _v(when_value)] = ()
    to: Annotated[tuple[str, ...], _v(to_value)] = None  # type: ignore[assignment]
    stop: Bool = False
    fallback: Bool = False
    transforms: Annotated[tuple[Any, ...], _v(transforms_value)] = ()
    stable_age: Duration | None = None  # overrides the global one for this route
    expect: Annotated[dict[str, Any] | None, _v(expect_value)] = None  # complete when all are in
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
    allowed_calling_aes: Annotated[tuple[str, ...], _v(ae_list)] = ()
    check_called_ae: Bool = False
    spool: Text = "spool"
    stable_age: Duration = 3.0
    keep_after_delivery: Bool = False
    retention: Duration = 0.0
    max_spool_size: Size = 0
    retry: RetryModel = RetryModel()
    destinations: dict[str, AnyDestination] | None = None
    routes: list[RouteModel] | None = None
    log_level: Annotated[str, _v(log_level_value)] = "INFO"
    query_retrieve: Bool = True
    commitment_scp: Bool = True
    known_aes: dict[AETitle, KnownAEModel] | None = None
    sources: dict[str, AnySource] | None = None
    web: WebModel = WebModel()
    tls: TlsServerModel | None = None  # DICOM TLS on the top-level listener
    listeners: list[ListenerModel] | None = None
    sweep: Annotated[Any, _v(lambda v, k: sweep_value(v, k))] = None
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
