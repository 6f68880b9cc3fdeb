"""C-STORE SCU: one association for a batch of files, contexts from what the files contain.

Used by the ``dicom`` destination and by ``dicomrouter send``. Files are streamed from disk as
they are (no decoding); only when the peer refused a file's transfer syntax (or the destination
prefers another one, ``transfer_syntaxes``) is the file converted (transcode.py).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Container, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from ..conversion import POOL
from ..netutil import (
    REJECTION_HANDLERS,
    adjust_associations,
    association_failure,
    rejected_permanently,
    stream_c_store_from_files,
)
from ..transcode import ConversionError
from .base import DeliveryError, InstanceRejected, PermanentFailure

log = logging.getLogger("dicomrouter.scu")  # the name operators grep for: kept

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
    #: syntaxes to propose, in order of preference (empty: each file's own, plus uncompressed)
    transfer_syntaxes: tuple[str, ...] = ()
    tls: Any = None  # an ssl.SSLContext (tlsctx.client_context) for DICOM TLS
    #: the destination's ``max_rate`` bucket (ratelimit.TokenBucket), shared by its
    #: associations; None: no cap
    limiter: Any = field(default=None, compare=False)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}" + (" (TLS)" if self.tls else "")


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


# What the operator can do about a permanent rejection of the association.
REJECTED_ACTION = ("make the peer accept the router's calling AE title (its allow-list) or fix "
                   "the destination's ae_title / calling_ae_title")


def status_is_permanent(status: int) -> bool:
    """C-STORE failures the same dataset gets again: SOP class not supported (0x0122), not
    authorised (0x0124), dataset does not match the SOP class (0xA9xx), cannot understand
    (0xCxxx). Out of resources (0xA7xx) and processing failures may pass later."""
    return status in (0x0122, 0x0124) or status >> 8 == 0xA9 or status >> 12 == 0xC


def store_outcome(status: int, comment: str, source: Source, peer: Peer) -> int:
    """A C-STORE-RSP status: success or warning is returned (a warning logged), a failure
    refuses the instance with the status and the peer's comment."""
    if status == 0x0000:
        return status
    if status in WARNING_STATUSES:
        log.warning("%s: %s answered %s", source_name(source), peer, status_text(status))
        return status
    raise InstanceRejected(f"{peer} answered {status_text(status)}"
                           + (f" - {comment}" if comment else ""),
                           permanent=status_is_permanent(status))


def _context_specs(pairs: Iterable[tuple[str, str]],
                   preferred: Sequence[str] = ()) -> list[tuple[str, list[str]]]:
    """The contexts to propose: with ``preferred`` syntaxes, one context per SOP class and
    preferred syntax (so the peer's answer says which of them it takes); else one context per
    (SOP class, transfer syntax) present, plus an uncompressed fallback context per SOP class, so
    a refused syntax can still be sent converted."""
    by_class: dict[str, list[str]] = {}
    for sop_class, ts in pairs:
        lst = by_class.setdefault(sop_class, [])
        if ts not in lst:
            lst.append(ts)
    specs: list[tuple[str, list[str]]] = []
    for sop_class, syntaxes in by_class.items():
        if preferred:
            specs.extend((sop_class, [ts]) for ts in preferred)
            continue
        specs.extend((sop_class, [ts]) for ts in syntaxes)
        if not all(u in syntaxes for u in UNCOMPRESSED):
            specs.append((sop_class, [str(u) for u in UNCOMPRESSED]))
    return specs


def plan_contexts(pairs: Iterable[tuple[str, str]],
                  preferred: Sequence[str] = ()) -> list[PresentationContext]:
    """The presentation contexts to propose for these (SOP class, syntax) pairs (at most 128)."""
    specs = _context_specs(pairs, preferred)
    if len(specs) > MAX_CONTEXTS:
        raise DeliveryError(f"{len(specs)} presentation contexts needed; an association "
                            f"carries at most {MAX_CONTEXTS}")
    return [build_context(sop_class, syntaxes) for sop_class, syntaxes in specs]


def target_syntax(sop_class: str, ts: str, accepted: Container[tuple[str, str]],
                  preferred: Sequence[str] = ()) -> str | None:
    """The syntax to send a (SOP class, stored syntax) instance in, given the accepted contexts:
    the first accepted preferred syntax; without preferences the stored syntax, else an accepted
    uncompressed one. None: the peer accepted nothing this instance can be sent in."""
    candidates = preferred or (ts, *(str(u) for u in UNCOMPRESSED))
    return next((c for c in candidates if (sop_class, c) in accepted), None)


Source = Path | str | BinaryIO  # a file name, or an open file (``Spool.open``)


def source_path(source: Source) -> str:
    """The file name behind a source (an open spool reader's ``name`` is its path)."""
    return str(source) if isinstance(source, str | Path) else str(source.name)


def source_name(source: Source) -> str:
    return Path(source_path(source)).name


@contextlib.contextmanager
def open_source(source: Source) -> Iterator[BinaryIO]:
    """The source as an open binary file at its start (closed after only if we opened it)."""
    if isinstance(source, str | Path):
        with open(source, "rb") as f:
            yield f
    else:
        source.seek(0)
        yield source


@contextlib.contextmanager
def converted_file(source: Source, ts: str, target: str, peer: Peer,
                   part10: bool = True) -> Iterator[str]:
    """A temporary file holding the source converted to ``target`` (by a conversion process,
    conversion.py): a Part 10 file, or with ``part10=False`` the dataset's bytes only.
    InstanceRejected with the reason when it cannot be converted."""
    with tempfile.NamedTemporaryFile(suffix=".dcm") as tmp:
        try:
            POOL.to_file(source_path(source), ts, target, tmp.name, part10)
        except ConversionError as exc:
            raise InstanceRejected(f"{peer} takes {UID(target).name}, not {UID(ts).name}, and "
                                   f"the conversion failed: {exc}",
                                   permanent=exc.permanent) from exc
        log.info("%s: sending it to %s converted from %s to %s", source_name(source), peer,
                 UID(ts).name, UID(target).name)
        yield tmp.name


def no_syntax(peer: Peer, sop_class: str, ts: str) -> InstanceRejected:
    return InstanceRejected(f"{peer} accepted no transfer syntax this instance can be sent in "
                            f"(SOP class {UID(sop_class).name}, stored as {UID(ts).name})",
                            permanent=True)


class StoreAssociation:
    """An established association to a Storage SCP; ``store`` sends one file."""

    def __init__(self, peer: Peer, pairs: Iterable[tuple[str, str]]) -> None:
        adjust_associations()
        stream_c_store_from_files()
        self.peer = peer
        ae = AE(ae_title=peer.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = peer.timeout
        ae.maximum_pdu_size = peer.max_pdu
        contexts = plan_contexts(pairs, peer.transfer_syntaxes)
        try:
            self.assoc: Association = ae.associate(
                peer.host, peer.port, contexts=contexts, ae_title=peer.ae_title,
                max_pdu=peer.max_pdu, tls_args=(peer.tls, peer.host) if peer.tls else None,
                evt_handlers=REJECTION_HANDLERS)
        except (OSError, ValueError, RuntimeError) as exc:
            raise DeliveryError(f"cannot associate with {peer}: {exc}") from exc
        if not self.assoc.is_established:
            why = association_failure(self.assoc, peer.host, peer.port, peer.tls)
            if rejected_permanently(self.assoc):
                raise PermanentFailure(f"{peer}: {why}", REJECTED_ACTION)
            raise DeliveryError(f"{peer}: {why}")
        self._accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                          for cx in self.assoc.accepted_contexts}
        if peer.limiter is not None:
            self._pace(peer.limiter)

    def _pace(self, limiter: Any) -> None:
        """``max_rate``: each P-DATA PDU waits for its bytes in the bucket as pynetdicom makes
        it from the file (in ``send_c_store``, this thread), before it is queued for the
        socket. Paced while it streams, not before: pynetdicom's association reactor, which
        aborts after ``network_timeout`` without incoming data, is paused during a C-STORE,
        while a wait before ``send_c_store`` would count as idle (an instance's share of a
        tight cap longer than the peer's ``timeout`` failed every attempt). Nothing is
        raised in here: an exception would leave pynetdicom's reactor paused; a lost
        association shows as no C-STORE response."""
        dul = self.assoc.dul
        send_pdu = dul.send_pdu

        def paced(primitive: Any) -> None:
            if isinstance(primitive, P_DATA) and self.assoc.is_established:
                pdvs = primitive.presentation_data_value_list
                limiter.take(6 + sum(6 + len(value) for _, value in pdvs))  # PDU, PDV headers
            send_pdu(primitive)

        dul.send_pdu = paced  # type: ignore[method-assign]

    def store(self, source: Source, sop_class: str, transfer_syntax: str,
              sop_instance: str | None = None) -> int:
        """Send one file; returns its (success or warning) status, else raises."""
        if not self.assoc.is_established:
            raise DeliveryError(f"association with {self.peer} was lost")
        target = target_syntax(sop_class, transfer_syntax, self._accepted,
                               self.peer.transfer_syntaxes)
        if target is None:
            raise no_syntax(self.peer, sop_class, transfer_syntax)
        try:
            if target == transfer_syntax:
                # pynetdicom's chunked send wants a file name (the spool reader's)
                rsp = self.assoc.send_c_store(source_path(source))
            else:  # the same bytes the fast sender sends, from a temporary Part 10 file
                with converted_file(source, transfer_syntax, target, self.peer) as path:
                    rsp = self.assoc.send_c_store(path)
        except RuntimeError as exc:  # pynetdicom: the association ended meanwhile
            if self.assoc.is_established:
                raise
            raise DeliveryError(f"association with {self.peer} was lost: {exc}") from exc
        if not rsp or "Status" not in rsp:
            raise DeliveryError(f"no C-STORE response from {self.peer} (timeout or connection "
                                "lost)")
        return store_outcome(int(rsp.Status), str(rsp.get("ErrorComment", "")), source,
                             self.peer)

    def release(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()


def batches(items: Sequence[tuple[str, str]],
            preferred: Sequence[str] = ()) -> list[list[int]]:
    """Split items (SOP class, syntax) into index groups that each fit one association."""
    groups: list[list[int]] = []
    current: list[int] = []
    pairs: set[tuple[str, str]] = set()
    for i, pair in enumerate(items):
        if pair not in pairs and current \
                and len(_context_specs(pairs | {pair}, preferred)) > MAX_CONTEXTS:
            groups.append(current)
            current, pairs = [], set()
        current.append(i)
        pairs.add(pair)
    if current:
        groups.append(current)
    return groups
