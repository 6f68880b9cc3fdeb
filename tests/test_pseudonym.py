"""Reversible pseudonymization (issue 29, item 3): a study built to leak (the leak tests' study)
goes out de-identified to an "AI" storescp with its mapping kept, encrypted, in the state; a
result the test builds on what the AI received (a Basic Text SR referencing the pseudonymized
instances at several depths) comes back and is re-identified on its way to a "PACS" storescp.
"""

from __future__ import annotations

import copy
import datetime as dt
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from peers import StoreSCP, run_storescu, wait_until
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from router_fixtures import Router, dicomrouter
from test_deid_leaks import CALLING_AE, SECRET, LeakyStudy, assert_nothing_leaks

from dicomrouter.deid import Deidentifier
from dicomrouter.pseudonym import PseudonymKeyError, load_key, reidentify
from dicomrouter.state import SQLiteState
from dicomrouter.transforms import parse
from dicomrouter.values import ConfigError

KEY = "pseudonym-test-key-0123456789-abcdefghij"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
AI_AE = "AINODE"


@pytest.fixture(autouse=True)
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEID_SECRET", SECRET)
    monkeypatch.setenv("PSEUDONYM_KEY", KEY)


def _ref(sop_class: str, sop_uid: str) -> Dataset:
    r = Dataset()
    r.ReferencedSOPClassUID = sop_class
    r.ReferencedSOPInstanceUID = sop_uid
    return r


def build_result(received: list[Dataset], path: Path) -> Dataset:
    """What an AI node would send back: a new SR in the pseudonymized study, its own new
    Series and SOP Instance UIDs, references to every input instance at several depths."""
    first = received[0]
    ds = Dataset()
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyInstanceUID = first.StudyInstanceUID
    for kw in ("PatientID", "PatientName", "AccessionNumber", "StudyDate", "StudyTime",
               "PatientBirthDate", "StudyID", "ReferringPhysicianName"):
        setattr(ds, kw, first.get(kw, ""))
    ds.Modality = "SR"
    ds.SeriesNumber = 900
    ds.InstanceNumber = 1
    ds.ContentDate = dt.date.today().strftime("%Y%m%d")  # the result's own: stays
    ds.ContentTime = "120000"
    ds.ValueType = "CONTAINER"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    by_series: dict[str, list[Dataset]] = {}
    for r in received:
        by_series.setdefault(str(r.SeriesInstanceUID), []).append(r)
    evidence = Dataset()
    evidence.StudyInstanceUID = first.StudyInstanceUID
    evidence.ReferencedSeriesSequence = []
    for series, items in by_series.items():
        s = Dataset()
        s.SeriesInstanceUID = series
        s.ReferencedSOPSequence = [_ref(str(i.SOPClassUID), str(i.SOPInstanceUID))
                                   for i in items]
        evidence.ReferencedSeriesSequence.append(s)
    ds.CurrentRequestedProcedureEvidenceSequence = [evidence]
    ds.SourceImageSequence = [_ref(str(received[0].SOPClassUID),
                                   str(received[0].SOPInstanceUID))]
    ds.ReferencedInstanceSequence = [_ref(str(r.SOPClassUID), str(r.SOPInstanceUID))
                                     for r in received[1:3]]
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "IMAGE"
    item.ReferencedSOPSequence = [_ref(str(received[-1].SOPClassUID),
                                       str(received[-1].SOPInstanceUID))]
    outer = Dataset()
    outer.RelationshipType = "CONTAINS"
    outer.ValueType = "CONTAINER"
    outer.ContentSequence = [item]
    ds.ContentSequence = [outer]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    return ds


def all_uids(ds: Dataset) -> list[str]:
    out: list[str] = []
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value or []:
                out += all_uids(item)
        elif elem.VR == "UI" and elem.value and elem.keyword != "ReferencedSOPClassUID":
            out.append(str(elem.value))
    return out


def mapping_rows(db: Path) -> bytes:
    """Every value of the mapping tables, as bytes."""
    with sqlite3.connect(db) as c:
        rows = [*c.execute("SELECT * FROM pseudonyms"), *c.execute("SELECT * FROM"
                                                                    " pseudonym_uids")]
    return repr(rows).encode()


def test_round_trip_pseudonymized_to_the_ai_reidentified_to_the_pacs(
        tmp_path: Path, dcmtk_available: Any) -> None:
    study = LeakyStudy(tmp_path / "study")
    files = study.build()
    originals = {n: dcmread(f, stop_before_pixels=True) for n, f in study.files.items()}
    first = originals["ct1.1"]
    with StoreSCP(tmp_path / "ai", aet="AI") as ai, \
            StoreSCP(tmp_path / "pacs", aet="PACS") as pacs, \
            Router(tmp_path / "router", {
                "keep_after_delivery": True,
                "destinations": {
                    "ai": {"type": "dicom", "ae_title": "AI", "host": "127.0.0.1",
                           "port": ai.port},
                    "pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1",
                             "port": pacs.port}},
                "routes": [
                    {"name": "to ai", "when": {"CallingAE": CALLING_AE}, "to": ["ai"],
                     "transforms": [{"deidentify": {"reversible": True,
                                                    "key_env": "PSEUDONYM_KEY"}}]},
                    {"name": "results", "when": {"CallingAE": AI_AE}, "to": ["pacs"],
                     "transforms": [{"reidentify": True}]}],
            }) as router:
        sent = run_storescu(files, router.port, calling=CALLING_AE)
        assert sent.returncode == 0, sent.stderr
        router.wait_state(study.uid("study"), "delivered", timeout=120)
        # (1) what the AI got: nothing of the patient (the leak tests' byte search)
        got = {p.name: p.read_bytes() for p in ai.files()}
        assert len(got) == len(files)
        assert_nothing_leaks(study, got, "AI")
        received = [dcmread(p, stop_before_pixels=True) for p in sorted(ai.files())]
        pseudo_study = str(received[0].StudyInstanceUID)
        assert pseudo_study != study.uid("study")
        # (2) the state keeps the mapping: no original value and no pseudonym in the clear
        # (the original Study Instance UID is its key: the state has that study anyway)
        rows = mapping_rows(router.spool / "state.db")
        assert rows.count(study.uid("study").encode()) > 1 + len(files)  # identity + UIDs
        pseudonyms = {str(v) for r in received for v in all_uids(r)} | {
            str(received[0].PatientID), str(received[0].PatientName)}
        for value in [str(first.PatientID), *str(first.PatientName).split("^"),
                      str(first.AccessionNumber), *study.marks, *study.dates,
                      *(u for k, u in study.uids.items() if k != "study"), *pseudonyms]:
            assert value.encode() not in rows, value
        # (3) a result comes back from the AI node and goes on to the PACS re-identified
        result = build_result(received, tmp_path / "result.dcm")
        back = run_storescu([tmp_path / "result.dcm"], router.port, calling=AI_AE)
        assert back.returncode == 0, back.stderr
        wait_until(lambda: pacs.files(), timeout=60, what="the result at the PACS")
        log = router.log(5000)
    assert "Traceback" not in log
    [arrived] = [dcmread(p) for p in pacs.files()]
    assert arrived.SOPInstanceUID == result.SOPInstanceUID  # the result's own UIDs stay
    assert arrived.SeriesInstanceUID == result.SeriesInstanceUID
    assert arrived.file_meta.MediaStorageSOPInstanceUID == result.SOPInstanceUID
    assert arrived.StudyInstanceUID == study.uid("study")
    for kw in ("PatientID", "PatientName", "AccessionNumber", "StudyDate", "StudyTime",
               "PatientBirthDate"):
        assert str(arrived.get(kw)) == str(first.get(kw)), kw
    assert arrived.ContentDate == result.ContentDate
    assert "PatientIdentityRemoved" not in arrived
    # every reference points at an ORIGINAL instance, series or study, at every depth
    identity = {str(o.get(k)) for o in originals.values()
                for k in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")}
    refs = all_uids(arrived)
    own = {str(result.SOPInstanceUID), str(result.SeriesInstanceUID), BASIC_TEXT_SR}
    assert len(refs) >= len(files) + 6
    assert all(u in identity or u in own for u in refs), refs
    evidence = arrived.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == study.uid("study")
    assert {s.SeriesInstanceUID for s in evidence.ReferencedSeriesSequence} == \
        {study.uid("series1"), study.uid("series2"), str(originals["sr"].SeriesInstanceUID),
         str(originals["kos"].SeriesInstanceUID)}
    assert {r.ReferencedSOPInstanceUID for s in evidence.ReferencedSeriesSequence
            for r in s.ReferencedSOPSequence} == {str(o.SOPInstanceUID)
                                                  for o in originals.values()}
    deep = arrived.ContentSequence[0].ContentSequence[0].ReferencedSOPSequence[0]
    assert deep.ReferencedSOPInstanceUID in {str(o.SOPInstanceUID) for o in originals.values()}
    assert arrived.PixelData if "PixelData" in arrived else True

    # (4) a wrong key: a clear error, nothing re-identified
    state = SQLiteState(router.spool / "state.db", readonly=True)
    copy = dcmread(tmp_path / "result.dcm")
    with pytest.raises(PseudonymKeyError, match="decrypted with this key"):
        reidentify(copy, state, _key("x" * 40))
    assert copy == dcmread(tmp_path / "result.dcm")
    assert reidentify(copy, state, load_key(None, "k"))  # the right one
    state.close()

    # (5) purging the original study removes its mapping
    r = dicomrouter("purge", "--config", str(router.config_path), "--study",
                    study.uid("study"), "--yes")
    assert r.returncode == 0, r.stderr
    state = SQLiteState(router.spool / "state.db", readonly=True)
    assert state.pseudonym_find(load_key(None, "k").tag(pseudo_study)) is None
    assert not reidentify(dcmread(tmp_path / "result.dcm"), state, load_key(None, "k"))
    state.close()


def _key(value: str) -> Any:
    import os
    os.environ["OTHER_PSEUDONYM_KEY"] = value
    try:
        return load_key("OTHER_PSEUDONYM_KEY", "k")
    finally:
        del os.environ["OTHER_PSEUDONYM_KEY"]


@pytest.mark.parametrize("value, problem", [(None, "is not set"), ("", "is not set"),
                                            ("short", "too short")])
def test_the_key_is_a_config_error_naming_key_env(monkeypatch: pytest.MonkeyPatch,
                                                  value: str | None, problem: str) -> None:
    if value is None:
        monkeypatch.delenv("PSEUDONYM_KEY")
    else:
        monkeypatch.setenv("PSEUDONYM_KEY", value)
    with pytest.raises(ConfigError) as err:
        parse([{"deidentify": {"reversible": True}}], "routes[0].transforms")
    assert "routes[0].transforms[0].deidentify.key_env" in str(err.value)
    assert problem in str(err.value) and "PSEUDONYM_KEY" in str(err.value)
    with pytest.raises(ConfigError, match=r"reidentify\.key_env"):
        parse([{"reidentify": True}], "routes[0].transforms")
    parse([{"deidentify": {}}], "t")  # not reversible: no key needed
    with pytest.raises(ConfigError, match=r"deidentify\.key_env.*only with reversible"):
        parse([{"deidentify": {"key_env": "PSEUDONYM_KEY"}}], "t")


def test_the_same_original_always_maps_to_the_same_pseudonyms(tmp_path: Path) -> None:
    """Re-sends and late arrivals agree: a second instance of the study adds its UIDs to the
    one mapping, the identity written first stays."""
    from dicomrouter.pseudonym import pseudonymize
    state = SQLiteState(tmp_path / "state.db")
    key = load_key(None, "k")
    deid = Deidentifier(SECRET.encode(), shift_dates=True)
    datasets = []
    for n in range(2):
        ds = Dataset()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4", "1.2.3.4.1"
        ds.SOPInstanceUID = f"1.2.3.4.1.{n}"
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        ds.PatientID, ds.PatientName, ds.StudyDate = "PID-77", "DOE^JANE", "20200101"
        pseudonymize(ds, deid, key, state, "route r")
        datasets.append(ds)
    assert datasets[0].StudyInstanceUID == datasets[1].StudyInstanceUID
    assert datasets[0].PatientID == datasets[1].PatientID
    assert datasets[0].StudyDate != "20200101"  # shifted
    result = Dataset()
    result.StudyInstanceUID = datasets[0].StudyInstanceUID
    result.SOPInstanceUID = "2.25.42"
    result.PatientID, result.PatientName = datasets[0].PatientID, datasets[0].PatientName
    result.StudyDate = datasets[0].StudyDate
    result.SourceImageSequence = [_ref("1.2.840.10008.5.1.4.1.1.7",
                                       str(datasets[1].SOPInstanceUID))]
    assert reidentify(result, state, key)
    assert (result.StudyInstanceUID, result.PatientID, str(result.PatientName),
            result.StudyDate, result.SOPInstanceUID) == \
        ("1.2.3.4", "PID-77", "DOE^JANE", "20200101", "2.25.42")
    assert result.SourceImageSequence[0].ReferencedSOPInstanceUID == "1.2.3.4.1.1"
    found = state.pseudonym_find(key.tag(str(datasets[0].StudyInstanceUID)))
    assert found is not None and found["study_uid"] == "1.2.3.4"
    assert {key.tag(str(d.SOPInstanceUID)) for d in datasets} <= set(found["uids"])
    assert state.pseudonym_purge("1.2.3.4", "test") == 1
    state.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_state(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """The state part on both backends."""
    if request.param == "sqlite":
        s: Any = SQLiteState(tmp_path / "state.db")
    else:
        from dicomrouter.state.postgres import PostgresState
        s = PostgresState(request.getfixturevalue("pg_dsn"), "node-a", tmp_path, lease=3)
    yield s
    s.close()


def _instance(study: str, n: int) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, f"{study}.1"
    ds.SOPInstanceUID = f"{study}.1.{n}"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.PatientID, ds.PatientName = "PID-SECRET-77", "SECRETNAME^JANE"
    ds.AccessionNumber, ds.StudyDate = "ACC-SECRET-9", "20200101"
    return ds


def test_mapping_kept_found_and_purged_with_its_study_on_both_backends(any_state: Any) -> None:
    import time

    from dicomrouter.pseudonym import pseudonymize
    key = load_key(None, "k")
    deid = Deidentifier(SECRET.encode(), shift_dates=True)
    pseudo: dict[str, Dataset] = {}
    for study in ("1.2.51", "1.2.52"):
        any_state.record_instance({"StudyInstanceUID": study, "SeriesInstanceUID": f"{study}.1",
                                   "SOPInstanceUID": f"{study}.1.1", "SOPClassUID": "1.2.3",
                                   "PatientID": "P", "Modality": "OT"}, "1.2.840.10008.1.2.1",
                                  f"data/{study}/a.dcm", 10, "M", "R")
        for n in (1, 2):
            ds = _instance(study, n)
            pseudonymize(ds, deid, key, any_state, "route ai")
            pseudo[f"{study}.{n}"] = ds
    ds = _instance("1.2.51", 1)
    pseudonymize(ds, deid, key, any_state, "route ai")  # sent again: the same pseudonyms
    assert ds.SOPInstanceUID == pseudo["1.2.51.1"].SOPInstanceUID
    assert any_state.pseudonym_key_checks() == {key.check}
    result = Dataset()
    result.StudyInstanceUID = pseudo["1.2.51.2"].StudyInstanceUID
    result.PatientID = pseudo["1.2.51.2"].PatientID
    result.StudyDate = pseudo["1.2.51.2"].StudyDate
    result.ReferencedSeriesSequence = [Dataset()]
    result.ReferencedSeriesSequence[0].SeriesInstanceUID = pseudo["1.2.51.2"].SeriesInstanceUID
    result.ReferencedSeriesSequence[0].ReferencedInstanceSequence = [
        _ref("1.2.840.10008.5.1.4.1.1.7", str(pseudo["1.2.51.2"].SOPInstanceUID))]
    from dicomrouter.pseudonym import original_study
    assert original_study(any_state, key, str(result.StudyInstanceUID)) == "1.2.51"
    assert original_study(any_state, key, "2.25.1") is None
    fresh = copy.deepcopy(result)
    assert reidentify(result, any_state, key)
    assert (result.StudyInstanceUID, result.PatientID, result.AccessionNumber,
            result.StudyDate) == ("1.2.51", "PID-SECRET-77", "ACC-SECRET-9", "20200101")
    ref = result.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == "1.2.51.1"
    assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == "1.2.51.1.2"
    # retention: only delivered (or purged) studies are due; the purge takes the study's
    assert any_state.pseudonym_studies_before(time.time() + 10) == []
    seen = any_state.study("1.2.51")
    assert any_state.route_study("1.2.51", ["pacs"], ["all"], seen, "matched all")
    job = any_state.claim_job("pacs")
    any_state.mark_sending("1.2.51.1.1", "pacs", "1.2.51")
    any_state.mark_delivered(["1.2.51.1.1"], "pacs")
    assert any_state.finish_job(job, None, 1, 1.0) == "delivered"
    assert any_state.settle_study("1.2.51")
    assert any_state.pseudonym_studies_before(time.time() - 60) == []  # retention not over
    assert any_state.pseudonym_studies_before(time.time() + 1) == ["1.2.51"]
    any_state.purge("1.2.52")
    assert any_state.pseudonym_find(key.tag(str(pseudo["1.2.52.1"].StudyInstanceUID))) is None
    assert any_state.pseudonym_find(key.tag(str(pseudo["1.2.51.1"].StudyInstanceUID)))
    assert any(" mapping deleted (the study was purged)" in e
               for _ts, e in any_state.history("1.2.52"))
    assert any_state.pseudonym_purge("1.2.51", "retention period over") == 1
    assert not reidentify(fresh, any_state, key)
    assert fresh.PatientID == pseudo["1.2.51.2"].PatientID  # left as it came


def test_a_wrong_key_sends_nothing_and_retention_removes_the_mapping(
        tmp_path: Path, dcmtk_available: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The results route has another key: the result is refused there (the history says why),
    nothing reaches the PACS; once the original study's retention is over, its mapping goes."""
    from dicomrouter.sample import generate
    monkeypatch.setenv("RESULTS_KEY", "another-key-of-enough-length-0123456789")
    files = generate(tmp_path / "images", series=1, instances=2, rows=16, cols=16, seed=2903)
    original = dcmread(files[0], stop_before_pixels=True)
    with StoreSCP(tmp_path / "ai", aet="AI") as ai, \
            StoreSCP(tmp_path / "pacs", aet="PACS") as pacs, \
            Router(tmp_path / "router", {
                "retention": "4s",
                "destinations": {
                    "ai": {"type": "dicom", "ae_title": "AI", "host": "127.0.0.1",
                           "port": ai.port},
                    "pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1",
                             "port": pacs.port, "retry": {"max_attempts": 1}}},
                "routes": [
                    {"name": "to ai", "when": {"CallingAE": "MODALITY"}, "to": ["ai"],
                     "transforms": [{"deidentify": {"reversible": True}}]},
                    {"name": "results", "when": {"CallingAE": AI_AE}, "to": ["pacs"],
                     "transforms": [{"reidentify": {"key_env": "RESULTS_KEY"}}]}],
            }) as router:
        assert run_storescu(files, router.port, calling="MODALITY").returncode == 0
        router.wait_state(str(original.StudyInstanceUID), "delivered", timeout=120)
        received = [dcmread(p, stop_before_pixels=True) for p in sorted(ai.files())]
        assert len(received) == 2
        build_result(received, tmp_path / "result.dcm")
        assert run_storescu([tmp_path / "result.dcm"], router.port,
                            calling=AI_AE).returncode == 0
        pseudo_study = str(received[0].StudyInstanceUID)
        wait_until(lambda: router.study_state(pseudo_study) in ("failed", "dead"),
                   timeout=90, what="the result refused at the PACS")
        assert pacs.files() == []
        wait_until(lambda: "mapping deleted (retention period over)" in dicomrouter(
            "status", "--config", str(router.config_path), "--study",
            str(original.StudyInstanceUID)).stdout, timeout=90, interval=2,
                   what="the mapping deleted with the study's retention")
        history = dicomrouter("status", "--config", str(router.config_path), "--study",
                              pseudo_study).stdout
        log = router.log(3000)
    assert "decrypted with this key" in history + log, history
    assert "Traceback" not in log
    state = SQLiteState(router.spool / "state.db", readonly=True)
    assert state.pseudonym_key_checks() == set()
    state.close()
