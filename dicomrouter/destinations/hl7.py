"""The ``hl7`` destination: one "study available" HL7 v2 message (ORU^R01 or OMG^O19) per
delivered study, sent over MLLP (``hl7wire.exchange``), its ACK checked.

A session reads no instance file: ``send`` counts the instance (it is "buffered"), ``commit``
renders the template with the study's indexed tags, the instance count and the routes, and
sends it. AA (or CA): every instance is delivered; AE / AR: a ``DeliveryError`` with the
receiver's reason (MSA-3 / ERR), retried by the job's retry policy, then dead. The receiver
cannot be reached or does not ACK within ``timeout``: retried the same way.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any, BinaryIO

from .. import hl7wire
from ..config.hl7 import Hl7DestinationModel
from ..state import Instance
from ..tlsctx import client_context
from .base import Context, DeliveryError, Destination, Session
from .registry import implements

#: the order fields (from ``latest_hl7_order``) a template sees besides the instances' tags
ORDER_FIELDS = ("RequestedProcedureID", "IssuerOfPatientID")


def study_context(instances: Sequence[Instance], state: Any) -> dict[str, str]:
    """The study's indexed tags (the first instance's), ``ModalitiesInStudy``, and what the
    latest HL7 order for its accession adds (RequestedProcedureID, IssuerOfPatientID)."""
    tags = dict(instances[0].tags) if instances else {}
    mods = sorted({i.tags.get("Modality", "") for i in instances} - {""})
    tags["ModalitiesInStudy"] = "\\".join(mods)
    if state is not None and tags.get("AccessionNumber"):
        try:
            order = state.latest_hl7_order(accession=tags["AccessionNumber"]) or {}
        except Exception:  # the message goes without what the order adds
            order = {}
        for key in ORDER_FIELDS:
            if order.get(key) and not tags.get(key):
                tags[key] = order[key]
    return tags


@implements(Hl7DestinationModel)
class Hl7Destination(Destination):
    whole_study = True  # the message counts the whole study, not a late arrival's part

    def __init__(self, cfg: Hl7DestinationModel, ctx: Context) -> None:
        super().__init__(cfg, ctx)
        self.model = cfg
        self.tls = client_context(cfg.tls) if cfg.tls else None
        text = cfg.template
        if cfg.template_file is not None:
            with open(cfg.template_file, encoding="utf-8") as f:
                text = f.read()
        self.template = hl7wire.environment().from_string(text or hl7wire.DEFAULT_TEMPLATE)

    def describe(self) -> str:
        return (f"hl7 {self.model.message_type} to {self.model.host}:{self.model.port}"
                f"{' (TLS)' if self.tls else ''}")

    probe_kind = "TCP connect"

    def probe(self) -> None:
        try:
            socket.create_connection((self.model.host, self.model.port),
                                     timeout=self.model.timeout).close()
        except OSError as exc:
            raise DeliveryError(f"{self.model.host}:{self.model.port}: {exc}") from None

    def open(self, instances: Sequence[Instance], routes: Sequence[str] = ()) -> Session:
        return _Hl7Session(self, instances, routes)

    def render(self, instances: Sequence[Instance], routes: Sequence[str]) -> str:
        m = self.model
        tags = study_context(instances, self.ctx.state)
        study_uid = instances[0].study_uid if instances else ""
        context = {"study": tags, "study_instance_uid": study_uid, "instances": len(instances),
                   "destinations": [self.name], "destination": self.name,
                   "routes": list(routes), "event": "delivered", "message_type": m.message_type,
                   "control_id": hl7wire.control_id(), "now": hl7wire.timestamp(),
                   "sending_application": m.sending_application,
                   "sending_facility": m.sending_facility or "",
                   "receiving_application": m.receiving_application or "",
                   "receiving_facility": m.receiving_facility or "",
                   "router_ae": self.ctx.router_ae}
        return hl7wire.segments(self.template.render(context))


class _Hl7Session(Session):
    transmits_on_send = False  # counted when the message leaves (commit)

    def __init__(self, dest: Hl7Destination, instances: Sequence[Instance],
                 routes: Sequence[str]) -> None:
        self.dest = dest
        self.routes = list(routes)
        self.all = list(instances)
        self.taken: list[str] = []
        self.refused = {}

    def send(self, inst: Instance, data: BinaryIO) -> bool:
        self.taken.append(inst.sop_uid)
        return False

    def commit(self) -> Sequence[str]:
        if not self.taken:
            return ()
        m = self.dest.model
        try:
            message = self.dest.render(self.all or [], self.routes)
        except Exception as exc:  # a template error on this study's values
            raise DeliveryError(f"template error: {type(exc).__name__}: {exc}") from None
        self.transmitting(self.taken)
        try:
            hl7wire.exchange(m.host, m.port, message, m.timeout, self.dest.tls, m.encoding)
        except hl7wire.Hl7Refused as exc:
            raise DeliveryError(f"{m.host}:{m.port} answered {exc}") from None
        except OSError as exc:
            self.not_transmitted(self.taken)
            raise DeliveryError(f"{m.host}:{m.port}: {type(exc).__name__}: {exc}") from None
        return list(self.taken)
