"""The models of the peers the router talks to: destinations (one model per type, and the tagged
union they form), pull sources, TLS on a connection, the retry policy."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    Discriminator,
    Tag,
    model_validator,
)

from ..schedule import parse_window
from ..schema import (
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
)
from .base import (
    DEFAULT_FOLDER_TEMPLATE,
    ConfigError,
    RetryPolicy,
    parse_choice,
    parse_duration,
    parse_str,
    parse_transfer_syntaxes,
    show,
    study_level,
)
from .validators import ae_list, template_value, transforms_value

_v = parsed
_Strict = Strict
_env_set = env_set


TlsVersion = Annotated[str, _v(parse_choice, ("TLSv1.2", "TLSv1.3"))]


class TlsServerModel(_Strict):
    """A listener's ``tls:`` (PS3.15 Secure Transport Connection Profiles)."""

    cert: Text
    key: Text
    ca: Text | None = None
    verify_client: Bool = False
    min_version: TlsVersion = "TLSv1.2"
    subject_aes: dict[str, Annotated[tuple[str, ...], _v(ae_list)]] | None = None

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


class DestinationBase(_Strict):
    concurrency: Int(1, 64) = 1
    retry: RetryModel = RetryModel()
    transforms: Annotated[tuple[Any, ...], _v(transforms_value)] = ()  # tag morphing on the copies
    deliver_between: Text | None = None  # "20:00-06:00": deliveries wait outside it
    days: list[Any] | None = None  # [mon, tue, ...]: the days the window opens on
    timezone: Text | None = None  # default: the router's local time zone

    def options(self) -> dict[str, Any]:
        return self.model_dump(exclude={"type", "concurrency", "retry", "deliver_between",
                                        "days", "timezone", "transforms"})

    @model_validator(mode="after")
    def _window(self) -> DestinationBase:
        parse_window(self.deliver_between, self.days, self.timezone)
        return self

    def window(self) -> Any:
        return parse_window(self.deliver_between, self.days, self.timezone)

    def _env_set(self, *keys: str) -> None:
        """Secrets are named by environment variable: each named one must be set now."""
        for key in keys:
            _env_set(key, getattr(self, key))


class FolderModel(DestinationBase):
    type: Literal["folder"]
    path: Text
    template: Annotated[str, _v(template_value)] | None = None  # default: the tree, or a zip name
    staging: Text | None = None  # a folder (relative to path) the study is written in first
    zip: Bool = False  # one zip per study instead of a tree

    @model_validator(mode="after")
    def _staging_needs_a_study_folder(self) -> FolderModel:
        template = self.template or DEFAULT_FOLDER_TEMPLATE
        if self.staging and not self.zip and study_level(template) is None:
            raise ConfigError("staging", "needs a folder level of template holding "
                              "{StudyInstanceUID} (that folder is moved into place whole)")
        return self


class DicomModel(DestinationBase):
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


class MoveModel(DestinationBase):
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


class DicomwebModel(DestinationBase, _HttpPeer):
    type: Literal["dicomweb"]
    batch_size: Int(1, 100_000) = 100
    batch_bytes: Size = 100_000_000
    # qido: after each batch, an instance counts as delivered only once the server's QIDO-RS
    # lists it (a server may answer 200 for an instance it did not keep)
    verify: Choice("none", "qido") = "none"


class S3Access(_Strict):
    """The keys of one S3 bucket (the s3 destination, the shared spool); secrets by name."""

    bucket: Text
    endpoint_url: Text | None = None  # default: AWS
    region: Text | None = None
    access_key_env: Text | None = None  # default: the standard AWS credential chain
    secret_key_env: Text | None = None
    verify_tls: Annotated[bool | str, _v(lambda v, k: _tls(v, k))] = True

    @model_validator(mode="after")
    def _s3_credentials(self) -> S3Access:
        if bool(self.access_key_env) != bool(self.secret_key_env):
            raise ConfigError("access_key_env", "access_key_env and secret_key_env go together")
        _env_set("access_key_env", self.access_key_env)
        _env_set("secret_key_env", self.secret_key_env)
        return self


class S3Model(DestinationBase, S3Access):
    type: Literal["s3"]
    mode: Choice("zip", "instances") = "zip"
    key: Annotated[str, _v(template_value)] | None = None  # default depends on mode (s3.py)
    timeout: Duration = 60.0


DESTINATION_MODELS: dict[str, type[DestinationBase]] = {
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

    _env_set = DestinationBase._env_set

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
