"""Processing steps end to end (issue 29, items 1 and 2), with real peers: DCMTK storescu as
the modality (a calling AE in ``known_aes``), DCMTK storescp as the PACS and as the sender's
own SCP, and a processing program written for the test that reads the input folder with
pydicom and writes a Basic Text SR in the original study referencing every input instance.

The SR reaches the sender inside the original study; the PACS gets the input unchanged and
no result; a route with no ``when`` does not send its own results back into its step; exit 1
is retried, then dead and visible; a timeout kills the step; two steps chain and a
``result.json`` picks the route of the results; a kill -9 during a step gives one result."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from peers import StoreSCP, run_storescu, sop_uids, wait_until
from pydicom import dcmread
from router_fixtures import Router, dicomrouter

from dicomrouter.sample import generate

RETRY = {"initial": "1s", "max_delay": "1s", "max_attempts": 2}

SR_PROGRAM = r'''
import json, os, sys, time
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

inp, out = sys.argv[1], sys.argv[2]
mode = os.environ.get("STEP_MODE", "")
if os.environ.get("STEP_PIDFILE"):
    open(os.environ["STEP_PIDFILE"], "w").write(str(os.getpid()))
if mode == "fail":
    sys.stderr.write("model failed on purpose\n")
    sys.exit(1)
if mode == "hang" or os.environ.get("STEP_SLEEP"):
    time.sleep(float(os.environ.get("STEP_SLEEP", "300")))
inputs = [dcmread(os.path.join(inp, n), stop_before_pixels=True) for n in sorted(os.listdir(inp))]
first = inputs[0]
ds = Dataset()
ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
ds.SOPInstanceUID = generate_uid()
ds.StudyInstanceUID = first.StudyInstanceUID
ds.SeriesInstanceUID = generate_uid()
for k in ("PatientID", "PatientName", "StudyDate", "AccessionNumber", "StudyID"):
    setattr(ds, k, first.get(k, ""))
ds.Modality = "SR"
ds.SeriesNumber = 99
ds.InstanceNumber = 1
ds.ValueType = "CONTAINER"
ds.ContinuityOfContent = "SEPARATE"
ds.CompletionFlag = "COMPLETE"
ds.VerificationFlag = "UNVERIFIED"
ref_series = {}
for i in inputs:
    item = Dataset()
    item.ReferencedSOPClassUID = i.SOPClassUID
    item.ReferencedSOPInstanceUID = i.SOPInstanceUID
    ref_series.setdefault(i.SeriesInstanceUID, []).append(item)
study = Dataset()
study.StudyInstanceUID = first.StudyInstanceUID
study.ReferencedSeriesSequence = []
for uid, items in ref_series.items():
    s = Dataset()
    s.SeriesInstanceUID = uid
    s.ReferencedSOPSequence = items
    study.ReferencedSeriesSequence.append(s)
ds.CurrentRequestedProcedureEvidenceSequence = [study]
name = Dataset()
name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = "121071", "DCM", "Finding"
ds.ConceptNameCodeSequence = [name]
meta = FileMetaDataset()
meta.MediaStorageSOPClassUID = ds.SOPClassUID
meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
meta.TransferSyntaxUID = ExplicitVRLittleEndian
ds.file_meta = meta
ds.save_as(os.path.join(out, "sr.dcm"), enforce_file_format=True)
if os.environ.get("STEP_ROUTE"):
    json.dump({"route": os.environ["STEP_ROUTE"]}, open(os.path.join(out, "result.json"), "w"))
print("wrote an SR referencing", len(inputs), "instance(s)")
'''

PASS_ON = r'''
import os, shutil, sys
inp, out = sys.argv[1], sys.argv[2]
for n in os.listdir(inp):
    shutil.copy(os.path.join(inp, n), os.path.join(out, n))
'''


def _program(tmp_path: Path, text: str, name: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def _config(tmp_path: Path, pacs: StoreSCP, sender: StoreSCP, **route: Any) -> dict[str, Any]:
    sr = _program(tmp_path, SR_PROGRAM, "sr.py")
    step = {"command": [sys.executable, sr, "{input}", "{output}"], "timeout": "60s"}
    return {"destinations": {"pacs": {"type": "dicom", "ae_title": pacs.aet,
                                      "host": "127.0.0.1", "port": pacs.port}},
            "known_aes": {"CT1": {"host": "127.0.0.1", "port": sender.port}},
            "retry": RETRY,
            "routes": [{"name": "ai", "to": ["pacs"], "process": [step],
                        "results": ["return_to_sender"], **route}]}


def _history(router: Router, study: str) -> list[str]:
    r = dicomrouter("status", "--json", "--study", study, "--config", str(router.config_path))
    assert r.returncode == 0, r.stderr
    return [event for _ts, event in json.loads(r.stdout)["history"]]


def _study(tmp_path: Path) -> tuple[list[Path], str]:
    files = generate(tmp_path / "in", studies=1, series=2, instances=2, rows=16, cols=16,
                     patient_id="AI1", seed=2929)
    return files, str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie is dead
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            return False
    return True


def _check_sr(path: Path, study: str, inputs: list[Path]) -> None:
    sr = dcmread(path)
    assert sr.Modality == "SR" and str(sr.StudyInstanceUID) == study
    refs = {str(i.ReferencedSOPInstanceUID)
            for s in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
            for i in s.ReferencedSOPSequence}
    assert refs == sop_uids(inputs)


def test_sr_goes_back_to_the_sender_in_the_original_study(tmp_path: Path,
                                                          pacs_and_sender: Any) -> None:
    pacs, sender = pacs_and_sender
    files, study = _study(tmp_path)
    # no when: the route matches its own results too; they must not loop into the step
    with Router(tmp_path / "router", _config(tmp_path, pacs, sender)) as router:
        assert run_storescu(files, router.port, aet=router.aet,
                            calling="CT1").returncode == 0
        wait_until(lambda: len(sender.files()) >= 1, timeout=90, what="the SR at CT1")
        router.wait_state(study, "delivered")
        wait_until(lambda: len(pacs.files()) >= len(files), timeout=60, what="the PACS")
        (sr_file,) = sender.files()
        _check_sr(sr_file, study, files)
        # the PACS has the input, pixel data unchanged, and no result
        assert sop_uids(pacs.files()) == sop_uids(files)
        sent = {str(dcmread(f).SOPInstanceUID): dcmread(f).PixelData for f in files}
        for f in pacs.files():
            ds = dcmread(f)
            assert ds.PixelData == sent[str(ds.SOPInstanceUID)]
        history = _history(router, study)
        assert sum("processing step 'step 1' (ai) running" in h for h in history) == 1
        assert any("exit code 0" in h and "wrote an SR referencing 4" in h
                   for h in history), history
        assert any("1 result instance(s) ingested" in h for h in history), history
        assert any("return:CT1" in h for h in history), history
        assert len(sender.files()) == 1  # once, and never processed again
        text = dicomrouter("status", "--study", study, "--config",
                           str(router.config_path)).stdout
        assert "process:ai" in text and "return:CT1" in text, text
        assert "processing step 'step 1' (ai) done: exit code 0" in text, text


def test_exit_1_is_retried_then_dead_and_visible(tmp_path: Path, pacs_and_sender: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    pacs, sender = pacs_and_sender
    files, study = _study(tmp_path)
    monkeypatch.setenv("STEP_MODE", "fail")
    with Router(tmp_path / "router", _config(tmp_path, pacs, sender)) as router:
        assert run_storescu(files, router.port, aet=router.aet,
                            calling="CT1").returncode == 0
        wait_until(lambda: sum("exit code 1" in h for h in _history(router, study)) >= 2,
                   timeout=90, what="two failed attempts")
        wait_until(lambda: any(j["destination"] == "process:ai" for j in
                               router.status().get("dead", [])), timeout=60,
                   what="the processing job dead")
        history = _history(router, study)
        assert any("stderr: model failed on purpose" in h for h in history), history
        assert sender.files() == []
        wait_until(lambda: len(pacs.files()) == len(files), timeout=60, what="the PACS")


def test_a_step_over_its_timeout_is_killed(tmp_path: Path, pacs_and_sender: Any,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    pacs, sender = pacs_and_sender
    files, study = _study(tmp_path)
    cfg = _config(tmp_path, pacs, sender)
    cfg["routes"][0]["process"][0]["timeout"] = "1s"
    monkeypatch.setenv("STEP_MODE", "hang")
    with Router(tmp_path / "router", cfg) as router:
        assert run_storescu(files, router.port, aet=router.aet,
                            calling="CT1").returncode == 0
        wait_until(lambda: any("killed after its timeout" in h
                               for h in _history(router, study)), timeout=90,
                   what="the step killed")
        assert sender.files() == []


def test_two_steps_chain_and_result_json_picks_the_route(tmp_path: Path, pacs_and_sender: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    pacs, sender = pacs_and_sender
    worklist = StoreSCP(tmp_path / "worklist", aet="WORKLIST")
    files, study = _study(tmp_path)
    cfg = _config(tmp_path, pacs, sender)
    sr_step = cfg["routes"][0]["process"][0]
    copy = _program(tmp_path, PASS_ON, "pass_on.py")
    cfg["routes"][0]["process"] = [{"name": "prepare", "command": [
        sys.executable, copy, "{input}", "{output}"]}, {**sr_step, "name": "report"}]
    cfg["destinations"]["worklist"] = {"type": "dicom", "ae_title": "WORKLIST",
                                       "host": "127.0.0.1", "port": worklist.port}
    cfg["routes"].append({"name": "positive", "when": {"PatientID": "NOBODY"},
                          "to": ["worklist"]})
    monkeypatch.setenv("STEP_ROUTE", "positive")
    with worklist, Router(tmp_path / "router", cfg) as router:
        assert run_storescu(files, router.port, aet=router.aet,
                            calling="CT1").returncode == 0
        wait_until(lambda: len(worklist.files()) >= 1, timeout=90, what="the worklist")
        router.wait_state(study, "delivered")
        (sr_file,) = worklist.files()
        _check_sr(sr_file, study, files)  # the second step read the first one's output
        assert sender.files() == []  # result.json's route replaced return_to_sender
        history = _history(router, study)
        assert any("'prepare' (ai) done: exit code 0" in h for h in history), history
        assert any("'report' (ai) done: exit code 0" in h for h in history), history
        assert any("picked route 'positive'" in h for h in history), history


def test_kill_9_during_a_step_gives_one_result(tmp_path: Path, pacs_and_sender: Any,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    pacs, sender = pacs_and_sender
    files, study = _study(tmp_path)
    pidfile = tmp_path / "step.pid"
    monkeypatch.setenv("STEP_PIDFILE", str(pidfile))
    monkeypatch.setenv("STEP_SLEEP", "3")
    cfg = _config(tmp_path, pacs, sender)
    router = Router(tmp_path / "router", cfg)
    try:
        router.start()
        assert run_storescu(files, router.port, aet=router.aet, calling="CT1").returncode == 0
        wait_until(pidfile.exists, timeout=90, what="the step running")
        first = int(pidfile.read_text() or 0)
        router.kill()  # the router dies mid-step: the step dies with it (PR_SET_PDEATHSIG)
        wait_until(lambda: not _alive(first), timeout=30, what="the step to die with it")
        pidfile.unlink()
        router.start()
        wait_until(lambda: len(sender.files()) >= 1, timeout=120, what="the SR at CT1")
        router.wait_state(study, "delivered")
        assert len(sender.files()) == 1
        _check_sr(sender.files()[0], study, files)
        history = _history(router, study)
        assert sum("1 result instance(s) ingested" in h for h in history) == 1, history
    finally:
        router.stop()


def test_a_container_step_without_an_engine_is_dead_with_why(
        tmp_path: Path, pacs_and_sender: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    pacs, sender = pacs_and_sender
    files, study = _study(tmp_path)
    cfg = _config(tmp_path, pacs, sender)
    cfg["routes"][0]["process"] = [{"container": {"image": "example/seg:1",
                                                  "engine": "podman"}}]
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin") + os.pathsep + "/usr/bin:/bin")
    assert not any((Path(d) / "podman").exists() for d in os.environ["PATH"].split(":"))
    with Router(tmp_path / "router", cfg) as router:
        assert run_storescu(files, router.port, aet=router.aet,
                            calling="CT1").returncode == 0
        wait_until(lambda: any(j["destination"] == "process:ai" for j in
                               router.status().get("dead", [])), timeout=90,
                   what="the processing job dead at once")
        history = _history(router, study)
        assert any("container engine 'podman' is not installed" in h for h in history), \
            history
        assert sum("running" in h and "step 1" in h for h in history) == 1


def test_origin_destinations_get_only_the_results_they_lack(tmp_path: Path,
                                                            pacs_and_sender: Any) -> None:
    pacs, sender = pacs_and_sender
    files, study = _study(tmp_path)
    cfg = _config(tmp_path, pacs, sender, results=["origin_destinations"])
    with Router(tmp_path / "router", cfg) as router:
        assert run_storescu(files, router.port, aet=router.aet,
                            calling="CT1").returncode == 0
        wait_until(lambda: len(pacs.files()) >= len(files) + 1, timeout=90,
                   what="the input and the SR at the PACS")
        router.wait_state(study, "delivered")
        srs = [f for f in pacs.files() if dcmread(f, stop_before_pixels=True).Modality == "SR"]
        assert len(srs) == 1
        _check_sr(srs[0], study, files)
        assert len(pacs.files()) == len(files) + 1  # the originals once, and the SR
        assert sender.files() == []
