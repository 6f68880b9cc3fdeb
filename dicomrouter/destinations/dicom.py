"""DICOM destination: C-STORE to a peer AE (Orthanc, a PACS), one association per session."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import BinaryIO

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import build_context
from pynetdicom.sop_class import Verification

from ..commitment import request
from ..config.peers import DicomModel
from ..qrscu import PeerError, Remote, associate, find
from ..state import Instance, State
from ..tlsctx import client_context
from .base import Context, DeliveryError, Destination, PermanentFailure, Session
from .fastsend import FastStoreAssociation
from .registry import implements
from .store import REJECTED_ACTION, Peer, StoreAssociation


def c_echo(remote: Remote) -> None:
    """A C-ECHO (a circuit breaker's probe): DeliveryError unless the peer answers. An
    association rejected for good (our AE title) or without the Verification service is an
    answer too: the peer is up, and the next delivery will say what is wrong."""
    try:
        with associate(remote, [build_context(Verification)]) as assoc:
            if not any(cx.abstract_syntax == Verification for cx in assoc.accepted_contexts):
                return  # up, but it does not do C-ECHO
            rsp = assoc.send_c_echo()
    except PeerError as exc:
        if exc.permanent:
            raise PermanentFailure(f"C-ECHO: {exc}", REJECTED_ACTION) from None
        raise DeliveryError(f"C-ECHO: {exc}") from None
    status = getattr(rsp, "Status", None)
    if status != 0x0000:
        raise DeliveryError(f"C-ECHO to {remote}: " + (
            "no response" if status is None else f"status 0x{int(status):04X}"))


def open_association(peer: Peer, pairs: Iterable[tuple[str, str]],
                     implementation: str = "fast") -> StoreAssociation | FastStoreAssociation:
    """An established C-STORE association: our lean sender, or pynetdicom's."""
    if implementation == "pynetdicom":
        return StoreAssociation(peer, pairs)
    return FastStoreAssociation(peer, pairs)


@implements(DicomModel)
class DicomDestination(Destination):
    def __init__(self, cfg: DicomModel, ctx: Context) -> None:
        super().__init__(cfg, ctx)
        tls = client_context(cfg.tls) if cfg.tls else None
        self.peer = Peer(cfg.ae_title, cfg.host, cfg.port,
                         cfg.calling_ae_title or ctx.router_ae, cfg.max_pdu, cfg.timeout,
                         cfg.transfer_syntaxes, tls, self.limiter)
        self.sender = cfg.sender
        self.associations = cfg.associations
        self.holds_connection = True
        self.commitment = cfg.storage_commitment
        self.verify = cfg.verify
        self.commitment_timeout = cfg.commitment_timeout
        #: the state database (storage commitment reports land there)
        self.state: State | None = ctx.state

    probe_kind = "C-ECHO"

    def probe(self) -> None:
        peer = self.peer
        c_echo(Remote(peer.ae_title, peer.host, peer.port, peer.calling_ae_title, peer.timeout,
                      peer.tls))

    def describe(self) -> str:
        extra = f", {self.associations} associations per study" if self.associations > 1 else ""
        if self.peer.transfer_syntaxes:
            extra += ", proposes " + ", ".join(UID(u).name for u in self.peer.transfer_syntaxes)
        if self.commitment:
            extra += f", storage commitment (waits up to {self.commitment_timeout:.0f} s)"
        if self.verify == "c-find":
            extra += ", verified by C-FIND"
        return f"dicom {self.peer}{extra}"

    def open(self, instances: Sequence[Instance], routes: Sequence[str] = ()) -> Session:
        pairs = {(i.sop_class, i.transfer_syntax) for i in instances}
        assoc = open_association(self.peer, pairs, self.sender)
        if self.commitment:
            return _CommittedSession(self, assoc)
        if self.verify == "c-find":
            return _VerifiedSession(self, assoc)
        return _DicomSession(assoc)


class _DicomSession(Session):
    def __init__(self, assoc: StoreAssociation | FastStoreAssociation) -> None:
        self.assoc = assoc

    def send(self, inst: Instance, data: BinaryIO) -> bool:
        self.assoc.store(data, inst.sop_class, inst.transfer_syntax, inst.sop_uid)
        return True  # a success (or warning) status: the peer has it

    def close(self) -> None:
        self.assoc.release()


class _CommittedSession(_DicomSession):
    """C-STORE, then storage commitment: delivered means committed by the peer's report."""

    def __init__(self, dest: DicomDestination,
                 assoc: StoreAssociation | FastStoreAssociation) -> None:
        super().__init__(assoc)
        self.dest = dest
        self.stored: list[tuple[str, str]] = []
        self.refused = {}

    def send(self, inst: Instance, data: BinaryIO) -> bool:
        super().send(inst, data)
        self.stored.append((inst.sop_class, inst.sop_uid))
        return False  # stored, not yet committed

    def commit(self) -> Sequence[str]:
        if not self.stored:
            return ()
        self.assoc.release()  # the N-ACTION goes on its own (pynetdicom) association
        dest, peer = self.dest, self.dest.peer
        if dest.state is None:
            raise DeliveryError("storage commitment needs the router's state database")
        remote = Remote(peer.ae_title, peer.host, peer.port, peer.calling_ae_title, peer.timeout,
                        peer.tls)
        try:
            report = request(remote, self.stored, dest.state, dest.commitment_timeout)
        except PeerError as exc:
            raise DeliveryError(f"storage commitment: {exc}") from None
        for uid, reason in report.failed.items():
            self.refused[uid] = (f"{peer} did not commit it (storage commitment failure reason "
                                 f"0x{reason:04X})")
        return report.committed


class _VerifiedSession(_DicomSession):
    """C-STORE, then a C-FIND of the study at IMAGE level: delivered means listed by the peer
    (``verify: c-find``); an instance stored with success but not listed is refused."""

    def __init__(self, dest: DicomDestination,
                 assoc: StoreAssociation | FastStoreAssociation) -> None:
        super().__init__(assoc)
        self.dest = dest
        self.stored: dict[str, list[str]] = {}  # study (as sent) → SOP Instance UIDs stored
        self.refused = {}

    def send(self, inst: Instance, data: BinaryIO) -> bool:
        super().send(inst, data)
        self.stored.setdefault(inst.study_uid, []).append(inst.sop_uid)
        return False  # stored, not yet seen in the peer's C-FIND

    def commit(self) -> Sequence[str]:
        if not self.stored:
            return ()
        self.assoc.release()  # the C-FIND goes on its own association
        peer = self.dest.peer
        remote = Remote(peer.ae_title, peer.host, peer.port, peer.calling_ae_title, peer.timeout,
                        peer.tls)
        listed: set[str] = set()
        for study, uids in self.stored.items():
            query = Dataset()
            query.QueryRetrieveLevel = "IMAGE"
            query.StudyInstanceUID = study
            query.SeriesInstanceUID = ""
            query.SOPInstanceUID = ""
            try:
                answers = find(remote, query)
            except PeerError as exc:
                raise DeliveryError(f"verify (C-FIND): {exc}") from None
            found = {str(a.get("SOPInstanceUID", "")) for a in answers}
            for uid in uids:
                if uid in found:
                    listed.add(uid)
                else:
                    self.refused[uid] = (f"accepted but not stored: {peer} answered the C-STORE "
                                         "with success, yet its C-FIND does not list it")
        return sorted(listed)
