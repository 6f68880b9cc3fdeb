"""DICOM destination: C-STORE to a peer AE (Orthanc, a PACS), one association per session."""

from __future__ import annotations

from collections.abc import Sequence
from typing import BinaryIO

from pydicom.uid import UID

from ..config import DestinationConfig
from ..state import Instance
from .base import Destination, Session
from .store import Peer, StoreAssociation, open_association


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

    def open(self, instances: Sequence[Instance]) -> Session:
        pairs = {(i.sop_class, i.transfer_syntax) for i in instances}
        return _DicomSession(open_association(self.peer, pairs, self.sender))


class _DicomSession(Session):
    def __init__(self, assoc: StoreAssociation) -> None:
        self.assoc = assoc

    def send(self, inst: Instance, data: BinaryIO) -> bool:
        self.assoc.store(data, inst.sop_class, inst.transfer_syntax, inst.sop_uid)
        return True  # a success (or warning) status: the peer has it

    def close(self) -> None:
        self.assoc.release()
