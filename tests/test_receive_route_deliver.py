"""The value chain end to end with real peers: DCMTK storescu → router → folder tree / Orthanc."""

from __future__ import annotations

import socket
import struct
import subprocess
from pathlib import Path

import pytest
from peers import SAMPLE_DIR, Orthanc, StoreSCP, dcmtk, free_port, run_storescu, wait_until
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config, build_context
from router_fixtures import Router, dataset_bytes, dicomrouter, tags_of

from dicomrouter.dicomfile import safe_component
from dicomrouter.dimse import encode_command, pdata, text
from dicomrouter.sample import generate
from dicomrouter.spool import note


def sample_files() -> list[Path]:
    """The committed samples: RLE, deflated, multi-frame implicit (each its own study)."""
    files = sorted(p for p in SAMPLE_DIR.rglob("*.dcm"))
    assert len(files) >= 4, "sample_dicom/ should hold the committed sample files"
    return files


def folder_router(tmp_path: Path, **extra: object) -> Router:
    return Router(tmp_path, {
        "destinations": {"archive": {"type": "folder", "path": str(tmp_path / "out")}},
        "routes": [{"name": "all", "to": ["archive"]}],
        **extra,
    })


def expected_path(root: Path, f: Path) -> Path:
    pid, study, series, sop = tags_of(f, "PatientID", "StudyInstanceUID", "SeriesInstanceUID",
                                      "SOPInstanceUID")
    return root / safe_component(pid) / study / series / f"{sop}.dcm"


RECEIVERS = pytest.mark.parametrize("receiver", ["fast", "pynetdicom"])


@RECEIVERS
def test_storescu_study_lands_in_folder_tree_byte_identical(tmp_path: Path, receiver: str) -> None:
    study = generate(tmp_path / "study", series=2, instances=3, rows=32, cols=32,
                     patient_id="../../etc", seed=7)
    files = study + sample_files()
    out = tmp_path / "out"
    with folder_router(tmp_path, receiver=receiver) as router:
        r = run_storescu([tmp_path / "study", *sample_files()], router.port, aet=router.aet)
        assert r.returncode == 0, r.stdout + r.stderr
        wait_until(lambda: all(expected_path(out, f).exists() for f in files), timeout=90,
                   what="every instance in the folder tree")
        for f in files:
            got = expected_path(out, f)
            assert dataset_bytes(got) == dataset_bytes(f), f"{got} differs from {f}"
            assert str(dcmread(got).file_meta.TransferSyntaxUID) == \
                str(dcmread(f).file_meta.TransferSyntaxUID)
            # the spool's marker and reception note (the sender's address) stay inside
            assert got.read_bytes()[:128] == bytes(128), f"{got}: preamble not zeros"
        # PatientID ../../etc stayed a harmless name inside the output folder
        assert (out / "_.._etc").is_dir()
        assert not (tmp_path / "etc").exists()
        written = [p for p in tmp_path.rglob("*.dcm") if out in p.parents]
        assert len(written) == len(files)
        assert not list(out.rglob("*.part")), "no temporary file left in the tree"
        # delivered studies leave the spool (keep_after_delivery defaults to false)
        wait_until(lambda: not list((router.spool / "data").rglob("*.dcm")), timeout=30,
                   what="spool emptied after delivery")
        log = router.log(2000)
        assert "complete" in log and "delivered to every destination" in log


@RECEIVERS
def test_unknown_calling_ae_is_rejected_and_logged(tmp_path: Path, receiver: str) -> None:
    with folder_router(tmp_path, allowed_calling_aes=["PACS"], receiver=receiver) as router:
        echo = [dcmtk("echoscu"), "-aec", router.aet, "127.0.0.1", str(router.port)]
        bad = subprocess.run([*echo[:1], "-aet", "INTRUDER", *echo[1:]], capture_output=True,
                             text=True, timeout=60)
        assert bad.returncode != 0
        wait_until(lambda: "rejected association from calling AE 'INTRUDER'" in router.log(),
                   timeout=30, what="rejection log line")
        good = subprocess.run([*echo[:1], "-aet", "PACS", *echo[1:]], capture_output=True,
                              text=True, timeout=60)
        assert good.returncode == 0, good.stdout + good.stderr
        f = generate(tmp_path / "one", series=1, instances=1, rows=8, cols=8, seed=2)[0]
        r = dicomrouter("send", str(f), "--port", str(router.port), "--calling-aet", "INTRUDER")
        assert r.returncode != 0 and "association rejected" in r.stderr
        assert "Calling AE title not recognised" in r.stderr
        assert "--calling-aet" in r.stderr and "INTRUDER" in r.stderr  # what to do, here
        assert "destination" not in r.stderr, r.stderr


def _raw_file(path: Path, body: bytes, sop_uid: str) -> Path:
    """A Part 10 file with a valid header and an arbitrary (here: broken) dataset body."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with open(path, "wb") as f:
        f.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(f, meta)  # type: ignore[arg-type]
        f.write(body)
    return path


@RECEIVERS
def test_each_spool_file_carries_its_reception_note(tmp_path: Path, receiver: str) -> None:
    """The routing keys of the association (listener, sender's address, AE titles) are in each
    spool file's preamble from the moment it is durable (spool/note.py): start-up's adoption of
    a slot, log record or orphan reads them there. Both receivers write it."""
    study = generate(tmp_path / "study", series=1, instances=3, rows=16, cols=16, seed=17)
    with folder_router(tmp_path, receiver=receiver, stable_age="1h") as router:
        r = run_storescu([tmp_path / "study"], router.port, aet=router.aet, calling="CT_NOTE")
        assert r.returncode == 0, r.stdout + r.stderr
        spooled = [router.spool / "data" / tags_of(f, "StudyInstanceUID")[0] /
                   f"{tags_of(f, 'SOPInstanceUID')[0]}.dcm" for f in study]
        wait_until(lambda: all(p.is_file() for p in spooled), timeout=60, what="the spool")
        for p in spooled:
            assert note.read(p.read_bytes()[:128]) == (
                {"_Listener": "main", "_SourceHost": "127.0.0.1"}, "CT_NOTE", router.aet), p


@RECEIVERS
def test_bad_datasets_get_failure_status_and_the_association_goes_on(tmp_path: Path,
                                                                     receiver: str) -> None:
    good = generate(tmp_path / "good", series=1, instances=2, rows=16, cols=16, seed=3)
    garbage = _raw_file(tmp_path / "garbage.dcm", b"\x08\x00\x16\x00UI\xf0\xff1.2.3" + b"\xff" * 7,
                        generate_uid())
    ds = dcmread(good[0])
    del ds.StudyInstanceUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    no_study = tmp_path / "nostudy.dcm"
    ds.save_as(no_study, enforce_file_format=True)
    bad_uid = dcmread(good[0])
    bad_uid.SOPInstanceUID = bad_uid.file_meta.MediaStorageSOPInstanceUID = "1.2.3/../../x"
    bad_uid_file = tmp_path / "baduid.dcm"
    bad_uid.save_as(bad_uid_file, enforce_file_format=True)

    with folder_router(tmp_path, receiver=receiver) as router:
        ae = AE(ae_title="TESTSCU")
        ae.requested_contexts = [build_context(CTImageStorage, [ExplicitVRLittleEndian])]
        old = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True  # send the bytes as they are, undecoded
        try:
            assoc = ae.associate("127.0.0.1", router.port, ae_title=router.aet)
            assert assoc.is_established
            statuses = [int(assoc.send_c_store(f).Status)
                        for f in (garbage, no_study, bad_uid_file, good[0], good[1])]
            assoc.release()
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = old
        assert all(0xC000 <= s <= 0xCFFF for s in statuses[:3]), [hex(s) for s in statuses]
        assert statuses[3:] == [0, 0]
        out = tmp_path / "out"
        wait_until(lambda: all(expected_path(out, f).exists() for f in good), timeout=60,
                   what="the good instances delivered")
        assert len(list(out.rglob("*.dcm"))) == 2
        log = router.log(2000)
        assert "refused with 0xC000" in log and "dataset has no StudyInstanceUID" in log
        assert "is not a valid UID" in log
        assert not router.partial_receptions(), "no partial file left behind"


@pytest.mark.parametrize("sender", ["fast", "pynetdicom"])
def test_dicom_destination_delivers_to_orthanc(tmp_path: Path, orthanc, sender: str) -> None:
    pacs: Orthanc = orthanc(aet="ORTHANC")
    study = generate(tmp_path / "study", series=3, instances=4, rows=32, cols=32, seed=11)
    rle = [f for f in sample_files() if "rle" in str(f)]
    sent = study + rle
    router = Router(tmp_path / "r", {
        "destinations": {"pacs": {"type": "dicom", "ae_title": "ORTHANC", "host": "127.0.0.1",
                                  "port": pacs.dicom_port, "sender": sender}},
        "routes": [{"name": "to pacs", "to": ["pacs"]}],
    })
    with router:
        r = run_storescu([tmp_path / "study", *rle], router.port, aet=router.aet)
        assert r.returncode == 0, r.stdout + r.stderr
        expected = {tags_of(f, "SOPInstanceUID")[0] for f in sent}
        pacs.wait_for_instances(expected, timeout=90)
        assert pacs.instance_sop_uids() == expected
        for f in (study[0], rle[0]):
            sop = tags_of(f, "SOPInstanceUID")[0]
            got = tmp_path / "from_orthanc.dcm"
            got.write_bytes(pacs.instance_file(sop))
            assert dataset_bytes(got) == dataset_bytes(f)
        st = router.status()
        assert st["queues"]["pacs"].get("delivered") == 2
        assert st["ledger"]["delivered"] == len(sent)


def test_one_study_over_several_associations(tmp_path: Path) -> None:
    """``associations: 4`` splits a study over 4 concurrent associations: storescp --fork (one
    child per association) logs 4 associations and receives every instance exactly once."""
    study = generate(tmp_path / "study", series=2, instances=20, rows=16, cols=16, seed=12)
    with StoreSCP(tmp_path / "storescp", extra=["--fork"]) as scp:
        before = scp.log(100000).count("Association Received")
        router = Router(tmp_path / "r", {
            "destinations": {"pacs": {"type": "dicom", "ae_title": "STORESCP",
                                      "host": "127.0.0.1", "port": scp.port,
                                      "associations": 4}},
            "routes": [{"name": "all", "to": ["pacs"]}],
        })
        with router:
            r = run_storescu([tmp_path / "study"], router.port, aet=router.aet)
            assert r.returncode == 0, r.stdout + r.stderr
            wait_until(lambda: router.status()["ledger"]["delivered"] == len(study),
                       timeout=90, what="the study delivered")
            ledger = router.status()["ledger"]
            assert "4 associations per study" in router.log(2000)
        expected = {tags_of(f, "SOPInstanceUID")[0] for f in study}
        wait_until(lambda: scp.sop_uids() == expected, timeout=30, what="storescp's files")
        assert len(scp.files()) == len(study)
        assert ledger["sends"] == len(study) and ledger["resent"] == 0
        assert scp.log(100000).count("Association Received") - before == 4


def test_send_cli_into_dcmtk_storescp(tmp_path: Path, storescp: StoreSCP) -> None:
    study = generate(tmp_path / "study", series=2, instances=3, rows=16, cols=16, seed=5)
    (tmp_path / "study" / "notes.txt").write_text("not dicom")
    r = dicomrouter("send", str(tmp_path / "study"), *[str(f) for f in sample_files()],
                    "--port", str(storescp.port), "--aet", storescp.aet)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "skipping" in r.stderr and "notes.txt" in r.stderr
    files = study + sample_files()
    assert f"sent {len(files)} of {len(files)} instance(s)" in r.stdout
    expected = {tags_of(f, "SOPInstanceUID")[0] for f in files}
    wait_until(lambda: storescp.sop_uids() == expected, timeout=60, what="all files at storescp")


def test_send_cli_fails_loudly(tmp_path: Path) -> None:
    study = generate(tmp_path / "study", series=1, instances=1, rows=8, cols=8, seed=5)
    r = dicomrouter("send", str(study[0]), "--port", str(free_port()))
    assert r.returncode != 0 and "no connection" in r.stderr


def test_echo_cli_against_orthanc(orthanc) -> None:
    pacs: Orthanc = orthanc(aet="ORTHANC")
    r = dicomrouter("echo", "--port", str(pacs.dicom_port), "--aet", "ORTHANC")
    assert r.returncode == 0, r.stderr
    assert "success" in r.stdout
    r = dicomrouter("echo", "--port", str(free_port()))
    assert r.returncode != 0 and "no connection" in r.stderr


def test_restart_delivers_a_complete_but_undelivered_study(tmp_path: Path) -> None:
    pacs_port = free_port()
    study = generate(tmp_path / "study", series=2, instances=2, rows=16, cols=16, seed=9)
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    cfg = {
        "destinations": {"pacs": {"type": "dicom", "ae_title": "ORTHANC", "host": "127.0.0.1",
                                  "port": pacs_port, "timeout": "5s"}},
        "routes": [{"name": "to pacs", "to": ["pacs"]}],
        "retry": {"initial": "1h"},
    }
    router = Router(tmp_path / "r", cfg)
    with router:
        assert run_storescu([tmp_path / "study"], router.port, aet=router.aet).returncode == 0
        wait_until(lambda: router.status()["retrying"], timeout=60,
                   what="the delivery to fail (Orthanc is not running yet)")
        st = router.status()
        assert st["retrying"][0]["study_uid"] == uid
        assert "no connection" in st["retrying"][0]["last_error"]
        assert st["studies"][0]["instances_in_spool"] == 4
    pacs = Orthanc(tmp_path / "orthanc", aet="ORTHANC")
    pacs.dicom_port = pacs_port
    with pacs, Router(tmp_path / "r", cfg) as router2:
        expected = {tags_of(f, "SOPInstanceUID")[0] for f in study}
        pacs.wait_for_instances(expected, timeout=90)
        router2.wait_state(uid, "delivered")
        assert "retried now rather than after their backoff" in router2.log(2000)


def test_protocol_garbage_and_aborts_do_not_hurt_the_router(tmp_path: Path) -> None:
    """Junk instead of an A-ASSOCIATE-RQ, an A-ABORT in the middle of a dataset, a connection
    dropped mid-PDU: each association ends, nothing partial is kept, the next sender is served."""
    study = generate(tmp_path / "study", series=1, instances=2, rows=64, cols=64, seed=41)
    with folder_router(tmp_path) as router:
        with socket.create_connection(("127.0.0.1", router.port)) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            s.settimeout(10)
            answer = s.recv(100)
            assert answer[:1] in (b"\x07", b"")  # A-ABORT, or simply closed
        # a real association that sends half a dataset, then aborts / drops the connection
        ae = AE(ae_title="HALFWAY")
        ae.requested_contexts = [build_context(CTImageStorage, [ExplicitVRLittleEndian])]
        for how in ("abort", "drop"):
            assoc = ae.associate("127.0.0.1", router.port, ae_title=router.aet)
            assert assoc.is_established
            cx = assoc.accepted_contexts[0].context_id
            sock = assoc.dul.socket.socket
            # a C-STORE-RQ command set, then one non-final dataset fragment
            cmd = encode_command([(0x0002, text(str(CTImageStorage), b"\x00")),
                                  (0x0100, struct.pack("<H", 1)),
                                  (0x0110, struct.pack("<H", 1)),
                                  (0x0700, struct.pack("<H", 0)),
                                  (0x0800, struct.pack("<H", 0)),
                                  (0x1000, text("1.2.3.4", b"\x00"))])
            sock.sendmsg(pdata(cx, 0x03, cmd))
            sock.sendmsg(pdata(cx, 0x00, dataset_bytes(study[0])[:3000]))
            if how == "abort":
                assoc.abort()
            else:
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
                assoc.kill()
        wait_until(lambda: not router.partial_receptions(), timeout=30,
                   what="partial receptions removed")
        assert run_storescu(study, router.port).returncode == 0
        out = tmp_path / "out"
        wait_until(lambda: all(expected_path(out, f).exists() for f in study), timeout=60,
                   what="the next sender's study delivered")
        assert len(list(out.rglob("*.dcm"))) == 2
        assert router.running
