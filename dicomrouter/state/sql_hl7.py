"""HL7 v2 messages (issue 27): each received message stored before its ACK, its handling
recorded once, and what it told the router: the latest order per accession, the latest
demographics per patient, the patient merges (ADT^A40).

``hl7_messages`` keeps every accepted message (``handled_at`` NULL until handled: a start-up
handles those again); ``hl7_orders`` the latest order/ADT fields by ``accession`` and by
``patient`` (JSON of the order dict, ``hl7.message.ORDER_KEYS``); ``hl7_merges`` old → new
PatientID.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from .sql_base import SQLBase

#: the order dict's keys → the DICOM keywords ``latest_hl7_order`` answers with
DICOM_OF_ORDER = {"patient_id": "PatientID", "issuer": "IssuerOfPatientID",
                  "patient_name": "PatientName", "birth_date": "PatientBirthDate",
                  "sex": "PatientSex", "accession": "AccessionNumber",
                  "requested_procedure_id": "RequestedProcedureID"}
DEMOGRAPHICS = ("patient_id", "issuer", "patient_name", "birth_date", "sex")
MAX_MERGE_HOPS = 16  # A→B, B→C...: followed this far (a cycle stops here too)


class Hl7SQL(SQLBase):
    """The HL7 tables (SQLite migration 14, PostgreSQL 13)."""

    def _durable_tx(self) -> Any:
        """A write transaction that is on disk once committed (SQLite: synchronous=FULL for
        it); PostgreSQL's commit is durable already."""
        return self._tx()

    def store_hl7_message(self, raw: str, message_type: str, control_id: str,
                          sending_application: str, sending_facility: str,
                          peer: str) -> int:
        """Store a received message durably (before its ACK); its id."""
        with self._durable_tx() as db:
            rows = list(db.execute(
                "INSERT INTO hl7_messages(received_at, control_id, message_type,"
                " sending_application, sending_facility, peer, raw) VALUES (?,?,?,?,?,?,?)"
                " RETURNING id", (time.time(), control_id, message_type, sending_application,
                                  sending_facility, peer, raw)))
            return int(rows[0][0])

    def hl7_unhandled(self, limit: int = 1000) -> list[dict[str, Any]]:
        """Stored messages not handled yet, oldest first."""
        return [dict(r) for r in self._query(
            "SELECT id, received_at, control_id, message_type, sending_application,"
            " sending_facility, peer, raw FROM hl7_messages WHERE handled_at IS NULL"
            " ORDER BY id LIMIT ?", (limit,))]

    def hl7_messages(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest messages (without their text), newest first."""
        return [dict(r) for r in self._query(
            "SELECT id, received_at, control_id, message_type, sending_application,"
            " sending_facility, peer, handled_at, outcome FROM hl7_messages"
            " ORDER BY id DESC LIMIT ?", (limit,))]

    def purge_hl7_messages(self, before: float) -> int:
        """Delete the messages handled before ``before`` (the latest orders, demographics and
        merges they recorded stay); how many."""
        with self._tx() as db:
            return int(db.execute("DELETE FROM hl7_messages WHERE handled_at IS NOT NULL AND"
                                  " handled_at < ?", (before,)).rowcount)

    def hl7_handled(self, message_id: int, outcome: str,
                    order: Mapping[str, str] | None = None,
                    merge: tuple[str, str] | None = None) -> None:
        """Record a message's handling in one transaction: the order (by accession, and its
        demographics by patient), the merge (old → new PatientID), and the message handled.
        A message already handled (a replay raced a live handling) changes nothing."""
        now = time.time()
        with self._tx() as db:
            done = list(db.execute("SELECT handled_at FROM hl7_messages WHERE id=?",
                                   (message_id,)))
            if done and done[0][0] is not None:
                return
            if order is not None:
                fields = json.dumps(dict(order), sort_keys=True)
                if order.get("accession"):
                    self._upsert_order(db, "accession", order["accession"], message_id,
                                       now, fields)
                if order.get("patient_id"):
                    demo = json.dumps({k: order.get(k, "") for k in DEMOGRAPHICS},
                                      sort_keys=True)
                    self._upsert_order(db, "patient", order["patient_id"], message_id, now,
                                       demo)
            if merge is not None and merge[0] and merge[1] and merge[0] != merge[1]:
                db.execute("INSERT INTO hl7_merges(old_patient_id, new_patient_id, message_id,"
                           " merged_at) VALUES (?,?,?,?) ON CONFLICT (old_patient_id) DO UPDATE"
                           " SET new_patient_id=excluded.new_patient_id,"
                           " message_id=excluded.message_id, merged_at=excluded.merged_at",
                           (merge[0], merge[1], message_id, now))
            db.execute("UPDATE hl7_messages SET handled_at=?, outcome=? WHERE id=?",
                       (now, outcome[:500], message_id))

    @staticmethod
    def _upsert_order(db: Any, kind: str, key: str, message_id: int, now: float,
                      fields: str) -> None:
        db.execute("INSERT INTO hl7_orders(kind, okey, message_id, updated, fields)"
                   " VALUES (?,?,?,?,?) ON CONFLICT (kind, okey) DO UPDATE SET"
                   " message_id=excluded.message_id, updated=excluded.updated,"
                   " fields=excluded.fields WHERE hl7_orders.message_id <= excluded.message_id",
                   (kind, key, message_id, now, fields))

    def _order_row(self, kind: str, key: str) -> dict[str, str] | None:
        rows = self._query("SELECT fields FROM hl7_orders WHERE kind=? AND okey=?", (kind, key))
        return json.loads(rows[0][0]) if rows else None

    def merged_patient_id(self, patient_id: str) -> str:
        """The PatientID a merge (ADT^A40) made of ``patient_id`` (itself if none)."""
        current, seen = patient_id, {patient_id}
        for _ in range(MAX_MERGE_HOPS):
            rows = self._query("SELECT new_patient_id FROM hl7_merges WHERE old_patient_id=?",
                               (current,))
            if not rows or rows[0][0] in seen:
                break
            current = rows[0][0]
            seen.add(current)
        return current

    def hl7_order(self, accession: str) -> dict[str, str] | None:
        """The latest order for an accession as the order dict (every field the message
        had: priority, ordering facility, scheduled time...)."""
        return self._order_row("accession", accession) if accession else None

    def study_hl7_order(self, study_uid: str) -> dict[str, str] | None:
        """The latest order for the study's AccessionNumber (its expected study)."""
        rows = self._query("SELECT accession FROM studies WHERE study_uid=?", (study_uid,))
        return self.hl7_order(rows[0][0]) if rows and rows[0][0] else None

    def latest_hl7_order(self, accession: str | None = None,
                         patient_id: str | None = None) -> dict[str, str] | None:
        """The latest order for ``accession`` (no order for it, or none asked: the latest
        ADT/order demographics of ``patient_id``, without accession) as DICOM keywords →
        values (PatientID, IssuerOfPatientID, PatientName in DICOM PN form, PatientBirthDate,
        PatientSex, AccessionNumber, RequestedProcedureID). A merged patient answers with the
        PatientID it was merged into, and the newest demographics known for that patient win
        over the order's."""
        order = self._order_row("accession", accession) if accession else None
        patient = order.get("patient_id", "") if order else (patient_id or "")
        if not order and not patient:
            return None
        if patient:
            patient = self.merged_patient_id(patient)
            demo = self._order_row("patient", patient)
            if demo is None and order is None:
                return None
            order = {**(order or {}), **{k: v for k, v in (demo or {}).items() if v},
                     "patient_id": patient}
        assert order is not None
        return {dicom: str(order.get(key, "") or "") for key, dicom in DICOM_OF_ORDER.items()}
