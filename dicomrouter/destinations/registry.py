"""Destination type → the class that delivers it. A new destination is one module here plus
its options in config (``config.DESTINATION_TYPES``); a test checks the two agree."""

from __future__ import annotations

import importlib

from ..config import DestinationConfig
from .base import Destination

CLASSES = {
    "folder": "folder:FolderDestination",
    "dicom": "dicom:DicomDestination",
    "dicomweb": "dicomweb:DicomwebDestination",
    "s3": "s3:S3Destination",
    "move": "move:MoveDestination",
}


def build(cfg: DestinationConfig, router_ae: str) -> Destination:
    """The destination object for a validated destination config (its module loaded now)."""
    module, _, name = CLASSES[cfg.type].partition(":")
    cls = getattr(importlib.import_module(f"{__package__}.{module}"), name)
    return cls(cfg, router_ae)  # type: ignore[no-any-return]
