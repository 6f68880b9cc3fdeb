"""Checks of the machine a configuration runs on (``serve --check``, and at start-up as
warnings): what the schema cannot know, such as whether a folder destination can be written.

Each problem is one line that starts with the key, like a configuration error. Folders are
tested by creating something in them (and removing it again), not with ``os.access``: root
passes every access check, yet cannot create anything in ``/proc``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .config import Config

LOW_SPACE = 1_000_000_000  # below this free on a destination folder's disk: say so


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def folder_problems(key: str, path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) of ``path`` as an output folder: why it cannot be used; low space."""
    path = path.absolute()
    base = _nearest_existing(path)
    if not base.is_dir():
        return [f"{key}: {path} cannot be created: {base} is not a folder"], []
    try:
        probe = tempfile.mkdtemp(prefix=".dicomrouter-check-", dir=base)
        os.rmdir(probe)
    except OSError as exc:
        what = "written to" if base == path else f"created ({base} refuses new folders)"
        return [f"{key}: {path} cannot be {what}: {exc.strerror or exc}"], []
    warnings = []
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(base).free
        if free < LOW_SPACE:
            warnings.append(f"{key}: only {free / 1e6:.0f} MB free on the disk of {path}")
    return [], warnings


def check(cfg: Config) -> tuple[list[str], list[str]]:
    """(errors, warnings) of this configuration on this machine."""
    errors: list[str] = []
    warnings: list[str] = []
    for name, dest in cfg.destinations.items():
        if dest.type != "folder":
            continue
        root = Path(dest.path)
        folders = [("path", root)]
        if dest.staging:
            folders.append(("staging", root / dest.staging))
        for key, folder in folders:
            e, w = folder_problems(f"destinations.{name}.{key}", folder)
            errors += e
            warnings += w
    return errors, warnings
