"""The test peers and the synthetic generator work against the real programs."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from peers import (
    REQUIRE_PEERS_ENV,
    SAMPLE_DIR,
    MotoS3,
    Orthanc,
    StoreSCP,
    dcmtk,
    find_dcmtk,
    free_port,
    require_peer,
    run_storescu,
    sop_uids,
    wait_until,
)
from pydicom import dcmread
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from dicomrouter.sample import TRANSFER_SYNTAXES, generate, resolve_transfer_syntax, sop_class_for

COMMITTED = {
    "ct_explicit": ExplicitVRLittleEndian,
    "mr_rle": RLELossless,
    "mr_deflated": DeflatedExplicitVRLittleEndian,
    "ot_multiframe_implicit": ImplicitVRLittleEndian,
}


def committed_files(*names: str) -> list[Path]:
    """The committed sample files of the named subdirectories (all if none named)."""
    return sorted(p for n in (names or tuple(COMMITTED)) for p in (SAMPLE_DIR / n).rglob("*.dcm"))


def transfer_syntaxes(paths: list[Path]) -> dict[str, str]:
    """SOP Instance UID -> transfer syntax UID."""
    result = {}
    for p in paths:
        ds = dcmread(p, stop_before_pixels=True)
        result[str(ds.SOPInstanceUID)] = str(ds.file_meta.TransferSyntaxUID)
    return result


# --------------------------------------------------------------------------- generator


@pytest.mark.parametrize("frames", [1, 3])
@pytest.mark.parametrize("ts_name", sorted(TRANSFER_SYNTAXES))
def test_generated_files_parse_and_decode(tmp_path: Path, ts_name: str, frames: int) -> None:
    paths = generate(tmp_path, studies=1, series=1, instances=2, modality="MR", rows=24,
                     cols=40, frames=frames, transfer_syntax=ts_name, seed=7)
    assert len(paths) == 2
    for number, path in enumerate(paths, 1):
        ds = dcmread(path)
        assert ds.preamble is not None and ds.file_meta.MediaStorageSOPInstanceUID == (
            ds.SOPInstanceUID
        )
        assert ds.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[ts_name]
        assert ds.SOPClassUID == (
            MRImageStorage if frames == 1 else MultiFrameGrayscaleWordSecondaryCaptureImageStorage
        )
        for keyword in ("PatientID", "PatientName", "StudyDate", "StudyTime", "AccessionNumber",
                        "StudyDescription", "SeriesDescription", "StudyID", "Modality"):
            assert str(ds.data_element(keyword).value), keyword
        assert ds.Modality == "MR"
        assert (ds.SeriesNumber, ds.InstanceNumber) == (1, number)
        assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsAllocated == 16
        arr = ds.pixel_array
        assert arr.dtype == np.uint16
        assert arr.shape == ((24, 40) if frames == 1 else (frames, 24, 40))
        assert arr.max() > arr.min()


def test_generate_layout_uids_and_determinism(tmp_path: Path) -> None:
    first = generate(tmp_path / "a", studies=2, series=2, instances=2, rows=16, cols=16, seed=3)
    second = generate(tmp_path / "b", studies=2, series=2, instances=2, rows=16, cols=16, seed=3)
    rel = [p.relative_to(tmp_path / "a").as_posix() for p in first]
    assert rel == [f"study{st}/series{se}/instance{i}.dcm"
                   for st in (1, 2) for se in (1, 2) for i in (1, 2)]

    a = [dcmread(p) for p in first]
    b = [dcmread(p) for p in second]
    assert len({ds.SOPInstanceUID for ds in a + b}) == 16, "UIDs must be fresh on every call"
    assert len({ds.StudyInstanceUID for ds in a}) == 2
    assert len({ds.SeriesInstanceUID for ds in a}) == 4
    assert len({ds.PatientID for ds in a}) == 1, "all studies belong to one patient"
    assert all(ds.SOPClassUID == CTImageStorage for ds in a)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.pixel_array, y.pixel_array), "pixels deterministic with seed"
        assert (x.PatientID, x.AccessionNumber, x.StudyDate) == (
            y.PatientID, y.AccessionNumber, y.StudyDate)

    third = generate(tmp_path / "c", series=1, instances=1, rows=16, cols=16, seed=4,
                     patient_id="PID42")
    ds = dcmread(third[0])
    assert ds.PatientID == "PID42"
    assert not np.array_equal(ds.pixel_array, a[0].pixel_array)


def test_sop_classes_and_transfer_syntax_names() -> None:
    assert sop_class_for("CT", 1) == CTImageStorage
    assert sop_class_for("MR", 1) == MRImageStorage
    assert sop_class_for("US", 1) == SecondaryCaptureImageStorage
    assert sop_class_for("CT", 2) == MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    assert resolve_transfer_syntax("RLE") == RLELossless
    assert resolve_transfer_syntax(str(ImplicitVRLittleEndian)) == ImplicitVRLittleEndian
    with pytest.raises(ValueError, match="unsupported transfer syntax"):
        resolve_transfer_syntax("1.2.840.10008.1.2.4.50")
    with pytest.raises(ValueError, match="frames"):
        generate(Path("/nonexistent"), frames=0)


def test_committed_samples_are_valid() -> None:
    files = committed_files()
    assert len(files) == 9
    assert sum(p.stat().st_size for p in files) < 300_000
    for name, ts in COMMITTED.items():
        for path in committed_files(name):
            ds = dcmread(path)
            assert ds.file_meta.TransferSyntaxUID == ts, path
            assert ds.PatientID.startswith("SAMPLE")
            assert ds.pixel_array.size > 0


# --------------------------------------------------------------------------- helpers


def test_dcmtk_finder_skips_python_shims(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dcmtk_available: dict[str, str]
) -> None:
    real = dcmtk("storescu")
    assert Path(real).read_bytes()[:4] == b"\x7fELF"

    fake_dir = tmp_path / "bin"
    fake_dir.mkdir()
    script = fake_dir / "storescu"
    script.write_text("#!/bin/sh\necho pynetdicom\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_dir}{os.pathsep}{os.environ['PATH']}")
    assert dcmtk("storescu") == real, "a script earlier in PATH must not win"

    monkeypatch.setenv("DCMTK_BIN", str(fake_dir))
    assert find_dcmtk("storescu") is None
    monkeypatch.delenv("DICOMROUTER_REQUIRE_PEERS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="DCMTK storescu not available"):
        dcmtk("storescu")  # a test needing it is gated where it uses it
    monkeypatch.setenv("DICOMROUTER_REQUIRE_PEERS", "1")
    with pytest.raises(pytest.fail.Exception, match="DCMTK storescu not available"):
        dcmtk("storescu")
    (fake_dir / "storescu").unlink()
    (fake_dir / "storescu").symlink_to(real)
    assert dcmtk("storescu") == str(fake_dir / "storescu")


def test_require_peer_and_wait_until(monkeypatch: pytest.MonkeyPatch) -> None:
    require_peer("present", True, "nothing")
    monkeypatch.delenv(REQUIRE_PEERS_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="install frob-pkg"):
        require_peer("frob", False, "frob-pkg")
    monkeypatch.setenv(REQUIRE_PEERS_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="frob"):
        require_peer("frob", False, "frob-pkg")

    calls = iter([0, 0, 5])
    assert wait_until(lambda: next(calls), timeout=10, interval=0.01) == 5
    with pytest.raises(AssertionError, match="the moon"):
        wait_until(lambda: False, timeout=0.2, interval=0.05, what="the moon")

    def boom() -> bool:
        raise ConnectionRefusedError("nope")

    with pytest.raises(AssertionError, match="nope"):
        wait_until(boom, timeout=0.2, interval=0.05, ignore=(OSError,))
    assert 0 < free_port() < 65536


# --------------------------------------------------------------------------- DCMTK


def test_storescu_to_storescp_all_arrive_as_stored(
    storescp: StoreSCP, sample_study: list[Path]
) -> None:
    extra = committed_files("mr_rle", "mr_deflated", "ot_multiframe_implicit")
    sent = sample_study + extra
    result = run_storescu([sample_study[0].parent.parent, *extra], storescp.port, aet=storescp.aet)
    assert result.returncode == 0, result.stderr
    assert "-xf" in result.args, "mixed transfer syntaxes use a generated association profile"
    assert result.stderr.count("Received Store Response (Success)") == len(sent)

    expected = transfer_syntaxes(sent)
    wait_until(lambda: len(storescp.files()) >= len(sent), timeout=60,
               what=f"{len(sent)} files in {storescp.out_dir}")
    received = transfer_syntaxes(storescp.files())
    assert received == expected, "every instance arrives in its own transfer syntax"

    by_uid = {str(dcmread(p).SOPInstanceUID): p for p in sent}
    for path in storescp.files():
        ds = dcmread(path)
        assert np.array_equal(ds.pixel_array, dcmread(by_uid[ds.SOPInstanceUID]).pixel_array)


@pytest.mark.parametrize(
    ("sample", "flag"),
    [("mr_rle", "-xr"), ("mr_deflated", "-xd"), ("ot_multiframe_implicit", "-xi"),
     ("ct_explicit", "-x=")],
)
def test_storescu_single_syntax_proposal(storescp: StoreSCP, sample: str, flag: str) -> None:
    files = committed_files(sample)
    result = run_storescu([SAMPLE_DIR / sample], storescp.port, aet=storescp.aet)
    assert result.returncode == 0, result.stderr
    assert "-R" in result.args and flag in result.args
    wait_until(lambda: len(storescp.files()) >= len(files), what=f"{sample} at storescp")
    assert transfer_syntaxes(storescp.files()) == transfer_syntaxes(files)


def test_storescu_reports_refused_association(
    tmp_path: Path, dcmtk_available: dict[str, str]
) -> None:
    with StoreSCP(tmp_path / "refusing", extra=["--refuse"]) as scp:
        result = run_storescu(committed_files("mr_rle"), scp.port, aet=scp.aet)
    assert result.returncode != 0
    assert "Association" in result.stderr
    assert scp.files() == []


# --------------------------------------------------------------------------- Orthanc


def test_storescu_to_orthanc(
    orthanc: Callable[..., Orthanc], sample_study: list[Path], dcmtk_available: dict[str, str]
) -> None:
    pacs = orthanc(aet="PACS")
    extra = committed_files("mr_rle", "mr_deflated", "ot_multiframe_implicit")
    sent = sample_study + extra
    result = run_storescu(sent, pacs.dicom_port, aet=pacs.aet)
    assert result.returncode == 0, result.stderr

    want = sop_uids(sent)
    pacs.wait_for_instances(want, timeout=60)
    assert pacs.instance_sop_uids() == want

    rle = dcmread(committed_files("mr_rle")[0])
    stored = dcmread(io.BytesIO(pacs.instance_file(str(rle.SOPInstanceUID))))
    assert stored.file_meta.TransferSyntaxUID == RLELossless
    assert np.array_equal(stored.pixel_array, rle.pixel_array)


def test_orthanc_dicomweb_lua_and_modalities(
    orthanc: Callable[..., Orthanc], storescp: StoreSCP, tmp_path: Path, sample_study: list[Path]
) -> None:
    lua = tmp_path / "hooks.lua"
    lua.write_text(
        "function OnStoredInstance(instanceId, tags, metadata, origin)\n"
        "  print('LUA-STORED ' .. tags['SOPInstanceUID'])\n"
        "end\n"
        "function OnStableStudy(studyId, tags, metadata)\n"
        "  print('LUA-STABLE ' .. tags['StudyInstanceUID'])\n"
        "end\n"
    )
    pacs = orthanc(aet="WEBPACS", dicomweb=True, lua_scripts=[lua], stable_age=1,
                   modalities={"downstream": [storescp.aet, "127.0.0.1", storescp.port]})
    result = run_storescu(sample_study, pacs.dicom_port, aet=pacs.aet)
    assert result.returncode == 0, result.stderr
    study_uid = str(dcmread(sample_study[0]).StudyInstanceUID)

    pacs.wait_for_instances(sop_uids(sample_study))
    studies = pacs.get("/dicom-web/studies")
    assert [s["0020000D"]["Value"][0] for s in studies] == [study_uid]
    wait_until(lambda: f"LUA-STABLE {study_uid}" in pacs.log_path.read_text(), timeout=60,
               what="Lua OnStableStudy after StableAge")
    assert pacs.log_path.read_text().count("LUA-STORED ") == len(sample_study)

    # The configured modality works as a C-STORE destination.
    pacs.post("/modalities/downstream/store", {"Resources": [pacs.get("/studies")[0]],
                                               "Synchronous": True})
    wait_until(lambda: storescp.sop_uids() == sop_uids(sample_study), timeout=60,
               what="Orthanc -> storescp forward")


# --------------------------------------------------------------------------- S3


def test_moto_s3_answers_boto3(moto_s3: MotoS3) -> None:
    import boto3

    client = boto3.client("s3", **moto_s3.client_kwargs())
    assert moto_s3.endpoint_url.startswith("http://127.0.0.1:")
    client.create_bucket(Bucket="dicomrouter-test")
    client.put_object(Bucket="dicomrouter-test", Key="study/1.dcm", Body=b"DICM")
    assert [b["Name"] for b in client.list_buckets()["Buckets"]] == ["dicomrouter-test"]
    body = client.get_object(Bucket="dicomrouter-test", Key="study/1.dcm")["Body"].read()
    assert body == b"DICM"


def test_free_ports_are_outside_the_range_outgoing_connections_use() -> None:
    """A server's port is drawn below the kernel's ephemeral range (an outgoing connection
    of a test beside cannot take it as its local port), binds, and is not given twice."""
    import socket

    low, high = (int(v) for v in
                 Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(p < low or p > high for p in ports), [p for p in ports if low <= p <= high]
    for port in ports[:20]:
        with socket.create_server(("127.0.0.1", port)):
            pass
