"""The one receive contract both receivers use: accept a received dataset, or say why not.

``accept`` maps every outcome to a DIMSE status in one place (like pynetdicom's ``attempt()``):

* 0x0000: durable in its receive slot, whole, identified (``Spool.accept``); the caller answers,
  then calls ``Spool.place``;
* 0xA700 out of resources: spool quota, free disk, a write or database error (or a bug: the log
  line names the exception; never a false success);
* 0xA900 the dataset's SOP Class/Instance UID is not the command's (as DCMTK storescp answers);
* 0xC000 cannot understand: malformed or truncated dataset, sequences nested too deep, no or
  invalid UIDs.

Each refusal is one log line with the peer's values escaped (see logsafe.py); never a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from typing import Any

from pydicom.dataset import Dataset

from .. import metrics
from ..dicomfile import UnreadableDataset
from ..dimse import CANNOT_UNDERSTAND, DATASET_MISMATCH, OUT_OF_RESOURCES, SUCCESS, error_comment
from ..spool import (
    Accepted,
    DatasetMismatch,
    Expected,
    LogReceiveFile,
    ReceiveFile,
    SharedStoreUnavailable,
    Spool,
    SpoolFull,
    note,
)
from ..spool.faults import crash_point
from ..state import StateUnavailable

log = logging.getLogger("dicomrouter.scp")



def accept(spool: Spool, rx: ReceiveFile, calling: str, called: str,
           command: Expected | None,
           how: str = "C-STORE") -> tuple[int, str, Accepted | None]:
    """(status, error comment, accepted instance or None) for one received dataset.

    ``command`` is (Affected SOP Class UID, Affected SOP Instance UID) of the C-STORE-RQ, or
    the keywords and values a STOW-RS request's path names (its study); None for an instance
    pulled over HTTP (``how`` names the way it came in the log line).
    """
    sop = command[1] if isinstance(command, tuple) else "instance"
    try:
        accepted = spool.accept(rx, calling, called, command)
        metrics.INSTANCES.labels(calling).inc()
        metrics.BYTES.labels(calling).inc(accepted.size)
        return SUCCESS, "", accepted
    except SpoolFull as exc:
        status, what, comment = OUT_OF_RESOURCES, "out of resources", \
            f"spool full: {exc.strerror or exc}"
    except (SharedStoreUnavailable, StateUnavailable) as exc:  # cluster mode: not durable
        status, what, comment = OUT_OF_RESOURCES, "out of resources", \
            f"{exc.strerror or exc} (not acknowledged: send it again)"
    except DatasetMismatch as exc:
        status, what, comment = DATASET_MISMATCH, "dataset does not match", str(exc)
    except UnreadableDataset as exc:
        status, what, comment = CANNOT_UNDERSTAND, "cannot understand", str(exc)
    except Exception as exc:  # never a false success, never a traceback for peer input
        status, what = OUT_OF_RESOURCES, "out of resources"
        comment = f"internal error: {type(exc).__name__}: {exc}"
    finally:
        rx.close()
    metrics.REFUSED.labels(f"0x{status:04X}").inc()
    log.error("%s %s from %s refused with 0x%04X (%s): %s", how, sop, calling, status, what,
              comment)
    return status, comment, None


def store_file(spool: Spool, chunks: Iterable[bytes], source: str, called: str,
               extra_tags: dict[str, str] | None = None, how: str = "pulled"
               ) -> tuple[int, str, dict[str, str] | None]:
    """Ingest a Part 10 file pulled from a source (HTTP) or written by a processing step:
    streamed into a receive slot, then the same checks, durability and placement as a
    C-STORE, with ``extra_tags`` in its index. Returns (status, comment, tags).

    The extra tags must survive a crash before the instance is recorded: the ones a reception
    note holds (``_SourceHost``, ``_Proxied``) go in the file's preamble as it is written, at
    no cost; any other (a processing result's) are kept beside it, synced (``kept_tags``)."""
    extra = extra_tags or {}
    noted = note.pack(source, called, extra) if set(extra) <= set(note.TAGS) else b""
    rx = spool.new_receive_file(note=noted)
    try:
        for chunk in chunks:
            rx.write(chunk)
    except BaseException:
        drop(rx)
        raise
    try:
        kept = spool.keep_tags(rx, extra, source, called) if extra and not noted else None
    except OSError as exc:  # a full disk: refused as accept refuses it, nothing left behind
        drop(rx)
        comment = f"cannot keep its index tags: {exc.strerror or exc}"
        log.error("%s instance from %s refused with 0x%04X (out of resources): %s", how,
                  source, OUT_OF_RESOURCES, comment)
        return OUT_OF_RESOURCES, comment, None
    status, comment, accepted = accept(spool, rx, source, called, None, how)
    if accepted is None:
        if kept is not None:
            spool.forget_kept_tags(kept)
        return status, comment, None
    crash_point("ingest-accepted")  # the crash tests: durable, not yet recorded
    accepted.tags.update(extra)
    spool.place(accepted)
    return status, comment, accepted.tags


def drop(rx: ReceiveFile | LogReceiveFile) -> None:
    """Give up a reception: close it and remove its receive slot, if it has one yet."""
    rx.close()
    if rx.name:
        with contextlib.suppress(OSError):
            os.unlink(rx.name)


def store_retrieved(spool: Spool, event: Any, calling: str, called: str,
                    tags: dict[str, str] | None = None) -> int | Dataset:
    """A C-STORE sub-operation of one of the router's own C-GETs (a pull source, a prefetch,
    the Q/R proxy): the same ingest as a push, placed at once with ``tags`` added to its index
    tags; the response for pynetdicom (0x0000, or a Dataset with the status and why)."""
    req = event.request
    rx = getattr(req, "_dataset_file", None)
    if not isinstance(rx, ReceiveFile):
        return CANNOT_UNDERSTAND
    status, comment, accepted = accept(
        spool, rx, calling, called, (str(req.AffectedSOPClassUID), str(req.AffectedSOPInstanceUID)))
    if accepted is None:
        ds = Dataset()
        ds.Status = status
        ds.ErrorComment = error_comment(comment)
        return ds
    accepted.tags.update(tags or {})
    spool.place(accepted)
    return SUCCESS
