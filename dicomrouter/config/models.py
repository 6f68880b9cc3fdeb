"""The configuration: pydantic models of the YAML file, the only declaration of each key (its
type, default and checks), and the router reads them as they are (frozen).

Every value goes through the strict parsers of ``values.py`` (``"5"`` is not a port, ``yes`` is
not a boolean) and every mapping refuses unknown keys with a "did you mean". A
``ValidationError`` becomes one ConfigError whose key is the path as the user wrote it
(``destinations.pacs.port``, ``routes[1].to``), never pydantic's wording or a traceback.
Relative paths are taken from the configuration file's folder (the validation context's
``base_dir``). What the file does not say directly is resolved once, after validation, into
private attributes read through properties: each route's name, each destination's retry policy
over the global one, the listeners with what they inherit, the DSN and the node id.
Destination and source types are registered with their models (``peers.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, PrivateAttr, ValidationError, ValidationInfo, model_validator

from ..rules import AGGREGATES, keys_of, literal_values, non_monotonic
from ..schedule import parse_window
from ..schema import (
    CHECK_SECRETS,
    AETitle,
    Bool,
    Choice,
    Duration,
    Folder,
    Int,
    Size,
    Strict,
    Text,
    parsed,
)
from ..schema import keyed_error as generic_keyed_error
from ..values import PRIORITIES
from .base import (
    DEFAULT_AE_TITLE,
    DEFAULT_PORT,
    ConfigError,
    parse_size,
    show,
)
from .coerce import CoerceModel, check_known_aes
from .dicomweb import DicomwebModel, check_dicomweb
from .groups import check_groups
from .hl7 import Hl7ListenerModel, Hl7RuleModel
from .mpps import MppsKeys
from .notifications import NotificationModel
from .peers import (
    DESTINATION_MODELS,
    SOURCE_MODELS,
    DestinationBase,
    RetryModel,
    SourceBase,
    TlsServerModel,
    validate_entries,
)
from .prefetch import PrefetchModel, resolve_prefetch
from .processing import StepModel, check_processing
from .proxy import ProxyKeys
from .runtime import SharedSpoolModel, StateModel, WebModel, default_node_id, node_id_value
from .validators import (
    ae_list,
    expect_value,
    log_level_value,
    route_to_value,
    sweep_value,
    transforms_value,
    when_value,
)


class ListenerModel(Strict):
    """One more port (``listeners:``); unset keys are taken from the top level (the resolved
    listeners, ``ConfigModel.all_listeners``, have every key set)."""

    name: Text | None = None
    ae_title: AETitle | None = None
    bind: Text | None = None
    port: Int(1, 65535)
    allowed_calling_aes: Annotated[tuple[str, ...], parsed(ae_list)] | None = None
    check_called_ae: Bool | None = None
    tls: TlsServerModel | None = None

    @model_validator(mode="before")
    @classmethod
    def _port_required(cls, data: Any) -> Any:
        if isinstance(data, dict) and "port" not in data:
            raise ConfigError("port", "required: the port this listener listens on")
        return data


class KnownAEModel(Strict):
    """``known_aes.<AE title>``: a peer the router opens associations to."""

    host: Text
    port: Int(1, 65535)
    calling_ae: AETitle | None = None  # the router's AE title toward it (default: ae_title)
    count_query: Bool = False  # ask it (C-FIND) how many instances a study it sends has

    _ae_title: str = PrivateAttr("")

    @property
    def ae_title(self) -> str:
        return self._ae_title


class RouteModel(Strict):
    name: Text | None = None
    when: Annotated[tuple[Any, ...], parsed(when_value)] = ()
    to: Annotated[tuple[str, ...], parsed(route_to_value)] = None  # type: ignore[assignment]
    stop: Bool = False
    fallback: Bool = False
    transforms: Annotated[tuple[Any, ...], parsed(transforms_value)] = ()
    stable_age: Duration | None = None  # overrides the global one for this route
    # complete early once every expected instance is in
    expect: Annotated[dict[str, Any] | None, parsed(expect_value)] = None
    level: Choice("study", "series") = "study"  # series: each series sent once it is stable
    # immediate: instances go as they arrive, the study still completes by its stable age
    forward: Choice("complete", "immediate") = "complete"
    # inside a study, per destination: series by series, or what references others last
    # (ordering.py); None: as the ledger lists them
    order: Choice("series", "references") | None = None
    deliver_between: Text | None = None  # jobs this route creates wait for the window
    days: list[Any] | None = None
    timezone: Text | None = None
    # the jobs' priority (the most urgent matching route's, per destination): claims take
    # stat, high, routine, low in that order, then the oldest
    priority: Choice(*PRIORITIES) = "routine"
    hold: Bool = False  # quarantine: the jobs wait for `dicomrouter release` (or reject)
    coerce: CoerceModel | None = None  # reconcile patient/order attributes (config/coerce.py)
    process: tuple[StepModel, ...] = ()  # processing steps (config/processing.py, issue 29)
    results: tuple[Text, ...] = ()  # where the steps' output instances go
    # studies whose steps run at the same time (default: 1 with a step on this machine, 4
    # when every step is remote: a study waiting for its results holds no other one back)
    process_concurrency: Int(1, 64) | None = None

    _schedule: Any = PrivateAttr(None)

    @property
    def schedule(self) -> Any:
        """schedule.Window: the jobs this route creates wait for it (None: any time)."""
        return self._schedule

    def window(self) -> Any:
        return self._schedule

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

    @model_validator(mode="after")
    def _fallback_has_no_conditions(self) -> RouteModel:
        self._schedule = parse_window(self.deliver_between, self.days, self.timezone)
        if not self.to and not self.process:
            raise ConfigError("to", "needs at least one destination")
        if self.fallback and self.when:
            raise ConfigError("fallback", "a fallback route fires when no other route "
                              "matched: it takes no when")
        if self.fallback and self.stop:
            raise ConfigError("stop", "a fallback route is always the last one to fire")
        if self.forward == "immediate":
            self._forward_immediate()
        if self.order == "references" and self.level == "series":
            raise ConfigError("order", "references is not with level: series (a series sent "
                              "alone cannot wait for the delivery of another series it "
                              "references); use level: study, or order: series")
        if self.hold and self.level == "series":
            raise ConfigError("hold", "not with level: series (a held study is released "
                              "whole: hold the study)")
        return self

    def _forward_immediate(self) -> None:
        """What ``forward: immediate`` cannot be combined with, and why."""
        needs_whole = {"fallback": "a fallback route fires only once no other route matched "
                                   "the complete study",
                       "expect": "it sends instances as they arrive, before any expectation",
                       "stable_age": "it sends instances as they arrive, without a stable age",
                       "deliver_between": "it sends instances as they arrive",
                       "level": "it sends instances as they arrive, not series",
                       "order": "it sends instances as they arrive, in arrival order"}
        for key, why in needs_whole.items():
            value = getattr(self, key)
            if value not in (None, False, "study"):
                raise ConfigError(key, f"not with forward: immediate ({why})")
        whole = sorted(set(keys_of(self.when)) & set(AGGREGATES))
        if whole:
            raise ConfigError("forward", f"immediate needs conditions on instance attributes; "
                              f"{whole[0]} is known only once the study is complete")
        undone = non_monotonic(self.when)
        if undone:
            raise ConfigError("forward", f"immediate needs conditions that, once they hold, "
                              f"hold for the rest of the study; {undone} can stop holding "
                              "when a later instance arrives")

    @model_validator(mode="before")
    @classmethod
    def _to_required(cls, data: Any) -> Any:
        if isinstance(data, dict) and "to" not in data:
            if data.get("process"):  # its steps are where it sends (process:<route>)
                return {**data, "to": []}
            raise ConfigError("to", "required: the destination names this route sends to")
        return data


class ConfigModel(ProxyKeys, MppsKeys):
    """The whole file; the defaults are the router's defaults (the Q/R proxy's keys:
    ``proxy.py``; the MPPS keys: ``mpps.py``)."""

    ae_title: AETitle = DEFAULT_AE_TITLE
    bind: Text = "0.0.0.0"
    port: Int(1, 65535) = DEFAULT_PORT
    max_pdu: Int(0, 2**32 - 1) = 0
    receiver: Choice("fast", "pynetdicom") = "fast"
    receivers: Int(1, 16) = 1
    allowed_calling_aes: Annotated[tuple[str, ...], parsed(ae_list)] = ()
    check_called_ae: Bool = False
    spool: Folder = Field("spool", validate_default=True)  # instances and state.db
    stable_age: Duration = 3.0
    keep_after_delivery: Bool = False
    retention: Duration = 0.0
    max_spool_size: Size = 0
    # the receive log (docs/architecture.md "Ack after durability"): one synced record write
    # per instance before the answer, the spool files written behind it and synced in batches
    receive_log: Bool = True
    receive_log_size: Annotated[int, parsed(parse_size, 1 << 18, 1 << 40)] = 256 << 20
    receive_log_max_record: Annotated[int, parsed(parse_size, 4096, 1 << 30)] = 4 << 20
    receive_log_wait: Duration = 10.0  # no room in the log this long: 0xA700
    retry: RetryModel = RetryModel()
    destinations: dict[str, DestinationBase] = {}
    routes: tuple[RouteModel, ...] = ()
    log_level: Annotated[str, parsed(log_level_value)] = "INFO"
    query_retrieve: Bool = True  # answer C-FIND / C-MOVE / C-GET over the spool
    commitment_scp: Bool = True  # answer storage commitment for what the spool holds
    known_aes: dict[AETitle, KnownAEModel] = {}
    sources: dict[str, SourceBase] = {}
    web: WebModel = WebModel()
    dicomweb: DicomwebModel = DicomwebModel()  # STOW-RS in (config/dicomweb.py)
    tls: TlsServerModel | None = None  # DICOM TLS on the top-level listener
    listeners: tuple[ListenerModel, ...] = ()  # more ports (see all_listeners)
    sweep: Annotated[Any, parsed(lambda v, k: sweep_value(v, k))] = None
    force_complete_after: Duration = 0.0  # a study receiving this long completes anyway
    force_complete: Choice("route", "hold") = "route"  # ... or is held for an operator
    # forward: immediate: an association to a dicom destination waits this long for the next
    # arrival before it is released (0: released after each run)
    forward_keep_open: Duration = 2.0
    # a delivery run sends at most this many instances, then lets a more urgent job of the
    # destination go first (priority: stat overtakes a long routine study)
    chunk_instances: Int(1, 1_000_000) = 200
    # several routers (docs/scale-out.md)
    state: StateModel = StateModel()
    shared_spool: SharedSpoolModel | None = None
    ack_after: Choice("shared", "local") | None = None  # default: shared (with shared_spool)
    node_id: Annotated[str, parsed(node_id_value)] | None = None  # default: the host name
    max_query_results: Int(1, 10_000_000) = 10_000  # C-FIND answers to one query
    # WADO-RS of a study not in the spool waits this long for the Q/R proxy to fetch it
    wado_proxy_timeout: Duration = 300.0
    # listener limits (docs/security.md)
    acse_timeout: Duration = 30.0  # TCP connect → complete A-ASSOCIATE-RQ (ARTIM)
    network_timeout: Duration = 60.0  # one PDU, once its header arrived (+ per MiB of it)
    dimse_timeout: Duration = 60.0  # an association with no message this long is aborted
    max_associations: Int(1, 10_000) = 64  # established at once
    max_pending_connections: Int(1, 10_000) = 32  # not yet associated; the oldest is dropped
    max_associate_rq_size: Annotated[int, parsed(parse_size, 1024, 16 * 2**20)] = 65536
    min_free_disk: Size = 1_000_000_000  # below it on the spool's disk: 0xA700
    max_sequence_depth: Int(1, 100) = 32  # deeper nesting in a received dataset: 0xC000
    # conversions (transcoding) run in processes of their own (conversion.py)
    conversion_processes: Int(1, 64) = 1  # at most this many conversions at once
    conversion_timeout: Duration = 600.0  # a longer conversion is stopped (its process killed)
    conversion_idle: Duration = 60.0  # the processes stop after this long without a conversion
    notifications: tuple[NotificationModel, ...] = ()  # webhooks / e-mail on events
    hl7: Hl7ListenerModel | None = None  # the HL7 v2 (MLLP) listener (issue 27)
    hl7_rules: tuple[Hl7RuleModel, ...] = ()  # what HL7 orders / ADT do (default: record)
    prefetch: tuple[PrefetchModel, ...] = ()  # prior prefetch rules (config/prefetch.py)
    prefetch_workers: Int(1, 64) = 2  # prefetches (queries and retrieves) run at once

    _source: str = PrivateAttr("embedded defaults")
    _listeners: tuple[ListenerModel, ...] = PrivateAttr(())

    @model_validator(mode="before")
    @classmethod
    def _entries(cls, data: Any, info: ValidationInfo) -> Any:
        """``destinations`` and ``sources`` through their type registries; empty mappings and
        lists for absent ones."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for key, registry, what in (("destinations", DESTINATION_MODELS, "destination"),
                                    ("sources", SOURCE_MODELS, "source")):
            try:
                data[key] = validate_entries(data.get(key), info, registry, what)
            except ConfigError as exc:
                raise ConfigError(f"{key}.{exc.key}" if exc.key else key, exc.problem) \
                    from None
        for key in ("routes", "listeners", "notifications", "hl7_rules", "prefetch",
                    "known_aes"):
            if data.get(key) is None:
                data.pop(key, None)
        return data

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
        if self.hl7 is not None and (self.hl7.port in ports or
                                     (self.web.enabled and self.hl7.port == self.web.port)):
            raise ConfigError("hl7.port", f"{self.hl7.port} is already used by "
                              f"{ports.get(self.hl7.port, 'web.port')}")
        if (self.tls or any(lst.tls for lst in self.listeners or [])) and \
                self.receiver != "fast":
            raise ConfigError("tls", "DICOM TLS needs 'receiver: fast'")
        if self.shared_spool is not None and self.state.type != "postgresql":
            raise ConfigError("shared_spool", "needs 'state: {type: postgresql, ...}': the "
                              "nodes sharing the instances must share their state")
        if self.ack_after is not None and self.shared_spool is None:
            raise ConfigError("ack_after", "only with shared_spool (without it an instance "
                              "is acknowledged once fsync'd in the local spool)")
        if self.receive_log and self.receive_log_max_record * 4 > self.receive_log_size:
            raise ConfigError("receive_log_max_record", f"{self.receive_log_max_record} bytes "
                              f"is more than a quarter of receive_log_size "
                              f"({self.receive_log_size}): make the log larger")
        if self.receive_log_wait <= 0:
            raise ConfigError("receive_log_wait", "must be more than 0")
        if self.receivers > 1 and self.receiver != "fast":
            raise ConfigError("receivers", "several receiver processes need 'receiver: fast'")
        check_dicomweb(self.dicomweb, self.web.port if self.web.enabled else None, ports,
                       self.routes or ())
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
                early = [j for j, r in enumerate(self.routes) if dest in r.to and
                         (r.forward == "immediate" or r.level == "series")]
                if route.hold and early:
                    raise ConfigError(f"routes[{i}].hold", f"{show(dest)} also gets studies "
                                      f"before they complete (routes[{early[0]}]: forward: "
                                      "immediate or level: series), so it cannot hold them")
                why = self.destinations[dest].whole_study() if route.forward == "immediate" \
                    else ""
                if why:
                    raise ConfigError(f"routes[{i}].forward", f"immediate cannot send to "
                                      f"{show(dest)}: {why}")
                why = self.destinations[dest].whole_study() if route.order else ""
                if why:
                    raise ConfigError(f"routes[{i}].order", f"{route.order} does not apply to "
                                      f"{show(dest)}: {why}, not instances one by one")
                forwarding = next((r.name or f"route {n + 1}" for n, r in enumerate(self.routes)
                                   if r.forward == "immediate" and dest in r.to), None)
                if route.order and forwarding:
                    raise ConfigError(f"routes[{i}].order", f"{route.order} cannot hold for "
                                      f"{show(dest)}: route {forwarding!r} forwards studies "
                                      "there as they arrive (forward: immediate), in arrival "
                                      "order")
        return self

    @model_validator(mode="after")
    def _notifications_name_what_exists(self) -> ConfigModel:
        known = list(self.destinations or {})
        route_names = {r.name or f"route {i + 1}" for i, r in enumerate(self.routes)}
        for i, note in enumerate(self.notifications):
            for d in note.destinations or ():
                if d not in known:
                    raise ConfigError(f"notifications[{i}].destinations", f"unknown destination "
                                      f"{show(d)} (known: {', '.join(known) or 'none defined'})")
            for r in note.routes or ():
                if r not in route_names:
                    raise ConfigError(f"notifications[{i}].routes", f"unknown route {show(r)} "
                                      f"(routes: {', '.join(sorted(route_names)) or 'none'})")
        return self

    @model_validator(mode="after")
    def _coerce_peers_known(self) -> ConfigModel:
        return check_known_aes(self)

    @model_validator(mode="after")
    def _group_members_known(self) -> ConfigModel:
        return check_groups(self)  # destination groups (issue 29, item 4)

    @model_validator(mode="after")
    def _processing_results_known(self) -> ConfigModel:
        return check_processing(self)  # processing steps (issue 29, items 1 and 2)

    @model_validator(mode="after")
    def _resolve(self) -> ConfigModel:
        """What the file leaves to defaults or inheritance, filled in once (these objects
        were made by this validation: nothing else holds them yet)."""
        retry = self.retry.policy()
        fields = {"retry": retry, "ack_after": self.ack_after or
                  ("shared" if self.shared_spool else "local"),
                  "node_id": self.node_id or default_node_id(),
                  "routes": tuple(r if r.name else r.model_copy(update={"name": f"route {i + 1}"})
                                  for i, r in enumerate(self.routes))}
        for key, value in fields.items():
            object.__setattr__(self, key, value)
        for name, d in self.destinations.items():
            d._retry_policy = d.retry.policy(retry)
            attempts = int(d._retry_policy.max_attempts)
            if "breaker_failures" in d.model_fields_set and d.breaker_failures >= attempts:
                # the default (5) is not refused: configs with a low max_attempts predate it
                raise ConfigError(
                    f"destinations.{name}.breaker_failures",
                    f"{d.breaker_failures} must be less than the destination's "
                    f"retry.max_attempts ({attempts}): each of the first breaker_failures "
                    "failed runs uses an attempt, so a job failing them all would be "
                    "dead-lettered before the breaker opens (0 turns the breaker off)")
        for ae, known in self.known_aes.items():
            known._ae_title = str(ae)
        self._listeners = self.resolve_listeners()
        return resolve_prefetch(self, RouteModel)  # checked; their routes in front

    def resolve_listeners(self) -> tuple[ListenerModel, ...]:
        """Every port: the top-level one (``main``), then ``listeners`` with what each does
        not set taken from the top level."""
        out = [ListenerModel.model_construct(
            name="main", ae_title=self.ae_title, bind=self.bind, port=self.port,
            allowed_calling_aes=self.allowed_calling_aes,
            check_called_ae=self.check_called_ae, tls=self.tls)]
        for i, lst in enumerate(self.listeners):
            out.append(ListenerModel.model_construct(
                name=lst.name or f"listener{i + 2}", ae_title=lst.ae_title or self.ae_title,
                bind=lst.bind or self.bind, port=lst.port,
                allowed_calling_aes=self.allowed_calling_aes if lst.allowed_calling_aes is None
                else lst.allowed_calling_aes,
                check_called_ae=self.check_called_ae if lst.check_called_ae is None
                else lst.check_called_ae, tls=lst.tls))
        return tuple(out)

    def with_port(self, port: int) -> ConfigModel:
        """The same configuration listening on another port (``serve --port``)."""
        copy = self.model_copy(update={"port": port})
        copy._listeners = copy.resolve_listeners()
        return copy

    @property
    def source(self) -> str:
        """Where the configuration came from (a file, or the embedded defaults)."""
        return self._source

    @property
    def all_listeners(self) -> tuple[ListenerModel, ...]:
        return self._listeners

    @property
    def listener(self) -> ListenerModel:
        """The first listener (top-level ``ae_title``/``bind``/``port``/... and ``tls``)."""
        return self._listeners[0]

    @property
    def limits(self) -> ConfigModel:
        """The listener limits (top-level keys: acse_timeout, max_associations, ...)."""
        return self

    @property
    def cluster(self) -> bool:
        """Several routers on one PostgreSQL state (and, usually, one shared spool)."""
        return self.state.type == "postgresql"

    @property
    def state_db(self) -> Path:
        return self.spool / "state.db"


def keyed_error(err: ValidationError, data: Any) -> ConfigError:
    """The first error of a ValidationError, as ``key.path: problem``."""
    return generic_keyed_error(err, data)


def from_dict(raw: Any, base_dir: Path, source: str, secrets: bool = True) -> ConfigModel:
    """Validate a parsed YAML document; relative paths are taken from ``base_dir``.
    ``secrets=False``: the environment variables naming destinations' and sources' secrets
    need not be set (for commands that only read the state)."""
    token = CHECK_SECRETS.set(secrets)
    try:
        cfg = ConfigModel.model_validate({} if raw is None else raw,
                                         context={"base_dir": base_dir})
    except ValidationError as err:
        raise keyed_error(err, raw) from None
    finally:
        CHECK_SECRETS.reset(token)
    cfg._source = source
    return cfg


__all__ = ["ConfigModel", "KnownAEModel", "ListenerModel", "RouteModel", "StateModel",
           "WebModel", "from_dict", "keyed_error"]
