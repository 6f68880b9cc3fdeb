"""Destination model → the class that delivers it, registered once by ``implements`` (a
decorator on the class, keyed by the model class: nothing to edit elsewhere). The built-in
types are imported by the package, so they are registered whenever ``destinations`` is."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from ..config import DestinationConfig
from .base import Context, Destination

T = TypeVar("T", bound=type[Destination])

CLASSES: dict[type[DestinationConfig], type[Destination]] = {}


def implements(model: type[DestinationConfig]) -> Callable[[T], T]:
    """Register the class that delivers destinations of ``model``."""
    def register(cls: T) -> T:
        CLASSES[model] = cls
        return cls
    return register


def build(cfg: DestinationConfig, ctx: Context) -> Destination:
    """The destination object for a validated destination model."""
    for model in type(cfg).__mro__:
        if model in CLASSES:
            return CLASSES[model](cfg, ctx)
    raise LookupError(f"no destination class implements {type(cfg).__name__} "
                      f"(destinations.{cfg.name}.type: {cfg.type})")
