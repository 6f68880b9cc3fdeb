"""Destinations: one small class each behind ``base.Destination``."""

from __future__ import annotations

from ..config import DestinationConfig
from .base import DeliveryError, Destination, InstanceRejected, Session


def build(cfg: DestinationConfig, router_ae: str) -> Destination:
    """The destination object for a validated destination config."""
    if cfg.type == "folder":
        from .folder import FolderDestination

        return FolderDestination(cfg)
    if cfg.type == "dicom":
        from .dicom import DicomDestination

        return DicomDestination(cfg, router_ae)
    raise ValueError(f"unknown destination type {cfg.type!r}")


__all__ = ["DeliveryError", "Destination", "InstanceRejected", "Session", "build"]
