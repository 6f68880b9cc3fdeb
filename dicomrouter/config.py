"""Configuration: one YAML file turned into typed objects.

Every validation error names the key path (``routes[1].to``) and what is wrong, because the person
reading it is an integration engineer editing a YAML file, not a Python developer.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydicom.datadict import tag_for_keyword

DEFAULT_AE_TITLE = "DICOMROUTER"
DEFAULT_PORT = 11112
CONFIG_ENV = "DICOMROUTER_CONFIG"
AE_PSEUDO_KEYS = ("CallingAE", "CalledAE")


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


def _receivers(raw: dict[str, Any]) -> int:
    n = _int(raw.get("receivers", 1), "receivers", 1, 16)
    if n > 1 and raw.get("receiver", "fast") != "fast":
        raise ConfigError("receivers", "several receiver processes need 'receiver: fast'")
    return n


def _choice(value: Any, key: str, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ConfigError(key, f"one of {', '.join(options)}; got {_show(value)}")
    return str(value)


def _mapping(value: Any, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(key, f"expected a mapping, got {type(value).__name__}")
    return value


def _reject_unknown(raw: dict[str, Any], known: set[str], key: str) -> None:
    for k in raw:
        if k not in known:
            close = difflib.get_close_matches(k, known, n=1) if isinstance(k, str) else []
            k = _show(k) if not isinstance(k, str) else k[:80]
            where = f"{key}.{k}" if key else k
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(where, f"unknown key ({hint}known keys: "
                              f"{', '.join(sorted(known))})")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for failed deliveries."""

    initial: float = 5.0
    max_delay: float = 600.0
    max_attempts: int = 10

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt + 1`` after ``attempt`` failures."""
        return min(self.max_delay, self.initial * (2 ** max(0, attempt - 1)))


def _retry(raw: Any, key: str, base: RetryPolicy) -> RetryPolicy:
    raw = _mapping(raw, key)
    _reject_unknown(raw, {"initial", "max_delay", "max_attempts"}, key)
    return RetryPolicy(
        initial=parse_duration(raw["initial"], f"{key}.initial") if "initial" in raw
        else base.initial,
        max_delay=parse_duration(raw["max_delay"], f"{key}.max_delay") if "max_delay" in raw
        else base.max_delay,
        max_attempts=_int(raw["max_attempts"], f"{key}.max_attempts", 1, 1_000_000)
        if "max_attempts" in raw else base.max_attempts,
    )


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


def _folder_options(raw: dict[str, Any], key: str) -> dict[str, Any]:
    _reject_unknown(raw, {"type", "path", "template", "concurrency", "retry"}, key)
    if "path" not in raw:
        raise ConfigError(f"{key}.path", "required for a folder destination")
    template = _str(raw.get("template", DEFAULT_FOLDER_TEMPLATE), f"{key}.template")
    template_keywords(template, f"{key}.template")
    return {"path": _str(raw["path"], f"{key}.path"), "template": template}


def _dicom_options(raw: dict[str, Any], key: str) -> dict[str, Any]:
    known = {"type", "ae_title", "host", "port", "calling_ae_title", "max_pdu", "timeout",
             "concurrency", "retry", "sender", "associations", "transfer_syntaxes"}
    _reject_unknown(raw, known, key)
    for required in ("ae_title", "host", "port"):
        if required not in raw:
            raise ConfigError(f"{key}.{required}", "required for a dicom destination")
    return {
        "ae_title": _ae_title(raw["ae_title"], f"{key}.ae_title"),
        "host": _str(raw["host"], f"{key}.host"),
        "port": _int(raw["port"], f"{key}.port", 1, 65535),
        "calling_ae_title": _ae_title(raw["calling_ae_title"], f"{key}.calling_ae_title")
        if "calling_ae_title" in raw else None,
        "max_pdu": _int(raw.get("max_pdu", 0), f"{key}.max_pdu", 0, 2**32 - 1),
        "timeout": parse_duration(raw.get("timeout", "60s"), f"{key}.timeout"),
        "sender": _choice(raw.get("sender", "fast"), f"{key}.sender", ("fast", "pynetdicom")),
        "associations": _int(raw.get("associations", 1), f"{key}.associations", 1, 16),
        "transfer_syntaxes": _transfer_syntaxes(raw.get("transfer_syntaxes", []),
                                                f"{key}.transfer_syntaxes"),
    }


def _transfer_syntaxes(raw: Any, key: str) -> tuple[str, ...]:
    """A preference list of syntaxes to propose: UIDs or pydicom keywords, lossless only."""
    from pydicom.uid import UID

    from .transcode import TARGETS

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


DESTINATION_TYPES = {"folder": _folder_options, "dicom": _dicom_options}


def _destination(name: str, raw: Any, key: str, retry: RetryPolicy) -> DestinationConfig:
    raw = _mapping(raw, key)
    if "type" not in raw:
        raise ConfigError(f"{key}.type", f"required; one of {', '.join(DESTINATION_TYPES)}")
    dtype = raw["type"]
    if not isinstance(dtype, str) or dtype not in DESTINATION_TYPES:
        raise ConfigError(
            f"{key}.type",
            f"unknown destination type {_show(dtype)}; one of {', '.join(DESTINATION_TYPES)}")
    options = DESTINATION_TYPES[dtype](raw, key)
    return DestinationConfig(
        name=name,
        type=dtype,
        options=options,
        concurrency=_int(raw.get("concurrency", 1), f"{key}.concurrency", 1, 64),
        retry=_retry(raw.get("retry"), f"{key}.retry", retry),
    )


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
    when: tuple[Matcher, ...]
    to: tuple[str, ...]


def _matcher(keyword: str, raw: Any, key: str) -> Matcher:
    if keyword not in AE_PSEUDO_KEYS and tag_for_keyword(keyword) is None:
        raise ConfigError(key, "not a DICOM keyword (nor CallingAE / CalledAE)")
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
        if len(text) >= 2 and text.startswith("/") and text.endswith("/"):
            try:
                patterns.append(re.compile(text[1:-1]))
            except re.error as exc:
                raise ConfigError(where, f"invalid regular expression {text}: {exc}") from None
        else:
            values.append(text.strip())
    return Matcher(keyword, tuple(values), tuple(patterns))


def _route(raw: Any, key: str, destinations: dict[str, DestinationConfig],
           index: int) -> RouteConfig:
    raw = _mapping(raw, key)
    _reject_unknown(raw, {"name", "when", "to"}, key)
    name = _str(raw.get("name", f"route {index + 1}"), f"{key}.name")
    when_raw = _mapping(raw.get("when"), f"{key}.when")
    when = tuple(_matcher(str(k), v, f"{key}.when.{k}") for k, v in when_raw.items())
    to_raw = raw.get("to")
    if to_raw is None:
        raise ConfigError(f"{key}.to", "required: the destination names this route sends to")
    to_list = to_raw if isinstance(to_raw, list) else [to_raw]
    if not to_list:
        raise ConfigError(f"{key}.to", "needs at least one destination")
    for i, dest in enumerate(to_list):
        if not isinstance(dest, str):
            raise ConfigError(f"{key}.to[{i}]", f"expected a destination name, got {_show(dest)}")
        if dest not in destinations:
            known = ", ".join(destinations) or "none defined"
            raise ConfigError(f"{key}.to", f"unknown destination {_show(dest)} (known: {known})")
    return RouteConfig(name=name, when=when, to=tuple(dict.fromkeys(to_list)))


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


_LIMIT_KEYS = {"acse_timeout", "network_timeout", "dimse_timeout", "max_associations",
               "max_pending_connections", "max_associate_rq_size", "min_free_disk",
               "max_sequence_depth"}


def _limits(raw: dict[str, Any]) -> Limits:
    d = Limits()
    timeouts = {k: parse_duration(raw.get(k, getattr(d, k)), k)
                for k in ("acse_timeout", "network_timeout", "dimse_timeout")}
    for k, v in timeouts.items():
        if v <= 0:
            raise ConfigError(k, "must be more than 0")
    return Limits(
        **timeouts,
        max_associations=_int(raw.get("max_associations", d.max_associations),
                              "max_associations", 1, 10_000),
        max_pending_connections=_int(raw.get("max_pending_connections",
                                             d.max_pending_connections),
                                     "max_pending_connections", 1, 10_000),
        max_associate_rq_size=parse_size(raw.get("max_associate_rq_size",
                                                 d.max_associate_rq_size),
                                         "max_associate_rq_size", 1024, 16 * 2**20),
        min_free_disk=parse_size(raw.get("min_free_disk", d.min_free_disk), "min_free_disk"),
        max_sequence_depth=_int(raw.get("max_sequence_depth", d.max_sequence_depth),
                                "max_sequence_depth", 1, 100),
    )


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
    source: str = "embedded defaults"

    @property
    def state_db(self) -> Path:
        return self.spool / "state.db"


TOP_KEYS = {
    "ae_title", "bind", "port", "max_pdu", "allowed_calling_aes", "spool", "stable_age",
    "keep_after_delivery", "retention", "max_spool_size", "retry", "destinations", "routes",
    "log_level", "receiver", "receivers", "check_called_ae", *_LIMIT_KEYS,
}


def from_dict(raw: Any, base_dir: Path, source: str) -> Config:
    """Validate a parsed YAML document; relative paths are taken from ``base_dir``."""
    raw = _mapping(raw, "")
    _reject_unknown(raw, TOP_KEYS, "")
    retry = _retry(raw.get("retry"), "retry", RetryPolicy())
    dests_raw = _mapping(raw.get("destinations"), "destinations")
    destinations: dict[str, DestinationConfig] = {}
    for name, draw in dests_raw.items():
        destinations[str(name)] = _destination(str(name), draw, f"destinations.{name}", retry)
    routes_raw = raw.get("routes", [])
    if not isinstance(routes_raw, list):
        raise ConfigError("routes", "expected a list of routes")
    routes = tuple(_route(r, f"routes[{i}]", destinations, i) for i, r in enumerate(routes_raw))
    callers = raw.get("allowed_calling_aes") or []
    if not isinstance(callers, list):
        raise ConfigError("allowed_calling_aes", "expected a list of AE titles")
    log_level = raw.get("log_level", "INFO")
    log_level = log_level.upper() if isinstance(log_level, str) else log_level
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError("log_level",
                          f"one of DEBUG, INFO, WARNING, ERROR; got {_show(log_level)}")

    def path(value: Any, key: str) -> Path:
        p = Path(os.path.expanduser(_str(value, key)))
        return p if p.is_absolute() else base_dir / p

    for d in destinations.values():
        if d.type == "folder":
            d.options["path"] = str(path(d.options["path"], f"destinations.{d.name}.path"))
    return Config(
        ae_title=_ae_title(raw.get("ae_title", DEFAULT_AE_TITLE), "ae_title"),
        bind=_str(raw.get("bind", "0.0.0.0"), "bind"),
        port=_int(raw.get("port", DEFAULT_PORT), "port", 1, 65535),
        max_pdu=_int(raw.get("max_pdu", 0), "max_pdu", 0, 2**32 - 1),
        allowed_calling_aes=tuple(
            _ae_title(a, f"allowed_calling_aes[{i}]") for i, a in enumerate(callers)
        ),
        spool=path(raw.get("spool", "spool"), "spool"),
        stable_age=parse_duration(raw.get("stable_age", "3s"), "stable_age"),
        keep_after_delivery=_bool(raw.get("keep_after_delivery", False), "keep_after_delivery"),
        retention=parse_duration(raw.get("retention", 0), "retention"),
        max_spool_size=parse_size(raw.get("max_spool_size", 0), "max_spool_size"),
        retry=retry,
        destinations=destinations,
        routes=routes,
        log_level=log_level,
        receiver=_choice(raw.get("receiver", "fast"), "receiver", ("fast", "pynetdicom")),
        receivers=_receivers(raw),
        limits=_limits(raw),
        check_called_ae=_bool(raw.get("check_called_ae", False), "check_called_ae"),
        source=source,
    )


def embedded_default(base_dir: Path | None = None) -> Config:
    """No config file: listen as DICOMROUTER on 11112, every study to ./received as a tree."""
    return from_dict(
        {
            "destinations": {"received": {"type": "folder", "path": "received"}},
            "routes": [{"name": "everything to ./received", "to": ["received"]}],
        },
        base_dir or Path.cwd(),
        "embedded defaults",
    )


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, second: int) -> None:
        super().__init__(f"{key}: given twice in one mapping (lines {first} and {second}); "
                         "keep one")
        self.key = key if isinstance(key, str) else _show(key)
        self.lines = (first, second)


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping: last-wins would silently undo
    the first (a second ``allowed_calling_aes: []`` opens the router to anyone)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> Any:
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _value in node.value:
        key = loader.construct_object(key_node, deep=False)
        try:
            hash(key)
        except TypeError:
            continue  # SafeConstructor reports an unhashable key itself
        if key in seen:
            raise _DuplicateKey(key, seen[key] + 1, key_node.start_mark.line + 1)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                              _mapping_without_duplicates)


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Load ``path``, else ``$DICOMROUTER_CONFIG``, else the embedded default."""
    chosen = path or os.environ.get(CONFIG_ENV)
    if not chosen:
        return embedded_default()
    p = Path(chosen)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {p}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"{p} is not UTF-8 text (byte 0x{exc.object[exc.start]:02X} at "
                          f"offset {exc.start})") from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as exc:
        raise ConfigError(exc.key[:80], f"given twice in one mapping (lines {exc.lines[0]} and "
                          f"{exc.lines[1]} of {p}); keep one") from None
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{p} is not valid YAML: {str(exc)[:1000]}") from None
    return from_dict(raw or {}, p.resolve().parent, str(p))


def replace_port(cfg: Config, port: int) -> Config:
    """The same configuration listening on another port (``serve --port``)."""
    from dataclasses import replace

    return replace(cfg, port=_int(port, "--port", 1, 65535))
