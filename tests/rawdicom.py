"""A raw DICOM upper-layer client for hostile-input tests: PDUs built byte by byte, so a test can
send what no well-behaved library would (broken items, wrong lengths, mismatched UIDs)."""

from __future__ import annotations

import socket
import struct

from dicomrouter.dimse import (
    C_STORE_RQ,
    PDU_HEADER,
    PDV_HEADER,
    encode_command,
    parse_command,
    pdata,
    text,
)

APP_CONTEXT = b"1.2.840.10008.3.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
VERIFICATION = "1.2.840.10008.1.1"


def item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BxH", kind, len(body)) + body


def context(cid: int, abstract: str | None, syntaxes: list[str]) -> bytes:
    body = struct.pack(">B3x", cid)
    if abstract is not None:
        body += item(0x30, abstract.encode())
    body += b"".join(item(0x40, ts.encode()) for ts in syntaxes)
    return item(0x20, body)


def associate_rq(calling: bytes = b"FUZZER", called: bytes = b"DICOMROUTER",
                 contexts: list[bytes] | None = None, max_pdu: int = 65536) -> bytes:
    if contexts is None:
        contexts = [context(1, CT, [EXPLICIT_LE]), context(3, VERIFICATION, [EXPLICIT_LE])]
    body = (struct.pack(">H2x16s16s32x", 1, called.ljust(16), calling.ljust(16))
            + item(0x10, APP_CONTEXT) + b"".join(contexts)
            + item(0x50, item(0x51, struct.pack(">I", max_pdu))))
    return PDU_HEADER.pack(0x01, len(body)) + body


def recv_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """(type, body) of the next PDU; (0, b'') if the connection closed."""
    head = _recv_exact(sock, 6)
    if len(head) < 6:
        return 0, b""
    kind, length = PDU_HEADER.unpack(head)
    return kind, _recv_exact(sock, length)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def accepted_contexts(ac_body: bytes) -> dict[int, int]:
    """context id → result, from an A-ASSOCIATE-AC body."""
    out: dict[int, int] = {}
    o = 68
    while o + 4 <= len(ac_body):
        kind, length = struct.unpack_from(">BxH", ac_body, o)
        if kind == 0x21:
            out[ac_body[o + 4]] = ac_body[o + 6]
        o += 4 + length
    return out


class RawAssociation:
    """An established association (A-ASSOCIATE-AC received) over a plain socket."""

    def __init__(self, port: int, rq: bytes | None = None, timeout: float = 30) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(rq or associate_rq())
        kind, body = recv_pdu(self.sock)
        if kind != 0x02:
            self.sock.close()
            raise ConnectionError(f"association not accepted (PDU type {kind})")
        self.contexts = accepted_contexts(body)
        self._mid = 0

    def c_store(self, dataset: bytes, sop_instance: str, sop_class: str = CT,
                cx: int = 1, fragment: int = 16000) -> int | None:
        """Send one C-STORE; returns the status, or None if the router ended the association."""
        self._mid += 1
        cmd = encode_command([(0x0002, text(sop_class, b"\x00")),
                              (0x0100, struct.pack("<H", C_STORE_RQ)),
                              (0x0110, struct.pack("<H", self._mid)),
                              (0x0700, struct.pack("<H", 0)),
                              (0x0800, struct.pack("<H", 0)),
                              (0x1000, text(sop_instance, b"\x00"))])
        try:
            self.sock.sendmsg(pdata(cx, 0x03, cmd))
            for start in range(0, max(len(dataset), 1), fragment):
                last = start + fragment >= len(dataset)
                self.sock.sendmsg(pdata(cx, 0x02 if last else 0x00,
                                        dataset[start:start + fragment]))
            return self.response_status()
        except OSError:
            return None

    def response_status(self) -> int | None:
        kind, body = recv_pdu(self.sock)
        if kind != 0x04:
            return None
        _length, _cx, _control = PDV_HEADER.unpack_from(body, 0)
        return int.from_bytes(parse_command(body[6:])[0x0900], "little")

    def release(self) -> None:
        try:
            self.sock.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")
            recv_pdu(self.sock)
        except OSError:
            pass
        self.sock.close()
