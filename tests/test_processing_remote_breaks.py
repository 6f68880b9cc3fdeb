"""Remote processing steps (issue 29, item 1) under the timings that broke them, with real
peers (DCMTK storescu as the modality CT1, storescp as the PACS and as CT1's own SCP, the
pynetdicom + highdicom AI node of tests/ai_node.py):

* a fast node answers while the router is still sending it the study (a ``max_rate`` slows
  the send so the result's study completes before the send is recorded as finished);
* a node answers in two associations seconds apart, the second after the step finished (a
  ``fallback`` route to the PACS would take the pseudonymized second result, if the routing
  table ever saw it);
* the router is stopped twice while the step waits, with ``max_attempts: 2`` (a stop is not a
  failed attempt: the job must not be dead-lettered, and the study is not sent again)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from ai_node import AiNode, segment, store_back
from peers import StoreSCP, free_port, run_storescu, sop_uids, wait_until
from pydicom import dcmread
from router_fixtures import Router, dicomrouter
from test_processing_remote import _check_seg_back
from test_web import TOKEN, http

from dicomrouter.sample import generate

SECRET = "s" * 40
KEY = "k" * 40


@pytest.fixture(autouse=True)
def _keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEID_SECRET", SECRET)
    monkeypatch.setenv("PSEUDONYM_KEY", KEY)
    monkeypatch.setenv("ROUTER_WEB_TOKEN", TOKEN)


def _study(tmp_path: Path, seed: int, **kw: Any) -> tuple[list[Path], str]:
    opts = {"series": 2, "instances": 2, "rows": 16, "cols": 16, **kw}
    files = generate(tmp_path / "in", studies=1, patient_id="REMOTE1", seed=seed, **opts)
    return files, str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _config(pacs: StoreSCP, sender: StoreSCP, node: AiNode, timeout: str = "90s",
            max_attempts: int = 5, **ai: Any) -> dict[str, Any]:
    return {
        "destinations": {
            "pacs": {"type": "dicom", "ae_title": pacs.aet, "host": "127.0.0.1",
                     "port": pacs.port},
            "ainode": {"type": "dicom", "ae_title": node.aet, "host": "127.0.0.1",
                       "port": node.port, **ai}},
        "known_aes": {"CT1": {"host": "127.0.0.1", "port": sender.port}},
        "retry": {"initial": "1s", "max_delay": "2s", "max_attempts": max_attempts},
        "routes": [
            {"name": "archive", "when": {"CallingAE": "CT1"}, "to": ["pacs"]},
            {"name": "ai", "when": {"CallingAE": "CT1"},
             "transforms": [{"deidentify": {"reversible": True}}],
             "process": [{"name": "segment", "remote": {"destination": "ainode"},
                          "timeout": timeout}],
             "results": ["return_to_sender", "pacs"]},
            # what no route takes goes to the PACS as it is: a pseudonymized result the
            # routing table saw would land there
            {"name": "the rest", "fallback": True, "to": ["pacs"]}]}


def _status(router: Router, study: str) -> dict[str, Any]:
    r = dicomrouter("status", "--json", "--study", study, "--config", str(router.config_path))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _history(router: Router, study: str) -> list[str]:
    return [event for _ts, event in _status(router, study)["history"]]


def _identified_only(pacs: StoreSCP, study: str) -> None:
    """Nothing pseudonymized at the PACS: every instance in the original study and patient."""
    for ds in (dcmread(p, stop_before_pixels=True) for p in pacs.files()):
        assert ds.StudyInstanceUID == study and ds.PatientID == "REMOTE1", \
            (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.PatientID)


def test_a_result_that_arrives_while_the_study_is_still_being_sent_is_taken(
        tmp_path: Path, pacs_and_sender: Any) -> None:
    """The node answers after the first instance; the router needs ~5 s more per instance
    (1kB/s), so the result's study completes while the step's await is still 'sending'."""
    pacs, sender = pacs_and_sender
    files, study = _study(tmp_path, 2941, series=1, instances=3, rows=48, cols=48)
    router = Router(tmp_path / "router", {})
    with AiNode(tmp_path / "ai", router.port, router.aet, answer="never") as ai:
        router.config.update(_config(pacs, sender, ai, timeout="40s", max_rate="1kB/s"))
        with router:
            assert run_storescu(files, router.port, aet=router.aet,
                                calling="CT1").returncode == 0
            wait_until(lambda: len(ai.received) >= 1, timeout=120,
                       what="the first instance at the AI node")
            ai.send_results()  # the node is fast: it answers before the rest arrived
            wait_until(lambda: any("taken for study" in h for h in _history(router, study)),
                       timeout=60, what="the result taken")
            wait_until(lambda: len(sender.files()) >= 1, timeout=60, what="the SEG at CT1")
            router.wait_state(study, "delivered", timeout=60)
            history = _history(router, study)
            log = router.log(5000)
    taken = next(i for i, h in enumerate(history) if "taken for study" in h)
    waiting = next(i for i, h in enumerate(history) if "waiting: sent 3 instance(s)" in h)
    assert taken < waiting, history  # the race this test is about did happen
    assert "while the study was still being sent" in history[taken]
    assert len(ai.received) == len(files)  # sent once
    (seg_back,) = sender.files()
    _check_seg_back(seg_back, files)
    assert any("'segment' (ai) done: 1 result instance(s) from ainode" in h
               for h in history), history
    wait_until(lambda: len(pacs.files()) >= len(files) + 1, timeout=60, what="the PACS")
    _identified_only(pacs, study)
    assert "Traceback" not in log


@pytest.mark.parametrize(("pseudonymized", "backend"), [
    (True, "sqlite"), (False, "sqlite"), (True, "postgresql")])
def test_a_second_result_seconds_after_the_first_follows_it_and_never_leaks(
        tmp_path: Path, pacs_and_sender: Any, pseudonymized: bool, backend: str,
        request: pytest.FixtureRequest) -> None:
    """Two results in two associations: the step finishes with the first one; the second,
    a generation of its own in the pseudonymized study, is still the step's result (its
    deadline has not passed): re-identified, routed by results:, never by the table."""
    pacs, sender = pacs_and_sender
    files, study = _study(tmp_path, 2942)
    router = Router(tmp_path / "router", {})
    with AiNode(tmp_path / "ai", router.port, router.aet, answer="never") as ai:
        cfg = _config(pacs, sender, ai)
        if not pseudonymized:  # the results come in the original study itself
            del cfg["routes"][1]["transforms"]
        if backend == "postgresql":  # the awaits and claims in PostgreSQL
            dsn = tmp_path / "state.dsn"
            dsn.write_text(request.getfixturevalue("pg_dsn") + "\n")
            cfg["state"] = {"type": "postgresql", "dsn_file": str(dsn)}
        router.config.update(cfg)
        with router:
            assert run_storescu(files, router.port, aet=router.aet,
                                calling="CT1").returncode == 0
            wait_until(lambda: any("waiting: sent 4" in h for h in _history(router, study)),
                       timeout=120, what="the study sent to the AI node")
            first = ai.send_results()
            wait_until(lambda: len(sender.files()) >= 1, timeout=120, what="the SEG at CT1")
            router.wait_state(study, "delivered", timeout=60)
            second = segment(ai.received)  # another finding, in a second association
            store_back(second, router.port, router.aet)
            wait_until(lambda: len(sender.files()) >= 2, timeout=120,
                       what="the second SEG at CT1")
            wait_until(lambda: len(pacs.files()) >= len(files) + 2, timeout=60,
                       what="the originals and both SEGs at the PACS")
            router.wait_state(study, "delivered", timeout=60)
            history = _history(router, study)
            log = router.log(5000)
    back = {str(dcmread(p).SOPInstanceUID): p for p in sender.files()}
    assert set(back) == {str(first.SOPInstanceUID), str(second.SOPInstanceUID)}
    for path in back.values():
        _check_seg_back(path, files)
    assert sop_uids(pacs.files()) == sop_uids(files) | set(back)
    _identified_only(pacs, study)
    assert len(ai.received) == len(files)  # the step did not run again
    assert any("after the step finished: late results" in h for h in history), history
    assert any("1 late result instance(s) of step 'segment' ingested" in h
               for h in history), history
    assert "Traceback" not in log


def test_stopping_the_router_while_the_step_waits_is_not_a_failed_attempt(
        tmp_path: Path, pacs_and_sender: Any) -> None:
    pacs, sender = pacs_and_sender
    files, study = _study(tmp_path, 2943)
    router = Router(tmp_path / "router", {})
    with AiNode(tmp_path / "ai", router.port, router.aet, answer="never") as ai:
        router.config.update(_config(pacs, sender, ai, max_attempts=2))
        web = free_port()
        router.config["web"] = {"port": web, "token_env": "ROUTER_WEB_TOKEN"}
        router.start()
        try:
            assert run_storescu(files, router.port, aet=router.aet,
                                calling="CT1").returncode == 0
            wait_until(lambda: any("waiting: sent 4" in h for h in _history(router, study)),
                       timeout=120, what="the study sent to the AI node")
            for n in (1, 2):  # max_attempts times: a counted stop would dead-letter the job
                router.stop()
                router.start()
                wait_until(lambda n=n: router.log(100000).count(
                    "still waiting for results from ainode") >= n, timeout=120,
                    what=f"the step waiting again after restart {n}")
            job = next(j for j in _status(router, study)["jobs"]
                       if j["destination"] == "process:ai")
            assert job["attempts"] == 0 and job["state"] in ("pending", "running"), job
            # shown waiting (not 'running') after the restart: status --study and the page
            steps = [(s["route"], s["name"], s["kind"], s["state"])
                     for s in _status(router, study)["processing"]]
            assert steps == [("ai", "segment", "remote", "waiting")], steps
            text = dicomrouter("status", "--study", study, "--config",
                               str(router.config_path)).stdout
            assert "ai / segment (remote): waiting — still, for results from ainode" in text
            (row,) = http(f"http://127.0.0.1:{web}/api/processing")[1]["studies"]
            assert [(s["kind"], s["state"]) for s in row["steps"]] == [("remote", "waiting")]
            ai.send_results()
            wait_until(lambda: len(sender.files()) >= 1, timeout=120, what="the SEG at CT1")
            router.wait_state(study, "delivered", timeout=60)
            log = router.log(100000)
        finally:
            router.stop()
    assert len(ai.received) == len(files)  # never sent again
    _check_seg_back(sender.files()[0], files)
    assert "interrupted by shutdown" in log
    assert "dead-lettered" not in log and "Traceback" not in log


def test_two_studies_at_the_node_at_once_get_each_their_own_result(
        tmp_path: Path, pacs_and_sender: Any) -> None:
    """Two patients' studies wait at the same node at the same time; the node answers the
    second first. Each SEG goes back into its own original study, with its own patient.
    The step waits up to 10 minutes: the second study reaches the node while the first
    waits (with one study at a time it would only go once the first step timed out)."""
    pacs, sender = pacs_and_sender
    a_files, a_study = _study(tmp_path / "a", 2944)
    b_files = generate(tmp_path / "b", studies=1, series=1, instances=3, rows=16, cols=16,
                       patient_id="REMOTE2", seed=2945)
    b_study = str(dcmread(b_files[0], stop_before_pixels=True).StudyInstanceUID)
    router = Router(tmp_path / "router", {})
    with AiNode(tmp_path / "ai", router.port, router.aet, answer="never") as ai:
        router.config.update(_config(pacs, sender, ai, timeout="10m"))
        with router:
            for files in (a_files, b_files):
                assert run_storescu(files, router.port, aet=router.aet,
                                    calling="CT1").returncode == 0
            wait_until(lambda: len(ai.received) >= len(a_files) + len(b_files), timeout=120,
                       what="both studies at the AI node, each step waiting")
            by_study: dict[str, list[Any]] = {}
            for ds in ai.received:
                by_study.setdefault(str(ds.StudyInstanceUID), []).append(ds)
            assert len(by_study) == 2
            segs = [segment(got) for got in sorted(by_study.values(), key=len, reverse=True)]
            for seg in segs:  # b's (3 instances) first
                store_back(seg, router.port, router.aet)
            wait_until(lambda: len(sender.files()) >= 2, timeout=120, what="both SEGs at CT1")
            router.wait_state(a_study, "delivered", timeout=60)
            router.wait_state(b_study, "delivered", timeout=60)
    back = {str(dcmread(p).StudyInstanceUID): p for p in sender.files()}
    assert set(back) == {a_study, b_study}
    _check_seg_back(back[a_study], a_files)
    _check_seg_back(back[b_study], b_files)
    wait_until(lambda: len(pacs.files()) >= len(a_files) + len(b_files) + 2, timeout=60,
               what="the PACS")
    for ds in (dcmread(p, stop_before_pixels=True) for p in pacs.files()):
        assert (str(ds.StudyInstanceUID), str(ds.PatientID)) in {
            (a_study, "REMOTE1"), (b_study, "REMOTE2")}


def test_a_remote_step_then_a_command_step(tmp_path: Path, pacs_and_sender: Any) -> None:
    """``process: [remote, command]``: the node's SEG (pseudonymized) is the command's input;
    only the command's SR is a result, and it comes back re-identified."""
    from test_processing_remote import SR_PROGRAM

    pacs, sender = pacs_and_sender
    files, study = _study(tmp_path, 2946)
    program = tmp_path / "sr.py"
    program.write_text(SR_PROGRAM)
    router = Router(tmp_path / "router", {})
    with AiNode(tmp_path / "ai", router.port, router.aet) as ai:
        cfg = _config(pacs, sender, ai)
        cfg["routes"][1]["process"].append({"name": "report", "command": [
            sys.executable, str(program), "{input}", "{output}"], "timeout": "60s"})
        router.config.update(cfg)
        with router:
            assert run_storescu(files, router.port, aet=router.aet,
                                calling="CT1").returncode == 0
            wait_until(lambda: len(sender.files()) >= 1, timeout=120, what="the SR at CT1")
            router.wait_state(study, "delivered", timeout=60)
            wait_until(lambda: len(pacs.files()) >= len(files) + 1, timeout=60,
                       what="the PACS")
            history = _history(router, study)
    (sr_file,) = sender.files()
    sr = dcmread(sr_file)
    assert sr.Modality == "SR" and sr.StudyInstanceUID == study and sr.PatientID == "REMOTE1"
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == study
    assert {str(i.ReferencedSOPInstanceUID) for s in evidence.ReferencedSeriesSequence
            for i in s.ReferencedSOPSequence} == {str(ai.sent[0].SOPInstanceUID)}
    assert sop_uids(pacs.files()) == sop_uids(files) | {str(sr.SOPInstanceUID)}
    _identified_only(pacs, study)
    assert any("'report' (ai) done: exit code 0" in h for h in history), history


def test_match_referenced_by_a_series_only(tmp_path: Path, pacs_and_sender: Any) -> None:
    """A result in a study of its own whose only link to what was sent is a referenced
    series (no study reference): taken, and put into the original study."""
    pacs, sender = pacs_and_sender
    files, study = _study(tmp_path, 2947)
    router = Router(tmp_path / "router", {})
    with AiNode(tmp_path / "ai", router.port, router.aet, answer="never") as ai:
        cfg = _config(pacs, sender, ai)
        cfg["routes"][1]["process"][0]["remote"]["match"] = "referenced"
        router.config.update(cfg)
        with router:
            assert run_storescu(files, router.port, aet=router.aet,
                                calling="CT1").returncode == 0
            wait_until(lambda: len(ai.received) >= len(files), timeout=120,
                       what="the study at the AI node")
            sent = str(ai.received[0].StudyInstanceUID)  # (segment() may share elements)
            seg = segment(ai.received, new_study=True)
            del seg.ReferencedStudySequence  # the sent study named nowhere in it
            assert sent not in str(seg)
            store_back(seg, router.port, router.aet)
            wait_until(lambda: len(sender.files()) >= 1, timeout=120, what="the SEG at CT1")
            router.wait_state(study, "delivered", timeout=60)
    back = dcmread(sender.files()[0])
    assert back.SOPInstanceUID == seg.SOPInstanceUID
    assert back.StudyInstanceUID == study and back.PatientID == "REMOTE1"
    originals = {str(dcmread(f).SeriesInstanceUID) for f in files}
    assert {str(i.SeriesInstanceUID) for i in back.ReferencedSeriesSequence} <= originals
    wait_until(lambda: len(pacs.files()) >= len(files) + 1, timeout=60, what="the PACS")
    _identified_only(pacs, study)


def test_the_modality_sending_the_study_again_while_the_step_waits(
        tmp_path: Path, pacs_and_sender: Any) -> None:
    """CT1 sends the same study again while the node works on it: not a result (its own
    sender), not sent to the node a second time (identical content), one SEG back."""
    pacs, sender = pacs_and_sender
    files, study = _study(tmp_path, 2948)
    router = Router(tmp_path / "router", {})
    with AiNode(tmp_path / "ai", router.port, router.aet, answer="never") as ai:
        router.config.update(_config(pacs, sender, ai))
        with router:
            assert run_storescu(files, router.port, aet=router.aet,
                                calling="CT1").returncode == 0
            wait_until(lambda: any("waiting: sent 4" in h for h in _history(router, study)),
                       timeout=120, what="the study sent to the AI node")
            assert run_storescu(files, router.port, aet=router.aet,
                                calling="CT1").returncode == 0
            wait_until(lambda: _status(router, study)["study"]["generation"] >= 2,
                       timeout=60, what="the second reception completed")
            ai.send_results()
            wait_until(lambda: len(sender.files()) >= 1, timeout=120, what="the SEG at CT1")
            wait_until(lambda: len(ai.received) > len(files) or
                       router.study_state(study) == "delivered", timeout=90,
                       what="the study delivered (or sent to the node again)")
            history = _history(router, study)
            log = router.log(5000)
    assert len(ai.received) == len(files), "\n".join(history)
    (seg_back,) = sender.files()
    _check_seg_back(seg_back, files)
    assert sop_uids(pacs.files()) == sop_uids(files) | {str(dcmread(seg_back).SOPInstanceUID)}
    assert not any("taken for study" in h and "from CT1" in h for h in history), history
    assert "Traceback" not in log
