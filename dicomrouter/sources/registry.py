"""Source model → the class that polls it, registered once by ``implements`` (keyed by the
model class). The built-in types are imported by the package."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from ..config import SourceConfig
from ..destinations.base import Context
from .base import Source

T = TypeVar("T", bound=type[Source])

CLASSES: dict[type[SourceConfig], type[Source]] = {}


def implements(model: type[SourceConfig]) -> Callable[[T], T]:
    """Register the class that polls sources of ``model``."""
    def register(cls: T) -> T:
        CLASSES[model] = cls
        return cls
    return register


def build(cfg: SourceConfig, ctx: Context) -> Source:
    """The source object for a validated source model."""
    for model in type(cfg).__mro__:
        if model in CLASSES:
            return CLASSES[model](cfg, ctx)
    raise LookupError(f"no source class implements {type(cfg).__name__} "
                      f"(sources.{cfg.name}.type: {cfg.type})")
