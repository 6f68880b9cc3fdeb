"""The router as a DICOMweb server (issue 28): the routes under ``/dicom-web/``, served on the
web port and, with ``dicomweb.port``, on a listener of their own (TLS with ``dicomweb.tls``).

This package owns the DICOMweb server's plumbing (``dicomweb_router``: the APIRouter every
DICOMweb route is registered on; ``require_dicomweb_auth`` in ``auth.py``: the one check of its
credentials; ``attach``/``dicomweb_app``: the two servers) and STOW-RS in (``stow.py``). QIDO-RS
and WADO-RS register their routes on the same router with the same dependency. Imports the
configuration, the spool, ``scp.ingest`` (the one ingest contract) and ``sources.multipart``
(the streaming multipart reader); nothing above ``web``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from ...config.dicomweb import DEFAULT_ENDPOINT
from .. import qido, wado
from .auth import Credentials, credentials, require_dicomweb_auth
from .stow import (
    BodyError,
    StowView,
    describe,
    http_status,
    ingest_request,
    media_problem,
    response_body,
)

log = logging.getLogger("dicomrouter.dicomweb")

PREFIX = "/dicom-web"
DICOM_JSON = "application/dicom+json"


#: adds more DICOMweb routes (QIDO-RS, WADO-RS) to the router: (api, router_view, auth)
RouteAdder = Callable[[APIRouter, Any, Callable[..., None]], None]


def dicomweb_router(router_view: StowView, *more: RouteAdder) -> APIRouter:
    """The DICOMweb routes: ``POST /dicom-web/studies[/{uid}]`` and, per named endpoint,
    ``POST /dicom-web/<endpoint>/studies[/{uid}]``, then QIDO-RS, WADO-RS and whatever each of
    ``more`` adds (called as ``add(api, router_view, require_dicomweb_auth)``), at the root and
    under each named endpoint (the same spool: an endpoint names where instances came in, it
    is no partition); every route needs the server's credentials (``require_dicomweb_auth``,
    a dependency of the whole router)."""
    api = APIRouter(prefix=PREFIX, dependencies=[Depends(require_dicomweb_auth)],
                    tags=["DICOMweb"])
    cfg = router_view.cfg.dicomweb
    limiter: list[anyio.CapacityLimiter] = []  # made in the event loop, on the first request

    async def stow(request: Request, study_uid: str | None, endpoint: str) -> Response:
        problem = media_problem(request.headers.get("content-type", ""))
        if problem:
            return JSONResponse({"detail": problem}, status_code=415)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cfg.max_request_size:
            return JSONResponse({"detail": f"the request ({declared} bytes) is larger than "
                                 f"dicomweb.max_request_size ({cfg.max_request_size})"},
                                status_code=413)
        if not limiter:
            limiter.append(anyio.CapacityLimiter(cfg.max_requests))
        host = request.client.host if request.client else ""
        calling = "STOW-RS" if endpoint == DEFAULT_ENDPOINT else f"STOW-RS:{endpoint}"
        stream = request.stream()

        async def next_chunk() -> bytes | None:
            with anyio.fail_after(cfg.read_timeout):
                try:
                    return await stream.__anext__()
                except StopAsyncIteration:
                    return None
                except ClientDisconnect:
                    raise BodyError(400, "the client went away before the end of the "
                                    "body") from None

        started = time.monotonic()
        out = await anyio.to_thread.run_sync(
            partial(ingest_request, router_view, _pulled(next_chunk),
                    request.headers["content-type"], study_uid, endpoint, calling, host),
            limiter=limiter[0])
        log.info("%s", describe(out, endpoint, host, time.monotonic() - started))
        base = str(request.base_url).rstrip("/") + PREFIX
        return JSONResponse(response_body(out, base, study_uid), status_code=http_status(out),
                            media_type=DICOM_JSON)

    def register(path: str, endpoint: str) -> None:
        async def all_studies(request: Request) -> Response:
            return await stow(request, None, endpoint)

        async def one_study(request: Request, study_uid: str) -> Response:
            return await stow(request, study_uid, endpoint)

        api.add_api_route(f"{path}/studies", all_studies, methods=["POST"],
                          summary="STOW-RS: store instances (multipart/related; "
                          "type=\"application/dicom\")", response_class=Response)
        api.add_api_route(f"{path}/studies/{{study_uid}}", one_study, methods=["POST"],
                          summary="STOW-RS: store instances of this study",
                          response_class=Response)

    register("", DEFAULT_ENDPOINT)
    for name in cfg.endpoints:
        register(f"/{name}", name)
    for add in (qido.add_routes, wado.add_routes, *more):  # QIDO-RS, WADO-RS
        add(api, router_view, require_dicomweb_auth)
    for name in cfg.endpoints:  # a named endpoint is a whole service root: a partner's one
        # DICOMweb server entry searches and retrieves there too
        sub = APIRouter(prefix=f"{PREFIX}/{name}", dependencies=[Depends(require_dicomweb_auth)])
        for add in (qido.add_routes, wado.add_routes, *more):
            add(sub, router_view, require_dicomweb_auth)
        api.routes.extend(sub.routes)  # full paths already, the same dependency
    return api


def _pulled(next_chunk: Callable[[], Awaitable[bytes | None]]) -> Iterator[bytes]:
    """The request body as a plain iterator for the worker thread: each chunk fetched from
    the event loop as the reader asks for it (nothing read ahead, nothing held)."""
    while True:
        chunk = anyio.from_thread.run(next_chunk)
        if chunk is None:
            return
        if chunk:
            yield chunk


def attach(app: FastAPI, router_view: StowView, *more: RouteAdder) -> None:
    """Serve the DICOMweb routes on the web port's app too."""
    app.state.dicomweb_auth = credentials(router_view.cfg, own_listener=False)
    app.include_router(dicomweb_router(router_view, *more))


def dicomweb_app(router_view: StowView, *more: RouteAdder) -> FastAPI:
    """The app of the DICOMweb server's own listener (``dicomweb.port``): its routes only."""
    app = FastAPI(title="dicomrouter DICOMweb", docs_url=None, redoc_url=None)
    app.state.dicomweb_auth = credentials(router_view.cfg, own_listener=True)
    app.include_router(dicomweb_router(router_view, *more))
    return app


__all__ = ["Credentials", "RouteAdder", "attach", "dicomweb_app", "dicomweb_router",
           "require_dicomweb_auth"]
