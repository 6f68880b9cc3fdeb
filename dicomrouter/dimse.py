"""DICOM upper layer and DIMSE encoding shared by our lean receiver and sender (PS3.7, PS3.8).

Only what C-STORE and C-ECHO need: PDU and PDV headers, Implicit VR Little Endian command sets.
Association negotiation PDUs are left to pynetdicom's PDU classes (once per association).
"""

from __future__ import annotations

import struct
from typing import Any, BinaryIO

IMPLEMENTATION_VERSION = "DICOMROUTER_01"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
NO_DATASET = 0x0101
SUCCESS, OUT_OF_RESOURCES, DATASET_MISMATCH, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xA900, 0xC000
MAX_COMMAND = 1 << 16  # a command set larger than this is not a command set
CHUNK = 1 << 20

PDU_HEADER = struct.Struct(">BxI")
PDV_HEADER = struct.Struct(">IBB")
_ELEMENT = struct.Struct("<HHI")


class ProtocolError(Exception):
    """The peer broke the DICOM upper layer protocol: the association is aborted."""


def read_exact(rf: BinaryIO, n: int) -> bytes:
    data = rf.read(n)
    if data is None or len(data) != n:
        raise ConnectionError("connection closed by the peer")
    return data


def parse_command(raw: bytes) -> dict[int, bytes]:
    """An Implicit VR Little Endian command set: element tag (0000,eeee) → raw value bytes."""
    out: dict[int, bytes] = {}
    offset, end = 0, len(raw)
    while offset + 8 <= end:
        group, elem, length = _ELEMENT.unpack_from(raw, offset)
        offset += 8
        if group != 0 or offset + length > end:
            raise ProtocolError("malformed command set")
        out[elem] = raw[offset:offset + length]
        offset += length
    return out


def us(cmd: dict[int, bytes], elem: int) -> int:
    v = cmd.get(elem)
    if v is None or len(v) != 2:
        raise ProtocolError(f"command element (0000,{elem:04X}) missing")
    return int.from_bytes(v, "little")


def ui(cmd: dict[int, bytes], elem: int) -> str:
    return cmd.get(elem, b"").rstrip(b"\x00 ").decode("ascii", "replace")


def element(elem: int, value: bytes) -> bytes:
    return _ELEMENT.pack(0, elem, len(value)) + value


def text(value: str, pad: bytes) -> bytes:
    b = value.encode("ascii", "replace")
    return b + pad if len(b) % 2 else b


def error_comment(text: str, limit: int = 64) -> str:
    """``text`` as an Error Comment (0000,0902): LO, at most 64 characters, no backslash or
    control characters; a longer one is cut at a word and ends with "..." (the log line has the
    whole message)."""
    clean = "".join(c if 32 <= ord(c) < 127 and c != "\\" else "?" for c in text).strip()
    if len(clean) <= limit:
        return clean
    cut = clean[:limit - 3]
    if " " in cut:
        cut = cut[:cut.rindex(" ")]
    return cut.rstrip(" ,;:-(") + "..."


def encode_response(context_id: int, command_field: int, message_id: int, sop_class: str,
                    status: int, sop_instance: str | None = None, comment: str = "") -> bytes:
    """A complete P-DATA-TF PDU carrying one response command set."""
    elements = [(0x0002, text(sop_class, b"\x00")),
                (0x0100, struct.pack("<H", command_field)),
                (0x0120, struct.pack("<H", message_id)),
                (0x0800, struct.pack("<H", NO_DATASET)),
                (0x0900, struct.pack("<H", status))]
    if comment:
        elements.append((0x0902, text(error_comment(comment), b" ")))
    if sop_instance is not None:
        elements.append((0x1000, text(sop_instance, b"\x00")))
    return b"".join(pdata(context_id, 0x03, encode_command(elements)))


def encode_command(elements: list[tuple[int, bytes]]) -> bytes:
    """A command set from (element number, value) pairs in ascending order."""
    body = b"".join(element(e, v) for e, v in elements)
    return element(0x0000, struct.pack("<I", len(body))) + body


def pdata(context_id: int, control: int, fragment: bytes | memoryview) -> list[bytes | memoryview]:
    """The buffers of one P-DATA-TF PDU holding one PDV (for ``socket.sendmsg``)."""
    n = len(fragment)
    return [PDU_HEADER.pack(0x04, n + 6) + PDV_HEADER.pack(n + 2, context_id, control), fragment]


def user_information(max_pdu: int) -> list[Any]:
    """The user information items we send in A-ASSOCIATE-RQ and -AC: our maximum PDU length and
    implementation identity."""
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID
    from pynetdicom.pdu_primitives import (
        ImplementationClassUIDNotification,
        ImplementationVersionNameNotification,
        MaximumLengthNotification,
    )

    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION
    return [max_length, impl, version]
