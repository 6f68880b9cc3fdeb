"""Pull sources: peers the router polls for new studies (``sources:`` in the config).

Each source is one small class behind ``base.Source``; ``runner.SourcePollers`` polls them on
their ``interval`` and records their health in the state database. Pulled instances take the
same ingest path as received ones (receive slot, checks, one fsync, place), then the normal
spool → stable → routes path.
"""

from __future__ import annotations

import importlib

from ..config import Config, SourceConfig
from ..spool import Spool
from ..state import State
from .base import Source

CLASSES = {
    "dicom": "dicom:DicomSource",
    "dicomweb": "dicomweb:DicomwebSource",
    "orthanc": "orthanc:OrthancSource",
}


def build(cfg: SourceConfig, router: Config, state: State, spool: Spool) -> Source:
    module, _, name = CLASSES[cfg.type].partition(":")
    cls = getattr(importlib.import_module(f"{__package__}.{module}"), name)
    return cls(cfg, router, state, spool)  # type: ignore[no-any-return]


def source_names(router: Config) -> dict[str, str]:
    """Calling AE title (as the spool records it) → source name, for the ``Source`` routing
    key: a dicom source's instances arrive from its AE title, HTTP sources record their name."""
    out: dict[str, str] = {}
    for name, src in router.sources.items():
        out[name] = name
        if src.type == "dicom":
            out.setdefault(src.options["ae_title"], name)
    return out


__all__ = ["CLASSES", "Source", "build", "source_names"]
