"""Index tags the router adds to an instance it ingests itself, kept on disk until it is recorded.

A processing result carries tags of the router's own beside those read from the file
(``_ResultOf``, ``_ResultRoute``, a remote node's origin); they live in the state's index only.
Between the instance's durable accept and its record a crash left the file alone: start-up
adopted it from its receive slot (or as an orphan) with the file's tags only, and the result
became a late arrival of its origin study, reopening it and routing it as ordinary input.

So ``store_file`` writes such tags (and the AE titles it ingests under) first, durably, to
``<tmp>/<hash of the SOP Instance UID>.tags``; placement (at once, by a retry or by start-up's
adoption) merges them and removes the file once the instance is recorded; start-up removes any
it did not use (written before a crash that came after the record). Tags a reception note
holds (a pull's ``_SourceHost``, the proxy's ``_Proxied``: ``note.py``) go in the file's
preamble instead, at no cost; only what a note cannot hold pays these two syncs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .receive import write_file
from .slots import fsync_dir

log = logging.getLogger("dicomrouter.spool")

SUFFIX = ".tags"


@dataclass(frozen=True)
class Kept:
    """What an ingest of the router's own knows and the file does not."""

    tags: dict[str, str]
    calling_ae: str = ""  # whom the history names as its source (the file's meta may not)
    called_ae: str = ""


def _path(directory: Path, sop_uid: str) -> Path:
    # hashed: a SOP Instance UID from a file is not trusted as a file name
    return directory / (hashlib.sha256(sop_uid.encode("utf-8", "replace")).hexdigest()[:32]
                        + SUFFIX)


def write_kept(directory: Path, sop_uid: str, kept: Kept) -> None:
    """Make ``kept`` durable for ``sop_uid`` (its content and its name)."""
    data = json.dumps({"SOPInstanceUID": sop_uid, **asdict(kept)}).encode()
    write_file(str(_path(directory, sop_uid)), data, sync=True)
    fsync_dir(directory)


def remove_kept(directory: Path, sop_uid: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(_path(directory, sop_uid))


def load_kept(directory: Path) -> dict[str, Kept]:
    """Everything kept in ``directory``, by SOP Instance UID. An unreadable file (cut by a
    crash while it was written: its instance was not accepted yet) is removed."""
    kept: dict[str, Kept] = {}
    for path in directory.glob("*" + SUFFIX):
        try:
            doc = json.loads(path.read_bytes())
            sop, tags = doc["SOPInstanceUID"], doc["tags"]
            if path != _path(directory, sop) or not isinstance(tags, dict):
                raise ValueError("not a kept-tags file")
            kept[sop] = Kept({str(k): str(v) for k, v in tags.items()},
                             str(doc.get("calling_ae", "")), str(doc.get("called_ae", "")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s removed: %s", path, exc)
            with contextlib.suppress(OSError):
                path.unlink()
    return kept


def is_kept_tags(name: str) -> bool:
    return name.endswith(SUFFIX)
