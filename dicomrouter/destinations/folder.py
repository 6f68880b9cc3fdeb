"""Folder destination: a ``Patient/Study/Series/SOP.dcm`` tree (template configurable)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from ..config import template_keywords
from ..dicomfile import read_header, render_template, text
from ..slots import fsync_dir
from ..state import Instance
from .base import DeliveryError, Destination, Session


class FolderDestination(Destination):
    """Copies each spool file byte for byte, under a temporary name, then renames it into place,
    so a reader of the tree never sees a half-written file."""

    def __init__(self, cfg, router_ae: str = "") -> None:  # type: ignore[no-untyped-def]
        super().__init__(cfg)
        self.root = Path(cfg.options["path"])
        self.template: str = cfg.options["template"]
        self.keywords = template_keywords(self.template, "template")

    def describe(self) -> str:
        return f"folder {self.root}"

    def open(self, instances: Sequence[Instance]) -> Session:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DeliveryError(f"cannot create {self.root}: {exc}") from exc
        return _FolderSession(self)

    def target(self, inst: Instance, data: BinaryIO) -> Path:
        """Where an instance goes; always inside the root, whatever the tag values say."""
        lookup = dict(inst.tags)
        missing = [k for k in self.keywords if k not in lookup]
        if missing:
            ds = read_header(data)
            data.seek(0)
            lookup.update({k: text(ds.get(k)) for k in missing})
        rel = render_template(self.template, lookup)
        dest = (self.root / rel).resolve()
        root = self.root.resolve()
        if root not in dest.parents:
            raise DeliveryError(f"template gave a path outside {root}: {rel}")
        return dest


class _FolderSession(Session):
    def __init__(self, dest: FolderDestination) -> None:
        self.dest = dest

    def send(self, inst: Instance, data: BinaryIO) -> bool:
        target = self.dest.target(inst, data)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            # not *.dcm: a watcher globbing for DICOM files never picks up a half-written one
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part",
                                       dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(data, out, 1 << 20)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            fsync_dir(target.parent)  # the rename is durable before the ledger says delivered
        except OSError as exc:
            raise DeliveryError(f"cannot write {target}: {exc}") from exc
        return True
