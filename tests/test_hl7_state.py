"""The state's HL7 part on both backends (SQLite, and a real PostgreSQL started by the test):
messages stored and handled once, ``latest_hl7_order`` by accession and by patient, newer
demographics over an order's, ADT^A40 merges followed (chains, cycles)."""

from __future__ import annotations

import time

from dicomrouter.state import State


def _order(**kw: str) -> dict[str, str]:
    base = {"message_type": "ORM^O01", "patient_id": "P1", "issuer": "HOSP",
            "patient_name": "Doe^John", "birth_date": "19700101", "sex": "M",
            "accession": "ACC1", "requested_procedure_id": "RP1", "modality": "CT",
            "scheduled": "", "study_uid": "", "sending_application": "RIS",
            "sending_facility": "HOSP", "control_id": "C1"}
    return {**base, **kw}


def _store(state: State, kind: str = "ORM^O01", control: str = "C1") -> int:
    return state.store_hl7_message(f"MSH|^~\\&|RIS|HOSP|||x||{kind}|{control}|P|2.5.1\r", kind,
                                   control, "RIS", "HOSP", "127.0.0.1:1")


def test_stored_then_handled_once(state: State) -> None:
    first, second = _store(state, control="C1"), _store(state, control="C2")
    assert second > first
    assert [r["id"] for r in state.hl7_unhandled()] == [first, second]
    state.hl7_handled(first, "recorded", _order())
    state.hl7_handled(first, "again", _order(patient_name="Other^Name"))  # no second time
    assert [r["id"] for r in state.hl7_unhandled()] == [second]
    assert state.latest_hl7_order(accession="ACC1")["PatientName"] == "Doe^John"
    rows = {r["id"]: r for r in state.hl7_messages()}
    assert rows[first]["outcome"] == "recorded" and rows[second]["handled_at"] is None


def test_latest_order_by_accession_and_by_patient(state: State) -> None:
    assert state.latest_hl7_order(accession="ACC1") is None
    assert state.latest_hl7_order(patient_id="P1") is None
    state.hl7_handled(_store(state), "ok", _order())
    assert state.latest_hl7_order(accession="ACC1") == {
        "PatientID": "P1", "IssuerOfPatientID": "HOSP", "PatientName": "Doe^John",
        "PatientBirthDate": "19700101", "PatientSex": "M", "AccessionNumber": "ACC1",
        "RequestedProcedureID": "RP1"}
    # an ADT^A08 later corrects the name: the order answers with the newest demographics
    state.hl7_handled(_store(state, "ADT^A08", "C2"), "ok",
                      _order(message_type="ADT^A08", accession="", requested_procedure_id="",
                             patient_name="Doe^Johnny", birth_date="19700102"))
    by_acc = state.latest_hl7_order(accession="ACC1")
    assert by_acc is not None
    assert (by_acc["PatientName"], by_acc["PatientBirthDate"], by_acc["AccessionNumber"],
            by_acc["RequestedProcedureID"]) == ("Doe^Johnny", "19700102", "ACC1", "RP1")
    # both asked, the accession has no order: the patient's demographics, no accession
    both = state.latest_hl7_order(accession="UNKNOWN", patient_id="P1")
    assert both is not None and (both["PatientName"], both["AccessionNumber"]) == (
        "Doe^Johnny", "")
    assert state.latest_hl7_order(accession="UNKNOWN", patient_id="NOBODY") is None
    by_pid = state.latest_hl7_order(patient_id="P1")
    assert by_pid is not None and by_pid["PatientName"] == "Doe^Johnny"
    assert by_pid["AccessionNumber"] == ""
    # a replayed older message does not overwrite a newer one (message ids order them)
    older = _store(state, control="C0")
    state.hl7_handled(older, "ok", _order(requested_procedure_id="RP-NEW"))
    state.hl7_handled(_store(state, control="C3"), "ok", _order(requested_procedure_id="RP3"))
    assert state.latest_hl7_order(accession="ACC1")["RequestedProcedureID"] == "RP3"


def test_merges_map_the_old_patient_id(state: State) -> None:
    state.hl7_handled(_store(state), "ok", _order(patient_id="OLD", accession="ACC9"))
    state.hl7_handled(_store(state, "ADT^A40", "C2"), "merged",
                      _order(message_type="ADT^A40", patient_id="NEW", accession="",
                             patient_name="Merged^Jane"), merge=("OLD", "NEW"))
    for found in (state.latest_hl7_order(patient_id="OLD"),
                  state.latest_hl7_order(accession="ACC9")):
        assert found is not None
        assert (found["PatientID"], found["PatientName"]) == ("NEW", "Merged^Jane")
    assert state.latest_hl7_order(accession="ACC9")["AccessionNumber"] == "ACC9"
    # a chain NEW → NEWER is followed; a cycle back to OLD stops
    state.hl7_handled(_store(state, "ADT^A40", "C3"), "merged",
                      _order(message_type="ADT^A40", patient_id="NEWER", accession=""),
                      merge=("NEW", "NEWER"))
    assert state.merged_patient_id("OLD") == "NEWER"
    state.hl7_handled(_store(state, "ADT^A40", "C4"), "merged",
                      _order(message_type="ADT^A40", patient_id="OLD", accession=""),
                      merge=("NEWER", "OLD"))
    assert state.merged_patient_id("OLD") in ("OLD", "NEW", "NEWER")  # terminates


def test_purge_keeps_unhandled_messages_and_the_orders(state: State) -> None:
    handled, pending = _store(state, control="C1"), _store(state, control="C2")
    state.hl7_handled(handled, "ok", _order())
    assert state.purge_hl7_messages(before=0.0) == 0
    assert state.purge_hl7_messages(before=time.time() + 1) == 1
    assert [r["id"] for r in state.hl7_messages()] == [pending]
    assert state.latest_hl7_order(accession="ACC1") is not None
