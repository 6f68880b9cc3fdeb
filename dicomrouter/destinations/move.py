"""The ``move`` destination (third-party move): ask a peer that holds the study (the source
PACS) to C-MOVE it to another AE title.

It sends no bytes itself: ``send`` only collects the instances, and ``commit`` issues one
C-MOVE for the whole study (or, when only part of it is undelivered after a late arrival,
IMAGE-level moves of exactly those instances, series by series). The final response decides:
failed sub-operations (with the peer's Failed SOP Instance UID List) are refused with the
counts, a failure status or fewer completed sub-operations than instances fails the job, and
it is retried like any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import BinaryIO

from pydicom.dataset import Dataset

from ..config.peers import MoveModel
from ..qrscu import PeerError, Remote, RetrieveResult, move
from ..state import Instance
from ..tlsctx import client_context
from .base import Context, DeliveryError, Destination, PermanentFailure, Session
from .dicom import c_echo
from .registry import implements


@implements(MoveModel)
class MoveDestination(Destination):
    def __init__(self, cfg: MoveModel, ctx: Context) -> None:
        super().__init__(cfg, ctx)
        src = cfg.source
        tls = client_context(cfg.tls) if cfg.tls else None
        self.remote = Remote(src.ae_title, src.host, src.port,
                             cfg.calling_ae_title or ctx.router_ae, cfg.timeout, tls)
        self.target = cfg.move_destination
        self.model = cfg.query_model

    probe_kind = "C-ECHO"

    def probe(self) -> None:
        c_echo(self.remote)

    def describe(self) -> str:
        return f"move: asks {self.remote} to C-MOVE studies to {self.target}"

    def open(self, instances: Sequence[Instance], routes: Sequence[str] = ()) -> Session:
        return _MoveSession(self)


class _MoveSession(Session):
    """Collects the instances, then one C-MOVE per identifier (the study, or each series of a
    late arrival): each one's outcome is reported durable as soon as it is known."""

    transmits_on_send = False

    def __init__(self, dest: MoveDestination) -> None:
        self.dest = dest
        self.instances: list[Instance] = []
        self.refused = {}

    def send(self, inst: Instance, data: BinaryIO) -> bool:
        self.instances.append(inst)
        return False  # delivered by the study's C-MOVE in commit

    def _identifiers(self, whole: bool) -> list[Dataset]:
        study = self.instances[0].study_uid
        if whole:
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            ds.StudyInstanceUID = study
            if self.dest.model == "patient":
                ds.PatientID = self.instances[0].tags.get("PatientID", "")
            return [ds]
        by_series: dict[str, list[str]] = {}
        for inst in self.instances:
            by_series.setdefault(inst.series_uid, []).append(inst.sop_uid)
        out = []
        for series, sops in by_series.items():
            ds = Dataset()
            ds.QueryRetrieveLevel = "IMAGE"
            if self.dest.model == "patient":
                ds.PatientID = self.instances[0].tags.get("PatientID", "")
            ds.StudyInstanceUID = study
            ds.SeriesInstanceUID = series
            ds.SOPInstanceUID = sops
            out.append(ds)
        return out

    def commit(self) -> Sequence[str]:
        if not self.instances:
            return ()
        dest = self.dest
        generations = {i.generation for i in self.instances}
        whole = generations == {1} or len(generations) > 1  # first delivery: the whole study
        delivered: list[str] = []
        for identifier in self._identifiers(whole):
            wanted = [i.sop_uid for i in self.instances
                      if identifier.QueryRetrieveLevel == "STUDY"
                      or i.series_uid == identifier.SeriesInstanceUID]
            self.transmitting(wanted)  # the source sends them now
            try:
                result = move(dest.remote, identifier, dest.target, dest.model)
            except PeerError as exc:
                if str(exc).startswith(("cannot reach", "cannot associate")):
                    self.not_transmitted(wanted)  # no association: the source sent nothing
                if exc.permanent:
                    raise PermanentFailure(str(exc), "make the source PACS accept the router's "
                                           "calling AE title, or fix the destination's "
                                           "source settings") from None
                raise DeliveryError(str(exc)) from None
            done = self._outcome(result, wanted)
            self.durable(done)  # recorded now: the next identifier failing does not forget it
            delivered += done
        return delivered

    def _outcome(self, result: RetrieveResult, wanted: list[str]) -> list[str]:
        """The instances this C-MOVE delivered; refusal reasons for the others."""
        dest = self.dest
        what = f"C-MOVE by {dest.remote} to {dest.target}: {result.describe()}"
        if result.status == 0xA801:
            raise PermanentFailure(what, f"add {dest.target} to the source's known "
                                   "destinations (its AE title, host and port)")
        if result.status not in (0x0000, 0xB000):
            raise DeliveryError(what)
        failed = set(result.failed_uids)
        if result.failed and not failed:
            raise DeliveryError(what + " (the peer did not say which instances failed)")
        ok = [uid for uid in wanted if uid not in failed]
        if result.completed + result.warning < len(ok):
            raise DeliveryError(f"{what}; the router holds {len(wanted)} instance(s) of it: "
                                "the source does not have them all (yet?)")
        for uid in wanted:
            if uid in failed:
                self.refused[uid] = f"failed sub-operation of the {what}"
        return ok
