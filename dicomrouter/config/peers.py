"""The models of the peers the router talks to: destinations and pull sources (one model per
type, each registered under its ``type`` by a decorator: the configuration's ``destinations`` and
``sources`` are validated through these registries), TLS on a connection, the retry policy.

A model is the only declaration of its keys: their types, defaults and checks. The router reads
the validated (frozen) models; what a model cannot know from its own mapping (its name, the
global retry policy it inherits from, its parsed delivery window) is filled in once by
``ConfigModel`` and read through properties.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import PrivateAttr, ValidationError, ValidationInfo, model_validator

from ..ratelimit import parse_rate
from ..schedule import parse_window
from ..schema import (
    AETitle,
    Bool,
    Choice,
    Duration,
    Folder,
    Int,
    ReadableFile,
    Size,
    Strict,
    Text,
    env_set,
    keyed_error,
    parsed,
    readable,
)
from .base import (
    DEFAULT_FOLDER_TEMPLATE,
    ConfigError,
    parse_choice,
    parse_duration,
    parse_str,
    parse_transfer_syntaxes,
    show,
    study_level,
)
from .coerce import CoerceModel
from .validators import ae_list, template_value, transforms_value

TlsVersion = Annotated[str, parsed(parse_choice, ("TLSv1.2", "TLSv1.3"))]
Rate = Annotated[float, parsed(parse_rate)]  # bytes per second


class TlsServerModel(Strict):
    """A listener's ``tls:`` (PS3.15 Secure Transport Connection Profiles)."""

    cert: ReadableFile
    key: ReadableFile
    ca: ReadableFile | None = None
    verify_client: Bool = False
    min_version: TlsVersion = "TLSv1.2"
    #: client certificate subject ("CN=...") → the calling AE titles it may use
    subject_aes: dict[str, Annotated[tuple[str, ...], parsed(ae_list)]] | None = None

    @model_validator(mode="after")
    def _files(self) -> TlsServerModel:
        if self.verify_client and not self.ca:
            raise ConfigError("ca", "verify_client needs the CA that signs client certificates")
        if self.subject_aes and not self.verify_client:
            raise ConfigError("subject_aes", "needs verify_client: true")
        for key in ("cert", "key", "ca"):
            readable(getattr(self, key), key)
        return self


class TlsClientModel(Strict):
    """``tls:`` of a dicom/move destination or a dicom source."""

    ca: ReadableFile | None = None  # default: the system's CAs
    cert: ReadableFile | None = None  # our client certificate (with key)
    key: ReadableFile | None = None
    check_hostname: Bool = True
    min_version: TlsVersion = "TLSv1.2"

    @model_validator(mode="after")
    def _pair(self) -> TlsClientModel:
        if bool(self.key) and not self.cert:
            raise ConfigError("key", "needs cert")
        for key in ("ca", "cert", "key"):
            readable(getattr(self, key), key)
        return self


class RetryModel(Strict):
    """``retry:``: exponential backoff for failed deliveries; a destination's own block only
    overrides what it sets (``policy``)."""

    initial: Duration | None = None
    max_delay: Duration | None = None
    max_attempts: Int(1, 1_000_000) | None = None

    DEFAULTS: ClassVar[dict[str, float]] = {"initial": 5.0, "max_delay": 600.0,
                                            "max_attempts": 10}

    def policy(self, base: RetryModel | None = None) -> RetryModel:
        """This block over ``base`` (the global policy), every value filled in."""
        values = {k: getattr(self, k) if getattr(self, k) is not None else
                  (getattr(base, k) if base is not None else None) for k in self.DEFAULTS}
        return RetryModel.model_construct(**{k: self.DEFAULTS[k] if v is None else v
                                             for k, v in values.items()})

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt + 1`` after ``attempt`` failures."""
        initial = self.initial if self.initial is not None else self.DEFAULTS["initial"]
        cap = self.max_delay if self.max_delay is not None else self.DEFAULTS["max_delay"]
        return min(cap, initial * (2 ** max(0, attempt - 1)))


class Named(Strict):
    """A model that is one entry of a mapping (``destinations.<name>``): the name is set by
    the mapping that holds it."""

    _name: str = PrivateAttr("")

    @property
    def name(self) -> str:
        return self._name


def secrets_set(model: Any, *keys: str) -> None:
    """Secrets are named by environment variable: each named one must be set now."""
    for key in keys:
        env_set(key, getattr(model, key))


class DestinationBase(Named):
    """What every destination has: how many studies at once, retries, transforms, a window,
    its circuit breaker and bandwidth cap."""

    type: str
    concurrency: Int(1, 64) = 1
    retry: RetryModel = RetryModel()
    transforms: Annotated[tuple[Any, ...], parsed(transforms_value)] = ()  # tag morphing
    deliver_between: Text | None = None  # "20:00-06:00": deliveries wait outside it
    days: list[Any] | None = None  # [mon, tue, ...]: the days the window opens on
    timezone: Text | None = None  # default: the router's local time zone
    #: consecutive connection-level failures that open the circuit breaker (0: never opens)
    breaker_failures: Int(0, 1_000_000) = 5
    probe_every: Duration = 30.0  # an open breaker probes the destination this often
    max_rate: Rate | None = None  # bandwidth cap (bytes/s) over all its sessions
    coerce: CoerceModel | None = None  # reconcile patient/order attributes (config/coerce.py)

    _retry_policy: RetryModel = PrivateAttr(default_factory=lambda: RetryModel().policy())
    _schedule: Any = PrivateAttr(None)

    @model_validator(mode="after")
    def _window(self) -> DestinationBase:
        if self.probe_every < 0.1:
            raise ConfigError("probe_every", "must be at least 100ms")
        self._schedule = parse_window(self.deliver_between, self.days, self.timezone)
        return self

    @property
    def retry_policy(self) -> RetryModel:
        """``retry`` over the global policy."""
        return self._retry_policy

    @property
    def schedule(self) -> Any:
        """schedule.Window: deliveries only inside it (None: any time)."""
        return self._schedule

    def window(self) -> Any:
        return self._schedule

    def whole_study(self) -> str:
        """Why this destination takes only whole studies ('' when instances may go one run
        at a time, as ``forward: immediate`` sends them)."""
        return ""


class SourceBase(Named):
    """What every pull source has: its type and how often it is polled."""

    type: str
    interval: Duration = 30.0  # between two polls
    poll: Bool = True  # false: never polled, only queried by prefetch rules (from:)

    @model_validator(mode="after")
    def _positive_interval(self) -> SourceBase:
        if self.interval < 0.1:
            raise ConfigError("interval", "must be at least 100ms")
        return self


D = TypeVar("D", bound=DestinationBase)
S = TypeVar("S", bound=SourceBase)

#: ``type`` → model: every destination and source type, registered by ``destination_type`` /
#: ``source_type`` (the built-in ones below; a new type registers its model in its own module)
DESTINATION_MODELS: dict[str, type[DestinationBase]] = {}
SOURCE_MODELS: dict[str, type[SourceBase]] = {}


def destination_type(name: str) -> Callable[[type[D]], type[D]]:
    """Register a destination model under its ``type``."""
    def register(model: type[D]) -> type[D]:
        DESTINATION_MODELS[name] = model
        return model
    return register


def source_type(name: str) -> Callable[[type[S]], type[S]]:
    """Register a source model under its ``type``."""
    def register(model: type[S]) -> type[S]:
        SOURCE_MODELS[name] = model
        return model
    return register


def validate_entries(raw: Any, info: ValidationInfo, registry: dict[str, Any],
                     what: str) -> dict[str, Any]:
    """A ``destinations:`` / ``sources:`` mapping: each entry validated by the model its
    ``type`` names; errors keyed ``<name>.<key>``."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("", f"expected a mapping of names to {what}s, got "
                          f"{type(raw).__name__}")
    out = {}
    types = ", ".join(registry)
    for name, entry in raw.items():
        key = str(name)
        if not isinstance(entry, dict):
            raise ConfigError(key, f"expected a mapping, got {type(entry).__name__}")
        kind = entry.get("type")
        if kind is None:
            raise ConfigError(f"{key}.type", f"required; one of {types}")
        model = registry.get(kind) if isinstance(kind, str) else None
        if model is None:
            shown = kind if isinstance(kind, str) else show(kind)
            raise ConfigError(f"{key}.type", f"unknown {what} type {shown}; one of {types}")
        try:
            value = model.model_validate(entry, context=info.context)
        except ValidationError as err:
            inner = keyed_error(err, entry)
            problem = f"required for a {kind} {what}" if inner.problem == "required" \
                else inner.problem
            raise ConfigError(f"{key}.{inner.key}" if inner.key else key, problem) from None
        value._name = key
        out[key] = value
    return out


@destination_type("folder")
class FolderModel(DestinationBase):
    path: Folder
    template: Annotated[str, parsed(template_value)] | None = None  # default: tree/zip name
    staging: Text | None = None  # a folder (relative to path) the study is written in first
    zip: Bool = False  # one zip per study instead of a tree

    @model_validator(mode="after")
    def _staging_needs_a_study_folder(self) -> FolderModel:
        template = self.template or DEFAULT_FOLDER_TEMPLATE
        if self.staging and not self.zip and study_level(template) is None:
            raise ConfigError("staging", "needs a folder level of template holding "
                              "{StudyInstanceUID} (that folder is moved into place whole)")
        return self

    def whole_study(self) -> str:
        return "it writes one zip per study" if self.zip else \
            "it moves a staged study folder into place" if self.staging else ""


@destination_type("dicom")
class DicomModel(DestinationBase):
    ae_title: AETitle
    host: Text
    port: Int(1, 65535)
    calling_ae_title: AETitle | None = None
    max_pdu: Int(0, 2**32 - 1) = 0
    timeout: Duration = 60.0
    sender: Choice("fast", "pynetdicom") = "fast"
    associations: Int(1, 16) = 1
    transfer_syntaxes: Annotated[tuple[str, ...], parsed(parse_transfer_syntaxes)] = ()
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


class PeerModel(Strict):
    """A DICOM peer: ``{ae_title, host, port}``."""

    ae_title: AETitle
    host: Text
    port: Int(1, 65535)


@destination_type("move")
class MoveModel(DestinationBase):
    source: PeerModel  # the peer that holds the studies and performs the C-MOVE
    move_destination: AETitle  # where it sends them (an AE title the source knows)
    calling_ae_title: AETitle | None = None
    query_model: Choice("study", "patient") = "study"
    timeout: Duration = 600.0  # association set-up, and between two C-MOVE responses
    tls: TlsClientModel | None = None

    @model_validator(mode="after")
    def _no_rate(self) -> MoveModel:
        if self.max_rate is not None:
            raise ConfigError("max_rate", "a move destination sends no bytes itself (the source "
                              "PACS does): cap the link there")
        return self

    def whole_study(self) -> str:
        return "it moves studies with C-MOVE"


def _tls(value: Any, key: str) -> bool | str:
    """``verify_tls``: true / false, or the path of a CA bundle."""
    if isinstance(value, bool):
        return value
    return parse_str(value, key)


class HttpPeer(Strict):
    """An HTTP peer's keys: a DICOMweb destination, an HTTP source."""

    url: Text
    username: Text | None = None
    password_env: Text | None = None
    password_file: Text | None = None
    token_env: Text | None = None
    token_file: Text | None = None
    verify_tls: Annotated[bool | str, parsed(_tls)] = True
    timeout: Duration = 120.0

    @model_validator(mode="after")
    def _credentials(self) -> HttpPeer:
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError("url", f"expected an http:// or https:// URL, got "
                              f"{show(self.url)}")
        if self.username and not (self.password_env or self.password_file):
            raise ConfigError("username", "needs password_env or password_file (a password "
                              "is never written in the configuration)")
        if self.username and (self.token_env or self.token_file):
            raise ConfigError("token_env", "either username/password or a token, not both")
        secrets_set(self, "password_env", "token_env")
        return self


@destination_type("dicomweb")
class DicomwebModel(DestinationBase, HttpPeer):
    batch_size: Int(1, 100_000) = 100
    batch_bytes: Size = 100_000_000
    # STOW-RS requests one study is split over, in flight at once (each with its own HTTP
    # session and batches); not ``concurrency``, which every destination has already: how many
    # studies are delivered to it at the same time
    parallel_requests: Int(1, 16) = 1
    # qido: after each batch, an instance counts as delivered only once the server's QIDO-RS
    # lists it (a server may answer 200 for an instance it did not keep)
    verify: Choice("none", "qido") = "none"


class S3Access(Strict):
    """The keys of one S3 bucket (the s3 destination, the shared spool); secrets by name."""

    bucket: Text
    endpoint_url: Text | None = None  # default: AWS
    region: Text | None = None
    access_key_env: Text | None = None  # default: the standard AWS credential chain
    secret_key_env: Text | None = None
    verify_tls: Annotated[bool | str, parsed(_tls)] = True
    # a multipart transfer: this many parts in flight (and in memory) at once, of this size
    transfer_threads: Int(1, 64) = 2
    part_size: Size = 8 * 2**20

    @model_validator(mode="after")
    def _s3_credentials(self) -> S3Access:
        if not 5 * 2**20 <= self.part_size <= 5 * 2**30:
            raise ConfigError("part_size", "must be between 5MiB and 5GiB (S3's part sizes)")
        if bool(self.access_key_env) != bool(self.secret_key_env):
            raise ConfigError("access_key_env", "access_key_env and secret_key_env go together")
        secrets_set(self, "access_key_env", "secret_key_env")
        return self


@destination_type("s3")
class S3Model(DestinationBase, S3Access):
    mode: Choice("zip", "instances") = "zip"
    key: Annotated[str, parsed(template_value)] | None = None  # default depends on mode (s3.py)
    timeout: Duration = 60.0

    def whole_study(self) -> str:
        return "it uploads one zip per study (mode: zip)" if self.mode == "zip" else ""


#: a study's instance count at a dicom/dicomweb source must stay the same this long before
#: it is pulled (Orthanc's own StableAge default)
DEFAULT_SOURCE_STABLE_AGE = 60.0


def _lookback(value: Any, key: str) -> float:
    """``all`` (0: no date window) or a duration."""
    if value == "all":
        return 0.0
    return parse_duration(value, key)


@source_type("dicom")
class DicomSourceModel(SourceBase):
    ae_title: AETitle
    host: Text
    port: Int(1, 65535)
    calling_ae_title: AETitle | None = None
    retrieve: Choice("move", "get") = "move"
    move_destination: AETitle | None = None  # default: the router's own ae_title
    lookback: Annotated[float, parsed(_lookback)] = 7 * 86400.0
    source_stable_age: Duration = DEFAULT_SOURCE_STABLE_AGE
    query_model: Choice("study", "patient") = "study"
    timeout: Duration = 600.0
    tls: TlsClientModel | None = None


class HttpSource(SourceBase, HttpPeer):
    """An HTTP pull source (DICOMweb, Orthanc's REST API)."""


@source_type("dicomweb")
class DicomwebSourceModel(HttpSource):
    lookback: Annotated[float, parsed(_lookback)] = 7 * 86400.0
    source_stable_age: Duration = DEFAULT_SOURCE_STABLE_AGE


@source_type("orthanc")
class OrthancSourceModel(HttpSource):
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


def destination_types() -> tuple[str, ...]:
    return tuple(DESTINATION_MODELS)


def source_types() -> tuple[str, ...]:
    return tuple(SOURCE_MODELS)
