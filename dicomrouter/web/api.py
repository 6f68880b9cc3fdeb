"""The HTTP API (FastAPI): health, readiness, Prometheus metrics, the REST API and the status
page. Reads go to the state database; the state-changing calls (retry a job, reroute, release
or reject a study) need the bearer token named by ``web.token_env`` and are refused (401)
without it.
Bound to anything but loopback (``web.protected``), every endpoint but ``/health`` needs the
token too (``/metrics`` unless ``web.metrics_public``), the way Orthanc refuses remote access
without credentials: the pages list patient IDs and their studies. A browser logs in with HTTP
basic auth (any user name, the token as the password); clients send ``Authorization: Bearer``.
The OpenAPI schema is at ``/openapi.json`` (no Swagger UI: it would load scripts from a CDN).
The DICOMweb server (STOW-RS, QIDO-RS, WADO-RS under ``/dicom-web``) is added to this app by
``web.dicomweb.attach``, with its own credentials (``dicomweb.auth``; off loopback the web token).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
from dataclasses import asdict
from typing import Any, Protocol

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel

from .. import metrics
from ..config import Config
from ..processing.steps_view import study_steps
from ..spool import Spool
from ..state import State
from . import page
from .steps import processing_rows


class RouterView(Protocol):
    """What the API needs from the running router."""

    cfg: Config
    state: State
    spool: Spool  # WADO-RS reads the instances through it

    def reroute(self, study_uid: str) -> str: ...

    def notify_destination(self, destination: str) -> None: ...

    def readiness(self) -> dict[str, str]: ...

    def breakers(self) -> dict[str, dict[str, Any]]: ...


class HoldDecision(BaseModel):
    """The body of a release or a reject: why (recorded in the audit trail)."""

    reason: str


def create_app(router: RouterView) -> FastAPI:
    app = FastAPI(title="dicomrouter", docs_url=None, redoc_url=None,
                  description="Status, metrics and operations of one dicomrouter.")
    state = router.state
    web = router.cfg.web
    token = os.environ.get(web.token_env) if web.token_env else None

    def authorised(request: Request) -> bool:
        """The request carries the token: as a bearer token, or as the password of HTTP basic
        auth (what a browser can send); compared in constant time."""
        if not token:
            return False
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        given = value.strip()
        if scheme.lower() == "basic":
            try:
                given = base64.b64decode(given, validate=True).decode("utf-8").partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                return False
        elif scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.encode(), token.encode())

    def require_token(request: Request) -> None:
        if not token:
            raise HTTPException(401, "state-changing calls are disabled: set web.token_env "
                                "to the name of an environment variable holding a token")
        if not authorised(request):
            raise HTTPException(401, "missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    open_paths = {"/health"} | ({"/metrics"} if web.metrics_public else set())

    @app.middleware("http")
    async def remote_access(request: Request, call_next: Any) -> Response:
        """Off loopback, nothing but /health (and public /metrics) without the token."""
        if not web.protected or request.url.path in open_paths or authorised(request) \
                or request.url.path.startswith("/dicom-web/"):  # its own auth (web/dicomweb)
            return await call_next(request)
        if request.url.path.startswith(("/api/", "/dicom-web/")) or \
                request.url.path == "/metrics":
            return JSONResponse({"detail": "this router is reachable from the network: send "
                                 "the token (Authorization: Bearer)"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        return HTMLResponse(page.LOGIN_REQUIRED, status_code=401,
                            headers={"WWW-Authenticate": 'Basic realm="dicomrouter", '
                                     'charset="UTF-8"'})

    @app.get("/health", summary="Liveness: the process answers")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: database and spool writable, listener up, "
             "sources polling")
    def ready() -> JSONResponse:
        problems = router.readiness()
        body = {"status": "ready" if not problems else "not ready", "problems": problems}
        return JSONResponse(body, status_code=200 if not problems else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    def prometheus() -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/api/studies", summary="Studies, newest first, with their delivery progress")
    def studies(state_: str | None = Query(None, alias="state"),
                patient_id: str | None = None, since: float | None = None,
                limit: int = Query(50, ge=1, le=1000),
                offset: int = Query(0, ge=0)) -> dict[str, Any]:
        rows = state.recent_studies(limit, offset, state_, patient_id, since)
        jobs = state.jobs(study_uids=[r["study_uid"] for r in rows])
        for r in rows:
            r["jobs"] = [j for j in jobs if j["study_uid"] == r["study_uid"]]
        return {"studies": rows, "limit": limit, "offset": offset}

    @app.get("/api/studies/{study_uid}", summary="One study: state, jobs, history")
    def study(study_uid: str) -> dict[str, Any]:
        row = state.study(study_uid)
        if row is None:
            raise HTTPException(404, f"no study {study_uid}")
        jobs = state.jobs(study_uids=[study_uid])
        history = state.history(study_uid)
        return {"study": asdict(row), "summary": state.study_rows(study_uid=study_uid),
                "jobs": jobs,
                "mpps": [asdict(m) | {"summary": str(m)}
                         for m in state.mpps_reports(study_uid)],
                "history": [{"ts": ts, "event": e} for ts, e in history],
                "processing": [s.as_dict() for s in  # its processing steps (issue 29)
                               study_steps(history, router.cfg.routes, jobs)]}

    @app.get("/api/processing", summary="Studies in processing (a process:<route> job not "
             "finished, or finished in the last hour), step by step")
    def processing() -> dict[str, Any]:
        return {"studies": processing_rows(state, router.cfg)}

    @app.get("/api/audit", summary="The audit trail: study events since a Unix time")
    def audit(since: float = 0.0, study_uid: str | None = None,
              limit: int = Query(10_000, ge=1, le=100_000)) -> dict[str, Any]:
        return {"events": state.events_since(since, study_uid)[:limit]}

    @app.get("/api/destinations", summary="Destinations with their queues and health")
    def destinations() -> dict[str, Any]:
        return {"destinations": destination_rows(router)}

    @app.get("/api/nodes", summary="The routers sharing this state (one when embedded), "
             "with their heartbeats and what each runs")
    def nodes() -> dict[str, Any]:
        return {"this": state.node_id, "nodes": state.nodes()}

    @app.get("/api/jobs", summary="Delivery jobs (e.g. ?state=dead)")
    def jobs(state_: str | None = Query(None, alias="state"), destination: str | None = None,
             limit: int = Query(100, ge=1, le=1000)) -> dict[str, Any]:
        return {"jobs": state.jobs(state_, destination, limit=limit)}

    @app.post("/api/jobs/{job_id}/retry", summary="Requeue a failed or dead job now",
              dependencies=[Depends(require_token)])
    def retry(job_id: int) -> dict[str, Any]:
        found = state.requeue_job(job_id)
        if found is None:
            raise HTTPException(404, f"no failed or dead job {job_id}")
        router.notify_destination(found["destination"])
        return {"requeued": job_id, **found}

    @app.post("/api/studies/{study_uid}/reroute", summary="Route a study in the spool again "
              "with the current rules", dependencies=[Depends(require_token)])
    def reroute(study_uid: str) -> dict[str, Any]:
        outcome = router.reroute(study_uid)
        if outcome == "unknown":
            raise HTTPException(404, f"no study {study_uid} in the spool")
        return {"study_uid": study_uid, "outcome": outcome}

    def decide(study_uid: str, body: HoldDecision, request: Request, release: bool
               ) -> dict[str, Any]:
        """Release or reject a held study; the audit trail names the token and the peer."""
        if not body.reason.strip():
            raise HTTPException(422, "reason: say why (it goes into the audit trail)")
        if state.study(study_uid) is None:
            raise HTTPException(404, f"no study {study_uid}")
        peer = request.client.host if request.client else "?"
        who = f"the web token holder at {peer} (REST)"
        act = state.release_study if release else state.reject_study
        dests = act(study_uid, who, body.reason.strip())
        if not dests:
            raise HTTPException(409, f"study {study_uid} has no held delivery")
        if release:
            for dest in dests:
                router.notify_destination(dest)
        return {"study_uid": study_uid, "released" if release else "rejected": dests}

    @app.post("/api/studies/{study_uid}/release", summary="Deliver a held study (a route "
              "with hold: true) now; body {\"reason\": \"...\"}",
              dependencies=[Depends(require_token)])
    def release(study_uid: str, body: HoldDecision, request: Request) -> dict[str, Any]:
        return decide(study_uid, body, request, True)

    @app.post("/api/studies/{study_uid}/reject", summary="Drop a held study's deliveries "
              "(never delivered there); body {\"reason\": \"...\"}",
              dependencies=[Depends(require_token)])
    def reject(study_uid: str, body: HoldDecision, request: Request) -> dict[str, Any]:
        return decide(study_uid, body, request, False)

    @app.get("/", response_class=HTMLResponse, summary="The status page")
    def status_page() -> HTMLResponse:
        return HTMLResponse(page.render(router, destination_rows(router)))

    return app


def destination_rows(router: RouterView) -> list[dict[str, Any]]:
    summary = router.state.gauges()
    failing = {j["destination"]: j for j in summary["retrying"]}
    dead = {j["destination"]: j for j in summary["dead"]}
    breakers = router.breakers()
    out = []
    for name, d in router.cfg.destinations.items():
        queue = summary["queues"].get(name, {})
        breaker = breakers.get(name) or {"state": "closed"}
        health = "breaker open" if breaker["state"] == "open" else \
            "failing" if name in failing else "dead letters" if name in dead else "ok"
        last = failing.get(name) or dead.get(name)
        out.append({"name": name, "type": d.type, "queue": queue,
                    "depth": queue.get("pending", 0) + queue.get("failed", 0)
                    + queue.get("running", 0),
                    "health": health, "breaker": breaker,
                    "last_error": breaker.get("reason") or (last["last_error"] if last
                                                            else None)})
        if d.type == "group":  # destination groups: studies per member, queued studies' member
            out[-1]["group"] = router.state.group_spread(name)
    return out
