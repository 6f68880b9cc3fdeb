"""``coerce:``: patient and order attributes reconciled before delivery, against real peers:
DCMTK ``wlmscpfs`` as the Modality Worklist SCP (worklist files built here, its request files
counting the C-FINDs), DCMTK ``storescp`` as the destination. What arrives is checked tag by
tag, the spool's files byte for byte, the study's history for the before → after."""

from __future__ import annotations

import csv
import hashlib
import subprocess
from pathlib import Path
from typing import Any

import pytest
from peers import StoreSCP, dcmtk, free_port, peer_env, run_storescu, tcp_accepts, wait_until
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from router_fixtures import Router, dataset_bytes, dicomrouter

from dicomrouter.config import ConfigError, from_dict, load
from dicomrouter.deid import from_options
from dicomrouter.sample import generate
from dicomrouter.state import state_for

WL_AE = "WLSCP"


class WorklistSCP:
    """DCMTK ``wlmscpfs`` on a free port: the worklist files are ``<dir>/WLSCP/*.wl`` (the
    called AE title's folder, with the ``lockfile`` it requires); every C-FIND it gets is
    written to ``requests/`` (``--request-file-path``), so a test counts them. ``-csk``:
    answers carry the files' Specific Character Set."""

    def __init__(self, work: Path, port: int | None = None) -> None:
        self.work = work
        self.db = work / "db"
        (self.db / WL_AE).mkdir(parents=True, exist_ok=True)
        (self.db / WL_AE / "lockfile").touch()
        self.requests = work / "requests"
        self.requests.mkdir(exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def add(self, name: str, **values: str) -> None:
        """A worklist entry (a scheduled CT step on ``date``), written as DICOM."""
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.AccessionNumber = values["AccessionNumber"]
        ds.PatientID = values["PatientID"]
        ds.IssuerOfPatientID = values.get("IssuerOfPatientID", "HOSP")
        ds.PatientName = values["PatientName"]
        ds.PatientBirthDate = values.get("PatientBirthDate", "19700101")
        ds.PatientSex = values.get("PatientSex", "F")
        ds.StudyInstanceUID = generate_uid()
        ds.RequestedProcedureID = values.get("RequestedProcedureID", "RP1")
        ds.RequestedProcedureDescription = "CT CHEST"
        ds.ReferringPhysicianName = ""
        step = Dataset()
        step.Modality = "CT"
        step.ScheduledStationAETitle = "CT1"
        step.ScheduledProcedureStepStartDate = values.get("date", "20260101")
        step.ScheduledProcedureStepStartTime = "080000"
        step.ScheduledProcedureStepID = "SPS1"
        step.ScheduledPerformingPhysicianName = ""
        step.ScheduledProcedureStepDescription = "CT CHEST"
        ds.ScheduledProcedureStepSequence = [step]
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.31"
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(self.db / WL_AE / f"{name}.wl", enforce_file_format=True)

    def queries(self) -> int:
        return len(list(self.requests.iterdir()))

    def __enter__(self) -> WorklistSCP:
        self.log = open(self.work / "wlmscpfs.log", "wb")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(
            [dcmtk("wlmscpfs"), "-v", "-csk", "-dfp", str(self.db), "-rfp", str(self.requests),
             "-rff", "#t_#i.dump", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT,
            env=peer_env())
        wait_until(lambda: tcp_accepts(self.port), timeout=30, what="wlmscpfs to listen")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
        self.log.close()


def study(tmp: Path, name: str, n: int = 4, **tags: str | None) -> list[Path]:
    """A CT study of ``n`` instances with ``tags`` set (None: removed), ASCII."""
    files = generate(tmp / name, studies=1, series=1, instances=n, rows=16, cols=16,
                     patient_id="X", seed=abs(hash(name)) % 10_000)
    for f in files:
        ds = dcmread(f)
        for kw, value in tags.items():
            if value is None:
                if kw in ds:
                    delattr(ds, kw)
            else:
                setattr(ds, kw, value)
        ds.save_as(f)
    return files


def history(router: Router, study_uid: str) -> list[str]:
    state = state_for(load(router.config_path, secrets=False), readonly=True)
    try:
        return [e for _t, e in state.history(study_uid)]
    finally:
        state.close()


def dead_jobs(router: Router, destination: str) -> list[dict[str, Any]]:
    state = state_for(load(router.config_path, secrets=False), readonly=True)
    try:
        return state.jobs(state="dead", destination=destination)
    finally:
        state.close()


def spool_digests(router: Router) -> dict[str, str]:
    return {p.name: hashlib.sha256(dataset_bytes(p)).hexdigest()
            for p in (router.spool / "data").rglob("*.dcm")}


def received(scp: StoreSCP, study_uid: str) -> list[Dataset]:
    out = []
    for p in scp.files():
        ds = dcmread(p)
        if ds.StudyInstanceUID == study_uid:
            out.append(ds)
    return out


def wl_config(wl: WorklistSCP, scp: StoreSCP, tmp: Path, **extra: Any) -> dict[str, Any]:
    return {
        "keep_after_delivery": True,
        "retry": {"initial": "1s", "max_attempts": 30},
        "known_aes": {WL_AE: {"host": "127.0.0.1", "port": wl.port}},
        "destinations": {
            "pacs": {"type": "dicom", "ae_title": "STORESCP", "host": "127.0.0.1",
                     "port": scp.port,
                     "coerce": {"mode": "overwrite",
                                "sources": [{"worklist": {"ae": WL_AE, "timeout": "5s",
                                                          "match": ["accession",
                                                                    "patient_date"]}}]}},
            "archive": {"type": "folder", "path": str(tmp / "archive"),
                        "coerce": {"sources": [{"worklist": {"ae": WL_AE}}]}},  # fill
        },
        "routes": [{"name": "all", "to": ["pacs", "archive"]}],
        **extra,
    }


def test_worklist_fill_and_overwrite(tmp_path: Path, storescp: StoreSCP) -> None:
    """By AccessionNumber (and by PatientID + date when there is none): overwrite corrects
    every attribute, fill only the missing ones; a UTF-8 name reaches an ASCII dataset with
    its character set; one C-FIND per study and destination, not per instance; the spool's
    files unchanged; the history says before → after once; two entries that disagree are not
    guessed from."""
    with WorklistSCP(tmp_path / "wl") as wl:
        wl.add("one", AccessionNumber="ACC-1", PatientID="P-100", PatientName="Müller^Jürgen")
        wl.add("bydate", AccessionNumber="ACC-7", PatientID="P-300", PatientName="Roe^Jane",
               date="20250505")
        wl.add("twin1", AccessionNumber="ACC-2", PatientID="P-200", PatientName="Doe^A")
        wl.add("twin2", AccessionNumber="ACC-2", PatientID="P-201", PatientName="Doe^B")
        files = study(tmp_path, "s1", AccessionNumber="ACC-1", PatientID="TMP123",
                      PatientName="WRONG^NAME", PatientBirthDate=None, PatientSex="M")
        by_date = study(tmp_path, "s2", n=2, AccessionNumber=None, PatientID="P-300",
                        PatientName="", StudyDate="20250505")
        twins = study(tmp_path, "s3", n=2, AccessionNumber="ACC-2", PatientID="TMP9",
                      PatientName="X^Y")
        uids = [str(dcmread(f[0]).StudyInstanceUID) for f in (files, by_date, twins)]
        with Router(tmp_path / "router", wl_config(wl, storescp, tmp_path)) as router:
            for f in (files, by_date, twins):
                assert run_storescu(f, router.port).returncode == 0
            for uid in uids:
                router.wait_state(uid, "delivered", timeout=120)
            # one C-FIND per study and destination, not per instance (s2 has no accession:
            # pacs asks by PatientID + date, archive matches by accession only)
            assert wl.queries() == 2 + 1 + 2
            spooled = spool_digests(router)
            hist = {uid: history(router, uid) for uid in uids}
            explained = dicomrouter("explain", "--study", uids[0], "--config",
                                    str(router.config_path))
            log = router.log(5000)
    assert "Traceback" not in log
    # the spool holds exactly what was sent
    sent = {f"{dcmread(f).SOPInstanceUID}.dcm": hashlib.sha256(dataset_bytes(f)).hexdigest()
            for f in [*files, *by_date, *twins]}
    assert spooled == sent

    pacs = received(storescp, uids[0])
    assert len(pacs) == 4
    for ds in pacs:  # overwrite
        assert (ds.PatientID, ds.IssuerOfPatientID, ds.PatientBirthDate, ds.PatientSex,
                ds.RequestedProcedureID) == ("P-100", "HOSP", "19700101", "F", "RP1")
        assert str(ds.PatientName) == "Müller^Jürgen" and ds.SpecificCharacterSet == "ISO_IR 192"
        assert ds.AccessionNumber == "ACC-1"
    archived = [dcmread(p) for p in (tmp_path / "archive").rglob("*.dcm")]
    mine = [ds for ds in archived if ds.StudyInstanceUID == uids[0]]
    assert len(mine) == 4
    for ds in mine:  # fill: what was there stays
        assert (ds.PatientID, str(ds.PatientName), ds.PatientSex) == ("TMP123", "WRONG^NAME", "M")
        assert (ds.PatientBirthDate, ds.IssuerOfPatientID, ds.RequestedProcedureID) == \
            ("19700101", "HOSP", "RP1")
    for ds in received(storescp, uids[1]):  # no accession: by PatientID + StudyDate
        assert (str(ds.PatientName), ds.AccessionNumber) == ("Roe^Jane", "ACC-7")
    for ds in received(storescp, uids[2]):  # two different entries: unchanged
        assert (ds.PatientID, str(ds.PatientName)) == ("TMP9", "X^Y")

    pacs_events = [e for e in hist[uids[0]] if e.startswith("coerce for pacs")]
    assert pacs_events == [
        "coerce for pacs (destination 'pacs'): worklist WLSCP by AccessionNumber 'ACC-1' "
        "(overwrite): PatientID 'TMP123' → 'P-100'; IssuerOfPatientID '' → 'HOSP'; "
        "PatientName 'WRONG^NAME' → 'Müller^Jürgen'; PatientBirthDate '' → '19700101'; "
        "PatientSex 'M' → 'F'; RequestedProcedureID '' → 'RP1'"], hist[uids[0]]
    assert [e for e in hist[uids[0]] if e.startswith("coerce for archive")] == [
        "coerce for archive (destination 'archive'): worklist WLSCP by AccessionNumber "
        "'ACC-1' (fill): IssuerOfPatientID '' → 'HOSP'; PatientBirthDate '' → '19700101'; "
        "RequestedProcedureID '' → 'RP1'"]
    assert any("2 different entries; not guessed, sent unchanged" in e for e in hist[uids[2]])
    assert [e for e in hist[uids[1]] if e.startswith("coerce for archive")] == [
        "coerce for archive (destination 'archive'): no match for PatientID 'P-300', "
        "StudyDate '20250505' (worklist WLSCP (by accession): no match): sent unchanged"]
    assert explained.returncode == 0, explained.stderr
    assert "coerce (overwrite;" in explained.stdout
    assert "done: coerce for pacs (destination 'pacs'): worklist WLSCP" in explained.stdout


def test_worklist_down(tmp_path: Path, storescp: StoreSCP) -> None:
    """The worklist SCP is down: hold (the default) sends nothing and retries until it is
    back, then sends coerced; send delivers unchanged and says so; fail dead-letters."""
    port = free_port()
    wl = WorklistSCP(tmp_path / "wl", port)
    wl.add("one", AccessionNumber="ACC-1", PatientID="P-100", PatientName="Right^Name")
    files = study(tmp_path, "s1", AccessionNumber="ACC-1", PatientID="TMP", PatientName="")
    uid = str(dcmread(files[0]).StudyInstanceUID)
    lookup = {"ae": WL_AE, "timeout": "3s"}
    cfg = wl_config(wl, storescp, tmp_path)
    cfg["destinations"] = {
        "pacs": {"type": "dicom", "ae_title": "STORESCP", "host": "127.0.0.1",
                 "port": storescp.port,
                 "coerce": {"mode": "overwrite", "sources": [{"worklist": lookup}]}},  # hold
        "copy": {"type": "folder", "path": str(tmp_path / "copy"),
                 "coerce": {"on_unavailable": "send", "sources": [{"worklist": lookup}]}},
        "strict": {"type": "folder", "path": str(tmp_path / "strict"),
                   "coerce": {"on_unavailable": "fail", "sources": [{"worklist": lookup}]}},
    }
    cfg["routes"] = [{"to": ["pacs", "copy", "strict"]}]
    with Router(tmp_path / "router", cfg) as router:
        assert run_storescu(files, router.port).returncode == 0
        wait_until(lambda: list((tmp_path / "copy").rglob("*.dcm")) and
                   dead_jobs(router, "strict"), timeout=90, interval=0.5,
                   what="copy delivered and strict dead")
        copies = [dcmread(p) for p in (tmp_path / "copy").rglob("*.dcm")]
        assert {ds.PatientID for ds in copies} == {"TMP"}  # unchanged
        assert not storescp.files()  # held: nothing sent uncorrected
        with wl:  # the worklist comes back on its port: the held job goes, corrected
            wait_until(lambda: len(received(storescp, uid)) == 4, timeout=90, interval=0.5,
                       what="pacs delivered after the worklist came back")
        hist = history(router, uid)
        log = router.log(5000)
    assert "Traceback" not in log
    assert {ds.PatientID for ds in received(storescp, uid)} == {"P-100"}
    assert {str(ds.PatientName) for ds in received(storescp, uid)} == {"Right^Name"}
    assert not list((tmp_path / "strict").rglob("*.dcm"))
    assert any(e.startswith("coerce for copy") and "sent unchanged (on_unavailable: send)"
               in e for e in hist), hist
    assert "coerce: worklist WLSCP: cannot" in log or "coerce: worklist WLSCP" in log


def test_table_maps_ids_between_sites_before_deidentification(tmp_path: Path,
                                                              monkeypatch) -> None:
    """A CSV maps site A's PatientID + IssuerOfPatientID to site B's; a route that also
    de-identifies pseudonymises the mapped ID (coerce runs first) and no coerced name
    survives; the file is read again when it changes."""
    monkeypatch.setenv("DEID_SECRET", "s3cret")
    table = tmp_path / "ids.csv"

    def write(rows: list[list[str]]) -> None:
        with open(table, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["from.PatientID", "from.IssuerOfPatientID", "to.PatientID",
                        "to.IssuerOfPatientID", "to.PatientName"])
            w.writerows(rows)

    write([["A-1", "SITE_A", "B-9", "SITE_B", "Ωmega^Zoë"]])
    first = study(tmp_path, "s1", n=2, PatientID="A-1", IssuerOfPatientID="SITE_A",
                  PatientName="Site^A")
    other = study(tmp_path, "s2", n=2, PatientID="A-1", IssuerOfPatientID="SITE_X")
    later = study(tmp_path, "s3", n=2, PatientID="A-2", IssuerOfPatientID="SITE_A")
    coerce = {"mode": "overwrite", "sources": [{"table": {"file": str(table)}}]}
    with Router(tmp_path / "router", {
        "keep_after_delivery": True,
        "destinations": {"siteb": {"type": "folder", "path": str(tmp_path / "siteb")},
                         "research": {"type": "folder", "path": str(tmp_path / "research")}},
        "routes": [{"name": "to site B", "to": "siteb", "coerce": coerce},
                   {"name": "research", "to": "research", "coerce": coerce,
                    "transforms": [{"deidentify": {"patient_id": "ANON-{hash:8}"}}]}],
    }) as router:
        for f in (first, other):
            assert run_storescu(f, router.port).returncode == 0
        for f in (first, other):
            router.wait_state(str(dcmread(f[0]).StudyInstanceUID), "delivered")
        write([["A-1", "SITE_A", "B-9", "SITE_B", "Ωmega^Zoë"],
               ["A-2", "SITE_A", "B-10", "SITE_B", "Ten^B"]])
        assert run_storescu(later, router.port).returncode == 0
        router.wait_state(str(dcmread(later[0]).StudyInstanceUID), "delivered")
        log = router.log(5000)
    assert "Traceback" not in log

    def got(folder: str, f: list[Path]) -> list[Dataset]:
        uid = dcmread(f[0]).StudyInstanceUID
        return [ds for ds in (dcmread(p) for p in (tmp_path / folder).rglob("*.dcm"))
                if ds.StudyInstanceUID == uid]

    assert {(d.PatientID, d.IssuerOfPatientID, str(d.PatientName)) for d in got("siteb", first)} \
        == {("B-9", "SITE_B", "Ωmega^Zoë")}
    assert {(d.PatientID, d.IssuerOfPatientID) for d in got("siteb", other)} == \
        {("A-1", "SITE_X")}  # another issuer: not in the table, unchanged
    assert {d.PatientID for d in got("siteb", later)} == {"B-10"}  # the file changed
    deid = from_options({"patient_id": "ANON-{hash:8}"})
    research = [p for p in (tmp_path / "research").rglob("*.dcm")]
    assert len(research) == 6
    pseudonyms = {dcmread(p).PatientID for p in research}
    assert deid.pseudonym("ANON-{hash:8}", "B-9") in pseudonyms  # of the coerced ID
    for p in research:
        raw = p.read_bytes()
        assert "Ωmega".encode() not in raw and b"Zo" not in raw and b"B-9" not in raw


class FakeState:
    """What the hl7 branch's State offers (``latest_hl7_order``), and the history."""

    def __init__(self, orders: dict[str, dict[str, str]]) -> None:
        self.orders = orders
        self.notes: list[str] = []
        self.asked: list[tuple[str | None, str | None]] = []

    def latest_hl7_order(self, accession: str | None = None,
                         patient_id: str | None = None) -> dict[str, str] | None:
        self.asked.append((accession, patient_id))
        return self.orders.get(accession or "") or self.orders.get(patient_id or "")

    def history(self, study_uid: str) -> list[tuple[float, str]]:
        return [(0.0, n) for n in self.notes]

    def note(self, study_uid: str, text: str) -> None:
        self.notes.append(text)


def test_hl7_source_and_sources_in_order(tmp_path: Path) -> None:
    """The hl7 lookup (a fake state: the HL7 store is another branch's): each attribute from
    the first source that gives it; asked once per identity, not per instance."""
    from dicomrouter.coerce import CoerceRun
    from dicomrouter.lookups import Lookups

    cfg = from_dict({"destinations": {"d": {"type": "folder", "path": str(tmp_path / "d")}},
                     "routes": [{"to": "d", "coerce": {"mode": "overwrite", "sources": [
                         {"table": {"rows": [{"from": {"PatientID": "OLD"},
                                              "to": {"PatientID": "NEW"}}]}}, "hl7"]}}]},
                    tmp_path, "t")
    state = FakeState({"ACC-5": {"PatientID": "H-1", "PatientName": "Hl7^Name",
                                 "AccessionNumber": "ACC-5", "PatientSex": ""}})
    run = CoerceRun(cfg.routes[0].coerce, "route 'x'", Lookups(cfg, state), state, "1.2.3", "d")
    for _ in range(3):
        ds = Dataset()
        ds.PatientID, ds.PatientName, ds.AccessionNumber, ds.PatientSex = "OLD", "", "ACC-5", "M"
        run.apply(ds)
        assert (ds.PatientID, str(ds.PatientName), ds.PatientSex) == ("NEW", "Hl7^Name", "M")
    assert state.asked == [("ACC-5", "OLD")]
    assert state.notes == ["coerce for d (route 'x'): table by PatientID 'OLD'; hl7 by "
                           "AccessionNumber 'ACC-5' (overwrite): PatientID 'OLD' → 'NEW'; "
                           "PatientName '' → 'Hl7^Name'"]
    # no HL7 store in this router: nothing found, nothing changed
    bare = CoerceRun(cfg.routes[0].coerce, "r", Lookups(cfg, object()), state, "1.2.3", "d")
    ds = Dataset()
    ds.PatientID, ds.AccessionNumber = "X", "ACC-5"
    bare.apply(ds)
    assert ds.PatientID == "X"


@pytest.mark.parametrize(("coerce", "message"), [
    ({"sources": []}, "routes[0].coerce.sources: required"),
    ({"sources": [{"worklist": {"ae": "NOPE"}}]},
     "routes[0].coerce.sources[0].worklist.ae: NOPE is not in known_aes"),
    ({"sources": ["hl7"], "attributes": ["StudyInstanceUID"]},
     "routes[0].coerce.attributes[0]: StudyInstanceUID cannot be coerced"),
    ({"sources": ["hl7"], "on_unavailable": "wait"}, "routes[0].coerce.on_unavailable: one of"),
    ({"sources": [{"worklist": {"ae": "WL", "match": ["date"]}}]},
     "routes[0].coerce.sources[0].worklist.match[0]: one of accession, patient_date"),
    ({"sources": [{"table": {"rows": [{"from": {"PatientID": "A"}, "to": {"PatientID": "B"}},
                                      {"from": {"PatientID": "A"}, "to": {"PatientID": "C"}}]}}]},
     "routes[0].coerce.sources[0].table.rows[1].from: the same values as [0]"),
    ({"sources": [{"table": {"rows": [{"from": {"PatientID": "A"},
                                       "to": {"StudyDescription": "B"}}]}}]},
     "routes[0].coerce.sources[0].table: gives StudyDescription, which is not in attributes"),
    ({"sources": [{"worklist": {"ae": "WL"}, "hl7": {}}]},
     "routes[0].coerce.sources[0]: one lookup per entry"),
    ({"sources": ["hl7"], "to": "mv"}, "routes[0].coerce: mv is a move destination"),
])
def test_bad_coerce_names_the_key(tmp_path: Path, coerce: dict[str, Any], message: str) -> None:
    to = coerce.pop("to", "a")
    with pytest.raises(ConfigError) as err:
        from_dict({"known_aes": {"WL": {"host": "127.0.0.1", "port": 104}},
                   "destinations": {"a": {"type": "folder", "path": "x"},
                                    "mv": {"type": "move", "move_destination": "X",
                                           "source": {"ae_title": "P", "host": "h",
                                                      "port": 104}}},
                   "routes": [{"to": to, "coerce": coerce}]}, tmp_path, "t")
    assert str(err.value).startswith(message), str(err.value)


def test_bad_csv_names_the_line(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text("from.PatientID,to.PatientID\nA,B\nA,C\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        from_dict({"destinations": {"a": {"type": "folder", "path": "x", "coerce": {
            "sources": [{"table": {"file": str(table)}}]}}}}, tmp_path, "t")
    assert str(err.value) == (f"destinations.a.coerce.sources[0].table.file: {table} line 3: "
                              f"the same values as {table} line 2 (a table gives one answer "
                              "per key: remove one of them)"), str(err.value)


def test_character_set_switch_keeps_the_other_text(tmp_path: Path) -> None:
    """A looked-up name the dataset's character set (ISO_IR 100) cannot hold switches the
    copy to UTF-8; the Latin-1 text already there is re-encoded, not garbled; the pixel data
    is the same bytes; the lookup is counted in /metrics."""
    from dicomrouter.coerce import CoerceRun
    from dicomrouter.lookups import Lookups
    from dicomrouter.metrics import REGISTRY
    from dicomrouter.transforms import transform_file

    src = study(tmp_path, "s", n=1, SpecificCharacterSet="ISO_IR 100",
                InstitutionName="Hôpital Saint-Éloi", PatientID="A-1", PatientName="Dupont^Zoé")[0]
    cfg = from_dict({"destinations": {"d": {"type": "folder", "path": str(tmp_path / "d")}},
                     "routes": [{"to": "d", "coerce": {"mode": "overwrite", "sources": [
                         {"table": {"rows": [{"from": {"PatientID": "A-1"},
                                              "to": {"PatientName": "Παπαδόπουλος^Νίκος"}}]}}
                     ]}}]}, tmp_path, "t")
    state = FakeState({})
    labels = {"destination": "d", "outcome": "changed"}
    before = REGISTRY.get_sample_value("dicomrouter_coercions_total", labels) or 0
    run = CoerceRun(cfg.routes[0].coerce, "r", Lookups(cfg, state), state, "1.2", "d")
    out = tmp_path / "out.dcm"
    with open(src, "rb") as f:
        transform_file(f, [run], str(out))
    got, orig = dcmread(out), dcmread(src)
    assert got.SpecificCharacterSet == "ISO_IR 192"
    assert str(got.PatientName) == "Παπαδόπουλος^Νίκος"
    assert got.InstitutionName == "Hôpital Saint-Éloi"
    assert got.PixelData == orig.PixelData
    assert "Παπαδόπουλος".encode() in out.read_bytes()
    assert REGISTRY.get_sample_value("dicomrouter_coercions_total", labels) == before + 1


def test_table_file_changes(tmp_path: Path) -> None:
    """A changed CSV is read again; one that no longer parses keeps the previous rows; a
    file that is gone makes the source unavailable (on_unavailable decides)."""
    import os

    from dicomrouter.lookups import Table, Unavailable

    path = tmp_path / "t.csv"
    path.write_text("from.PatientID,to.PatientID\nA,B\n", encoding="utf-8")
    cfg = from_dict({"destinations": {"d": {"type": "folder", "path": "x", "coerce": {
        "sources": [{"table": {"file": str(path)}}]}}}}, tmp_path, "t")
    table = Table(cfg.destinations["d"].coerce.sources[0].table)
    assert table.ask({"PatientID": "A"}, ("PatientID",)).values == {"PatientID": "B"}
    path.write_text("from.PatientID,to.PatientID\nA,C\nZ,Y\n", encoding="utf-8")
    os.utime(path, ns=(1, 10**18))  # a new modification time whatever the clock's resolution
    assert table.ask({"PatientID": "A"}, ("PatientID",)).values == {"PatientID": "C"}
    path.write_text("from.PatientID,to.PatientID\nA,D\nA,E\n", encoding="utf-8")  # duplicate
    os.utime(path, ns=(1, 2 * 10**18))
    assert table.ask({"PatientID": "A"}, ("PatientID",)).values == {"PatientID": "C"}
    assert table.ask({"PatientID": "Q"}, ("PatientID",)) is None
    path.unlink()
    with pytest.raises(Unavailable):
        table.ask({"PatientID": "A"}, ("PatientID",))
