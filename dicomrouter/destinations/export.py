"""What whole-study exports share: the manifest, and a study zip built as instances are read.

Checksums are computed while the bytes are copied (into the zip or the folder), never in a
second read of the spool file.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from ..state import Instance


def copy_hashed(src: BinaryIO, write: Any) -> tuple[int, str]:
    """Copy ``src`` through ``write``; (size, SHA-256) of what was copied."""
    digest = hashlib.sha256()
    size = 0
    while chunk := src.read(1 << 20):
        digest.update(chunk)
        write(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def entry(inst: Instance, path: str, size: int, sha256: str) -> dict[str, Any]:
    return {"sop_instance_uid": inst.sop_uid, "series_instance_uid": inst.series_uid,
            "path": path, "size": size, "sha256": sha256}


def manifest(study_uid: str, entries: Iterable[dict[str, Any]], destination: str,
             routes: Sequence[str] = (), earlier: dict[str, Any] | None = None) -> dict[str, Any]:
    """The study's ``manifest.json``; ``earlier`` (a previous export's) is merged by UID."""
    files = {e["sop_instance_uid"]: e for e in (earlier or {}).get("files", [])}
    files.update({e["sop_instance_uid"]: e for e in entries})
    series: dict[str, int] = {}
    for e in files.values():
        series[e["series_instance_uid"]] = series.get(e["series_instance_uid"], 0) + 1
    return {"study_instance_uid": study_uid, "instances": len(files), "series": series,
            "destination": destination, "routes": list(routes),
            "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "files": sorted(files.values(), key=lambda e: e["path"])}


class StudyZip:
    """A study's zip in a temporary file of ``directory``: members added as instances are read
    (``<SeriesInstanceUID>/<SOPInstanceUID>.dcm``), ``manifest.json`` added by ``finish``."""

    def __init__(self, directory: Path | str | None, name: str | None = None) -> None:
        """``name``: a fixed file name in ``directory`` (truncated if a crash left it), else a
        new temporary one."""
        if name is not None:
            self.path = str(Path(directory or tempfile.gettempdir()) / name)
            Path(self.path).touch()
        else:
            fd, self.path = tempfile.mkstemp(prefix=".study-", suffix=".zip.part", dir=directory)
            os.close(fd)
        self._zip = zipfile.ZipFile(self.path, "w", zipfile.ZIP_STORED, allowZip64=True)
        self.entries: list[dict[str, Any]] = []
        self.study_uid = ""

    def add(self, inst: Instance, data: BinaryIO) -> None:
        self.study_uid = inst.study_uid
        name = f"{inst.series_uid or 'UNKNOWN'}/{inst.sop_uid}.dcm"
        with self._zip.open(name, "w", force_zip64=True) as member:
            size, sha = copy_hashed(data, member.write)
        self.entries.append(entry(inst, name, size, sha))

    def finish(self, destination: str, routes: Sequence[str] = ()) -> str:
        """Add the manifest and close the zip; returns the zip's SHA-256."""
        self._zip.writestr("manifest.json", json.dumps(
            manifest(self.study_uid, self.entries, destination, routes), indent=2))
        self._zip.close()
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()

    def discard(self) -> None:
        self._zip.close()
        Path(self.path).unlink(missing_ok=True)
