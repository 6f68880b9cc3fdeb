"""Remote processing steps end to end (issue 29, item 1: ``remote``), with real peers: DCMTK
storescu as the modality (CT1, in ``known_aes``), DCMTK storescp as the PACS and as CT1's own
SCP, an AI node that receives the study with pynetdicom, segments it with highdicom and sends
the SEG back with C-STORE (tests/ai_node.py), and Orthanc with its DICOMweb plugin as an AI
node reached over STOW-RS.

What breaks it on purpose: the route pseudonymizes reversibly (the node must see no patient
data, the PACS nothing pseudonymized, the sender its SEG inside the original study with the
original identifiers); the router is killed while the step waits (the node must not get the
study twice, the SEG must arrive once); the node does not answer in time (the step fails, the
next attempt sends again); the node answers in a study of its own (``match: referenced``)."""

from __future__ import annotations

import io
import json
import os
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from ai_node import AI_AE, AiNode, referenced_sops, segment, store_back
from peers import StoreSCP, run_storescu, sop_uids, wait_until
from pydicom import dcmread
from router_fixtures import Router, dicomrouter

from dicomrouter.sample import generate

SECRET = "s" * 40
KEY = "k" * 40
RETRY = {"initial": "1s", "max_delay": "2s", "max_attempts": 5}


@pytest.fixture(autouse=True)
def _keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEID_SECRET", SECRET)
    monkeypatch.setenv("PSEUDONYM_KEY", KEY)


def _study(tmp_path: Path, seed: int = 2931) -> tuple[list[Path], str]:
    files = generate(tmp_path / "in", studies=1, series=2, instances=2, rows=16, cols=16,
                     patient_id="REMOTE1", seed=seed)
    return files, str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _history(router: Router, study: str) -> list[str]:
    r = dicomrouter("status", "--json", "--study", study, "--config", str(router.config_path))
    assert r.returncode == 0, r.stderr
    return [event for _ts, event in json.loads(r.stdout)["history"]]


def _config(pacs: StoreSCP, sender: StoreSCP, ai: dict[str, Any], step: dict[str, Any],
            reversible: bool = True, **route: Any) -> dict[str, Any]:
    step = dict(step)
    timeout = step.pop("timeout", "90s")
    return {
        "destinations": {"pacs": {"type": "dicom", "ae_title": pacs.aet, "host": "127.0.0.1",
                                  "port": pacs.port},
                         "ainode": ai},
        "known_aes": {"CT1": {"host": "127.0.0.1", "port": sender.port}},
        "retry": RETRY,
        "routes": [
            {"name": "archive", "when": {"CallingAE": "CT1"}, "to": ["pacs"]},
            {"name": "ai", "when": {"CallingAE": "CT1"},
             **({"transforms": [{"deidentify": {"reversible": True}}]} if reversible else {}),
             "process": [{"name": "segment", "remote": {"destination": "ainode", **step},
                          "timeout": timeout}],
             "results": ["return_to_sender", "pacs"], **route}]}


def _dicom_ai(node: AiNode) -> dict[str, Any]:
    return {"type": "dicom", "ae_title": node.aet, "host": "127.0.0.1", "port": node.port}


def _check_seg_back(seg_file: Path, files: list[Path]) -> Any:
    """The SEG as the sender / the PACS got it: in the original study, with the original
    patient, referencing original instances only, its own new UIDs kept."""
    originals = {str(dcmread(f).SOPInstanceUID): dcmread(f) for f in files}
    first = next(iter(originals.values()))
    seg = dcmread(seg_file)
    assert seg.Modality == "SEG"
    assert seg.StudyInstanceUID == first.StudyInstanceUID
    for kw in ("PatientID", "PatientName", "PatientBirthDate", "AccessionNumber"):
        assert str(seg.get(kw, "")) == str(first.get(kw, "")), kw
    assert referenced_sops(seg) <= set(originals) and referenced_sops(seg)
    assert str(seg.SOPInstanceUID) not in originals
    assert "PatientIdentityRemoved" not in seg
    return seg


def test_round_trip_through_a_remote_ai_node_pseudonymized_and_back(
        tmp_path: Path, pacs_and_sender: Any) -> None:
    pacs, sender = pacs_and_sender
    files, study = _study(tmp_path)
    originals = [dcmread(f) for f in files]
    router = Router(tmp_path / "router", {})
    with AiNode(tmp_path / "ai", router.port, router.aet) as ai:
        router.config.update(_config(pacs, sender, _dicom_ai(ai), {}))
        with router:
            assert run_storescu(files, router.port, aet=router.aet,
                                calling="CT1").returncode == 0
            wait_until(lambda: len(sender.files()) >= 1, timeout=120, what="the SEG at CT1")
            wait_until(lambda: len(pacs.files()) >= len(files) + 1, timeout=60,
                       what="the originals and the SEG at the PACS")
            router.wait_state(study, "delivered", timeout=60)
            history = _history(router, study)
            text = dicomrouter("status", "--study", study, "--config",
                               str(router.config_path)).stdout
            log = router.log(5000)
        # the AI node got the study once, pseudonymized: none of the patient's values
        assert len(ai.received) == len(files)
        for got in ai.received:
            assert str(got.StudyInstanceUID) != study
            assert str(got.PatientID) != "REMOTE1"
            assert str(got.SOPInstanceUID) not in sop_uids(files)
            assert str(got.PatientName) != str(originals[0].PatientName)
        (seg_back,) = sender.files()
        seg = _check_seg_back(seg_back, files)
        assert str(seg.SOPInstanceUID) == str(ai.sent[0].SOPInstanceUID)  # its own UID kept
        # the PACS: the originals (pixel data unchanged) and the SEG, nothing pseudonymized
        at_pacs = {str(dcmread(p).SOPInstanceUID): dcmread(p) for p in pacs.files()}
        assert set(at_pacs) == sop_uids(files) | {str(seg.SOPInstanceUID)}
        for o in originals:
            assert at_pacs[str(o.SOPInstanceUID)].PixelData == o.PixelData
        pseudo_study = str(ai.received[0].StudyInstanceUID)
        for ds in at_pacs.values():
            assert ds.StudyInstanceUID == study and ds.PatientID == "REMOTE1"
            assert pseudo_study.encode() not in ds.to_json().encode()
    assert sum("'segment' (ai) waiting: sent 4 instance(s) to ainode" in h
               for h in history) == 1, "\n".join(history)
    assert any("'segment' (ai) done: 1 result instance(s) from ainode" in h
               for h in history), history
    assert any("1 result instance(s) ingested" in h for h in history), history
    assert "process:ai" in text and "return:CT1" in text, text
    assert "ai / segment (remote): done" in text, text
    assert "Traceback" not in log
    # the re-identified SEG moves from the pseudonymized study into the origin: expected, INFO
    moved = [line for line in log.splitlines() if "moved from study" in line]
    assert moved and all(" INFO " in line for line in moved), moved


def _sr_step_config(tmp_path: Path, pacs: StoreSCP, sender: StoreSCP) -> dict[str, Any]:
    """The pseudonymizing route ``ai`` with one local command step, SR_PROGRAM, instead of
    the remote one (its AI node is never reached)."""
    program = tmp_path / "sr.py"
    program.write_text(SR_PROGRAM)
    cfg = _config(pacs, sender, {"type": "dicom", "ae_title": "NOBODY", "host": "127.0.0.1",
                                 "port": 9}, {})
    cfg["routes"][1]["process"] = [{"name": "report", "command": [
        sys.executable, str(program), "{input}", "{output}"], "timeout": "60s"}]
    return cfg


def test_a_local_command_on_a_pseudonymizing_route_gives_re_identified_results(
        tmp_path: Path, pacs_and_sender: Any) -> None:
    """The same contract for a command step: it sees the pseudonymized study only, and its SR
    (written in the study it got, referencing what it got) reaches the sender re-identified."""
    pacs, sender = pacs_and_sender
    files, study = _study(tmp_path, seed=2937)
    cfg = _sr_step_config(tmp_path, pacs, sender)
    with Router(tmp_path / "router", cfg) as router:
        assert run_storescu(files, router.port, aet=router.aet, calling="CT1").returncode == 0
        wait_until(lambda: len(sender.files()) >= 1, timeout=120, what="the SR at CT1")
        router.wait_state(study, "delivered", timeout=60)
        wait_until(lambda: len(pacs.files()) >= len(files) + 1, timeout=60, what="the PACS")
        history = _history(router, study)
    (sr_file,) = sender.files()
    sr = dcmread(sr_file)
    assert sr.StudyInstanceUID == study and sr.PatientID == "REMOTE1"
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == study
    assert {str(i.ReferencedSOPInstanceUID) for s in evidence.ReferencedSeriesSequence
            for i in s.ReferencedSOPSequence} == sop_uids(files)
    assert any("'report' (ai) done: exit code 0" in h for h in history), history
    for ds in (dcmread(p) for p in pacs.files()):  # the originals and the SR: all identified
        assert ds.StudyInstanceUID == study and ds.PatientID == "REMOTE1"


class CrashingRouter(Router):
    """A router killed (SIGKILL, from inside) at a fault point: ``DICOMROUTER_CRASH_AT``."""

    def __init__(self, work_dir: Path, config: dict[str, Any], crash_at: str) -> None:
        super().__init__(work_dir, config)
        self.crash_at = crash_at

    def env(self) -> dict[str, str]:
        return {**super().env(), "DICOMROUTER_CRASH_AT": self.crash_at}

    def died(self) -> bool:
        return self.proc is None or self.proc.poll() is not None


@pytest.mark.parametrize("crash_at", ["result-reidentified", "ingest-accepted"])
def test_a_kill_after_a_result_was_re_identified_still_takes_it_once(
        tmp_path: Path, pacs_and_sender: Any, crash_at: str) -> None:
    """The router dies right after re-identifying a step's result, before ingesting it
    (``result-reidentified``), or once the result is durable in its receive slot, before it is
    recorded (``ingest-accepted``). After the restart the result is ingested, re-identified,
    once, as a result. (It was re-identified in place: the retry re-identified the
    re-identified file, found no mapping for its original study and refused it as
    "pseudonymized": the result was lost. And start-up adopted a result from its slot without
    the index tags that make it one: a late arrival reopened its origin study.)"""
    pacs, sender = pacs_and_sender
    files, study = _study(tmp_path, seed=2939)
    cfg = _sr_step_config(tmp_path, pacs, sender)
    router = CrashingRouter(tmp_path / "router", cfg, crash_at)
    router.start()
    try:
        assert run_storescu(files, router.port, aet=router.aet, calling="CT1").returncode == 0
        wait_until(router.died, timeout=120, what=f"the router killed at {crash_at}")
        router.stop()
        assert not sender.files()
        router.crash_at = ""
        router.start()
        wait_until(lambda: len(sender.files()) >= 1, timeout=120, what="the SR at CT1")
        router.wait_state(study, "delivered", timeout=60)
        wait_until(lambda: len(pacs.files()) >= len(files) + 1, timeout=60, what="the PACS")
        history = _history(router, study)
    finally:
        router.stop()
    (sr_file,) = sender.files()  # once
    sr = dcmread(sr_file)
    assert sr.StudyInstanceUID == study and sr.PatientID == "REMOTE1"
    assert {str(i.ReferencedSOPInstanceUID) for s in sr.CurrentRequestedProcedureEvidenceSequence[
        0].ReferencedSeriesSequence for i in s.ReferencedSOPSequence} == sop_uids(files)
    assert not [h for h in history if "not taken" in h], history
    # the result reopens its delivered study as a result from the router itself (a slot
    # adopted without the tags and AE it was ingested with said "from  ")
    assert [h for h in history if "late arrival" in h] == [
        f"reopened by a late arrival from {router.aet} (generation 2)"], history
    assert sum("1 result instance(s) ingested" in h for h in history) == 1, history
    assert sop_uids(pacs.files()) == sop_uids(files) | {str(sr.SOPInstanceUID)}


SR_PROGRAM = r'''
import os, sys
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

inp, out = sys.argv[1], sys.argv[2]
inputs = [dcmread(os.path.join(inp, n), stop_before_pixels=True) for n in sorted(os.listdir(inp))]
if any(str(i.PatientID) == "REMOTE1" for i in inputs):
    sys.exit("the step saw the patient's own ID")
first = inputs[0]
ds = Dataset()
ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
ds.SOPInstanceUID = generate_uid()
ds.StudyInstanceUID = first.StudyInstanceUID
ds.SeriesInstanceUID = generate_uid()
for k in ("PatientID", "PatientName", "StudyDate", "AccessionNumber", "StudyID"):
    setattr(ds, k, first.get(k, ""))
ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "SR", 99, 1
ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
series = {}
for i in inputs:
    item = Dataset()
    item.ReferencedSOPClassUID = i.SOPClassUID
    item.ReferencedSOPInstanceUID = i.SOPInstanceUID
    series.setdefault(i.SeriesInstanceUID, []).append(item)
study = Dataset()
study.StudyInstanceUID = first.StudyInstanceUID
study.ReferencedSeriesSequence = []
for uid, items in series.items():
    s = Dataset()
    s.SeriesInstanceUID = uid
    s.ReferencedSOPSequence = items
    study.ReferencedSeriesSequence.append(s)
ds.CurrentRequestedProcedureEvidenceSequence = [study]
meta = FileMetaDataset()
meta.MediaStorageSOPClassUID = ds.SOPClassUID
meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
meta.TransferSyntaxUID = ExplicitVRLittleEndian
ds.file_meta = meta
ds.save_as(os.path.join(out, "sr.dcm"), enforce_file_format=True)
'''


def test_kill_9_while_the_step_waits_sends_once_and_the_result_arrives_once(
        tmp_path: Path, pacs_and_sender: Any) -> None:
    pacs, sender = pacs_and_sender
    files, study = _study(tmp_path, seed=2932)
    router = Router(tmp_path / "router", {})
    with AiNode(tmp_path / "ai", router.port, router.aet, answer="never") as ai:
        router.config.update(_config(pacs, sender, _dicom_ai(ai), {}))
        router.start()
        try:
            assert run_storescu(files, router.port, aet=router.aet,
                                calling="CT1").returncode == 0
            wait_until(lambda: any("waiting: sent 4" in h for h in _history(router, study)),
                       timeout=120, what="the study sent to the AI node")
            assert len(ai.received) == len(files)
            router.kill()  # mid-wait: the job was running
            router.start()
            wait_until(lambda: "still waiting for results from ainode" in router.log(3000),
                       timeout=120, what="the retried step waiting again, not sending")
            assert len(ai.received) == len(files)  # not sent twice
            ai.send_results()
            wait_until(lambda: len(sender.files()) >= 1, timeout=120, what="the SEG at CT1")
            router.wait_state(study, "delivered", timeout=60)
            wait_until(lambda: len(pacs.files()) >= len(files) + 1, timeout=60,
                       what="the SEG at the PACS")
            history = _history(router, study)
        finally:
            router.stop()
    assert len(ai.received) == len(files)
    (seg_back,) = sender.files()  # once
    _check_seg_back(seg_back, files)
    assert len(pacs.files()) == len(files) + 1
    assert sum("waiting: sent" in h for h in history) == 1, history


def test_no_result_in_time_fails_the_step_and_the_next_attempt_sends_again(
        tmp_path: Path, pacs_and_sender: Any) -> None:
    pacs, sender = pacs_and_sender
    files, study = _study(tmp_path, seed=2933)
    router = Router(tmp_path / "router", {})
    with AiNode(tmp_path / "ai", router.port, router.aet, answer="never") as ai:
        router.config.update(_config(pacs, sender, _dicom_ai(ai), {"timeout": "3s"}))
        with router:
            assert run_storescu(files, router.port, aet=router.aet,
                                calling="CT1").returncode == 0
            wait_until(lambda: any("failed: no result from ainode within its timeout (3 s)"
                                   in h for h in _history(router, study)), timeout=120,
                       what="the step failed by its timeout")
            wait_until(lambda: len(ai.received) >= 2 * len(files), timeout=120,
                       what="the next attempt sending the study again")
            ai.answer = "auto"  # now it answers what it got
            wait_until(lambda: len(sender.files()) >= 1, timeout=120, what="the SEG at CT1")
            router.wait_state(study, "delivered", timeout=60)
            # the node answers each reception: the sends before the retry, and the retry's
            # own when it came before their answer; every answer comes back (a later one
            # as a late result of the finished step), none is lost or left pseudonymized
            wait_until(lambda: ai.answered() and len(sender.files()) == len(ai.sent),
                       timeout=60, what="every answer of the node at CT1")
            router.wait_state(study, "delivered", timeout=60)
            history = _history(router, study)
    assert len(sender.files()) == len(ai.sent)
    for path in sender.files():
        _check_seg_back(path, files)
    assert any("'segment' (ai) done: 1 result instance(s)" in h for h in history), history


def test_match_referenced_takes_a_result_in_a_study_of_its_own_into_the_origin(
        tmp_path: Path, pacs_and_sender: Any) -> None:
    """No pseudonymization; the node answers in a new study that references the one it got:
    the SEG reaches the sender inside the original study. An unrelated study from the same AE
    meanwhile is routed by the table, not taken."""
    pacs, sender = pacs_and_sender
    files, study = _study(tmp_path, seed=2934)
    other, other_study = _study(tmp_path / "other", seed=2935)
    router = Router(tmp_path / "router", {})
    with AiNode(tmp_path / "ai", router.port, router.aet, new_study=True) as ai:
        cfg = _config(pacs, sender, _dicom_ai(ai), {"match": "referenced",
                                                    "results_from": [AI_AE]},
                      reversible=False)
        cfg["routes"].append({"name": "from the node", "when": {"CallingAE": AI_AE},
                              "to": ["pacs"]})
        router.config.update(cfg)
        with router:
            assert run_storescu(files, router.port, aet=router.aet,
                                calling="CT1").returncode == 0
            wait_until(lambda: len(sender.files()) >= 1, timeout=120, what="the SEG at CT1")
            router.wait_state(study, "delivered", timeout=60)
            # a study of the node's own, referencing nothing sent: routed by the table
            assert run_storescu(other, router.port, aet=router.aet,
                                calling=AI_AE).returncode == 0
            router.wait_state(other_study, "delivered", timeout=90)
            history = _history(router, study)
    (seg_back,) = sender.files()
    seg = _check_seg_back(seg_back, files)
    assert str(ai.sent[0].StudyInstanceUID) != study  # it came in a study of its own
    assert seg.StudyInstanceUID == study
    assert len(ai.received) == len(files)
    assert sop_uids(other) <= sop_uids(pacs.files())
    assert any("taken for study " + study in h for h in history), history


def test_a_stow_rs_ai_node_orthanc(tmp_path: Path, pacs_and_sender: Any, orthanc: Any) -> None:
    """The study goes to the AI node over STOW-RS (Orthanc's DICOMweb plugin); the test
    plays the model: it reads what Orthanc got, segments it and stores the SEG back."""
    pacs, sender = pacs_and_sender
    files, study = _study(tmp_path, seed=2936)
    node = orthanc(aet="AIWEB", dicomweb=True)
    router = Router(tmp_path / "router", {})
    router.config.update(_config(pacs, sender, {
        "type": "dicomweb", "url": f"{node.url}/dicom-web"}, {}))
    with router:
        assert run_storescu(files, router.port, aet=router.aet,
                            calling="CT1").returncode == 0
        wait_until(lambda: len(node.get("/instances")) >= len(files), timeout=120,
                   what="the study at the DICOMweb AI node")
        got = []
        for oid in node.get("/instances"):
            with urllib.request.urlopen(f"{node.url}/instances/{oid}/file", timeout=30) as r:
                got.append(dcmread(io.BytesIO(r.read())))
        assert all(str(d.StudyInstanceUID) != study for d in got)  # pseudonymized
        store_back(segment(got), router.port, router.aet)
        wait_until(lambda: len(sender.files()) >= 1, timeout=120, what="the SEG at CT1")
        router.wait_state(study, "delivered", timeout=60)
    _check_seg_back(sender.files()[0], files)


def test_status_and_config_name_the_remote_step(tmp_path: Path) -> None:
    """``serve --check`` refuses a remote step whose destination does not exist, naming it."""
    cfg = tmp_path / "router.yaml"
    cfg.write_text(json.dumps({"routes": [{"name": "ai", "process": [
        {"remote": {"destination": "nowhere"}}]}]}))
    r = dicomrouter("serve", "--check", "--config", str(cfg))
    assert r.returncode != 0
    assert "routes[0].process[0].remote.destination: unknown destination 'nowhere'" in \
        r.stdout + r.stderr
    assert sys.executable and os.path.exists(cfg)
