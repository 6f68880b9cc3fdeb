"""WADO-RS (PS3.18 10.4) over what the spool holds: studies, series and instances as
multipart/related ``application/dicom`` (the bytes as stored, or converted losslessly when a
syntax is asked for: ``media.instance_syntax``), their ``/metadata`` as DICOM JSON, and
``/frames/{n}`` of an instance as stored (``pixelframes.py``).

Instances are selected through the Q/R index (``State.qr_instances``, the C-MOVE/C-GET path)
and read only through ``Spool.open``; every answer is streamed one instance (one frame) at a
time, so a study is never held in memory. Everything that can make a request fail (an unknown
UID 404, a syntax or media type the router cannot give 406, a bad frame number 400) is decided
before the first byte goes out. The metadata leaves Pixel Data out (no BulkDataURI): a client
gets pixels from ``/frames`` or the instance; other binary values are inlined.

A study the spool does not hold is asked of the Q/R proxy when the router has one
(``router_view.proxy_fetcher``, issue 28 item 3): ``fetch(study, series_uid=..., timeout=
wado_proxy_timeout)`` returns True once its instances are in the spool and indexed.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydicom import dcmread
from pydicom.uid import UID

from .. import query
from ..conversion import POOL
from ..dicomfile import valid_uid
from ..pixelframes import FrameError, check, locate, read_frame
from ..proxy import StillFetching
from ..state import Instance
from ..transcode import ConversionError
from . import media

log = logging.getLogger("dicomrouter.dicomweb")

_CHUNK = 1 << 20


def select(router_view: Any, study: str, series: str | None = None, sop: str | None = None
           ) -> list[Instance]:
    """The spool's instances under the path's UIDs (asked of the Q/R proxy when there are none
    and the router has one); 400 for a malformed UID, 404 when nothing is there."""
    keys = {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": sop}
    for kw, uid in keys.items():
        if uid is not None and not valid_uid(uid):
            raise HTTPException(400, f"{kw} {uid[:80]!r} is not a valid UID")
    q = query.Query("IMAGE", tuple(query.Match(kw, "single", (uid,))
                                   for kw, uid in keys.items() if uid is not None), ())
    found = router_view.state.qr_instances(q)
    fetcher = getattr(router_view, "proxy_fetcher", None)
    if not found and fetcher is not None:
        timeout = router_view.cfg.wado_proxy_timeout
        log.info("WADO-RS: study %s is not in the spool: fetching it through the Q/R proxy "
                 "(at most %g s)", study, timeout)
        try:
            if fetcher.fetch(study, series_uid=series, timeout=timeout):
                found = router_view.state.qr_instances(q)
        except StillFetching as exc:  # not a 404: the study exists and is on its way
            raise HTTPException(503, f"{exc}: ask again later",
                                headers={"Retry-After": "30"}) from None
    if not found:
        what = "instance" if sop else "series" if series else "study"
        raise HTTPException(404, f"no {what} {sop or series or study} in the spool")
    return found


def _guarded(chunks: Iterator[bytes], what: str) -> Iterator[bytes]:
    """A response body that stops, with one log line, where reading the spool or a conversion
    fails once the answer has begun (its status is sent): the multipart body then lacks its
    closing delimiter, which a client sees as a cut answer; no traceback in the log."""
    try:
        yield from chunks
    except Exception as exc:  # noqa: BLE001 - the answer is under way: end it, say why
        log.warning("WADO-RS %s cut short: %s: %s", what, type(exc).__name__, exc)


def _stored(router_view: Any, inst: Instance) -> Iterator[bytes]:
    """The stored bytes; the file is opened now, before the part's header is written."""
    reader = router_view.spool.open(inst)

    def chunks() -> Iterator[bytes]:
        with reader:
            while chunk := reader.read(_CHUNK):
                yield chunk

    return chunks()


def _converted(router_view: Any, inst: Instance, target: str) -> Iterator[bytes]:
    """The instance converted to ``target`` by a conversion process, into a temporary file
    (converted now, before the part's header is written; the file goes once it was sent)."""
    tmp = tempfile.NamedTemporaryFile(suffix=".dcm")  # noqa: SIM115 - closed by chunks()
    try:
        with router_view.spool.open(inst) as reader:
            POOL.to_file(reader.name, inst.transfer_syntax, target, tmp.name)
    except ConversionError as exc:
        tmp.close()
        raise ConversionError(f"instance {inst.sop_uid} cannot be converted from "
                              f"{UID(inst.transfer_syntax).name} to {UID(target).name}: "
                              f"{exc}") from None
    except BaseException:
        tmp.close()
        raise

    def chunks() -> Iterator[bytes]:
        with tmp, open(tmp.name, "rb") as f:
            while chunk := f.read(_CHUNK):
                yield chunk

    return chunks()


def retrieve(router_view: Any, request: Request, instances: list[Instance]
             ) -> StreamingResponse:
    """The instances as multipart/related application/dicom, in the syntax the Accept asks."""
    wanted = media.wishes(request.headers.get("accept"))
    plan = [(inst, media.instance_syntax(inst.transfer_syntax, wanted)) for inst in instances]
    refused = [inst for inst, target in plan if target is None]
    if refused:
        raise HTTPException(406, f"cannot send instance {refused[0].sop_uid} (stored as "
                            f"{UID(refused[0].transfer_syntax).name}) as asked "
                            f"({request.headers.get('accept', '')[:200]}): the router sends "
                            "the stored syntax or converts losslessly")
    mark = media.boundary()

    def parts() -> Iterator[tuple[str, Iterator[bytes]]]:
        for inst, target in plan:
            assert target is not None
            body = _stored(router_view, inst) if target == inst.transfer_syntax else \
                _converted(router_view, inst, target)
            yield f"application/dicom; transfer-syntax={target}", body

    log.info("WADO-RS to %s: %d instance(s)", _client(request), len(plan))
    return StreamingResponse(_guarded(media.multipart(parts(), mark), "retrieve"),
                             media_type=media.related("application/dicom", mark))


def _metadata(router_view: Any, inst: Instance) -> dict[str, Any]:
    with router_view.spool.open(inst) as reader:
        ds = dcmread(io.BufferedReader(reader, 1 << 16), stop_before_pixels=True, force=True)
    return ds.to_json_dict()


def metadata(router_view: Any, request: Request, instances: list[Instance]
             ) -> StreamingResponse:
    """The instances' attributes as one DICOM JSON array, written one instance at a time."""

    def body() -> Iterator[bytes]:
        yield b"["
        for n, inst in enumerate(instances):
            yield (b"," if n else b"") + json.dumps(_metadata(router_view, inst)).encode()
        yield b"]"

    log.info("WADO-RS metadata to %s: %d instance(s)", _client(request), len(instances))
    return StreamingResponse(_guarded(body(), "metadata"), media_type="application/dicom+json")


def frame_numbers(text: str) -> list[int]:
    """``1,3,5`` → [1, 3, 5]; 400 for anything but whole numbers ≥ 1."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or len(part) > 9 or int(part) < 1:
            raise HTTPException(400, f"frame number {part[:20]!r}: a whole number ≥ 1 is "
                                "expected (frames are counted from 1)")
        out.append(int(part))
    return out


def frames(router_view: Any, request: Request, inst: Instance, numbers: list[int]
           ) -> StreamingResponse:
    """Frames of one instance as stored, each a part of its media type."""
    try:
        with router_view.spool.open(inst) as reader:
            where = locate(io.BufferedReader(reader, 1 << 16), inst.transfer_syntax)
        check(where, numbers)
        content_type = media.frame_type(inst.transfer_syntax,
                                        media.wishes(request.headers.get("accept")))
    except FrameError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    if content_type is None:
        raise HTTPException(406, f"the frames of instance {inst.sop_uid} are stored as "
                            f"{UID(inst.transfer_syntax).name} and sent only as stored "
                            f"(asked: {request.headers.get('accept', '')[:200]})")
    mark = media.boundary()

    def body() -> Iterator[bytes]:
        with router_view.spool.open(inst) as reader:
            f = io.BufferedReader(reader, 1 << 16)
            yield from media.multipart(((content_type, read_frame(f, where, n))
                                        for n in numbers), mark)

    log.info("WADO-RS frames to %s: instance %s, frame(s) %s", _client(request), inst.sop_uid,
             ",".join(map(str, numbers)))
    return StreamingResponse(_guarded(body(), "frames"),
                             media_type=media.related(content_type.split(";")[0], mark))


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


def add_routes(api: APIRouter, router_view: Any, auth: Callable[..., Any]) -> None:
    """The WADO-RS resources on ``api`` (``/studies/{study}``, ... ``/frames/{n}``)."""
    deps = [Depends(auth)]

    @api.get("/studies/{study}", dependencies=deps, summary="WADO-RS: retrieve a study",
             response_class=StreamingResponse)
    def study(study: str, request: Request) -> StreamingResponse:
        return retrieve(router_view, request, select(router_view, study))

    @api.get("/studies/{study}/series/{series}", dependencies=deps,
             summary="WADO-RS: retrieve a series", response_class=StreamingResponse)
    def series(study: str, series: str, request: Request) -> StreamingResponse:
        return retrieve(router_view, request, select(router_view, study, series))

    @api.get("/studies/{study}/series/{series}/instances/{sop}", dependencies=deps,
             summary="WADO-RS: retrieve an instance", response_class=StreamingResponse)
    def instance(study: str, series: str, sop: str, request: Request) -> StreamingResponse:
        return retrieve(router_view, request, select(router_view, study, series, sop))

    @api.get("/studies/{study}/metadata", dependencies=deps,
             summary="WADO-RS: a study's metadata", response_class=StreamingResponse)
    def study_metadata(study: str, request: Request) -> StreamingResponse:
        return metadata(router_view, request, select(router_view, study))

    @api.get("/studies/{study}/series/{series}/metadata", dependencies=deps,
             summary="WADO-RS: a series' metadata", response_class=StreamingResponse)
    def series_metadata(study: str, series: str, request: Request) -> StreamingResponse:
        return metadata(router_view, request, select(router_view, study, series))

    @api.get("/studies/{study}/series/{series}/instances/{sop}/metadata", dependencies=deps,
             summary="WADO-RS: an instance's metadata", response_class=StreamingResponse)
    def instance_metadata(study: str, series: str, sop: str, request: Request
                          ) -> StreamingResponse:
        return metadata(router_view, request, select(router_view, study, series, sop))

    @api.get("/studies/{study}/series/{series}/instances/{sop}/frames/{numbers}",
             dependencies=deps, summary="WADO-RS: frames of an instance, as stored",
             response_class=StreamingResponse)
    def instance_frames(study: str, series: str, sop: str, numbers: str, request: Request
                        ) -> StreamingResponse:
        wanted = frame_numbers(numbers)
        return frames(router_view, request, select(router_view, study, series, sop)[0],
                      wanted)
