"""Destinations: one small class each behind ``base.Destination``, with its model, registered
by ``registry.implements``; ``build`` makes one from a validated model and the ``Context``. The
ways out of the router: may import the spool's readers, the state, config, ``common`` and the
leaves; never delivery, completion or the faces."""

from __future__ import annotations

from . import dicom, dicomweb, folder, group, hl7, move, s3  # noqa: F401 - registers the built-in types
from .base import Context, DeliveryError, Destination, InstanceRejected, Session
from .registry import build, implements

__all__ = ["Context", "DeliveryError", "Destination", "InstanceRejected", "Session", "build",
           "implements"]
