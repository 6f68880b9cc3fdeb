"""The state's part of processing results (issue 29, items 1 and 2), on SQLite and a real
PostgreSQL: a generation of results gives each target a job limited to the result series (the
sender never gets the originals), a delivered job takes only the results, a job still owing
the whole study keeps owing it, and the result tags stay in the index."""

from __future__ import annotations

from dicomrouter.state import State

CT = "1.2.840.10008.5.1.4.1.1.2"
SR = "1.2.840.10008.5.1.4.1.1.88.11"
EXPLICIT = "1.2.840.10008.1.2.1"
STUDY = "1.29.1"


def _record(state: State, sop: str, series: str, sop_class: str = CT,
            **tags: str) -> None:
    state.record_instance({"StudyInstanceUID": STUDY, "SeriesInstanceUID": series,
                           "SOPInstanceUID": sop, "SOPClassUID": sop_class, "PatientID": "P",
                           **tags}, EXPLICIT, f"data/{STUDY}/{sop}.dcm", 100, "CT1", "ROUTER")


def _deliver(state: State, dest: str, sops: list[str]) -> None:
    job = state.claim_job(dest)
    assert job is not None
    for sop in sops:
        state.mark_sending(sop, dest, STUDY)
    state.mark_delivered(sops, dest, {s: f"crc32:{s[-1]}" for s in sops})
    state.finish_job(job, None, 5, 1.0)


def test_results_go_as_their_series_only(state: State) -> None:
    images = [f"{STUDY}.1.{i}" for i in (1, 2, 3)]
    for sop in images:
        _record(state, sop, f"{STUDY}.1")
    seen = state.study(STUDY)
    assert seen is not None
    assert state.route_study(STUDY, ["pacs", "slow", "process:ai"], ["ai"], seen)
    _deliver(state, "pacs", images)
    _deliver(state, "process:ai", images)
    _record(state, f"{STUDY}.9.1", f"{STUDY}.9", SR, Modality="SR", _ResultOf="ai",
            _ResultRoute="")
    seen = state.study(STUDY)
    assert seen is not None and seen.generation == 2
    (result,) = [i for i in state.instances(STUDY) if i.generation == 2]
    assert result.tags["_ResultOf"] == "ai"  # the link to the route, in the index
    plan = {"return:CT1": [f"{STUDY}.9"], "pacs": [f"{STUDY}.9"], "slow": [f"{STUDY}.9"]}
    assert state.route_results(STUDY, seen, plan, "processing results: 1 result(s)")
    assert not state.route_results(STUDY, seen, plan, "again")  # routed once
    for dest in ("return:CT1", "pacs"):  # each run takes the result series only
        job = state.claim_job(dest)
        assert job is not None and job.series_only == (f"{STUDY}.9",), dest
        assert [i.sop_uid for i in state.undelivered(STUDY, dest)
                if i.series_uid in job.series_only] == [f"{STUDY}.9.1"]
    # slow still owes the whole study: the result comes with it
    job = state.claim_job("slow")
    assert job is not None and job.series_only is None
    assert len(state.undelivered(STUDY, "slow")) == 4
    assert state.claim_job("process:ai") is None  # never back into the step
    study = state.study(STUDY)
    assert study is not None and study.state == "routed"
    assert any("processing results: 1 result(s)" in e for _t, e in state.history(STUDY))


def test_results_after_the_spool_was_emptied_are_not_a_partial_delivery(state: State) -> None:
    """The originals were delivered and deleted from the spool before the results came back:
    a destination that takes the results only (``series_only``) lacks nothing, and is not
    reported partial; one that the results made owe the whole study is."""
    images = [f"{STUDY}.1.{i}" for i in (1, 2, 3)]
    for sop in images:
        _record(state, sop, f"{STUDY}.1")
    seen = state.study(STUDY)
    assert seen is not None
    assert state.route_study(STUDY, ["pacs", "process:ai"], ["ai"], seen)
    _deliver(state, "pacs", images)
    _deliver(state, "process:ai", images)
    assert state.settle_study(STUDY)
    state.forget_spool(STUDY, "delivered")
    _record(state, f"{STUDY}.9.1", f"{STUDY}.9", SR, Modality="SR", _ResultOf="ai",
            _ResultRoute="")
    seen = state.study(STUDY)
    assert seen is not None and seen.generation == 2
    assert state.route_results(STUDY, seen, {"return:CT1": [f"{STUDY}.9"],
                                             "pacs": [f"{STUDY}.9"]}, "processing results")
    assert state.partial_jobs(STUDY) == []
    for dest in ("return:CT1", "pacs"):
        _deliver(state, dest, [f"{STUDY}.9.1"])
    assert state.settle_study(STUDY)
    assert state.partial_jobs(STUDY) == []
    assert state.history(STUDY)[-1][1] == "delivered to every destination"
    assert {j["destination"]: (j["missing"], j["partial"])
            for j in state.jobs(study_uids=[STUDY])} == {
        "pacs": (0, False), "process:ai": (0, False), "return:CT1": (0, False)}
