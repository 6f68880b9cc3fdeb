"""HL7 v2 on the wire, for the router's outbound messages (the ``hl7`` destination and the
``hl7`` notifications): the templates (Jinja2's sandbox, with HL7 escaping filters), the
built-in ORU^R01 / OMG^O19 "study available" messages, and one MLLP exchange with its ACK
checked. Parsing and escaping are python-hl7's (``hl7``), not hand-written.

A leaf: no state; the network I/O is one blocking exchange the caller bounds with a timeout.
"""

from __future__ import annotations

import functools
import itertools
import os
import socket
import ssl
import time
from typing import Any

SB, EB, CR = b"\x0b", b"\x1c", b"\x0d"
_SEQ = itertools.count(1)


@functools.cache
def _escaper() -> Any:
    """A message with the standard separators (python-hl7 escapes with them); python-hl7 is
    imported on first use, so routers without HL7 do not load it."""
    import hl7

    return hl7.parse("MSH|^~\\&|")


#: the built-in message: MSH, PID and ORC/OBR of the study, OBX with what was sent where, and
#: the study's UID (ZDS, as IHE's scheduled workflow carries it). ``hl7`` escapes a value,
#: ``hl7_name`` a DICOM PN (its ``^`` components kept as HL7 components).
DEFAULT_TEMPLATE = """\
MSH|^~\\&|{{ sending_application|hl7 }}|{{ sending_facility|hl7 }}|\
{{ receiving_application|hl7 }}|{{ receiving_facility|hl7 }}|{{ now }}||\
{{ message_type }}|{{ control_id }}|P|2.5.1
PID|1||{{ study.PatientID|hl7 }}{% if study.IssuerOfPatientID %}^^^\
{{ study.IssuerOfPatientID|hl7 }}{% endif %}||{{ study.PatientName|hl7_name }}||\
{{ study.PatientBirthDate|hl7 }}|{{ study.PatientSex|hl7 }}
ORC|{{ 'SC' if message_type == 'ORU^R01' else 'XO' }}||{{ study.AccessionNumber|hl7 }}||CM
OBR|1||\
{{ study.AccessionNumber|hl7 }}|{{ study.StudyDescription|hl7 }}|||\
{{ study.StudyDate|hl7 }}{{ study.StudyTime|hl7 }}|||||||||||\
{{ study.AccessionNumber|hl7 }}|{{ study.RequestedProcedureID|hl7 }}|||||\
{{ study.Modality|hl7 }}|{{ 'F' if event in ('delivered', 'completed') else 'I' }}
OBX|1|ST|StudyInstanceUID||{{ study_instance_uid|hl7 }}||||||F
OBX|2|NM|NumberOfStudyRelatedInstances||{{ instances }}||||||F
OBX|3|ST|Destination||{{ destinations|join(',')|hl7 }}||||||F
OBX|4|ST|Event||{{ event|hl7 }}||||||F
ZDS|{{ study_instance_uid|hl7 }}^{{ router_ae|hl7 }}^Application^DICOM
"""


class Hl7Refused(Exception):
    """The receiver answered AE or AR (or CE/CR): ``code`` and its reason (MSA-3 / ERR)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}" if reason else code)
        self.code = code
        self.reason = reason


def escape(value: Any) -> str:
    """A value for an HL7 field: the separators escaped (``|`` → ``\\F\\`` ...), line breaks
    as ``\\.br\\``; None and missing values are empty."""
    if value is None:
        return ""
    text = str(value)
    if not text:
        return ""
    out = _escaper().escape(text)
    return out.replace("\r\n", "\\.br\\").replace("\n", "\\.br\\").replace("\r", "\\.br\\")


def escape_name(value: Any) -> str:
    """A DICOM person name (``Family^Given^Middle^Prefix^Suffix``) as an HL7 XPN
    (``Family^Given^Middle^Suffix^Prefix``), each component escaped."""
    if not value:
        return ""
    parts = [escape(p) for p in str(value).split("=")[0].split("^")] + [""] * 5
    family, given, middle, prefix, suffix = parts[:5]
    return "^".join([family, given, middle, suffix, prefix]).rstrip("^")


def timestamp(at: float | None = None) -> str:
    """HL7 TS (local time, seconds)."""
    return time.strftime("%Y%m%d%H%M%S", time.localtime(at if at is not None else time.time()))


def control_id() -> str:
    """A message control ID unique for this process's life and across restarts."""
    return f"{int(time.time() * 1000):x}{os.getpid() % 65536:04x}{next(_SEQ):04x}"


def describe_order(order: dict[str, Any]) -> str:
    """The HL7 order a study was expected by, in one line (explain, status --study)."""
    return (f"expected by HL7 order {order.get('control_id', '')} "
            f"({order.get('message_type', '')} from {order.get('sending_application', '')}/"
            f"{order.get('sending_facility', '')}): accession {order.get('accession', '')}, "
            f"modality {order.get('modality') or '?'}, scheduled "
            f"{order.get('scheduled') or '?'}, priority {order.get('priority') or '?'}")


def environment() -> Any:
    """The Jinja2 sandbox of HL7 templates (the notifications' environment) with the ``hl7``
    and ``hl7_name`` filters; ``Undefined`` renders empty (a study without a tag)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(autoescape=False, keep_trailing_newline=True)
    env.filters["hl7"] = escape
    env.filters["hl7_name"] = escape_name
    return env


def segments(rendered: str) -> str:
    """A rendered template as a message: one segment per non-blank line, ``\\r``-separated."""
    lines = [line.strip("\r") for line in rendered.replace("\r\n", "\n").split("\n")]
    return "\r".join(line for line in lines if line.strip()) + "\r"


#: MSH-18 (HL7 table 0211) → Python codec; what is not here falls back to the configured
#: ``encoding`` (ISO 2022 and JIS sets need a shift-state decoder of their own)
CHARSETS = {"ASCII": "ascii", "8859/1": "latin-1", "8859/2": "iso8859-2",
            "8859/3": "iso8859-3", "8859/4": "iso8859-4", "8859/5": "iso8859-5",
            "8859/6": "iso8859-6", "8859/7": "iso8859-7", "8859/8": "iso8859-8",
            "8859/9": "iso8859-9", "8859/15": "iso8859-15", "UNICODE UTF-8": "utf-8",
            "UNICODE": "utf-8", "UTF-8": "utf-8", "GB 18030-2000": "gb18030",
            "KS X 1001": "euc-kr", "CNS 11643-1992": "big5", "BIG-5": "big5"}


def declared_encoding(block: bytes) -> tuple[str, str] | None:
    """(MSH-18 as written, its Python codec) when the message names a character set this
    table knows; None when it names none (or one it does not know: the caller says so). MSH
    is ASCII whatever the set, so it is read from the bytes before any decoding."""
    start = block.find(b"MSH")
    if start < 0 or len(block) < start + 4:
        return None
    sep = block[start + 3:start + 4]
    end = min([i for i in (block.find(b"\r", start), block.find(b"\n", start)) if i >= 0]
              or [len(block)])
    fields = block[start:end].split(sep)
    if len(fields) < 18:
        return None
    # MSH-18 may repeat (the default set first); the first names the message's own set
    raw = fields[17].split(b"~")[0].strip().decode("ascii", "replace")
    if not raw:
        return None
    codec = CHARSETS.get(raw.upper())
    return (raw, codec) if codec else (raw, "")


def ack_of(raw: bytes, encoding: str = "utf-8") -> tuple[str, str]:
    """(MSA-1 code, reason) of an ACK: MSA-3, else ERR's text."""
    text = raw.decode(encoding, "replace").strip("\x0b\x1c\r\n ")
    import hl7

    try:
        msg = hl7.parse(text)
        msa = msg.segment("MSA")
    except Exception:
        raise OSError(f"the answer is not an HL7 ACK: {text[:80]!r}") from None
    code = str(msa[1]).strip() if len(msa) > 1 else ""
    reason = str(msa[3]).strip() if len(msa) > 3 else ""
    if not reason:
        try:
            err = msg.segment("ERR")
            reason = " ".join(str(f) for f in list(err)[1:] if str(f)).strip()
        except KeyError:
            pass
    return code, reason


def exchange(host: str, port: int, message: str, timeout: float,
             tls: ssl.SSLContext | None = None, encoding: str = "utf-8",
             max_ack: int = 1 << 20) -> tuple[str, str]:
    """Send one message over MLLP and read its ACK: (code, reason). Raises OSError when the
    receiver cannot be reached or does not answer within ``timeout``; ``Hl7Refused`` for
    AE / AR / CE / CR."""
    data = SB + message.encode(encoding) + EB + CR
    with socket.create_connection((host, port), timeout=timeout) as raw:
        sock: Any = tls.wrap_socket(raw, server_hostname=host) if tls is not None else raw
        sock.settimeout(timeout)
        sock.sendall(data)
        buf = b""
        deadline = time.monotonic() + timeout
        while EB + CR not in buf:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no ACK within {timeout:g} s")
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("the receiver closed the connection without an ACK")
            buf += chunk
            if len(buf) > max_ack:
                raise OSError("the ACK is larger than 1 MiB")
    code, reason = ack_of(buf.split(EB + CR, 1)[0], encoding)
    if code in ("AA", "CA"):
        return code, reason
    raise Hl7Refused(code or "?", reason)
