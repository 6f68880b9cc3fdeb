"""Folder destination: a ``Patient/Study/Series/SOP.dcm`` tree (template configurable), or one
zip per study; with a ``manifest.json`` per study, optionally staged.

Every file is written under a temporary name and renamed, so a reader never sees half a file.
With ``staging`` the study is written under the staging folder and moved into place whole when
it is complete (one rename of the study folder), so a watcher of the final folder never sees
half a study. ``zip: true`` writes one zip per study (``template`` names it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from ..config import DEFAULT_FOLDER_TEMPLATE, study_level, template_keywords
from ..config.peers import FolderModel
from ..dicomfile import read_header, render_template, text
from ..ratelimit import throttled
from ..spool.slots import fsync_dir
from ..state import Instance
from .base import Context, DeliveryError, Destination, Session
from .export import StudyZip, copy_hashed, entry, manifest
from .registry import implements

log = logging.getLogger(__name__)

DEFAULT_ZIP_TEMPLATE = "{PatientID}/{StudyInstanceUID}.zip"
MANIFEST = "manifest.json"


@implements(FolderModel)
class FolderDestination(Destination):
    def __init__(self, cfg: FolderModel, ctx: Context) -> None:
        super().__init__(cfg, ctx)
        self.root = Path(cfg.path)
        self.zip = cfg.zip
        self.whole_study = self.zip  # a zip is the study
        self.template: str = cfg.template or (
            DEFAULT_ZIP_TEMPLATE if self.zip else DEFAULT_FOLDER_TEMPLATE)
        self.keywords = template_keywords(self.template, "template")
        self.level = study_level(self.template)
        staging = cfg.staging
        self.staging = (self.root / staging).resolve() if staging else None

    def describe(self) -> str:
        how = "zip per study" if self.zip else "tree"
        staged = f", staged in {self.staging}" if self.staging else ""
        return f"folder {self.root} ({how}{staged})"

    probe_kind = "a test file"

    def probe(self) -> None:
        """The folder (created if need be) takes a file again: one written and removed."""
        test = self.root / f".dicomrouter-probe-{os.getpid()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with open(test, "wb") as f:
                f.write(b"probe")
                os.fsync(f.fileno())
            test.unlink()
        except OSError as exc:
            raise DeliveryError(f"cannot write in {self.root}: {exc.strerror or exc}") from None

    def open(self, instances: Sequence[Instance], routes: Sequence[str] = ()) -> Session:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if self.staging is not None:
                self.staging.mkdir(parents=True, exist_ok=True)
                if os.stat(self.staging).st_dev != os.stat(self.root).st_dev:
                    raise DeliveryError(f"staging {self.staging} is not on the file system of "
                                        f"{self.root}: the study could not be moved at once")
        except OSError as exc:
            raise DeliveryError(f"cannot create {self.root}: {exc}") from exc
        return _ZipSession(self, routes) if self.zip else _TreeSession(self, routes)

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


def partial_name(target: Path) -> Path:
    """Where ``target`` is written before its rename: beside it, hidden, not ``*.dcm`` (a
    watcher globbing for DICOM files never picks up a half-written one), and always the same
    name, so a retry after a crash (kill -9 mid-write) overwrites what the crash left."""
    return target.with_name(f".{target.name}.part")


def remove_partials(folder: Path) -> int:
    """Delete partial files a crashed delivery left under ``folder``; how many. Called when a
    study is next delivered there (only one job delivers a study to a destination at a time)."""
    removed = 0
    with contextlib.suppress(OSError):
        for p in folder.rglob(".*.part"):
            with contextlib.suppress(OSError):
                p.unlink()
                removed += 1
    return removed


def _write_atomically(target: Path, fill: Any) -> Any:
    """Write ``target`` through its partial name, fsync, rename; ``fill(file)`` writes the
    content and its result is returned."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_name(target)
    try:
        with open(tmp, "wb") as out:
            result = fill(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)  # the rename is durable before the ledger says delivered
    return result


class _TreeSession(Session):
    """One file per instance; a manifest per study folder; staged studies move at commit."""

    def __init__(self, dest: FolderDestination, routes: Sequence[str]) -> None:
        self.dest = dest
        self.routes = routes
        self.entries: list[dict[str, Any]] = []
        self.study_dir: Path | None = None  # final study folder (None: the template has none)
        self.study_uid = ""
        self.buffered: list[str] = []

    def send(self, inst: Instance, data: BinaryIO) -> bool:
        dest = self.dest
        target = dest.target(inst, data)
        root = dest.root.resolve()
        if dest.level is not None and self.study_dir is None:
            self.study_dir = root.joinpath(*target.relative_to(root).parts[:dest.level + 1])
            self.study_uid = inst.study_uid
            self._clean(self.study_dir)
        write_to = dest.staging / target.relative_to(root) if dest.staging else target
        try:
            size, sha = _write_atomically(write_to, lambda out: copy_hashed(
                throttled(data, dest.limiter), out.write))
        except OSError as exc:
            raise DeliveryError(f"cannot write {write_to}: {exc}") from exc
        if self.study_dir is not None:
            self.entries.append(entry(inst, target.relative_to(self.study_dir).as_posix(),
                                      size, sha))
        if dest.staging is None:
            return True
        self.buffered.append(inst.sop_uid)
        return False

    def _clean(self, study_dir: Path) -> None:
        dest = self.dest
        folders = [study_dir]
        if dest.staging is not None:
            folders.append(dest.staging / study_dir.relative_to(dest.root.resolve()))
        removed = sum(remove_partials(f) for f in folders if f.is_dir())
        if removed:
            log.info("%s: removed %d partial file(s) an interrupted delivery of study %s left "
                     "in %s", dest.name, removed, self.study_uid, study_dir)

    def commit(self) -> Sequence[str]:
        if self.study_dir is None or not self.entries:
            return self.buffered  # no study folder level (config refuses staging without one)
        dest = self.dest
        root = dest.root.resolve()
        final = self.study_dir
        staged = dest.staging / final.relative_to(root) if dest.staging else None
        try:
            earlier = _read_manifest(final)
            where = staged or final
            _write_atomically(where / MANIFEST, lambda out: out.write(json.dumps(
                manifest(self.study_uid, self.entries, dest.name, self.routes, earlier),
                indent=2).encode()))
            if staged is not None:
                _move_into_place(staged, final)
        except OSError as exc:
            raise DeliveryError(f"cannot complete {final}: {exc}") from exc
        return self.buffered


def _read_manifest(study_dir: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads((study_dir / MANIFEST).read_text()))
    except (OSError, ValueError):
        return None


def _move_into_place(staged: Path, final: Path) -> None:
    """The staged study folder becomes the final one in one rename; if the study is there
    already (sent again, late arrivals), its files are renamed in one by one."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(staged, final)
    except OSError:
        if not final.is_dir():
            raise
        for src in sorted(staged.rglob("*"), key=lambda p: p.name == MANIFEST):
            if src.is_file():
                dst = final / src.relative_to(staged)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
        for d in sorted((p for p in staged.rglob("*") if p.is_dir()), reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()
        with contextlib.suppress(OSError):
            staged.rmdir()
    fsync_dir(final.parent)


class _ZipSession(Session):
    """One zip per study, built beside its final name and renamed into place at commit."""

    transmits_on_send = False  # the zip appears (is "sent") at commit

    def __init__(self, dest: FolderDestination, routes: Sequence[str]) -> None:
        self.dest = dest
        self.routes = routes
        self.zip: StudyZip | None = None
        self.target: Path | None = None
        self.uids: list[str] = []

    def send(self, inst: Instance, data: BinaryIO) -> bool:
        if self.zip is None:
            self.target = self.dest.target(inst, data)
            try:
                self.target.parent.mkdir(parents=True, exist_ok=True)
                self.zip = StudyZip(self.target.parent, partial_name(self.target).name)
            except OSError as exc:
                raise DeliveryError(f"cannot write {self.target}: {exc}") from exc
        try:
            self.zip.add(inst, throttled(data, self.dest.limiter))
        except OSError as exc:
            raise DeliveryError(f"cannot write {self.target}: {exc}") from exc
        self.uids.append(inst.sop_uid)
        return False

    def commit(self) -> Sequence[str]:
        if self.zip is None or self.target is None:
            return ()
        self.transmitting(self.uids)
        try:
            self.zip.finish(self.dest.name, self.routes)
            with open(self.zip.path, "rb") as f:
                os.fsync(f.fileno())
            os.replace(self.zip.path, self.target)
            fsync_dir(self.target.parent)
        except OSError as exc:
            raise DeliveryError(f"cannot write {self.target}: {exc}") from exc
        return self.uids

    def close(self) -> None:
        if self.zip is not None:
            self.zip.discard()
