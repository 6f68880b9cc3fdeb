"""Destinations: one small class each behind ``base.Destination``, built by ``registry``."""

from __future__ import annotations

from .base import DeliveryError, Destination, InstanceRejected, Session
from .registry import build

__all__ = ["DeliveryError", "Destination", "InstanceRejected", "Session", "build"]
