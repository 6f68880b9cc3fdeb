"""C-STORE SCU: one association for a batch of files, contexts from what the files contain.

Used by the ``dicom`` destination and by ``dicomrouter send``. Files are streamed from disk as
they are (no decoding); only when the peer refused a file's transfer syntax is the file decoded
and sent as Explicit/Implicit VR Little Endian, if pydicom can decompress it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from ..netutil import association_failure, enable_tcp_nodelay, stream_c_store_from_files
from .base import DeliveryError, InstanceRejected

log = logging.getLogger("dicomrouter.scu")

MAX_CONTEXTS = 128
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
WARNING_STATUSES = (0x0001, 0xB000, 0xB006, 0xB007)


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int
    calling_ae_title: str = "DICOMROUTER"
    max_pdu: int = 0
    timeout: float = 60.0

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def status_text(code: int) -> str:
    info = STORAGE_SERVICE_CLASS_STATUS.get(code)
    if info is None:
        if 0xA700 <= code <= 0xA7FF:
            info = ("Failure", "Refused: Out of Resources")
        elif 0xA900 <= code <= 0xA9FF:
            info = ("Failure", "Data Set Does Not Match SOP Class")
        elif 0xC000 <= code <= 0xCFFF:
            info = ("Failure", "Cannot Understand")
        else:
            info = ("Failure", "unknown status")
    return f"0x{code:04X} ({info[0]}: {info[1]})"


def _context_specs(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """One context per (SOP class, transfer syntax) present, plus an uncompressed fallback context
    per SOP class, so a refused syntax can still be sent decoded."""
    by_class: dict[str, list[str]] = {}
    for sop_class, ts in pairs:
        lst = by_class.setdefault(sop_class, [])
        if ts not in lst:
            lst.append(ts)
    specs: list[tuple[str, list[str]]] = []
    for sop_class, syntaxes in by_class.items():
        specs.extend((sop_class, [ts]) for ts in syntaxes)
        if not all(u in syntaxes for u in UNCOMPRESSED):
            specs.append((sop_class, [str(u) for u in UNCOMPRESSED]))
    return specs


def plan_contexts(pairs: Iterable[tuple[str, str]]) -> list[PresentationContext]:
    """The presentation contexts to propose for these (SOP class, syntax) pairs (at most 128)."""
    specs = _context_specs(pairs)
    if len(specs) > MAX_CONTEXTS:
        raise DeliveryError(f"{len(specs)} presentation contexts needed; an association "
                            f"carries at most {MAX_CONTEXTS}")
    return [build_context(sop_class, syntaxes) for sop_class, syntaxes in specs]


class StoreAssociation:
    """An established association to a Storage SCP; ``store`` sends one file."""

    def __init__(self, peer: Peer, pairs: Iterable[tuple[str, str]]) -> None:
        enable_tcp_nodelay()
        stream_c_store_from_files()
        self.peer = peer
        ae = AE(ae_title=peer.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = peer.timeout
        ae.maximum_pdu_size = peer.max_pdu
        contexts = plan_contexts(pairs)
        try:
            self.assoc: Association = ae.associate(peer.host, peer.port, contexts=contexts,
                                                   ae_title=peer.ae_title,
                                                   max_pdu=peer.max_pdu)
        except (OSError, ValueError, RuntimeError) as exc:
            raise DeliveryError(f"cannot associate with {peer}: {exc}") from exc
        if not self.assoc.is_established:
            raise DeliveryError(f"{peer}: {association_failure(self.assoc, peer.host, peer.port)}")
        self._accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                          for cx in self.assoc.accepted_contexts}

    def store(self, path: Path, sop_class: str, transfer_syntax: str,
              sop_instance: str | None = None) -> int:
        """Send one file; returns its (success or warning) status, else raises."""
        if not self.assoc.is_established:
            raise DeliveryError(f"association with {self.peer} was lost")
        if (sop_class, transfer_syntax) in self._accepted:
            rsp = self.assoc.send_c_store(path)
        else:
            rsp = self.assoc.send_c_store(self._decoded(path, sop_class, transfer_syntax))
        if not rsp or "Status" not in rsp:
            raise DeliveryError(f"no C-STORE response from {self.peer} (timeout or connection "
                                "lost)")
        status = int(rsp.Status)
        if status == 0x0000:
            return status
        if status in WARNING_STATUSES:
            log.warning("%s: %s answered %s", path.name, self.peer, status_text(status))
            return status
        comment = f" - {rsp.ErrorComment}" if "ErrorComment" in rsp else ""
        raise InstanceRejected(f"{self.peer} answered {status_text(status)}{comment}")

    def _decoded(self, path: Path, sop_class: str, ts: str):  # type: ignore[no-untyped-def]
        """The file as an uncompressed dataset, for a peer that refused its own syntax."""
        if not any((sop_class, str(u)) in self._accepted for u in UNCOMPRESSED):
            raise InstanceRejected(f"{self.peer} accepted no transfer syntax for SOP class "
                                   f"{UID(sop_class).name}")
        ds = decoded_dataset(path, ts, self.peer)
        log.info("%s: %s refused %s, sending it decoded", path.name, self.peer, UID(ts).name)
        return ds

    def release(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()


def decoded_dataset(path: Path, ts: str, peer: Peer) -> Dataset:
    """The file's dataset, decompressed if it is compressed: for a peer that refused its syntax."""
    ds = dcmread(path)
    if UID(ts).is_compressed:
        try:
            ds.decompress(generate_instance_uid=False)  # a router never changes UIDs
        except Exception as exc:
            raise InstanceRejected(f"{peer} refused {UID(ts).name} and it cannot be "
                                   f"decompressed here: {exc}") from exc
    return ds


def batches(items: Sequence[tuple[str, str]]) -> list[list[int]]:
    """Split items (SOP class, syntax) into index groups that each fit one association."""
    groups: list[list[int]] = []
    current: list[int] = []
    pairs: set[tuple[str, str]] = set()
    for i, pair in enumerate(items):
        if pair not in pairs and current and len(_context_specs(pairs | {pair})) > MAX_CONTEXTS:
            groups.append(current)
            current, pairs = [], set()
        current.append(i)
        pairs.add(pair)
    if current:
        groups.append(current)
    return groups


def open_association(peer: Peer, pairs: Iterable[tuple[str, str]],
                     implementation: str = "fast") -> StoreAssociation:
    """An established C-STORE association: our lean sender, or pynetdicom's."""
    if implementation == "pynetdicom":
        return StoreAssociation(peer, pairs)
    from .fastsend import FastStoreAssociation

    return FastStoreAssociation(peer, pairs)  # type: ignore[return-value]
