"""Routing conditions, table-driven on real datasets (pydicom's test files), and the explain
command on files and on a spooled study."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicomrouter import config as cfgmod
from dicomrouter.config import ConfigError
from dicomrouter.explain import instances_from_files, open_file
from dicomrouter.routing import route

FILES = {"ct": "CT_small.dcm", "mr": "MR_small.dcm", "rt": "rtplan.dcm", "sr": "test-SR.dcm"}


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One study per test file; the CT gets a referring physician code in a nested sequence."""
    root = tmp_path_factory.mktemp("rules")
    out = {}
    for name, file in FILES.items():
        path = root / name / "a.dcm"
        path.parent.mkdir()
        src = get_testdata_file(file)
        assert src is not None
        shutil.copy(src, path)
        if name == "ct":
            ds = dcmread(path)
            code = Dataset()
            code.CodeValue = "RAD123"
            person = Dataset()
            person.PersonIdentificationCodeSequence = Sequence([code])
            ds.ReferringPhysicianIdentificationSequence = Sequence([person])
            ds.InstitutionName = "General Hospital"
            ds.save_as(path)
        by_study, skipped = instances_from_files([str(path)])
        assert not skipped
        out[name] = next(iter(by_study.values()))
    return out


def cfg_for(tmp_path: Path, when: dict[str, Any], **route_keys: Any) -> cfgmod.Config:
    p = tmp_path / "r.yml"
    p.write_text(yaml.safe_dump({
        "destinations": {"a": {"type": "folder", "path": "a"},
                         "b": {"type": "folder", "path": "b"}},
        "routes": [{"name": "r", "when": when, "to": "a", **route_keys}]}))
    return cfgmod.load(p)


CASES: list[tuple[dict[str, Any], set[str]]] = [
    # the classic forms keep working
    ({"Modality": "CT"}, {"ct"}),
    ({"Modality": ["MR", "RTPLAN"]}, {"mr", "rt"}),
    ({"PatientName": "/^CompressedSamples/"}, {"ct", "mr"}),
    # operators
    ({"Modality": {"equals": "SR"}}, {"sr"}),
    ({"Modality": {"in": ["CT", "SR"]}}, {"ct", "sr"}),
    ({"PatientName": {"regex": "MR1$"}}, {"mr"}),
    ({"PatientName": {"glob": "Compressed*CT?"}}, {"ct"}),
    ({"StudyDate": {">=": "20040101"}}, {"ct", "mr"}),
    ({"StudyDate": {"<": "20040101"}}, {"rt"}),
    ({"StudyDate": {"between": ["20040101", "20040131"]}}, {"ct"}),
    ({"SliceThickness": {">": 1}}, {"ct"}),  # numeric: 5.0 > 1, 0.8 is not
    ({"SliceThickness": {"<=": 1}}, {"mr"}),
    ({"SliceThickness": {"exists": True}}, {"ct", "mr"}),
    ({"SliceThickness": {"missing": True}}, {"rt", "sr"}),
    # tags by number and sequence paths (read from the file)
    ({"(0008,0060)": "MR"}, {"mr"}),
    ({"ReferringPhysicianIdentificationSequence[0].PersonIdentificationCodeSequence[0]"
      ".CodeValue": "RAD123"}, {"ct"}),
    ({"ReferringPhysicianIdentificationSequence[*].PersonIdentificationCodeSequence"
      ".CodeValue": {"glob": "RAD*"}}, {"ct"}),
    ({"InstitutionName": {"regex": "(?i)general"}}, {"ct"}),
    # study-level aggregates and pseudo keys
    ({"ModalitiesInStudy": "MR"}, {"mr"}),
    ({"NumberOfStudyRelatedInstances": {">=": 1}}, {"ct", "mr", "rt", "sr"}),
    ({"NumberOfStudyRelatedSeries": 1}, {"ct", "mr", "rt", "sr"}),
    ({"CallingAE": ""}, {"ct", "mr", "rt", "sr"}),  # files have no calling AE
    # groups
    ({"not": {"Modality": "CT"}}, {"mr", "rt", "sr"}),
    ({"any": [{"Modality": "SR"}, {"StudyDate": {"<": "20040101"}}]}, {"rt", "sr"}),
    ({"all": [{"StudyDate": {">": "2004"}}, {"not": {"Modality": "MR"}}]}, {"ct"}),
    ({"Modality": "CT", "SliceThickness": {"<": 1}}, set()),  # every condition must hold
    # values match case-sensitively...
    ({"Modality": "ct"}, set()),
    ({"Modality": {"equals": "ct"}}, set()),
    ({"Modality": {"in": ["mr", "sr"]}}, set()),
    ({"Modality": "/^ct$/"}, set()),
    ({"PatientName": {"glob": "compressed*"}}, set()),
    # ... unless the condition ignores case
    ({"Modality": "/^ct$/i"}, {"ct"}),
    ({"Modality": ["/^m[rg]$/i", "SR"]}, {"mr", "sr"}),
    ({"PatientName": "/^compressedsamples\\^/i"}, {"ct", "mr"}),
    ({"Modality": {"ieq": "ct"}}, {"ct"}),
    ({"StationName": {"ieq": " ct01_oc0 "}}, {"ct"}),  # padding is stripped on both sides
    ({"InstitutionName": {"ieq": "jfk imaging"}}, set()),  # the whole value, not a part
    ({"Modality": {"iin": ["mr", "Sr"]}}, {"mr", "sr"}),
    ({"not": {"Modality": {"ieq": "ct"}}}, {"mr", "rt", "sr"}),
    # an empty value is no value (AccessionNumber is empty in every test file)
    ({"AccessionNumber": {"missing": True}}, {"ct", "mr", "rt", "sr"}),
    ({"AccessionNumber": {"exists": True}}, set()),
    ({"AccessionNumber": ""}, {"ct", "mr", "rt", "sr"}),
    ({"StationName": {"missing": True}}, {"sr"}),  # absent, like empty
]


@pytest.mark.parametrize(("when", "expected"), CASES, ids=[str(c[0])[:60] for c in CASES])
def test_conditions_on_real_datasets(tmp_path: Path, studies: dict[str, Any],
                                     when: dict[str, Any], expected: set[str]) -> None:
    cfg = cfg_for(tmp_path, when)
    got = {name for name, insts in studies.items()
           if route(cfg.routes, insts, open_file).destinations}
    assert got == expected


def test_first_match_stop_and_fallback(tmp_path: Path, studies: dict[str, Any]) -> None:
    p = tmp_path / "r.yml"
    p.write_text(yaml.safe_dump({
        "destinations": {n: {"type": "folder", "path": n} for n in ("ai", "archive", "rest")},
        "routes": [
            {"name": "ct to the AI node", "when": {"Modality": "CT"}, "to": "ai", "stop": True},
            {"name": "images", "when": {"Modality": {"in": ["CT", "MR"]}}, "to": "archive"},
            {"name": "everything else", "fallback": True, "to": "rest"}]}))
    cfg = cfgmod.load(p)
    ct = route(cfg.routes, studies["ct"], open_file)
    assert ct.destinations == ("ai",)  # stop: the second route is not evaluated
    assert ct.explanation[1].skipped == "route 'ct to the AI node' matched with stop: true"
    mr = route(cfg.routes, studies["mr"], open_file)
    assert mr.destinations == ("archive",) and mr.routes == ("images",)
    sr = route(cfg.routes, studies["sr"], open_file)
    assert sr.destinations == ("rest",) and sr.routes == ("everything else",)
    assert "Modality in ('CT', 'MR'): fails (study has SR)" in sr.explanation[1].why


@pytest.mark.parametrize(("when", "message"), [
    ({"Modality": {"like": "CT"}}, "routes[0].when.Modality.like: unknown operator"),
    ({"Modality": {">": 1, "<": 2}}, "routes[0].when.Modality: one operator per condition"),
    ({"NoSuchKeyword": 1}, "routes[0].when.NoSuchKeyword: not a DICOM keyword"),
    ({"Modalty": "CT"}, "routes[0].when.Modalty: not a DICOM keyword (did you mean 'Modality'"),
    ({"Modality": {"regex": "("}}, "routes[0].when.Modality.regex: invalid regular expression"),
    ({"any": {"Modality": "CT"}}, "routes[0].when.any: expected a list"),
    ({"not": {"Bogus": 1}}, "routes[0].when.not.Bogus: not a DICOM keyword"),
    ({"Modality": {"between": [1]}}, "routes[0].when.Modality.between: expected [low, high]"),
    ({"Modality": {"exists": "yes"}}, "routes[0].when.Modality.exists: expected true or false"),
    ({"Modality": {"iin": "ct"}}, "routes[0].when.Modality.iin: expected a list of values"),
    ({"Modality": {"ieq": ["ct"]}}, "routes[0].when.Modality.ieq: expected one value"),
    ({"Modality": "/(/i"}, "routes[0].when.Modality: invalid regular expression /(/i"),
    ({"Modality": {"ilike": "ct"}}, "routes[0].when.Modality.ilike: unknown operator (one of "
     "equals, in, ieq, iin,"),
])
def test_bad_conditions_name_the_key(tmp_path: Path, when: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        cfg_for(tmp_path, when)
    assert str(err.value).startswith(message), str(err.value)


def test_a_fallback_route_takes_no_conditions(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        cfg_for(tmp_path, {"Modality": "CT"}, fallback=True)
    assert str(err.value).startswith("routes[0].fallback: a fallback route")


def test_explain_files_says_which_condition_decided(tmp_path: Path,
                                                    studies: dict[str, Any]) -> None:
    from router_fixtures import dicomrouter

    p = tmp_path / "r.yml"
    p.write_text(yaml.safe_dump({
        "destinations": {"ai": {"type": "folder", "path": "ai"},
                         "rest": {"type": "folder", "path": "rest",
                                  "deliver_between": "20:00-06:00"}},
        "routes": [{"name": "thin CT", "when": {"Modality": "CT", "SliceThickness": {"<": 2}},
                    "to": "ai"},
                   {"name": "rest", "fallback": True, "to": "rest",
                    "transforms": [{"set": {"InstitutionName": "X"}}]}]}))
    ct = Path(studies["ct"][0].key)
    r = dicomrouter("explain", str(ct), "--config", str(p))
    assert r.returncode == 0, r.stderr
    assert "route 'thin CT' → ai: not matched" in r.stdout, r.stdout
    assert "SliceThickness < 2: fails (study has 5.000000)" in r.stdout, r.stdout
    assert "route 'rest' [fallback] → rest: MATCHED" in r.stdout, r.stdout
    assert "transforms for rest: set InstitutionName = 'X'" in r.stdout, r.stdout
    assert "rest delivers only 20:00-06:00 every day (local time)" in r.stdout, r.stdout
    r = dicomrouter("explain", str(ct), "--config", str(p), "--json")
    data = json.loads(r.stdout)
    assert data[0]["destinations"] == ["rest"]


def test_case_insensitive_conditions_explained_as_written(tmp_path: Path,
                                                          studies: dict[str, Any]) -> None:
    """explain shows /.../i, ieq and iin as written, and that the plain form fails on case."""
    from router_fixtures import dicomrouter

    p = tmp_path / "r.yml"
    p.write_text(yaml.safe_dump({
        "destinations": {n: {"type": "folder", "path": n} for n in ("a", "b", "c", "d")},
        "routes": [{"name": "exact", "when": {"Modality": "ct"}, "to": "a"},
                   {"name": "regex i", "when": {"StationName": "/^ct01/i"}, "to": "b"},
                   {"name": "ieq", "when": {"Modality": {"ieq": "ct"}}, "to": "c"},
                   {"name": "iin", "when": {"Modality": {"iin": ["mr", "ct"]},
                                            "PatientName": {"regex": "(?i)samples"}},
                    "to": "d"}]}))
    ct = Path(studies["ct"][0].key)
    r = dicomrouter("explain", str(ct), "--config", str(p))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "route 'exact' → a: not matched" in out, out
    assert "Modality = ct: fails (study has CT)" in out, out
    assert "route 'regex i' → b: MATCHED" in out, out
    assert "StationName = /^ct01/i: holds (study has CT01_OC0)" in out, out
    assert "Modality ieq 'ct': holds (study has CT)" in out, out
    assert "Modality iin ('mr', 'ct'): holds (study has CT)" in out, out
    assert "PatientName regex /(?i)samples/: holds" in out, out
    assert "destinations: b, c, d" in out, out
    data = json.loads(dicomrouter("explain", str(ct), "--config", str(p), "--json").stdout)
    assert data[0]["destinations"] == ["b", "c", "d"]


def test_case_insensitive_routes_end_to_end(tmp_path: Path) -> None:
    """A real router: a study whose Modality and StationName are written in another case than
    the table reaches only the destinations whose conditions ignore case; its history says
    which condition decided."""
    from peers import dcmtk, run_storescu, wait_until
    from router_fixtures import Router, dicomrouter

    from dicomrouter.sample import generate

    dcmtk("storescu")
    study = generate(tmp_path / "study", series=1, instances=2, rows=8, cols=8, seed=811)
    for f in study:
        ds = dcmread(f)
        ds.StationName = "ct-Scanner-1"
        ds.AccessionNumber = ""
        ds.save_as(f)
    uid = str(dcmread(study[0]).StudyInstanceUID)
    dests = ("exact", "regex_i", "ieq", "no_accession")
    with Router(tmp_path / "r", {
        "destinations": {n: {"type": "folder", "path": str(tmp_path / n)} for n in dests},
        "routes": [
            {"name": "exact", "when": {"StationName": "CT-SCANNER-1"}, "to": "exact"},
            {"name": "regex i", "when": {"StationName": "/^CT-SCANNER-\\d$/i"},
             "to": "regex_i"},
            {"name": "ieq", "when": {"StationName": {"ieq": "CT-SCANNER-1"},
                                     "Modality": {"iin": ["ct", "mr"]}}, "to": "ieq"},
            {"name": "no accession", "when": {"AccessionNumber": {"missing": True}},
             "to": "no_accession"}],
    }) as router:
        assert run_storescu(study, router.port).returncode == 0
        router.wait_state(uid, "delivered")
        wait_until(lambda: all(len(list((tmp_path / n).rglob("*.dcm"))) == 2
                               for n in dests[1:]), timeout=30, what="the three deliveries")
        text = dicomrouter("status", "--study", uid, "--config",
                           str(router.config_path)).stdout
    assert not (tmp_path / "exact").exists() or not list((tmp_path / "exact").rglob("*.dcm"))
    assert "'exact' not matched (StationName = CT-SCANNER-1: fails (study has ct-Scanner-1))" \
        in text, text
    assert "StationName = /^CT-SCANNER-\\d$/i: holds" in text, text
    assert "Modality iin ('ct', 'mr'): holds (study has CT)" in text, text
    assert "AccessionNumber missing True: holds (study has none)" in text, text
