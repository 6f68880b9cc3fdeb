"""Remote processing steps (issue 29, item 1): the study goes to an AI node through one of the
configured destinations (C-STORE, STOW-RS, ...) and the step waits for the results the node
sends back to the router, like any sender would.

Two halves meet in the state's ``remote_awaits`` row of (origin study, route, step):

* ``RemoteStep`` (run by the ``process:<route>`` delivery job, through ``chain.run_chain``)
  records what it sends (the Study Instance UID, series and instances *as sent*: pseudonymized
  when the route de-identifies reversibly), sends it, and polls the row until results are
  listed there or the step's ``timeout`` passes. The row outlives a crash: a retry finds the
  study already at the node (``waiting``) and only waits again, so the node is not asked twice
  and its results are not duplicated; results that arrive after a timeout still count for the
  next attempt, which then does not send again either.
* ``RemoteClaims`` (asked by the tracker when a study completes, before the routing table) takes
  a completed generation's new instances as results when they are in the study that was sent
  (or, ``match: referenced``, reference it or one of its series), come from another sender
  than the study's own (or one of ``results_from``) and are not an echo of what was sent. They
  are tagged as results in the index (so they never enter a processing step again), listed in
  the row, and their study is marked routed without a job: the step, not the routing table,
  decides where they go (its output is ingested and routed by ``results:``, re-identified first).
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset

from ..config.processing import StepModel, step_name
from ..destinations.base import Context, DeliveryError, InstanceRejected, Interrupted
from ..destinations.registry import build
from ..logsafe import escape
from ..spool import SpoolReader
from ..state import Instance, State
from .results import (
    PICKED_TAG,
    RESULT_TAG,
    ingest_result,
    is_result,
    reidentify_file,
    route_key,
)
from .runner import Outcome
from .workfolder import WorkFolder

log = logging.getLogger("dicomrouter.processing")

REMOTE_TAG = "_RemoteOf"  # a remote step's result as it arrived: the origin study it is for
POLL = 1.0  # seconds between two looks at the await while a remote step waits
TAKEN, LATER, PART = "taken", "later", "part"  # RemoteClaims.claim


@dataclass
class RemoteOutcome(Outcome):
    """A remote step's outcome: ``text`` is its history line's summary."""

    text: str = ""

    def summary(self) -> str:
        return self.text


class RemoteStep:
    """Run the remote steps of one study's chain (see the module docstring)."""

    def __init__(self, ctx: Context, route: str, origin: Sequence[Instance],
                 stop: threading.Event, poll: float = POLL,
                 clock: Callable[[], float] = time.time) -> None:
        assert ctx.state is not None and ctx.config is not None
        self.ctx = ctx
        self.state: State = ctx.state
        self.route = route
        self.origin_uid = origin[0].study_uid
        self.origin_ae = origin[0].calling_ae
        self.stop = stop
        self.poll = poll
        self.clock = clock

    def __call__(self, step: StepModel, name: str, folder: WorkFolder) -> Outcome:
        remote = step.remote
        assert remote is not None
        start = self.clock()
        row = self.state.remote_await(self.origin_uid, self.route, name)
        if row is not None and row["state"] == "done":
            row = None  # an earlier chain's (the study came again): this run sends anew
        if row is not None and row["results"]:
            pass  # results came back (perhaps after an earlier attempt's timeout): no resend
        elif row is not None and row["state"] == "waiting" and row["deadline"] > start:
            log.info("study %s: processing step %r (%s) still waiting for results from %s "
                     "(sent before a restart): not sent again", self.origin_uid, name,
                     self.route, remote.destination)
            # the history too: its last line was 'running', the status view would say so
            self.state.note(self.origin_uid, (
                f"processing step {name!r} ({self.route}) waiting: still, for results from "
                f"{remote.destination} (the study went there before a restart: not sent "
                f"again); results by {_utc(row['deadline'])}"))
        else:
            self._send(step, name, folder)
            row = self.state.remote_await(self.origin_uid, self.route, name)
        assert row is not None
        while not row["results"]:
            if self.clock() >= row["deadline"]:
                why = (f"no result from {remote.destination} within its timeout "
                       f"({step.timeout:g} s)")
                self.state.remote_await_expire(
                    self.origin_uid, self.route, name,
                    f"processing step {name!r} ({self.route}): {why}; the next attempt sends "
                    "the study again unless results come back meanwhile")
                return RemoteOutcome(None, self.clock() - start, timed_out=True, text=why)
            if self.stop.wait(self.poll):
                raise Interrupted(f"processing step {name!r} interrupted while waiting for "
                                    f"results from {remote.destination} (the router stops; "
                                    "it waits again at the next start)")
            row = self.state.remote_await(self.origin_uid, self.route, name)
            assert row is not None
        count = self._collect(row, folder)
        outcome = RemoteOutcome(0, self.clock() - start, text=(
            f"{count} result instance(s) from {remote.destination} after "
            f"{self.clock() - start:.1f} s"))
        outcome.outputs = sorted(p for p in folder.output.iterdir() if p.is_file())
        return outcome

    def _send(self, step: StepModel, name: str, folder: WorkFolder) -> None:
        """Record what goes out, send it (DeliveryError: the step fails, retried), mark it sent."""
        remote = step.remote
        assert remote is not None
        cfg = self.ctx.config
        files = sorted(p for p in folder.input.iterdir() if p.is_file())
        instances = [_instance(p) for p in files]
        instances = [i for i in instances if i is not None]
        if not instances:
            raise DeliveryError(f"processing step {name!r}: nothing to send to "
                                f"{remote.destination} (no DICOM input)")
        self.state.remote_await_open(self.origin_uid, self.route, name, {
            "destination": remote.destination, "match": remote.match,
            "results_from": remote.results_from, "sent_study": instances[0][1].study_uid,
            "sent_series": sorted({i.series_uid for _p, i in instances}),
            "sent_sops": [i.sop_uid for _p, i in instances], "origin_ae": self.origin_ae})
        dest = build(cfg.destinations[remote.destination], self.ctx)
        dest.workdir = Path(self.ctx.spool.root) / "exports" / remote.destination
        durable: set[str] = set()
        with dest.open([i for _p, i in instances], (self.route,)) as session:
            session.on_durable = durable.update
            for path, inst in instances:
                with SpoolReader(str(path)) as data:
                    try:
                        if session.send(inst, data):
                            durable.add(inst.sop_uid)
                    except InstanceRejected as exc:
                        raise DeliveryError(f"{remote.destination} refused {inst.sop_uid}: "
                                            f"{exc}") from None
            durable.update(session.commit())
        sent = len(durable & {i.sop_uid for _p, i in instances})
        if sent < len(instances):
            raise DeliveryError(f"{remote.destination} took {sent} of {len(instances)} "
                                "instance(s)")
        now = self.clock()
        deadline = now + step.timeout
        self.state.remote_await_sent(
            self.origin_uid, self.route, name, now, deadline,
            f"processing step {name!r} ({self.route}) waiting: sent {sent} instance(s) to "
            f"{remote.destination}; results by {_utc(deadline)}")

    def _collect(self, row: dict[str, Any], folder: WorkFolder) -> int:
        """The claimed results, copied from the spool into the step's output folder."""
        count = 0
        for study_uid, sop_uid in row["results"]:
            found = [i for i in self.state.instances(study_uid) if i.sop_uid == sop_uid]
            if not found:
                continue  # replaced or purged since: nothing to take
            copy_result(self.ctx.spool.open, found[0], folder.output / f"{sop_uid}.dcm", row)
            count += 1
        return count


def copy_result(open_instance: Callable[[Instance], Any], inst: Instance, out: Path,
                row: dict[str, Any]) -> None:
    """A claimed result from the spool to ``out``; one in a study of its own (``match:
    referenced``) is put into the study that was sent (the origin's, or its pseudonym that
    re-identification maps back)."""
    with open_instance(inst) as src, open(out, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    if inst.study_uid != row["sent_study"]:
        ds = dcmread(out)
        ds.StudyInstanceUID = row["sent_study"]
        dcmwrite(out, ds, enforce_file_format=True)


def _utc(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))


def _instance(path: Path) -> tuple[Path, Instance] | None:
    """An input file as the destinations see an instance (its own UIDs, as transformed)."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=[
            "SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID",
            "PatientID", "Modality"])
    except Exception:  # not DICOM: not sent (the step's input may hold other files)
        return None
    meta = ds.file_meta
    tags = {k: str(ds.get(k, "") or "") for k in ("SOPInstanceUID", "SOPClassUID",
                                                   "StudyInstanceUID", "SeriesInstanceUID",
                                                   "PatientID", "Modality")}
    return path, Instance(
        sop_uid=tags["SOPInstanceUID"], study_uid=tags["StudyInstanceUID"],
        series_uid=tags["SeriesInstanceUID"],
        sop_class=str(meta.get("MediaStorageSOPClassUID", "") or tags["SOPClassUID"]),
        transfer_syntax=str(meta.get("TransferSyntaxUID", "")), key=str(path),
        size=path.stat().st_size, calling_ae="", called_ae="", tags=tags)


class RemoteClaims:
    """Results of remote steps, recognised when their study completes (module docstring)."""

    def __init__(self, state: State, open_instance: Callable[[Instance], Any],
                 late: Callable[[dict[str, Any], str, Sequence[Instance]], None] | None = None
                 ) -> None:
        self.state = state
        self.open = open_instance
        self.late = late  # LateResults: what comes after the step finished

    def claim(self, study_uid: str, seen: Any, instances: Sequence[Instance]) -> str:
        """TAKEN: the new generation's instances are all results (the study is routed without
        a job); LATER: an instance arrived meanwhile (it completes later); PART: some were
        taken (now tagged as results), the routing table routes the study; '': none."""
        generation = getattr(seen, "generation", 0)
        new = [i for i in instances if i.generation == generation and not is_result(i)]
        if not new:
            return ""
        awaits = self.state.remote_awaits_open()
        if not awaits:
            return ""
        for row in awaits:
            taken = [i for i in new if self._matches(row, study_uid, i)]
            if not taken:
                continue
            senders = ", ".join(sorted({i.calling_ae or "?" for i in taken}))
            why = (f"processing step {row['step']!r} ({row['route']}): {len(taken)} result "
                   f"instance(s) from {escape(senders)} in study {study_uid} taken for study "
                   f"{row['origin_uid']} (sent to {row['destination']})" +
                   {"waiting": "", "sending": "; while the study was still being sent",
                    "done": "; after the step finished: late results"}.get(
                       row["state"], "; after its timeout: they count for its next attempt"))
            tags = {RESULT_TAG: row["route"], PICKED_TAG: "", REMOTE_TAG: row["origin_uid"]}
            whole = len(taken) == len(new)
            if not self.state.remote_claim(row, study_uid, seen, [i.sop_uid for i in taken],
                                           tags, why, mark_routed=whole):
                return LATER
            log.info("study %s: %s", study_uid, why)
            if row["state"] == "done" and self.late is not None:
                self.late(row, study_uid, taken)
            return TAKEN if whole else PART
        return ""

    def _matches(self, row: dict[str, Any], study_uid: str, inst: Instance) -> bool:
        if inst.sop_uid in row["sent_sops"]:
            return False  # the node sent back what it got: not a result
        senders = row["results_from"]
        if senders and inst.calling_ae not in senders:
            return False
        if not senders and inst.calling_ae == row["origin_ae"] and \
                study_uid == row["origin_uid"]:
            return False  # the study's own sender, sending more of it
        if study_uid == row["sent_study"]:
            return True
        if row["match"] != "referenced":
            return False
        try:
            with self.open(inst) as f:
                ds = dcmread(f, stop_before_pixels=True)
        except Exception:
            return False
        wanted = {row["sent_study"], *row["sent_series"]}
        return bool(wanted & set(_uids(ds)))


class LateResults:
    """Results that come after their step finished, before its deadline (a node answering in
    several associations, seconds apart; each is a generation of its own): they were claimed
    like the first ones (so the routing table never sees them: no leak of a pseudonymized
    result, no loop into the step). When the remote step is the route's last, they are what
    its output would have been: re-identified and ingested as results of the route, routed by
    ``results:``. After a later step they stay in the spool, noted in the origin's history."""

    def __init__(self, cfg: Any, state: State, spool: Any) -> None:
        self.cfg = cfg
        self.state = state
        self.spool = spool

    def __call__(self, row: dict[str, Any], study_uid: str,
                 taken: Sequence[Instance]) -> None:
        origin, name = row["origin_uid"], row["route"]
        route = next((r for r in self.cfg.routes if r.name == name), None)
        steps = route.process if route is not None else ()
        if not steps or step_name(steps[-1], len(steps) - 1) != row["step"]:
            self.state.note(origin, f"processing step {row['step']!r} ({name}): "
                            f"{len(taken)} late result instance(s) not taken further (the "
                            f"steps after it already ran); kept in study {study_uid}")
            return
        key = route_key(route)
        ingested = 0
        with tempfile.TemporaryDirectory(prefix="late-", dir=self.spool.root) as tmp:
            for inst in taken:
                path = Path(tmp) / f"{inst.sop_uid}.dcm"
                try:
                    copy_result(self.spool.open, inst, path, row)
                    if key is not None:
                        reidentify_file(path, key, self.state, name)
                    ingest_result(self.spool, path, name, "", self.cfg.ae_title,
                                  self.cfg.ae_title)
                    ingested += 1
                except (OSError, ValueError) as exc:
                    self.state.note(origin, f"processing ({name}): late result "
                                    f"{inst.sop_uid} not taken: {exc}")
        self.state.note(origin, f"processing ({name}): {ingested} late result instance(s) "
                        f"of step {row['step']!r} ingested")


def _uids(ds: Dataset, depth: int = 0) -> list[str]:
    """Every UID value in ``ds``, nested sequences included (a few levels)."""
    out: list[str] = []
    for elem in ds:
        if elem.VR == "SQ" and depth < 6:
            for item in elem.value or []:
                out += _uids(item, depth + 1)
        elif elem.VR == "UI" and elem.value and depth:
            out.append(str(elem.value))
    return out
