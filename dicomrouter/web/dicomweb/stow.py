"""STOW-RS in (PS3.18 10.5): a multipart/related request's instances, each through the same
ingest as a C-STORE (``scp.ingest.accept``: checks, durable before it is listed, placement).

The body is read as it arrives (``sources.multipart.MultipartReader``) in a worker thread that
pulls each chunk from the event loop, so a 2 GB request holds a chunk and one instance's receive
buffer (at most ``receive_log_max_record``, then a receive slot on disk), never the request.
An instance is listed in ``ReferencedSOPSequence`` only once ``accept`` made it durable; every
other part is in ``FailedSOPSequence`` with its FailureReason (0xA700, 0xA900, 0xC000). HTTP 200:
all stored, 202: some failed, 409: none stored. A body that breaks off (truncated, too large,
too slow) is answered 400 / 413 / 408 with what was stored before that point.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydicom import dcmread

from ...config import Config
from ...dimse import CANNOT_UNDERSTAND, OUT_OF_RESOURCES
from ...scp.ingest import accept, drop
from ...sources.multipart import MultipartError, MultipartReader, boundary_of
from ...spool import Spool, note

log = logging.getLogger("dicomrouter.dicomweb")

#: bytes of each part kept to name a refused instance (its SOP Class and Instance UIDs)
HEAD_BYTES = 64 << 10
DICOM = "application/dicom"


class StowView(Protocol):
    """What STOW-RS needs from the running router."""

    cfg: Config
    spool: Spool


class BodyError(Exception):
    """The request body stopped making sense or arriving; ``status`` is the HTTP answer."""

    def __init__(self, status: int, problem: str) -> None:
        super().__init__(problem)
        self.status = status


@dataclass
class Outcome:
    """What one STOW-RS request did, instance by instance."""

    stored: list[dict[str, str]] = field(default_factory=list)  # class, sop, study, series
    failed: list[tuple[str, str, int]] = field(default_factory=list)  # class, sop, reason
    error: BodyError | None = None


def media_problem(content_type: str) -> str:
    """Why a request's Content-Type is not a STOW-RS one of Part 10 instances ('' if it is)."""
    try:
        boundary_of(content_type)
    except MultipartError as exc:
        return str(exc)
    for p in content_type.split(";")[1:]:
        key, _, value = p.strip().partition("=")
        if key.strip().lower() == "type" and value.strip().strip('"').lower() != DICOM:
            return (f"type={value.strip()}: only Part 10 instances (type=\"{DICOM}\") are "
                    "accepted, not metadata with bulk data")
    return ""


def counted(chunks: Iterator[bytes], limit: int, deadline: float) -> Iterator[bytes]:
    """``chunks`` as they come, refused past ``limit`` bytes or the request's deadline."""
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise BodyError(413, f"the request is larger than dicomweb.max_request_size "
                            f"({limit} bytes)")
        if time.monotonic() > deadline:
            raise BodyError(408, "the request took longer than dicomweb.request_timeout")
        yield chunk


def ingest_request(view: StowView, chunks: Iterator[bytes], content_type: str,
                   study_uid: str | None, endpoint: str, calling: str, host: str) -> Outcome:
    """Read every part of the body and ingest each; runs in a worker thread."""
    dw = view.cfg.dicomweb
    out = Outcome()
    reader = MultipartReader(counted(chunks, dw.max_request_size,
                                     time.monotonic() + dw.request_timeout),
                             boundary_of(content_type))
    expected = {"StudyInstanceUID": study_uid} if study_uid else None
    try:
        while (body := reader.next_part()) is not None:
            part_type = reader.headers.get("content-type", DICOM).split(";")[0].strip().lower()
            one_part(view, body, part_type, expected, endpoint, calling, host, out)
    except MultipartError as exc:
        out.error = BodyError(400, f"the multipart body is not well formed: {exc}")
    except BodyError as exc:
        out.error = exc
    except TimeoutError:
        out.error = BodyError(408, f"no data for dicomweb.read_timeout ({dw.read_timeout:g} s)")
    except Exception as exc:  # e.g. the server stopping: one line, what was stored is listed
        log.error("STOW-RS request from %s (endpoint %s) stopped: %s: %s", host, endpoint,
                  type(exc).__name__, exc)
        out.error = BodyError(500, f"the request stopped: {type(exc).__name__}")
    return out


def one_part(view: StowView, body: Iterator[bytes], part_type: str,
             expected: dict[str, str] | None, endpoint: str, calling: str, host: str,
             out: Outcome) -> None:
    """One part: streamed into a receive buffer or slot, then ``accept`` and ``place``."""
    spool, limit = view.spool, view.cfg.dicomweb.max_instance_size
    head = bytearray()
    size = 0
    if part_type != DICOM:
        for chunk in body:
            if len(head) < HEAD_BYTES:
                head += chunk[:HEAD_BYTES - len(head)]
        log.error("STOW-RS part from %s (endpoint %s) refused with 0xC000: it is %s, not %s",
                  host, endpoint, part_type, DICOM)
        out.failed.append((*uids_of(head), CANNOT_UNDERSTAND))
        return
    rx: Any = spool.new_receive_file(logged=True)
    # the routing keys start-up's adoption needs go in the file's preamble (spool/note.py)
    keys = {"_Endpoint": endpoint, "_SourceHost": host}
    noted = note.pack(calling, view.cfg.ae_title, keys)
    try:
        for chunk in body:
            size += len(chunk)
            if len(head) < HEAD_BYTES:
                head += chunk[:HEAD_BYTES - len(head)]
            if size <= limit:
                rx.write(note.overlay(chunk, size - len(chunk), noted))
    except BaseException:
        drop(rx)
        raise
    if size > limit:
        drop(rx)
        log.error("STOW-RS instance from %s (endpoint %s) refused with 0xA700: %d bytes, more "
                  "than dicomweb.max_instance_size (%d)", host, endpoint, size, limit)
        out.failed.append((*uids_of(head), OUT_OF_RESOURCES))
        return
    status, _comment, accepted = accept(spool, rx, calling, view.cfg.ae_title, expected,
                                        "STOW-RS")
    if accepted is None:
        out.failed.append((*uids_of(head), status))
        return
    tags = accepted.tags
    tags.update(keys)  # the Endpoint and SourceHost routing keys
    out.stored.append({k: tags.get(k, "") for k in ("SOPClassUID", "SOPInstanceUID",
                                                   "StudyInstanceUID", "SeriesInstanceUID")})
    spool.place(accepted)


def uids_of(head: bytes | bytearray) -> tuple[str, str]:
    """(SOP Class UID, SOP Instance UID) from the start of a refused part, or '' for what
    cannot be read there (a part that is not DICOM at all)."""
    try:
        ds = dcmread(io.BytesIO(bytes(head)), force=True, stop_before_pixels=True,
                     specific_tags=["SOPClassUID", "SOPInstanceUID"])
        return str(ds.get("SOPClassUID", "") or ""), str(ds.get("SOPInstanceUID", "") or "")
    except Exception:  # noqa: BLE001 - any garbage: the failure lists no UIDs
        return "", ""


def _ui(value: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


def response_body(out: Outcome, base_url: str, study_uid: str | None) -> dict[str, Any]:
    """The PS3.18 Store Instances Response Module, as DICOM JSON."""
    body: dict[str, Any] = {}
    if study_uid:
        body["00081190"] = {"vr": "UR", "Value": [f"{base_url}/studies/{study_uid}"]}
    if out.failed:
        body["00081198"] = {"vr": "SQ", "Value": [
            {"00081150": _ui(cls), "00081155": _ui(sop),
             "00081197": {"vr": "US", "Value": [reason]}} for cls, sop, reason in out.failed]}
    if out.stored:
        body["00081199"] = {"vr": "SQ", "Value": [
            {"00081150": _ui(s["SOPClassUID"]), "00081155": _ui(s["SOPInstanceUID"]),
             "00081190": {"vr": "UR", "Value": [
                 f"{base_url}/studies/{s['StudyInstanceUID']}/series/{s['SeriesInstanceUID']}"
                 f"/instances/{s['SOPInstanceUID']}"]}} for s in out.stored]}
    return body


def http_status(out: Outcome) -> int:
    """200 every instance stored, 202 some failed, 409 none stored (PS3.18 10.5.3); a body
    that broke off answers its own error."""
    if out.error is not None:
        return out.error.status
    if not out.failed:
        return 200 if out.stored else 400
    return 202 if out.stored else 409


def describe(out: Outcome, endpoint: str, host: str, seconds: float) -> str:
    """The request's one log line."""
    what = f"{len(out.stored)} stored, {len(out.failed)} failed"
    if out.error is not None:
        what += f", then {out.error}"
    return (f"STOW-RS from {host} (endpoint {endpoint}): {what} in {seconds:.2f} s")


__all__ = ["BodyError", "Outcome", "StowView", "describe", "http_status", "ingest_request",
           "media_problem", "response_body"]
