"""The state's part of remote processing steps (issue 29, item 1) and the claim of results, on
SQLite and a real PostgreSQL: the await survives a reopen, a claim tags exactly the matching
instances and marks their study routed in one transaction (not when an instance arrived since),
late results still count after a timeout, a re-open forgets earlier results, purge forgets the
awaits; and ``RemoteClaims`` refuses what is not a result (the study's own sender, an echo of
what was sent, another AE than ``results_from``, an unrelated study)."""

from __future__ import annotations

import io
import time

from dicomrouter.processing.remote import LATER, PART, REMOTE_TAG, TAKEN, RemoteClaims
from dicomrouter.processing.results import RESULT_TAG, is_result
from dicomrouter.state import State

EXPLICIT = "1.2.840.10008.1.2.1"
ORIGIN = "1.29.7"
SENT = "2.25.77"  # the pseudonymized study that went to the node


def _record(state: State, study: str, sop: str, calling: str) -> None:
    state.record_instance({"StudyInstanceUID": study, "SeriesInstanceUID": f"{study}.1",
                           "SOPInstanceUID": sop, "SOPClassUID": "1.2.840.10008.5.1.4.1.1.66.4",
                           "PatientID": "P"}, EXPLICIT, f"data/{study}/{sop}.dcm", 100,
                          calling, "ROUTER")


def _nothing(inst: object) -> io.BytesIO:
    return io.BytesIO(b"")  # match: study never reads the file


def _open(state: State, sent: str = SENT, results_from: tuple[str, ...] = ()) -> None:
    state.remote_await_open(ORIGIN, "ai", "segment", {
        "destination": "ainode", "match": "study", "results_from": list(results_from),
        "sent_study": sent, "sent_series": [f"{sent}.1"], "sent_sops": [f"{sent}.1.1"],
        "origin_ae": "CT1"})
    state.remote_await_sent(ORIGIN, "ai", "segment", 100.0, 1e12, "sent 1 instance")


def test_a_claim_takes_the_results_and_routes_their_study_without_a_job(state: State) -> None:
    _open(state)
    assert [r["state"] for r in state.remote_awaits_open()] == ["waiting"]
    _record(state, SENT, f"{SENT}.9.1", "AINODE")
    _record(state, SENT, f"{SENT}.1.1", "AINODE")  # the node echoing what it got
    claims = RemoteClaims(state, open_instance=_nothing)
    seen = state.study(SENT)
    assert claims.claim(SENT, seen, state.instances(SENT)) == PART  # the echo is not taken
    row = state.remote_await(ORIGIN, "ai", "segment")
    assert row is not None and row["results"] == [[SENT, f"{SENT}.9.1"]]
    by_sop = {i.sop_uid: i for i in state.instances(SENT)}
    assert is_result(by_sop[f"{SENT}.9.1"]) and not is_result(by_sop[f"{SENT}.1.1"])
    assert by_sop[f"{SENT}.9.1"].tags[REMOTE_TAG] == ORIGIN
    assert by_sop[f"{SENT}.9.1"].tags[RESULT_TAG] == "ai"
    assert state.study(SENT).state == "receiving"  # PART: the table routes the rest
    assert any("taken for study " + ORIGIN in e for _t, e in state.history(ORIGIN))


def test_a_whole_generation_of_results_is_taken(state: State) -> None:
    _open(state)
    _record(state, SENT, f"{SENT}.9.1", "AINODE")
    _record(state, SENT, f"{SENT}.9.2", "AINODE")
    claims = RemoteClaims(state, open_instance=_nothing)
    seen = state.study(SENT)
    _record(state, SENT, f"{SENT}.9.3", "AINODE")  # arrives after the look: later
    assert claims.claim(SENT, seen, state.instances(SENT)) == LATER
    assert state.remote_await(ORIGIN, "ai", "segment")["results"] == []
    seen = state.study(SENT)
    assert claims.claim(SENT, seen, state.instances(SENT)) == TAKEN
    assert state.study(SENT).state == "routed"
    assert state.jobs(study_uids=[SENT]) == []
    assert len(state.remote_await(ORIGIN, "ai", "segment")["results"]) == 3
    # a second look at the same generation takes nothing more
    assert claims.claim(SENT, state.study(SENT), state.instances(SENT)) == ""


def test_what_is_not_a_result_is_left_to_the_routing_table(state: State) -> None:
    _open(state, sent=ORIGIN, results_from=("AINODE",))
    _record(state, ORIGIN, f"{ORIGIN}.1.5", "CT1")  # the modality sending more of the study
    _record(state, ORIGIN, f"{ORIGIN}.9.1", "OTHER")  # not in results_from
    claims = RemoteClaims(state, open_instance=_nothing)
    assert claims.claim(ORIGIN, state.study(ORIGIN), state.instances(ORIGIN)) == ""
    _record(state, "9.9.9", "9.9.9.1", "AINODE")  # an unrelated study (match: study)
    assert claims.claim("9.9.9", state.study("9.9.9"), state.instances("9.9.9")) == ""
    assert not any(is_result(i) for i in state.instances(ORIGIN))


def test_late_results_count_and_a_reopen_or_purge_forgets(state: State) -> None:
    _open(state)
    state.remote_await_expire(ORIGIN, "ai", "segment", "no result within its timeout")
    assert [r["state"] for r in state.remote_awaits_open()] == ["expired"]
    _record(state, SENT, f"{SENT}.9.1", "AINODE")
    claims = RemoteClaims(state, open_instance=_nothing)
    assert claims.claim(SENT, state.study(SENT), state.instances(SENT)) == TAKEN
    row = state.remote_await(ORIGIN, "ai", "segment")
    assert row["state"] == "expired" and row["results"] == [[SENT, f"{SENT}.9.1"]]
    _open(state)  # a new send: its own results only
    assert state.remote_await(ORIGIN, "ai", "segment")["results"] == []
    state.remote_await_done(ORIGIN, "ai")
    assert state.remote_await(ORIGIN, "ai", "segment")["state"] == "done"
    _open(state)
    _record(state, ORIGIN, f"{ORIGIN}.1.1", "CT1")
    state.purge(ORIGIN)
    assert state.remote_await(ORIGIN, "ai", "segment") is None


def test_results_are_claimed_while_sending_and_after_done_until_the_deadline(
        state: State) -> None:
    """A fast node answers before the send is recorded (the row is still 'sending'); a node
    answering in two associations has its second result come after the chain finished
    ('done'): both are the step's results, the latter only until the step's deadline."""
    state.remote_await_open(ORIGIN, "ai", "segment", {
        "destination": "ainode", "match": "study", "results_from": [], "sent_study": SENT,
        "sent_series": [f"{SENT}.1"], "sent_sops": [f"{SENT}.1.1"], "origin_ae": "CT1"})
    assert [r["state"] for r in state.remote_awaits_open()] == ["sending"]
    _record(state, SENT, f"{SENT}.9.1", "AINODE")
    late: list[tuple[str, list[str]]] = []
    claims = RemoteClaims(state, _nothing, lambda row, study, insts: late.append(
        (row["state"], [i.sop_uid for i in insts])))
    assert claims.claim(SENT, state.study(SENT), state.instances(SENT)) == TAKEN
    deadline = time.time() + 1000
    state.remote_await_sent(ORIGIN, "ai", "segment", 100.0, deadline, "sent 1 instance")
    assert state.remote_await(ORIGIN, "ai", "segment")["results"] == [[SENT, f"{SENT}.9.1"]]
    assert late == []  # taken by the step itself
    state.remote_await_done(ORIGIN, "ai")
    assert [r["state"] for r in state.remote_awaits_open(now=deadline - 1)] == ["done"]
    assert state.remote_awaits_open(now=deadline + 1) == []  # past its deadline: forgotten
    other = "1.29.8"  # an unfinished step of another study is asked first
    state.remote_await_open(other, "ai", "segment", {
        "destination": "ainode", "match": "study", "results_from": [], "sent_study": "2.25.78",
        "sent_series": [], "sent_sops": [], "origin_ae": "CT1"})
    assert [r["origin_uid"] for r in state.remote_awaits_open(now=deadline - 1)] == \
        [other, ORIGIN]
    _record(state, SENT, f"{SENT}.9.2", "AINODE")  # the second association
    assert claims.claim(SENT, state.study(SENT), state.instances(SENT)) == TAKEN
    assert late == [("done", [f"{SENT}.9.2"])]
    # a done await past its deadline is deleted when another chain finishes
    state.remote_await_sent(ORIGIN, "ai", "segment", 100.0, time.time() - 1, "sent again")
    state.remote_await_done(ORIGIN, "ai")
    assert state.remote_await(ORIGIN, "ai", "segment") is None
    assert state.remote_await(other, "ai", "segment") is not None  # in flight: kept
