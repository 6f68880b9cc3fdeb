"""Corrections follow the ledger (issue 29, item 5): IOCM rejection notes and corrected
instances go exactly where the ledger shows the affected instances went.

Peers: DCMTK storescp destinations (two that received the study, one that is down while the
correction arrives, a fourth that a route makes due only after the note), DCMTK storescu as
the modality. The tests assert which files each destination holds, after the down one comes
back and after a restart of the router."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from peers import StoreSCP, free_port, run_storescu, wait_until
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from router_fixtures import Router, dicomrouter

from dicomrouter.sample import generate

KOS = "1.2.840.10008.5.1.4.1.1.88.59"
RETRY = {"initial": "1s", "max_delay": "2s", "max_attempts": 1000}


def _dest(aet: str, port: int) -> dict[str, Any]:
    return {"type": "dicom", "ae_title": aet, "host": "127.0.0.1", "port": port,
            "timeout": "10s", "retry": RETRY}


def _uids(scp: StoreSCP) -> list[str]:
    """SOP Instance UIDs of every file received (a UID twice: received twice)."""
    return [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in scp.files()]


def rejection_note(images: list[Dataset], code: str = "113001",
                   meaning: str = "Rejected for Quality Reasons") -> Dataset:
    """A KOS in the images' study whose title is an IOCM rejection code and whose evidence
    lists the images."""
    first = images[0]
    ds = Dataset()
    for kw in ("PatientID", "PatientName", "StudyInstanceUID", "StudyDate", "StudyTime",
               "AccessionNumber", "StudyID"):
        setattr(ds, kw, first.get(kw, ""))
    ds.SOPClassUID = KOS
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 99
    ds.InstanceNumber = 1
    ds.Modality = "KO"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = code, "DCM", meaning
    ds.ConceptNameCodeSequence = [title]
    evidence = Dataset()
    evidence.StudyInstanceUID = first.StudyInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    refs = []
    for image in images:
        ref = Dataset()
        ref.ReferencedSOPClassUID = image.SOPClassUID
        ref.ReferencedSOPInstanceUID = image.SOPInstanceUID
        refs.append(ref)
    series.ReferencedSOPSequence = refs
    evidence.ReferencedSeriesSequence = [series]
    ds.CurrentRequestedProcedureEvidenceSequence = [evidence]
    return ds


def _save(ds: Dataset, path: Path) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _history(router: Router, study: str) -> str:
    r = dicomrouter("status", "--study", study, "--config", str(router.config_path))
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_a_rejection_note_goes_where_the_rejected_instances_went(tmp_path: Path) -> None:
    files = generate(tmp_path / "images", series=2, instances=3, rows=16, cols=16, seed=291)
    images = [dcmread(p, stop_before_pixels=True) for p in files]
    study = str(images[0].StudyInstanceUID)
    first = str(images[0].SeriesInstanceUID)
    rejected = [ds for ds in images if str(ds.SeriesInstanceUID) == first]
    kept = {str(ds.SOPInstanceUID) for ds in images} - {str(ds.SOPInstanceUID)
                                                       for ds in rejected}
    assert len(rejected) == 3 and len(kept) == 3
    note = rejection_note(rejected)
    note_file = _save(note, tmp_path / "note" / "kos.dcm")
    cold_port = free_port()  # the archive that is down while the note arrives
    with StoreSCP(tmp_path / "pacs", aet="PACS") as pacs, \
            StoreSCP(tmp_path / "archive", aet="ARCHIVE") as archive, \
            StoreSCP(tmp_path / "late", aet="LATE") as late:
        router = Router(tmp_path / "router", {
            "destinations": {"pacs": _dest("PACS", pacs.port),
                             "archive": _dest("ARCHIVE", archive.port),
                             "cold": _dest("COLD", cold_port),
                             "late": _dest("LATE", late.port)},
            # "late" becomes due for the study only once the note is in it
            "routes": [{"name": "all", "to": ["pacs", "archive", "cold"]},
                       {"name": "notes", "when": {"Modality": "KO"}, "to": ["late"]}]})
        router.start()
        try:
            assert run_storescu(files, router.port, aet=router.aet).returncode == 0
            every = {str(ds.SOPInstanceUID) for ds in images}
            for scp in (pacs, archive):
                wait_until(lambda s=scp: set(_uids(s)) == every, timeout=90,
                           what=f"the study at {scp.aet} (log: {router.log_path})")
            wait_until(lambda: "delivery to cold failed" in _history(router, study),
                       timeout=60, what="cold's first failed attempt")
            assert run_storescu([note_file], router.port, aet=router.aet).returncode == 0
            wait_until(lambda: str(note.SOPInstanceUID) in _uids(pacs) and
                       str(note.SOPInstanceUID) in _uids(archive), timeout=90,
                       what=f"the note at pacs and archive (log: {router.log_path})")
            wait_until(lambda: set(_uids(late)) == kept, timeout=90,
                       what=f"the kept instances at late (log: {router.log_path})")
            history = _history(router, study)
            assert (f"rejection note {note.SOPInstanceUID} (113001 Rejected for Quality "
                    "Reasons): 3 instance(s) → archive, pacs; 3 pending send(s) to cold "
                    "cancelled") in history, history
        finally:
            router.stop()
        # a restart with cold still owing the study, then cold comes back
        router.start()
        try:
            with StoreSCP(tmp_path / "cold", aet="COLD", port=cold_port) as cold:
                wait_until(lambda: set(_uids(cold)) == kept, timeout=90,
                           what=f"the kept instances at cold (log: {router.log_path})")
                router.wait_state(study, "delivered")
                assert sorted(_uids(cold)) == sorted(kept)  # never a rejected one, nor the note
            for scp in (pacs, archive):  # each instance and the note exactly once
                assert sorted(_uids(scp)) == sorted(every | {str(note.SOPInstanceUID)})
            assert sorted(_uids(late)) == sorted(kept)  # it never had a rejected instance
            explained = dicomrouter("explain", "--study", study, "--config",
                                    str(router.config_path))
            assert explained.returncode == 0, explained.stderr
            assert f"correction: rejection note {note.SOPInstanceUID} (113001" in \
                explained.stdout, explained.stdout
        finally:
            router.stop()


def _comments(scp: StoreSCP, uid: str) -> list[str]:
    """ImageComments of each file the destination holds for ``uid``."""
    return [str(ds.get("ImageComments", "")) for ds in
            (dcmread(p) for p in scp.files()) if str(ds.SOPInstanceUID) == uid]


def test_a_corrected_instance_goes_where_the_old_version_went(tmp_path: Path) -> None:
    files = generate(tmp_path / "images", series=1, instances=3, rows=16, cols=16, seed=292)
    images = [dcmread(p) for p in files]
    study = str(images[0].StudyInstanceUID)
    every = {str(ds.SOPInstanceUID) for ds in images}
    fixed = dcmread(files[1])
    fixed.ImageComments = "corrected at the modality"
    fixed_file = _save(fixed, tmp_path / "fixed" / "fixed.dcm")
    uid = str(fixed.SOPInstanceUID)
    new = "corrected at the modality"
    cold_port = free_port()  # down while the correction arrives: it never had the old one
    with StoreSCP(tmp_path / "pacs", aet="PACS") as pacs, \
            StoreSCP(tmp_path / "archive", aet="ARCHIVE") as archive, \
            StoreSCP(tmp_path / "other", aet="OTHER") as other:
        dests = {"pacs": _dest("PACS", pacs.port), "archive": _dest("ARCHIVE", archive.port),
                 "cold": _dest("COLD", cold_port), "other": _dest("OTHER", other.port)}
        router = Router(tmp_path / "router", {
            "destinations": dests, "routes": [{"name": "all", "to": ["pacs", "archive",
                                                                    "cold"]}]})
        router.start()
        try:
            assert run_storescu(files, router.port, aet=router.aet).returncode == 0
            for scp in (pacs, archive):
                wait_until(lambda s=scp: set(_uids(s)) == every, timeout=90,
                           what=f"the study at {scp.aet} (log: {router.log_path})")
        finally:
            router.stop()
        # the table changes: archive is no longer routed to (but holds the old version),
        # "other" now is (it never had the study: it gets the current version)
        router.config["routes"] = [{"name": "all", "to": ["pacs", "cold", "other"]}]
        router.start()
        try:
            assert run_storescu([fixed_file], router.port, aet=router.aet).returncode == 0
            for scp in (pacs, archive):
                wait_until(lambda s=scp: new in _comments(s, uid), timeout=90,
                           what=f"the correction at {scp.aet} (log: {router.log_path})")
            wait_until(lambda: set(_uids(other)) == every, timeout=90,
                       what=f"the study at other (log: {router.log_path})")
            history = _history(router, study)
            assert f"corrected instance {uid} → archive, pacs" in history, history
        finally:
            router.stop()
        with StoreSCP(tmp_path / "cold", aet="COLD", port=cold_port) as cold:
            router.start()
            try:  # cold never had the old version: it gets the corrected one, once
                wait_until(lambda: set(_uids(cold)) == every, timeout=90,
                           what=f"the study at cold (log: {router.log_path})")
                router.wait_state(study, "delivered")
                assert sorted(_uids(cold)) == sorted(every)
                assert _comments(cold, uid) == [new]
            finally:
                router.stop()
        assert _comments(other, uid) == [new]
        for scp in (pacs, archive):  # the pixel data went unchanged with it
            got = [dcmread(p) for p in scp.files()]
            assert all(ds.PixelData == images[1].PixelData for ds in got
                       if str(ds.SOPInstanceUID) == uid)


def test_a_correction_nobody_received_yet_simply_replaces_it(tmp_path: Path) -> None:
    files = generate(tmp_path / "images", series=1, instances=3, rows=16, cols=16, seed=293)
    images = [dcmread(p) for p in files]
    study = str(images[0].StudyInstanceUID)
    every = {str(ds.SOPInstanceUID) for ds in images}
    fixed = dcmread(files[0])
    fixed.ImageComments = "second version"
    fixed_file = _save(fixed, tmp_path / "fixed" / "fixed.dcm")
    uid = str(fixed.SOPInstanceUID)
    with StoreSCP(tmp_path / "pacs", aet="PACS") as pacs:
        router = Router(tmp_path / "router", {
            "destinations": {"pacs": _dest("PACS", pacs.port)},
            "routes": [{"name": "checked", "hold": True, "to": ["pacs"]}]})
        router.start()
        try:
            assert run_storescu(files, router.port, aet=router.aet).returncode == 0
            wait_until(lambda: "held for pacs" in _history(router, study), timeout=60,
                       what=f"the study held (log: {router.log_path})")
            assert run_storescu([fixed_file], router.port, aet=router.aet).returncode == 0
            wait_until(lambda: _history(router, study).count("held for pacs") >= 2,
                       timeout=60, what=f"the new generation held (log: {router.log_path})")
            r = dicomrouter("release", study, "--reason", "checked", "--config",
                            str(router.config_path))
            assert r.returncode == 0, r.stderr
            wait_until(lambda: set(_uids(pacs)) == every, timeout=90,
                       what=f"the study at pacs (log: {router.log_path})")
            router.wait_state(study, "delivered")
            assert sorted(_uids(pacs)) == sorted(every)  # each once: the new version only
            assert _comments(pacs, uid) == ["second version"]
            assert "corrected instance" not in _history(router, study)
        finally:
            router.stop()


def test_a_zip_export_leaves_rejected_instances_out(tmp_path: Path) -> None:
    files = generate(tmp_path / "images", series=1, instances=4, rows=16, cols=16, seed=294)
    images = [dcmread(p, stop_before_pixels=True) for p in files]
    study = str(images[0].StudyInstanceUID)
    note = rejection_note(images[:1], "113039", "Data Retention Policy Expired")
    note_file = _save(note, tmp_path / "note" / "kos.dcm")
    out = tmp_path / "zips"
    with Router(tmp_path / "router", {
            "retention": "1h",  # the study stays in the spool to be exported whole again
            "destinations": {"out": {"type": "folder", "path": str(out), "zip": True}},
            "routes": [{"name": "all", "to": ["out"]}]}) as router:
        assert run_storescu(files, router.port, aet=router.aet).returncode == 0
        router.wait_state(study, "delivered")
        assert run_storescu([note_file], router.port, aet=router.aet).returncode == 0
        wait_until(lambda: "rejection note" in _history(router, study) and
                   router.study_state(study) == "delivered" and
                   _history(router, study).count("delivered to out") >= 2, timeout=90,
                   what=f"the study exported again (log: {router.log_path})")
    zips = sorted(out.rglob("*.zip"))
    assert len(zips) == 1
    with zipfile.ZipFile(zips[0]) as archive:
        m = json.loads(archive.read("manifest.json"))
    inside = {e["sop_instance_uid"] for e in m["files"]}
    assert inside == {str(ds.SOPInstanceUID) for ds in images[1:]} | {str(note.SOPInstanceUID)}
