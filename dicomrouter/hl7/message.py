"""An inbound HL7 v2 message: parsed by python-hl7, classified, its order (the expected
study, the patient's demographics, a merge) read out of it, and the ACK that answers it.

The fields follow IHE Radiology's Scheduled Workflow: ORM^O01 (v2.3.1) carries the accession
in OBR-18, the requested procedure ID in OBR-19, the modality in OBR-24, the Study Instance
UID in ZDS-1, the scheduled time in OBR-27.4 (or ORC-7.4, OBR-36); OMI^O23 (v2.5) in IPC-1,
IPC-2, IPC-5, IPC-3 and TQ1-7. ADT^A08 / A31 update a patient's demographics (PID); ADT^A40
merges MRG-1 (the old PatientID) into PID-3.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import hl7

from .. import hl7wire

#: message type (MSH-9.1^MSH-9.2) → what it is to the router
SUPPORTED = {"ORM^O01": "order", "OMI^O23": "order", "ADT^A08": "demographics",
             "ADT^A31": "demographics", "ADT^A40": "merge"}
#: the keys of the order dict handed to ``OrderHub`` subscribers (prefetch's contract)
ORDER_KEYS = ("message_type", "patient_id", "issuer", "patient_name", "birth_date", "sex",
              "accession", "requested_procedure_id", "modality", "scheduled", "study_uid",
              "sending_application", "sending_facility", "control_id")
#: HL7 table 0357 (message error condition codes) used in ERR-3
SEGMENT_SEQUENCE, REQUIRED_MISSING, UNSUPPORTED_TYPE, INTERNAL = "100", "101", "200", "207"


class Malformed(ValueError):
    """Not an HL7 v2 message the router can read (no MSH, no message type...)."""


@dataclass
class Inbound:
    """One received message and what its MSH says."""

    raw: str
    msg: Any  # hl7.Message
    message_type: str  # "ORM^O01"
    control_id: str
    sending_application: str
    sending_facility: str
    version: str

    @property
    def kind(self) -> str:
        return SUPPORTED.get(self.message_type, "")

    def field(self, segment: str, n: int, component: int = 1, sub: int = 1,
              occurrence: int = 1) -> str:
        """One value (first repetition), '' when absent."""
        try:
            value = self.msg.extract_field(segment, occurrence, n, 1, component, sub)
        except (KeyError, IndexError):
            return ""
        return str(value or "").strip()

    def first(self, *paths: tuple[str, int, int]) -> str:
        """The first non-empty of several (segment, field, component) places."""
        for segment, n, component in paths:
            value = self.field(segment, n, component)
            if value:
                return value
        return ""

    def count(self, segment: str) -> int:
        try:
            return len(self.msg.segments(segment))
        except KeyError:
            return 0


def parse(text: str) -> Inbound:
    """Parse a message (segments separated by CR; LF tolerated); Malformed with why not."""
    text = text.replace("\r\n", "\r").replace("\n", "\r").strip("\r")
    if not text.startswith("MSH") or len(text) < 8:
        raise Malformed("does not start with an MSH segment")
    try:
        msg = hl7.parse(text)
        msh = msg.segment("MSH")
    except Exception as exc:
        raise Malformed(f"cannot be parsed ({type(exc).__name__}: {exc})") from None
    inbound = Inbound(text, msg, "", "", "", "", "")
    code, event = inbound.field("MSH", 9, 1), inbound.field("MSH", 9, 2)
    if not code:
        raise Malformed("MSH-9 (message type) is empty")
    inbound.message_type = f"{code}^{event}" if event else code
    inbound.control_id = inbound.field("MSH", 10)
    inbound.sending_application = inbound.field("MSH", 3)
    inbound.sending_facility = inbound.field("MSH", 4)
    inbound.version = inbound.field("MSH", 12) or "2.5.1"
    if len(msh) < 10:
        raise Malformed("MSH has fewer than 10 fields")
    return inbound


def _iso(ts: str) -> str:
    """HL7 TS (YYYYMMDD[HHMM[SS]]...) → ISO 8601 ('' when it is not a date)."""
    digits = ts[:14]
    if len(digits) < 8 or not digits.isdigit():
        return ""
    out = f"{digits[:4]}-{digits[4:6]}-{digits[6:8]}"
    if len(digits) >= 12:
        out += f"T{digits[8:10]}:{digits[10:12]}:{digits[12:14] or '00'}"
    return out


def person_name(inbound: Inbound, segment: str = "PID", n: int = 5) -> str:
    """An XPN (family^given^middle^suffix^prefix) as a DICOM PN
    (family^given^middle^prefix^suffix)."""
    family, given, middle, suffix, prefix = (inbound.field(segment, n, c) for c in range(1, 6))
    return "^".join([family, given, middle, prefix, suffix]).rstrip("^")


def missing(inbound: Inbound) -> str:
    """What a supported message lacks to be handled ('' when nothing)."""
    if not inbound.count("PID"):
        return "no PID segment"
    if not inbound.field("PID", 3):
        return "PID-3 (patient ID) is empty"
    if inbound.kind == "merge" and not inbound.field("MRG", 1):
        return "MRG-1 (prior patient ID) is empty"
    if inbound.kind == "order" and not order_of(inbound)["accession"]:
        return "no accession number (OBR-18, IPC-1, ORC-3 or OBR-3)"
    return ""


def order_of(inbound: Inbound) -> dict[str, str]:
    """The order dict (``ORDER_KEYS``, plus the extra fields a route may use: priority,
    ordering facility, procedure code and text, order control); for ADT the patient part."""
    order = {
        "message_type": inbound.message_type,
        "patient_id": inbound.field("PID", 3),
        "issuer": inbound.field("PID", 3, 4),
        "patient_name": person_name(inbound),
        "birth_date": inbound.field("PID", 7)[:8],
        "sex": inbound.field("PID", 8),
        "accession": "", "requested_procedure_id": "", "modality": "", "scheduled": "",
        "study_uid": "",
        "sending_application": inbound.sending_application,
        "sending_facility": inbound.sending_facility,
        "control_id": inbound.control_id,
    }
    if inbound.kind == "order":
        order.update({
            "accession": inbound.first(("IPC", 1, 1), ("OBR", 18, 1), ("ORC", 3, 1),
                                       ("OBR", 3, 1)),
            "requested_procedure_id": inbound.first(("IPC", 2, 1), ("OBR", 19, 1)),
            "modality": inbound.first(("IPC", 5, 1), ("OBR", 24, 1)),
            "scheduled": _iso(inbound.first(("TQ1", 7, 1), ("OBR", 27, 4), ("ORC", 7, 4),
                                            ("OBR", 36, 1))),
            "study_uid": inbound.first(("IPC", 3, 1), ("ZDS", 1, 1)),
            "priority": inbound.first(("TQ1", 9, 1), ("OBR", 27, 6), ("ORC", 7, 6),
                                      ("OBR", 5, 1)),
            "ordering_facility": inbound.first(("ORC", 21, 1), ("MSH", 4, 1)),
            "procedure_code": inbound.field("OBR", 4, 1),
            "procedure_text": inbound.field("OBR", 4, 2),
            "order_control": inbound.field("ORC", 1),
        })
    return order


def values(inbound: Inbound, order: dict[str, str], key: str) -> list[str]:
    """Every value of an ``hl7_rules`` key: a named one, or a field path ``SEG-n[.c[.s]]``
    (every segment of that name: any OBR of the message)."""
    named = {"MessageType": inbound.message_type,
             "SendingApplication": inbound.sending_application,
             "SendingFacility": inbound.sending_facility,
             "PatientID": order.get("patient_id", ""),
             "AccessionNumber": order.get("accession", ""),
             "Modality": order.get("modality", ""),
             "OrderPriority": order.get("priority", ""),
             "OrderingFacility": order.get("ordering_facility", "")}
    if key in named:
        return [named[key]]
    segment, _, rest = key.partition("-")
    parts = [int(p) for p in rest.split(".")]
    n, component, sub = (parts + [1, 1])[:3]
    return [inbound.field(segment, n, component, sub, occurrence=i + 1)
            for i in range(max(1, inbound.count(segment)))]


def ack(inbound: Inbound | None, code: str, reason: str = "", error: str = "",
        application: str = "DICOMROUTER", facility: str = "") -> str:
    """The ACK: python-hl7's ``create_ack`` (MSH with sender and receiver swapped, MSA-1/2),
    MSA-3 with the reason, and an ERR segment (ERR-3: HL7 table 0357 code) when refused. A
    message without a readable MSH gets an ACK built from nothing."""
    text = hl7wire.escape(reason)[:200]
    if inbound is not None:
        out = str(inbound.msg.create_ack(code, message_id=hl7wire.control_id(),
                                          application=application, facility=facility or None))
        segs = [s for s in out.split("\r") if s]
        if text:
            segs = [s + f"|{text}" if s.startswith("MSA") else s for s in segs]
        version = inbound.version
    else:
        segs = [f"MSH|^~\\&|{hl7wire.escape(application)}|{hl7wire.escape(facility)}|||"
                f"{hl7wire.timestamp()}||ACK|{hl7wire.control_id()}|P|2.5.1",
                f"MSA|{code}||{text}"]
        version = "2.5.1"
    if error:
        severity = "E"
        segs.append(f"ERR|^^^{error}&{text.replace('&', '')}&HL70357" if version < "2.5" else
                    f"ERR|||{error}^{text}^HL70357|{severity}")
    return "\r".join(segs) + "\r"
