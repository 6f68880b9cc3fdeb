"""Configuration values and their strict parsers, shared by the configuration schema
(``config/``) and the modules whose values it holds (routing conditions, transforms, delivery
windows, the sweep): durations, sizes, AE titles, choices, templates, transfer syntaxes,
matchers, addresses.

Every parser raises ConfigError(key, problem); the schema prefixes the key path, so the person
reading it, an integration engineer editing a YAML file, sees ``routes[1].to: ...``. A leaf:
imports nothing of the router but the codecs' list of syntaxes (``transcode``).
"""

from __future__ import annotations

import ipaddress
import math
import re
import reprlib
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.uid import UID

from .transcode import TARGETS

AE_PSEUDO_KEYS = ("CallingAE", "CalledAE", "Source", "Listener", "SourceHost", "Prefetch",
                  "PrefetchRule", "Endpoint", "Proxied")
#: pseudo-keys whose values are true / false (``Prefetch: true``: a prior a prefetch brought)
BOOLEAN_PSEUDO_KEYS = ("Prefetch", "Proxied")
#: the index tag marking an instance the Q/R proxy fetched from the PACS (the Proxied key)
PROXIED_TAG = "_Proxied"
#: the index tag marking a processing result: the route whose steps wrote it
RESULT_TAG = "_ResultOf"
#: a route's ``priority``, most urgent first; jobs store the index (0: stat)
PRIORITIES = ("stat", "high", "routine", "low")


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlist = _REPR.maxdict = _REPR.maxtuple = 4
_REPR.maxlevel = 2


def show(value: Any) -> str:
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
        raise ConfigError(key, f"expected a duration like 3s, 500ms or 2m, got {show(value)}")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ConfigError(key, f"expected a finite duration, got {show(value)}")
        if value < 0:
            raise ConfigError(key, f"must not be negative, got {show(value)}")
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ConfigError(key, f"expected a duration like 3s, 500ms or 2m, got {show(value)}")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_size(value: Any, key: str, lo: int = 0, hi: int | None = None) -> int:
    """``50GB``, ``500MB``, ``2GiB`` or a number of bytes → bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        size = value
    else:
        m = _SIZE.match(value) if isinstance(value, str) else None
        if not m:
            raise ConfigError(key, f"expected a size like 500MB or 50GB, got {show(value)}")
        unit = m.group(2).lower() if m.group(2) else None
        size = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if size < lo or (hi is not None and size > hi):
        raise ConfigError(key, f"expected a size from {lo} to {hi} bytes, got {show(value)}")
    return size


def parse_ae_title(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, f"expected an AE title (1-16 characters), got {show(value)}")
    v = value.strip()
    if len(v) > 16 or "\\" in v or any(ord(c) < 32 for c in v):
        raise ConfigError(key, "an AE title is 1-16 characters without backslash, got "
                          f"{show(value)}")
    return v


def parse_str(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"expected a non-empty string, got {show(value)}")
    return value


def parse_int(value: Any, key: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(key, f"expected a whole number from {lo} to {hi}, got {show(value)}")
    return value


def parse_bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"expected true or false, got {show(value)}")
    return value


def parse_choice(value: Any, key: str, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ConfigError(key, f"one of {', '.join(options)}; got {show(value)}")
    return str(value)



_TEMPLATE_FIELD = re.compile(r"{([^{}]*)}")


def template_keywords(template: str, key: str) -> list[str]:
    """The tag keywords a path template uses; each must be a DICOM keyword."""
    words = _TEMPLATE_FIELD.findall(template)
    for w in words:
        if tag_for_keyword(w) is None:
            raise ConfigError(key, f"{{{w}}} is not a DICOM keyword")
    return words



def parse_transfer_syntaxes(raw: Any, key: str) -> tuple[str, ...]:
    """A preference list of syntaxes to propose: UIDs or pydicom keywords, lossless only."""
    by_name = {str(u): str(u) for u in TARGETS} | {UID(u).keyword: str(u) for u in TARGETS}
    if not isinstance(raw, list):
        raise ConfigError(key, f"expected a list of transfer syntaxes, got {show(raw)}")
    out: list[str] = []
    for i, item in enumerate(raw):
        uid = by_name.get(item.strip()) if isinstance(item, str) else None
        if uid is None:
            known = ", ".join(UID(u).keyword for u in TARGETS)
            raise ConfigError(f"{key}[{i}]", f"{show(item)} is not a syntax the router can send "
                              f"in (lossless only): one of {known}, or their UIDs")
        if uid not in out:
            out.append(uid)
    return tuple(out)



def study_level(template: str) -> int | None:
    """Index of the template's folder level that names the study (holds {StudyInstanceUID})."""
    levels = [p for p in template.split("/") if p]
    for i, level in enumerate(levels[:-1]):
        if "{StudyInstanceUID}" in level:
            return i
    return None

@dataclass(frozen=True)
class Matcher:
    """One ``when`` condition: a tag keyword (or CallingAE/CalledAE) and accepted values."""

    keyword: str
    values: tuple[str, ...]
    patterns: tuple[re.Pattern[str], ...]

    def accepts(self, value: str) -> bool:
        v = value.strip()
        return v in self.values or any(p.search(v) for p in self.patterns)



def regex_literal(text: str) -> tuple[str, int] | None:
    """``/pattern/`` → (pattern, 0) and ``/pattern/i`` → (pattern, re.IGNORECASE), else None
    (a plain value)."""
    if len(text) >= 2 and text.startswith("/") and text.endswith("/"):
        return text[1:-1], 0
    if len(text) >= 3 and text.startswith("/") and text.endswith("/i"):
        return text[1:-2], re.IGNORECASE
    return None


def parse_matcher(keyword: str, raw: Any, key: str) -> Matcher:
    if keyword not in AE_PSEUDO_KEYS and tag_for_keyword(keyword) is None:
        raise ConfigError(key, "not a DICOM keyword (nor CallingAE / CalledAE / Source / "
                          "Listener / SourceHost / Prefetch / PrefetchRule / Endpoint / Proxied)")
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise ConfigError(key, "needs at least one value")
    values: list[str] = []
    patterns: list[re.Pattern[str]] = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]" if isinstance(raw, list) else key
        if isinstance(item, bool) and keyword in BOOLEAN_PSEUDO_KEYS:
            item = "true" if item else "false"
        if isinstance(item, bool) or item is None or isinstance(item, dict | list):
            raise ConfigError(where, f"expected a value or /regex/, got {show(item)}")
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



def is_loopback(host: str) -> bool:
    """``host`` (an address or a name) reaches only this machine."""
    if host.strip().lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[] ")).is_loopback
    except ValueError:
        return False
