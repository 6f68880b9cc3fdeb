"""Validators of the configuration's values that are not one type (a template, a routing
condition, a destination list, transforms, expectations, a sweep plan), shared by the models."""

from __future__ import annotations

from typing import Any

from ..rules import parse_when
from ..schema import (
    parsed,
)
from ..sweep import parse as parse_sweep
from ..transforms import parse as parse_transforms
from .base import (
    ConfigError,
    parse_ae_title,
    parse_int,
    parse_str,
    show,
    template_keywords,
)

_v = parsed


def template_value(value: Any, key: str) -> str:
    template_keywords(parse_str(value, key), key)
    return str(value)


def when_value(value: Any, key: str) -> tuple[Any, ...]:

    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ConfigError(key, f"expected a mapping, got {type(value).__name__}")
    return parse_when(value, "")  # keys relative to "when": the location adds routes[i].when


def expect_value(value: Any, key: str) -> dict[str, Any] | None:
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


def sweep_value(value: Any, key: str) -> Any:
    return parse_sweep(value, "")


def transforms_value(value: Any, key: str) -> tuple[Any, ...]:
    return parse_transforms(value, "")


def to_value(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        raise ConfigError(key, "required: the destination names this route sends to")
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ConfigError(key, "needs at least one destination")
    return route_to_value(items, key)


def route_to_value(value: Any, key: str) -> tuple[str, ...]:
    """A route's ``to``: may be empty (only a route with ``process:``, checked there)."""
    if value is None:
        raise ConfigError(key, "required: the destination names this route sends to")
    items = value if isinstance(value, list) else [value]
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ConfigError(f"[{i}]", f"expected a destination name, got {show(item)}")
    return tuple(dict.fromkeys(items))


def ae_list(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(key, "expected a list of AE titles")
    return tuple(parse_ae_title(a, f"[{i}]") for i, a in enumerate(value))


def peer_names(value: Any, key: str) -> tuple[str, ...]:
    """``forward_mpps`` / ``ian``: names of DICOM peers (known_aes or dicom destinations)."""
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item.strip():
            raise ConfigError(f"[{i}]", f"expected a peer name, got {show(item)}")
    return tuple(dict.fromkeys(items))


def log_level_value(value: Any, key: str) -> str:
    level = value.upper() if isinstance(value, str) else value
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(key, f"one of DEBUG, INFO, WARNING, ERROR; got {show(level)}")
    return str(level)
