"""Pull sources: peers the router polls for new studies (``sources:`` in the config).

Each source is one small class behind ``base.Source``; ``runner.SourcePollers`` polls them on
their ``interval`` and records their health in the state database. Pulled instances take the
same ingest path as received ones (receive slot, checks, one fsync, place), then the normal
spool → stable → routes path. A source type is one module (its model and its class,
registered by ``implements``). Policy: may import the spool, the state, the ways out
(``qrscu``, ``destinations.base.Context``), config and the leaves.
"""

from __future__ import annotations

from ..config import Config
from . import dicom, dicomweb, orthanc  # noqa: F401 - registers the built-in types
from .base import Source
from .registry import CLASSES, build, implements


def source_names(router: Config) -> dict[str, str]:
    """Calling AE title (as the spool records it) → source name, for the ``Source`` routing
    key: a dicom source's instances arrive from its AE title, HTTP sources record their name."""
    out: dict[str, str] = {}
    for name, src in router.sources.items():
        out[name] = name
        if src.type == "dicom":
            out.setdefault(src.ae_title, name)
    return out


__all__ = ["CLASSES", "Source", "build", "implements", "source_names"]
