"""The state's part of corrections following the ledger (issue 29, item 5), on SQLite and a
real PostgreSQL: a rejection note rejects instances in the ledger (never undelivered again),
cancels their due sends and may go only where one of them was delivered; a re-received
instance keeps which destinations had its earlier version."""

from __future__ import annotations

from dicomrouter.state import State

CT = "1.2.840.10008.5.1.4.1.1.2"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"
EXPLICIT = "1.2.840.10008.1.2.1"
STUDY = "1.29.5"


def _record(state: State, sop: str, sop_class: str = CT, series: str = "1.29.5.1") -> None:
    state.record_instance({"StudyInstanceUID": STUDY, "SeriesInstanceUID": series,
                           "SOPInstanceUID": sop, "SOPClassUID": sop_class, "PatientID": "P",
                           "Modality": "CT"}, EXPLICIT, f"data/{STUDY}/{sop}.dcm", 100, "MOD",
                          "ROUTER")


def _route(state: State, dests: list[str]) -> None:
    seen = state.study(STUDY)
    assert seen is not None
    assert state.route_study(STUDY, dests, ["all"], seen)


def _deliver(state: State, dest: str, sops: list[str]) -> None:
    for sop in sops:
        state.mark_sending(sop, dest, STUDY)
    state.mark_delivered(sops, dest, {s: f"crc32:{s[-1]}" for s in sops})


def _undelivered(state: State, dest: str) -> list[str]:
    return [i.sop_uid for i in state.undelivered(STUDY, dest)]


def test_a_rejection_note_in_the_ledger(state: State) -> None:
    images = [f"{STUDY}.1.{i}" for i in range(1, 5)]
    for sop in images:
        _record(state, sop)
    _route(state, ["pacs", "cold"])
    _deliver(state, "pacs", images)  # cold is down: nothing delivered there
    note = f"{STUDY}.9.1"
    _record(state, note, KOS, series=f"{STUDY}.9")
    assert [i.sop_uid for i in state.unexamined_notes(KOS)] == [note]
    assert _undelivered(state, "pacs") == []  # not before it was examined
    inst = state.instance(note)
    assert inst is not None
    done = state.reject_instances(inst, "113001", "Rejected for Quality Reasons",
                                  [images[0], images[1], "1.2.3.never.received"])
    assert done["rejected"] == 2 and done["to"] == {"pacs": 2} and \
        done["cancelled"] == {"cold": 2}
    assert done["text"] == (f"rejection note {note} (113001 Rejected for Quality Reasons): 2 "
                            "instance(s) → pacs; 2 pending send(s) to cold cancelled (1 "
                            "referenced instance(s) not held here)")
    assert state.unexamined_notes(KOS) == []
    again = state.reject_instances(inst, "113001", "Rejected for Quality Reasons", images)
    assert again["text"] == "" and again["rejected"] == 0  # examined once (several nodes)
    assert state.rejected_uids(STUDY) == set(images[:2])
    # cold never gets a rejected instance nor the note; pacs gets the note; a destination
    # routed later gets the rest only
    assert _undelivered(state, "cold") == images[2:]
    assert _undelivered(state, "pacs") == [note]
    assert _undelivered(state, "late") == images[2:]
    assert state.directed_instances(STUDY, 2) == {"pacs": [f"{STUDY}.9"]}
    assert any(done["text"] == text for _ts, text in state.history(STUDY))


def test_a_key_object_that_is_no_rejection_note_is_an_ordinary_instance(state: State) -> None:
    _record(state, f"{STUDY}.1.1")
    _record(state, f"{STUDY}.9.1", KOS, series=f"{STUDY}.9")
    assert _undelivered(state, "pacs") == [f"{STUDY}.1.1"]
    state.note_examined(f"{STUDY}.9.1")
    assert state.unexamined_notes(KOS) == []
    assert sorted(_undelivered(state, "pacs")) == [f"{STUDY}.1.1", f"{STUDY}.9.1"]


def test_a_re_received_instance_remembers_who_had_the_old_version(state: State) -> None:
    images = [f"{STUDY}.1.{i}" for i in range(1, 4)]
    for sop in images:
        _record(state, sop)
    _route(state, ["pacs", "archive", "cold"])
    _deliver(state, "pacs", images)
    _deliver(state, "archive", images[:2])
    _record(state, images[1])  # sent again: generation 2
    assert state.replaced_deliveries(STUDY, 2) == {
        images[1]: {"pacs": "crc32:2", "archive": "crc32:2"}}
    assert _undelivered(state, "pacs") == [images[1]]
    # archive is no longer routed: it gets a job for that series only
    state.send_also(STUDY, {"archive": [f"{STUDY}.1"]}, "corrections: also to archive")
    jobs = {j["destination"]: j for j in state.jobs(study_uids=[STUDY])}
    assert jobs["archive"]["state"] == "pending"
    _deliver(state, "pacs", [images[1]])
    _deliver(state, "archive", [images[1]])
    assert state.replaced_deliveries(STUDY, 2) == {}
