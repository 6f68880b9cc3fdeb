"""DICOM destination: C-STORE to a peer AE (Orthanc, a PACS), one association per session."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import BinaryIO

from pydicom.uid import UID

from ..config import DestinationConfig
from ..state import Instance
from .base import Destination, Session
from .fastsend import FastStoreAssociation
from .store import Peer, StoreAssociation


def open_association(peer: Peer, pairs: Iterable[tuple[str, str]],
                     implementation: str = "fast") -> StoreAssociation | FastStoreAssociation:
    """An established C-STORE association: our lean sender, or pynetdicom's."""
    if implementation == "pynetdicom":
        return StoreAssociation(peer, pairs)
    return FastStoreAssociation(peer, pairs)


class DicomDestination(Destination):
    def __init__(self, cfg: DestinationConfig, default_calling_ae: str = "DICOMROUTER") -> None:
        super().__init__(cfg)
        o = cfg.options
        self.peer = Peer(o["ae_title"], o["host"], o["port"],
                         o["calling_ae_title"] or default_calling_ae, o["max_pdu"], o["timeout"],
                         o["transfer_syntaxes"])
        self.sender = o["sender"]
        self.associations = o["associations"]

    def describe(self) -> str:
        extra = f", {self.associations} associations per study" if self.associations > 1 else ""
        if self.peer.transfer_syntaxes:
            extra += ", proposes " + ", ".join(UID(u).name for u in self.peer.transfer_syntaxes)
        return f"dicom {self.peer}{extra}"

    def open(self, instances: Sequence[Instance], routes: Sequence[str] = ()) -> Session:
        pairs = {(i.sop_class, i.transfer_syntax) for i in instances}
        return _DicomSession(open_association(self.peer, pairs, self.sender))


class _DicomSession(Session):
    def __init__(self, assoc: StoreAssociation | FastStoreAssociation) -> None:
        self.assoc = assoc

    def send(self, inst: Instance, data: BinaryIO) -> bool:
        self.assoc.store(data, inst.sop_class, inst.transfer_syntax, inst.sop_uid)
        return True  # a success (or warning) status: the peer has it

    def close(self) -> None:
        self.assoc.release()
