"""Deflated Explicit VR Little Endian datasets: walked whole, received by both receivers, kept
byte for byte. The inflater once lost zlib's unconsumed input whenever a dataset inflated to
more than one window from one read, so pydicom's own ``image_dfl.dcm`` was refused."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
from peers import run_storescu, wait_until
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import AE
from router_fixtures import Router, dataset_bytes, tags_of

from dicomrouter.dicomfile import safe_component
from dicomrouter.sample import generate
from dicomrouter.walk import WINDOW, Malformed, check_file


def big_deflated(tmp_path: Path, rows: int = 1024, cols: int = 1024, seed: int = 1) -> Path:
    """A CT whose dataset inflates to ~100 windows from a few kB: a smooth, compressible
    gradient with a little structure, so the pixels can be compared after the trip."""
    src = generate(tmp_path / f"src{seed}", series=1, instances=1, rows=rows, cols=cols,
                   seed=seed)[0]
    ds = dcmread(src)
    y, x = np.mgrid[0:rows, 0:cols]
    ds.PixelData = ((x + y) % 4096).astype(np.uint16).tobytes()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    out = tmp_path / f"deflated{seed}.dcm"
    ds.save_as(out, implicit_vr=False, little_endian=True, enforce_file_format=True)
    ds = dcmread(out)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(out, enforce_file_format=True)
    return out


def test_walker_inflates_datasets_many_windows_long(tmp_path: Path) -> None:
    f = big_deflated(tmp_path)
    deflated = len(dataset_bytes(f))
    ds = dcmread(f)
    assert ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert len(ds.PixelData) > 30 * WINDOW > 10 * deflated, "the case this test is about"
    check_file(str(f))
    check_file(get_testdata_file("image_dfl.dcm"))


def test_walker_still_refuses_a_truncated_deflated_dataset(tmp_path: Path) -> None:
    f = big_deflated(tmp_path)
    raw = f.read_bytes()
    body = dataset_bytes(f)
    inflated = zlib.decompress(body, -zlib.MAX_WBITS)
    z = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    cut = z.compress(inflated[:-1000]) + z.flush()
    broken = tmp_path / "cut.dcm"
    broken.write_bytes(raw[:len(raw) - len(body)] + cut)
    with pytest.raises(Malformed):
        check_file(str(broken))
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(raw[:len(raw) - len(body)] + body[:len(body) // 2])
    with pytest.raises(Malformed):
        check_file(str(garbage))


def _landed(out: Path, f: Path) -> Path:
    pid, study, series, sop = tags_of(f, "PatientID", "StudyInstanceUID", "SeriesInstanceUID",
                                      "SOPInstanceUID")
    return out / safe_component(pid) / study / series / f"{sop}.dcm"


@pytest.mark.parametrize("receiver", ["fast", "pynetdicom"])
def test_deflated_cstore_from_dcmtk_and_pynetdicom(tmp_path: Path, receiver: str,
                                                   dcmtk_available: dict[str, str]) -> None:
    """storescu -xd and pynetdicom (the file's own bytes) send deflated datasets; each is
    acknowledged with Success and delivered byte-identical, its pixels intact."""
    by_dcmtk = [Path(get_testdata_file("image_dfl.dcm")), big_deflated(tmp_path, seed=2)]
    by_pynetdicom = big_deflated(tmp_path, seed=3)
    out = tmp_path / "out"
    config = {"receiver": receiver,
              "destinations": {"archive": {"type": "folder", "path": str(out)}},
              "routes": [{"name": "all", "to": ["archive"]}]}
    with Router(tmp_path, config) as router:
        r = run_storescu(by_dcmtk, router.port, aet=router.aet)
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stderr.count("Received Store Response (Success)") == 2, r.stderr

        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(dcmread(by_pynetdicom).SOPClassUID,
                                 DeflatedExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", router.port, ae_title=router.aet)
        assert assoc.is_established
        try:
            status = assoc.send_c_store(by_pynetdicom)  # the file's bytes, as stored
            assert status.Status == 0x0000
        finally:
            assoc.release()

        sent = [*by_dcmtk, by_pynetdicom]
        wait_until(lambda: all(_landed(out, f).exists() for f in sent), timeout=90,
                   what="the deflated instances in the folder tree")
        # pynetdicom sent the file's own bytes: they are kept as received, byte for byte
        assert dataset_bytes(_landed(out, by_pynetdicom)) == dataset_bytes(by_pynetdicom)
        for f in sent:  # storescu inflates and deflates again: the same dataset, other bytes
            got, want = dcmread(_landed(out, f)), dcmread(f)
            assert got.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
            assert np.array_equal(got.pixel_array, want.pixel_array)
            assert [e for e in got if e.tag != 0x7FE00010] == \
                [e for e in want if e.tag != 0x7FE00010]
        assert "Traceback" not in router.log(2000)

