"""The models of HL7 v2 (issue 27): the ``hl7:`` MLLP listener, ``hl7_rules:`` (what an order
or ADT message does), the ``hl7`` destination type and the MLLP peer a notification of type
``hl7`` sends to. Templates are checked here, in Jinja2's sandbox, so a syntax error is a
configuration error, not a failure at the first study."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import model_validator

from ..rules import parse_when
from ..schema import Bool, Choice, Duration, Int, ReadableFile, Strict, Text, parsed, readable
from ..values import parse_size
from .base import ConfigError, show
from .peers import DestinationBase, TlsClientModel, TlsServerModel, destination_type

#: the keys of an ``hl7_rules`` ``when:`` besides ``SEG-n[.c[.s]]`` field paths
HL7_KEYS = ("MessageType", "SendingApplication", "SendingFacility", "PatientID",
            "AccessionNumber", "Modality", "OrderPriority", "OrderingFacility")
FIELD_PATH = re.compile(r"^[A-Z][A-Z0-9]{2}-[1-9][0-9]*(\.[1-9][0-9]*){0,2}$")
#: the message types an outbound ``hl7`` destination or notification may send
OUT_TYPES = ("ORU^R01", "OMG^O19")


def check_hl7_key(key: str, where: str) -> None:
    """A key of an ``hl7_rules`` condition: a name of ``HL7_KEYS`` or a field path
    (``PID-3``, ``OBR-4.1``, ``PID-3.4.1``)."""
    if key in HL7_KEYS or FIELD_PATH.match(key):
        return
    raise ConfigError(where, f"not an HL7 field path (SEG-n, SEG-n.c, SEG-n.c.s such as "
                      f"PID-3 or OBR-4.1) nor one of {', '.join(HL7_KEYS)}")


def hl7_when(value: Any, key: str) -> tuple[Any, ...]:
    return parse_when(value, key, check_hl7_key)


def check_template(text: str | None, key: str) -> None:
    """A Jinja2 template's syntax (the renderer is ``hl7wire.environment``, the same
    sandbox the notifications use)."""
    if text is None:
        return
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment().parse(text)
    except TemplateSyntaxError as exc:
        raise ConfigError(key, f"template error on line {exc.lineno}: {exc.message}") from None


def _size(value: Any, key: str) -> int:
    return parse_size(value, key, 1024, 64 << 20)


class SenderModel(Strict):
    """One entry of ``allowed_senders``: a sending application (MSH-3), a sending facility
    (MSH-4), or both (both must match)."""

    application: Text | None = None
    facility: Text | None = None

    @model_validator(mode="after")
    def _one(self) -> SenderModel:
        if self.application is None and self.facility is None:
            raise ConfigError("application", "give application, facility or both")
        return self

    def allows(self, application: str, facility: str) -> bool:
        return (self.application in (None, application)) and \
            (self.facility in (None, facility))


class Hl7ListenerModel(Strict):
    """``hl7:``: the MLLP listener for HL7 v2 orders and ADT messages, and its limits."""

    bind: Text = "0.0.0.0"
    port: Int(1, 65535) = 2575
    tls: TlsServerModel | None = None
    allowed_senders: tuple[SenderModel, ...] = ()  # empty: any sender
    max_message_size: Annotated[int, parsed(_size)] = 1 << 20  # a larger one is refused (AR)
    idle_timeout: Duration = 300.0  # a connection with no complete message this long is closed
    max_connections: Int(1, 10_000) = 32  # at once; more are closed at once
    # of the bytes on the wire, unless a message's MSH-18 names its character set
    encoding: Text = "utf-8"
    ack_timeout: Duration = 30.0  # storing a message before its ACK: longer answers AE
    keep_messages: Duration = 30 * 86400.0  # handled messages' text kept this long (0: forever)

    @model_validator(mode="after")
    def _checks(self) -> Hl7ListenerModel:
        if self.keep_messages < 0:
            raise ConfigError("keep_messages", "must be 0 (forever) or more")
        for key in ("idle_timeout", "ack_timeout"):
            if getattr(self, key) <= 0:
                raise ConfigError(key, "must be more than 0")
        try:
            "MSH".encode(self.encoding)
        except LookupError:
            raise ConfigError("encoding", f"unknown encoding {show(self.encoding)}") from None
        return self

    def allows(self, application: str, facility: str) -> bool:
        return not self.allowed_senders or any(
            s.allows(application, facility) for s in self.allowed_senders)


class Hl7RuleModel(Strict):
    """One entry of ``hl7_rules:``: which messages (``when``) and what they do: ``record``
    the expected study / demographics / merge (latest order per accession and patient), and
    ``prefetch`` (hand the order to the prior prefetch)."""

    name: Text | None = None
    when: Annotated[tuple[Any, ...], parsed(hl7_when)] = ()
    record: Bool = True
    prefetch: Bool = False


class Hl7PeerModel(Strict):
    """An MLLP receiver of the router's HL7 messages (``hl7`` destination, ``hl7:`` of a
    notification)."""

    host: Text
    port: Int(1, 65535)
    tls: TlsClientModel | None = None
    timeout: Duration = 30.0  # connecting, and waiting for the ACK
    message_type: Choice(*OUT_TYPES) = "ORU^R01"
    sending_application: Text = "DICOMROUTER"
    sending_facility: Text | None = None
    receiving_application: Text | None = None
    receiving_facility: Text | None = None
    encoding: Text = "utf-8"

    @model_validator(mode="after")
    def _peer_checks(self) -> Hl7PeerModel:
        if self.timeout <= 0:
            raise ConfigError("timeout", "must be more than 0")
        try:
            "MSH".encode(self.encoding)
        except LookupError:
            raise ConfigError("encoding", f"unknown encoding {show(self.encoding)}") from None
        return self


@destination_type("hl7")
class Hl7DestinationModel(DestinationBase, Hl7PeerModel):
    """``type: hl7``: a "study available" message (ORU^R01 or OMG^O19) per delivered study,
    sent over MLLP, its ACK checked (AA delivered; AE/AR retried with the reason)."""

    template: Text | None = None  # Jinja2 (hl7 / hl7_name filters); default: built in
    template_file: ReadableFile | None = None

    @model_validator(mode="after")
    def _template(self) -> Hl7DestinationModel:
        if self.template is not None and self.template_file is not None:
            raise ConfigError("template_file", "give template or template_file, not both")
        check_template(self.template, "template")
        if self.template_file is not None:
            readable(self.template_file, "template_file")
            with open(self.template_file, encoding="utf-8") as f:
                check_template(f.read(), "template_file")
        return self

    def whole_study(self) -> str:
        return "an hl7 destination sends one message per study"
