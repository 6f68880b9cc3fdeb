"""Processing as a destination: a route with ``process:`` sends its studies to
``process:<route>``, whose jobs are delivery jobs (retries, backoff, dead letter, status and
the circuit breaker come from delivery.py). A session stages the study's instances (after the
route's transforms), and its ``commit`` runs the steps and ingests what the last one wrote.

Crash safety: the last step's output is moved to ``done/`` (one rename) before any of it is
ingested; a retry finding ``done/`` ingests what is left there instead of running the steps
again, so a finished step's results are recorded once (a file ingested twice has the same SOP
Instance UID: it replaces itself). An unfinished chain's work folders are discarded."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from ..config.processing import ProcessModel
from ..destinations import DeliveryError
from ..destinations.base import Context, Destination, PermanentFailure, Session
from ..destinations.registry import implements
from ..spool.faults import crash_point
from ..spool.slots import fsync_dir
from ..state import Instance
from .chain import ChainFailed, run_chain
from .remote import RemoteStep
from .results import (
    REIDENTIFIED,
    ingest_result,
    is_result,
    reidentified_copy,
    route_key,
)

DONE = "done"
PICKED = ".route"  # in done/: the route result.json picked


@implements(ProcessModel)
class ProcessDestination(Destination):
    whole_study = True  # a retry runs the steps on the whole study again
    probe_kind = "nothing (a processing step)"

    def __init__(self, cfg: ProcessModel, ctx: Context) -> None:
        super().__init__(cfg, ctx)
        self.route = cfg.route
        routes = {r.name: r for r in ctx.config.routes} if ctx.config is not None else {}
        self.steps = routes[self.route].process if self.route in routes else ()
        # the route de-identifies reversibly: its results are re-identified before they
        # enter the router (so nothing pseudonymized reaches the destinations of results:)
        self.key = route_key(routes.get(self.route))
        self.stop = threading.Event()  # the router stops: a remote step stops waiting

    def takes(self, inst: Instance) -> bool:
        return not is_result(inst)  # results never go back into a processing step

    def interrupt(self) -> None:
        self.stop.set()

    def describe(self) -> str:
        return f"processing steps of route {self.route!r} ({len(self.steps)} step(s))"

    def folder(self, study_uid: str) -> Path:
        assert self.workdir is not None
        return self.workdir / study_uid

    def open(self, instances: Sequence[Instance], routes: Sequence[str] = ()) -> Session:
        return _ProcessSession(self, instances)

    def recover(self) -> list[str]:
        """Unfinished chains (no ``done/``) left by a crash are discarded."""
        said = []
        if self.workdir is None or not self.workdir.is_dir():
            return said
        for study in self.workdir.iterdir():
            for part in study.iterdir() if study.is_dir() else ():
                if part.name != DONE:
                    shutil.rmtree(part, ignore_errors=True)
                    said.append(f"discarded the unfinished processing of study {study.name} "
                                f"({part.name})")
        return said


class _ProcessSession(Session):
    transmits_on_send = False

    def __init__(self, dest: ProcessDestination, originals: Sequence[Instance]) -> None:
        self.dest = dest
        # the study as received: its UID names the history and the remote steps' awaits
        # (what is staged may be a de-identified copy, under a pseudonymized UID)
        self.originals = list(originals)
        self.staged: list[tuple[Instance, Path]] = []
        self.skipped: list[str] = []

    def _study(self) -> Path:
        return self.dest.folder(self._origin(self.staged[0][0]))

    def _origin(self, inst: Instance) -> str:
        return self.originals[0].study_uid if self.originals else inst.study_uid

    def send(self, inst: Instance, data: BinaryIO) -> bool:
        if is_result(inst):  # results never go back into a processing step
            return True
        folder = self.dest.folder(self._origin(inst)) / "staged"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{inst.sop_uid}.dcm"
        try:
            with open(path, "wb") as out:
                shutil.copyfileobj(data, out)
        except OSError as exc:
            raise DeliveryError(f"cannot stage {inst.sop_uid} for processing: {exc}") from exc
        self.staged.append((inst, path))
        return False

    def commit(self) -> Sequence[str]:
        if not self.staged:
            return ()
        dest = self.dest
        study_uid = self._origin(self.staged[0][0])
        root = self._study()
        done = root / DONE
        state = dest.ctx.state
        note = (lambda text: state.note(study_uid, text)) if state is not None else \
            (lambda text: None)
        self.transmitting([i.sop_uid for i, _p in self.staged])
        if not done.is_dir():
            files = {i.sop_uid: p for i, p in self.staged}
            try:
                chain = run_chain(dest.steps, root / "run", dest.route,
                                  [i for i, _p in self.staged],
                                  lambda i: files[i.sop_uid].open("rb"), note,
                                  remote=RemoteStep(dest.ctx, dest.route,
                                                    self.originals or [self.staged[0][0]],
                                                    dest.stop)
                                  if state is not None else None)
            except ChainFailed as exc:
                if exc.cannot_start:
                    raise PermanentFailure(str(exc), "make the step runnable on this machine, "
                                           "then 'dicomrouter retry --dead'") from None
                raise DeliveryError(str(exc)) from None
            last = chain.outcomes[-1][1] if chain.outcomes else None
            out = (root / "run" / str(len(chain.outcomes)) / "output") if last else None
            if out is None or not out.is_dir():
                out = root / "run" / "empty"
                out.mkdir(parents=True, exist_ok=True)
            (out / PICKED).write_text(chain.route, encoding="utf-8")
            os.replace(out, done)  # the step is finished: from here its results count once
            fsync_dir(root)
        if state is not None:
            state.remote_await_done(study_uid, dest.route)
        picked = (done / PICKED).read_text(encoding="utf-8") if (done / PICKED).exists() else ""
        cfg = dest.ctx.config
        ingested = 0
        for path in sorted(p for p in done.rglob("*") if p.is_file()):
            if path.name in (PICKED, "result.json") or path.name.endswith(REIDENTIFIED):
                continue  # (a copy a crash left: made again from the file as written)
            taken = path
            try:
                if dest.key is not None:
                    taken = reidentified_copy(path, dest.key, state, dest.route)
                    crash_point("result-reidentified")
                ingest_result(dest.ctx.spool, taken, dest.route, picked, cfg.ae_title,
                              cfg.ae_title)
                ingested += 1
            except ValueError as exc:
                note(f"processing ({dest.route}): output {path.name} not taken: {exc}")
            path.unlink()
            if taken != path:
                taken.unlink()
        note(f"processing ({dest.route}): {ingested} result instance(s) ingested" +
             (f"; result.json picked route {picked!r}" if picked else ""))
        with contextlib.suppress(OSError):
            shutil.rmtree(root)
        return [i.sop_uid for i, _p in self.staged]
