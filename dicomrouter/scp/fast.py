"""A lean DICOM acceptor for C-STORE and C-ECHO: one blocking thread per association.

Why: pynetdicom's reactor and DUL threads poll with 1 ms sleeps and decode every PDU into objects,
which caps one association near a third of DCMTK's storescp (see docs/performance.md). Here each
association thread blocks on its socket, walks P-DATA PDVs with ``struct``, streams dataset
fragments straight into the spool's receive file, and answers C-STORE-RSP itself. The durability
promise is the same as on the pynetdicom path: ``Spool.accept`` (fsync of the receive slot,
index tags) runs before the response is written; ``Spool.place`` (rename, commit) right after
it, while the sender prepares its next request (a crash in between: start-up adopts the slot).

Association negotiation (A-ASSOCIATE-RQ decoding, presentation context negotiation, the
A-ASSOCIATE-AC/RJ encoding) reuses pynetdicom's PDU classes: it happens once per association.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
from typing import BinaryIO

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
)
from pynetdicom.presentation import negotiate_as_acceptor

from ..config import Config
from ..dicomfile import UnreadableDataset
from ..dimse import (
    APPLICATION_CONTEXT,
    C_ECHO_RQ,
    C_ECHO_RSP,
    C_STORE_RQ,
    C_STORE_RSP,
    CANNOT_UNDERSTAND,
    IMPLEMENTATION_VERSION,
    MAX_COMMAND,
    NO_DATASET,
    OUT_OF_RESOURCES,
    PDU_HEADER,
    PDV_HEADER,
    VERIFICATION,
    ProtocolError,
    encode_response,
    parse_command,
    read_exact,
    text,
    ui,
    us,
    user_information,
)
from ..spool import ReceiveFile, Spool, SpoolFull
from .contexts import supported_contexts

log = logging.getLogger("dicomrouter.scp")

CHUNK = 1 << 20


def _meta_element(elem: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sxxI", 2, elem, vr, len(value)) + value
    return struct.pack("<HH2sH", 2, elem, vr, len(value)) + value


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group of a Part 10 file."""
    body = (_meta_element(0x0001, b"OB", b"\x00\x01")
            + _meta_element(0x0002, b"UI", text(sop_class, b"\x00"))
            + _meta_element(0x0003, b"UI", text(sop_instance, b"\x00"))
            + _meta_element(0x0010, b"UI", text(transfer_syntax, b"\x00"))
            + _meta_element(0x0012, b"UI", text(PYNETDICOM_IMPLEMENTATION_UID, b"\x00"))
            + _meta_element(0x0013, b"SH", text(IMPLEMENTATION_VERSION, b" ")))
    if source_ae:
        body += _meta_element(0x0016, b"AE", text(source_ae, b" "))
    group_length = _meta_element(0x0000, b"UL", struct.pack("<I", len(body)))
    return b"\x00" * 128 + b"DICM" + group_length + body


class FastStorageSCP:
    """The listening socket and its association threads (same interface as StorageSCP)."""

    def __init__(self, cfg: Config, spool: Spool, network_timeout: float = 120.0,
                 max_associations: int = 64) -> None:
        self.cfg = cfg
        self.spool = spool
        self.network_timeout = network_timeout
        self.max_associations = max_associations
        self._contexts = supported_contexts()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._active: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        # With several receiver processes each binds the port; the kernel spreads connections.
        sock = socket.create_server((self.cfg.bind, self.cfg.port), backlog=128,
                                    reuse_port=self.cfg.receivers > 1)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="scp-accept", daemon=True)
        self._thread.start()
        log.info("listening as %s on %s:%d (allowed calling AEs: %s)", self.cfg.ae_title,
                 self.cfg.bind, self.cfg.port,
                 ", ".join(self.cfg.allowed_calling_aes) or "any")

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        with self._lock:
            for conn in list(self._active):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(5)

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, addr = self._sock.accept()
            except OSError:
                if self._stop.is_set():
                    return
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(self.network_timeout)
            with self._lock:
                self._active.add(conn)
                busy = len(self._active) > self.max_associations
            t = threading.Thread(target=self._serve, args=(conn, addr, busy), daemon=True,
                                 name=f"assoc-{addr[0]}:{addr[1]}")
            t.start()

    def _serve(self, conn: socket.socket, addr: tuple[str, int], busy: bool) -> None:
        try:
            _Association(self, conn, f"{addr[0]}:{addr[1]}", busy).run()
        finally:
            with self._lock:
                self._active.discard(conn)
            conn.close()


class _Association:
    """One association, driven by blocking reads on its socket."""

    def __init__(self, server: FastStorageSCP, conn: socket.socket, peer: str,
                 busy: bool) -> None:
        self.server = server
        self.spool = server.spool
        self.conn = conn
        self.peer = peer
        self.busy = busy
        self.rf: BinaryIO = conn.makefile("rb", buffering=256 * 1024)  # type: ignore[assignment]
        self.calling = ""
        self.called = ""
        self.contexts: dict[int, tuple[str, str]] = {}  # id → (abstract syntax, syntax)
        self.stored = 0
        self.failed = 0
        self.studies: set[str] = set()
        self._buf: bytearray | None = None  # made at the first dataset (not for a C-ECHO)
        # the message being received
        self._command = bytearray()
        self._cmd: dict[int, bytes] | None = None
        self._cx = 0
        self._rx: ReceiveFile | None = None

    # ---- PDU level ------------------------------------------------------------------------

    def run(self) -> None:
        how = "closed"
        try:
            pdu_type, length = PDU_HEADER.unpack(read_exact(self.rf, 6))
            if pdu_type != 0x01:
                raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}")
            if not self._negotiate(PDU_HEADER.pack(1, length) + read_exact(self.rf, length)):
                return
            while True:
                pdu_type, length = PDU_HEADER.unpack(read_exact(self.rf, 6))
                if pdu_type == 0x04:
                    self._p_data(length)
                elif pdu_type == 0x05:
                    read_exact(self.rf, length)
                    self.conn.sendall(b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00")
                    how = "released"
                    return
                elif pdu_type == 0x07:
                    how = "aborted by the peer"
                    return
                else:
                    raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}")
        except ProtocolError as exc:
            how = f"aborted: {exc}"
            log.warning("association from %s (%s): %s", self.calling or "?", self.peer, exc)
            with contextlib.suppress(OSError):  # A-ABORT, source: service provider
                self.conn.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x00")
        except (ConnectionError, TimeoutError, OSError) as exc:
            how = f"lost ({exc.__class__.__name__}: {exc})"
        finally:
            self._discard_partial()
            if self.stored or self.failed:
                log.info("association from %s (%s) %s: %d instance(s) stored, %d refused, "
                         "%d study(ies)", self.calling, self.peer, how, self.stored,
                         self.failed, len(self.studies))

    def _negotiate(self, raw: bytes) -> bool:
        """Answer the A-ASSOCIATE-RQ; True if the association is established."""
        rq = A_ASSOCIATE_RQ()
        try:
            rq.decode(raw)
            prim = rq.to_primitive()
        except Exception as exc:
            raise ProtocolError(f"undecodable A-ASSOCIATE-RQ: {exc}") from exc
        self.calling = (prim.calling_ae_title or "").strip()
        self.called = (prim.called_ae_title or "").strip()
        allowed = self.server.cfg.allowed_calling_aes
        reason = None
        if allowed and self.calling not in allowed:
            reason = (0x01, 0x01, 0x03)
            log.warning("rejected association from calling AE %r (%s): not in "
                        "allowed_calling_aes", self.calling, self.peer)
        elif self.busy:
            reason = (0x02, 0x03, 0x02)
            log.warning("rejected association from calling AE %r (%s): too many associations",
                        self.calling, self.peer)
        if reason is not None:
            rj_prim = A_ASSOCIATE()
            rj_prim.result, rj_prim.result_source, rj_prim.diagnostic = reason
            rj = A_ASSOCIATE_RJ()
            rj.from_primitive(rj_prim)
            self.conn.sendall(rj.encode())
            return False
        results, _roles = negotiate_as_acceptor(
            prim.presentation_context_definition_list, self.server._contexts)
        self.contexts = {int(cx.context_id): (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                         for cx in results if cx.result == 0x00}
        ac = A_ASSOCIATE()
        ac.application_context_name = APPLICATION_CONTEXT
        ac.calling_ae_title = prim.calling_ae_title
        ac.called_ae_title = prim.called_ae_title
        ac.result = 0x00
        ac.result_source = 0x01
        ac.presentation_context_definition_results_list = results
        ac.user_information = user_information(self.server.cfg.max_pdu)
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(ac)
        self.conn.sendall(pdu.encode())
        log.debug("association from %s (%s) accepted: %d of %d context(s)", self.calling,
                  self.peer, len(self.contexts), len(results))
        return True

    def _p_data(self, length: int) -> None:
        """Walk the PDVs of one P-DATA-TF; dataset bytes go straight to the receive file."""
        remaining = length
        while remaining > 0:
            if remaining < 6:
                raise ProtocolError("truncated PDV")
            item_length, cx_id, control = PDV_HEADER.unpack(read_exact(self.rf, 6))
            fragment = item_length - 2
            remaining -= 4 + item_length
            if fragment < 0 or remaining < 0:
                raise ProtocolError("PDV length beyond its PDU")
            if cx_id not in self.contexts:
                raise ProtocolError(f"PDV for unknown presentation context {cx_id}")
            if control & 0x01:
                if len(self._command) + fragment > MAX_COMMAND:
                    raise ProtocolError("command set too large")
                self._command += read_exact(self.rf, fragment)
                if control & 0x02:
                    self._on_command(cx_id, bytes(self._command))
                    self._command.clear()
            else:
                self._dataset_fragment(cx_id, fragment)
                if control & 0x02:
                    self._on_dataset_end()

    # ---- DIMSE level ----------------------------------------------------------------------

    def _on_command(self, cx_id: int, raw: bytes) -> None:
        cmd = parse_command(raw)
        field = us(cmd, 0x0100)
        if field == C_ECHO_RQ:
            log.info("C-ECHO from %s (%s)", self.calling, self.peer)
            self.conn.sendall(encode_response(cx_id, C_ECHO_RSP, us(cmd, 0x0110),
                                              ui(cmd, 0x0002) or VERIFICATION, 0x0000))
            return
        if field != C_STORE_RQ:
            raise ProtocolError(f"unsupported DIMSE command 0x{field:04X}")
        if us(cmd, 0x0800) == NO_DATASET:
            self._respond_store(cx_id, cmd, CANNOT_UNDERSTAND, "no dataset")
            return
        self._cmd = cmd
        self._cx = cx_id

    def _dataset_fragment(self, cx_id: int, n: int) -> None:
        if self._cmd is None or cx_id != self._cx:
            raise ProtocolError("dataset fragment without its C-STORE-RQ")
        if self._rx is None:
            self._rx = self.spool.new_receive_file()
            self._rx.write(file_meta(ui(self._cmd, 0x0002), ui(self._cmd, 0x1000),
                                     self.contexts[cx_id][1], self.calling))
        if self._buf is None:
            self._buf = bytearray(CHUNK)
        view = memoryview(self._buf)
        rx = self._rx
        while n > 0:
            got = self.rf.readinto(view[:min(n, CHUNK)])  # type: ignore[attr-defined]
            if not got:
                raise ConnectionError("connection closed by the peer")
            rx.write(view[:got])
            n -= got

    def _on_dataset_end(self) -> None:
        cmd, rx, cx_id = self._cmd, self._rx, self._cx
        self._cmd, self._rx = None, None
        assert cmd is not None
        if rx is None:  # an empty dataset
            self._respond_store(cx_id, cmd, CANNOT_UNDERSTAND, "empty dataset")
            return
        sop = ui(cmd, 0x1000)
        try:
            accepted = self.spool.accept(rx, self.calling, self.called)
        except SpoolFull as exc:
            log.error("C-STORE %s from %s refused with 0xA700 (out of resources): %s", sop,
                      self.calling, exc.strerror or exc)
            self._respond_store(cx_id, cmd, OUT_OF_RESOURCES, f"spool full: {exc.strerror}")
            return
        except UnreadableDataset as exc:
            log.error("C-STORE %s from %s refused with 0xC000 (cannot understand): %s", sop,
                      self.calling, exc)
            self._respond_store(cx_id, cmd, CANNOT_UNDERSTAND, str(exc))
            return
        except Exception as exc:  # never a false success
            log.exception("C-STORE %s from %s failed; answered 0xA700", sop, self.calling)
            self._respond_store(cx_id, cmd, OUT_OF_RESOURCES,
                                f"internal error: {type(exc).__name__}")
            return
        finally:
            rx.close()
        self.studies.add(accepted.tags["StudyInstanceUID"])
        try:
            self._respond_store(cx_id, cmd, 0x0000)
        finally:  # durable already, answered or not: rename and record it (overlaps the
            self.spool.place(accepted)  # sender's next request)

    def _respond_store(self, cx_id: int, cmd: dict[int, bytes], status: int,
                       comment: str = "") -> None:
        if status == 0:
            self.stored += 1
        else:
            self.failed += 1
        self.conn.sendall(encode_response(cx_id, C_STORE_RSP, us(cmd, 0x0110),
                                          ui(cmd, 0x0002), status, ui(cmd, 0x1000), comment))

    def _discard_partial(self) -> None:
        """A dataset cut off by an abort or a lost connection: never acknowledged, removed."""
        if self._rx is not None:
            self._rx.close()
            with contextlib.suppress(OSError):
                os.unlink(self._rx.name)
            self._rx = None
