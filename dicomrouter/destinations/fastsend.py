"""A lean C-STORE SCU: blocking socket, datasets streamed from the spool files as they are.

The mirror of ``scp/fast.py``: pynetdicom's requestor polls with 1 ms sleeps and builds objects
for every PDU, which capped ``dicomrouter send`` near a third of DCMTK's storescu. Here each
C-STORE is one command PDU, the dataset bytes read from the file (after its File Meta group) in
PDVs no larger than the peer accepts, and one blocking read of the response. The association
request and acceptance use pynetdicom's PDU classes.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    MaximumLengthNotification,
)

from ..dimse import (
    APPLICATION_CONTEXT,
    C_STORE_RQ,
    MAX_COMMAND,
    PDU_HEADER,
    PDV_HEADER,
    ProtocolError,
    encode_command,
    parse_command,
    pdata,
    read_exact,
    text,
    ui,
    us,
    user_information,
)
from ..netutil import describe_non_dicom, rejection_is_permanent
from ..tlsctx import describe_error
from .base import DeliveryError, InstanceRejected, PermanentFailure
from .store import (
    REJECTED_ACTION,
    Peer,
    Source,
    converted_file,
    no_syntax,
    open_source,
    plan_contexts,
    source_name,
    source_path,
    store_outcome,
    target_syntax,
)

OUR_MAX_PDU = 1 << 20  # what we accept from the peer (its responses are tiny)
DEFAULT_FRAGMENT = 1 << 20  # PDV size when the peer sets no limit


def seek_dataset(f: BinaryIO, path: str) -> int:
    """Position an open Part 10 file at its dataset (after preamble, DICM and File Meta);
    returns the offset."""
    head = f.read(144)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
        raise InstanceRejected(f"{path} is not a DICOM Part 10 file with a group length")
    return f.seek(144 + struct.unpack_from("<I", head, 140)[0])


class FastStoreAssociation:
    """Same interface as ``store.StoreAssociation`` (store, release)."""

    def __init__(self, peer: Peer, pairs: Iterable[tuple[str, str]]) -> None:
        self.peer = peer
        contexts = plan_contexts(pairs, peer.transfer_syntaxes)
        for i, cx in enumerate(contexts):
            cx.context_id = 2 * i + 1
        try:
            self.sock = socket.create_connection((peer.host, peer.port), timeout=peer.timeout)
        except OSError as exc:
            raise DeliveryError(f"{peer}: no connection ({exc.strerror or exc}): is the peer up "
                                "and listening?") from exc
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if peer.tls is not None:
            raw = self.sock
            try:
                self.sock = peer.tls.wrap_socket(raw, server_hostname=peer.host)
            except (ssl.SSLError, OSError) as exc:
                raw.close()
                raise DeliveryError(f"{peer}: TLS handshake failed: "
                                    f"{describe_error(exc)}") from None
        self.rf = self.sock.makefile("rb", buffering=64 * 1024)
        self._message_id = 0
        self.established = False
        #: (AE title, Message ID) of the C-MOVE these C-STOREs are sub-operations of (PS3.7
        #: 9.3.1.1: Move Originator AE Title and Message ID); None for a delivery
        self.move_originator: tuple[str, int] | None = None
        try:
            self._associate(contexts)
        except BaseException:
            self.close()
            raise

    def _associate(self, contexts: list) -> None:  # type: ignore[type-arg]
        rq = A_ASSOCIATE()
        rq.application_context_name = APPLICATION_CONTEXT
        rq.calling_ae_title = self.peer.calling_ae_title
        rq.called_ae_title = self.peer.ae_title
        rq.presentation_context_definition_list = contexts
        rq.user_information = user_information(OUR_MAX_PDU)
        pdu = A_ASSOCIATE_RQ()
        pdu.from_primitive(rq)
        try:
            self.sock.sendall(pdu.encode())
            head = read_exact(self.rf, 6)
            pdu_type, length = PDU_HEADER.unpack(head)
            if pdu_type not in (0x02, 0x03, 0x07):  # not an answer: an HTTP port, say
                raise DeliveryError(f"{self.peer}: association aborted by the peer (PDU type "
                                    f"0x{pdu_type:02X}){describe_non_dicom(head)}")
            body = read_exact(self.rf, length)
        except (OSError, ConnectionError) as exc:
            raise DeliveryError(f"{self.peer}: association aborted by the peer ({exc})") from exc
        raw = PDU_HEADER.pack(pdu_type, length) + body
        if pdu_type == 0x03:
            rj = A_ASSOCIATE_RJ()
            rj.decode(raw)
            why = (f"{self.peer}: association rejected ({rj.result_str}, {rj.source_str}: "
                   f"{rj.reason_str})")
            if rejection_is_permanent(rj.result, rj.source, rj.reason_diagnostic):
                raise PermanentFailure(why, REJECTED_ACTION)
            raise DeliveryError(f"{why}: check the called/calling AE titles and the peer's "
                                "allow-list")
        if pdu_type != 0x02:
            raise DeliveryError(f"{self.peer}: association aborted by the peer "
                                f"(PDU type 0x{pdu_type:02X})")
        ac = A_ASSOCIATE_AC()
        ac.decode(raw)
        prim = ac.to_primitive()
        self.peer_max = 0
        for item in prim.user_information:
            if isinstance(item, MaximumLengthNotification):
                self.peer_max = int(item.maximum_length_received or 0)
        proposed = {cx.context_id: str(cx.abstract_syntax) for cx in contexts}
        self.accepted: dict[tuple[str, str], int] = {}
        for cx in prim.presentation_context_definition_results_list:
            if cx.result == 0 and cx.context_id in proposed and cx.transfer_syntax:
                key = (proposed[cx.context_id], str(cx.transfer_syntax[0]))
                self.accepted.setdefault(key, int(cx.context_id))
        self.established = True

    @property
    def fragment(self) -> int:
        return self.peer_max - 6 if self.peer_max else DEFAULT_FRAGMENT

    def store(self, source: Source, sop_class: str, transfer_syntax: str,
              sop_instance: str | None = None) -> int:
        """Send one file; returns its (success or warning) status, else raises."""
        if not self.established:
            raise DeliveryError(f"association with {self.peer} was lost")
        target = target_syntax(sop_class, transfer_syntax, self.accepted,
                               self.peer.transfer_syntaxes)
        if target is None:
            raise no_syntax(self.peer, sop_class, transfer_syntax)
        cx_id = self.accepted[(sop_class, target)]
        payload: bytes | None = None
        if target != transfer_syntax:
            with converted_file(source, transfer_syntax, target, self.peer, part10=False) as path:
                payload = Path(path).read_bytes()
        sop_instance = sop_instance or self._sop_instance(source)
        self._message_id = self._message_id % 0xFFFF + 1
        elements = [
            (0x0002, text(sop_class, b"\x00")),
            (0x0100, struct.pack("<H", C_STORE_RQ)),
            (0x0110, struct.pack("<H", self._message_id)),
            (0x0700, struct.pack("<H", 0)),
            (0x0800, struct.pack("<H", 0x0000)),
            (0x1000, text(sop_instance, b"\x00")),
        ]
        if self.move_originator is not None:
            elements += [(0x1030, text(self.move_originator[0], b" ")),
                         (0x1031, struct.pack("<H", self.move_originator[1]))]
        command = encode_command(elements)
        try:
            self._send(pdata(cx_id, 0x03, command))
            if payload is None:
                self._send_file(cx_id, source)
            else:
                self._send_bytes(cx_id, payload)
            rsp = self._response()
        except (OSError, ConnectionError, ProtocolError) as exc:
            self.established = False
            raise DeliveryError(f"association with {self.peer} lost: {exc}") from exc
        return store_outcome(us(rsp, 0x0900), ui(rsp, 0x0902), source, self.peer)

    @staticmethod
    def _sop_instance(source: Source) -> str:
        from pydicom.filereader import read_file_meta_info

        # only `dicomrouter send` gets here (deliveries know the UID)
        return str(read_file_meta_info(source_path(source)).MediaStorageSOPInstanceUID)

    def _send_file(self, cx_id: int, source: Source) -> None:
        frag = self.fragment
        with open_source(source) as f:
            remaining = os.fstat(f.fileno()).st_size - seek_dataset(f, source_name(source))
            buf = bytearray(min(frag, max(remaining, 1)))
            view = memoryview(buf)
            while True:
                n = f.readinto(view[:min(frag, remaining)]) if remaining else 0
                remaining -= n
                last = remaining <= 0
                self._send(pdata(cx_id, 0x02 if last else 0x00, view[:n]))
                if last:
                    return

    def _send_bytes(self, cx_id: int, data: bytes) -> None:
        frag = self.fragment
        view = memoryview(data)
        for start in range(0, max(len(data), 1), frag):
            chunk = view[start:start + frag]
            last = start + frag >= len(data)
            self._send(pdata(cx_id, 0x02 if last else 0x00, chunk))

    def _response(self) -> dict[int, bytes]:
        command = bytearray()
        while True:
            pdu_type, length = PDU_HEADER.unpack(read_exact(self.rf, 6))
            if pdu_type == 0x07:
                raise ProtocolError("association aborted by the peer")
            if pdu_type != 0x04:
                raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}")
            remaining = length
            while remaining > 0:
                item_length, _cx, control = PDV_HEADER.unpack(read_exact(self.rf, 6))
                fragment = read_exact(self.rf, item_length - 2)
                remaining -= 4 + item_length
                if not control & 0x01:
                    continue  # a response with a dataset: not for C-STORE, ignored
                command += fragment
                if len(command) > MAX_COMMAND:
                    raise ProtocolError("response command set too large")
                if control & 0x02:
                    return parse_command(bytes(command))

    def _send(self, buffers: list) -> None:  # type: ignore[type-arg]
        """One PDU from its buffers: gathered by sendmsg, or joined for TLS (no sendmsg);
        paced by the destination's ``max_rate`` bucket, PDU by PDU."""
        if self.peer.limiter is not None:
            self.peer.limiter.take(sum(len(b) for b in buffers))
        if self.peer.tls is not None:
            self.sock.sendall(b"".join(buffers))
        else:
            self.sock.sendmsg(buffers)

    def release(self) -> None:
        if self.established:
            self.established = False
            with contextlib.suppress(OSError, ConnectionError):
                self.sock.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")
                pdu_type, length = PDU_HEADER.unpack(read_exact(self.rf, 6))
                read_exact(self.rf, length)
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.rf.close()
        with contextlib.suppress(OSError):
            self.sock.close()
