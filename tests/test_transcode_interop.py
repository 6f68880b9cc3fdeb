"""Conversion for peers that refuse the stored syntax, checked by decoding what arrived.

Files in every syntax the router converts (Big Endian, RLE, JPEG Baseline, JPEG Extended, JPEG
Lossless, JPEG-LS, JPEG 2000; lossless and lossy) are made by DCMTK's own tools (dcmconv,
dcmcrle, dcmcjpeg, dcmcjpls) and by openjpeg, sent with storescu to the router, and delivered to
a DCMTK storescp accepting only Implicit VR Little Endian (+xi) and to an Orthanc accepting only
Little Endian. What arrives must decode to the very pixel array the source decodes to, with its
SOP Instance UID, and a lossy source must arrive flagged Lossy Image Compression = 01.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from peers import Orthanc, StoreSCP, dcmtk, peer_env, run_storescu, wait_until
from pydicom import dcmread
from pydicom.uid import JPEG2000, ImplicitVRLittleEndian, JPEG2000Lossless, generate_uid
from router_fixtures import Router

from dicomrouter.sample import generate

#: shared objects of the pixel codecs and numpy (as named in /proc/PID/maps)
CODEC_LIBRARIES = ("/numpy/", "gdcm", "openjpeg", "libjpeg", "/PIL/", "charls", "jpeg_ls")
LOSSY = {"jpeg_baseline_gray", "jpeg_baseline_rgb", "jpeg_extended", "jpegls_near", "j2k_lossy"}


def _tool(tool: str, *args: str | Path) -> None:
    r = subprocess.run([dcmtk(tool), *map(str, args)], capture_output=True, text=True,
                       env=peer_env(), timeout=120, check=False)
    assert r.returncode == 0, f"{tool} failed: {r.stdout}{r.stderr}"


def _eight_bit(src: Path, out: Path, rgb: bool) -> Path:
    """An 8-bit grayscale or RGB image (JPEG Baseline takes only 8-bit samples)."""
    ds = dcmread(src)
    arr = ds.pixel_array
    gray = ((arr - arr.min()) * 255 // max(1, int(arr.max() - arr.min()))).astype(np.uint8)
    if rgb:
        pixels = np.stack([gray, 255 - gray, gray // 2], axis=-1)
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    else:
        pixels = gray
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OB"
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name → file; each its own SOP Instance UID, all of one study."""
    d = tmp_path_factory.mktemp("transcode")
    names = ["explicit", "deflated", "big_endian", "big_endian_8bit", "rle", "jpeg_lossless",
             "jpeg_extended",
             "jpegls", "jpegls_near", "j2k", "j2k_lossy", "jpeg_baseline_gray",
             "jpeg_baseline_rgb"]
    sources = generate(d / "src", series=1, instances=len(names), rows=64, cols=80, seed=77)
    src = dict(zip(names, sorted(sources, key=lambda p: int(dcmread(p).InstanceNumber)),
                   strict=True))
    out = d / "send"
    out.mkdir()
    files = {n: out / f"{n}.dcm" for n in names}
    _tool("dcmconv", "+te", src["explicit"], files["explicit"])
    _tool("dcmconv", "+td", src["deflated"], files["deflated"])
    _tool("dcmconv", "+tb", src["big_endian"], files["big_endian"])
    _tool("dcmconv", "+tb", _eight_bit(src["big_endian_8bit"], d / "8bit.dcm", False),
          files["big_endian_8bit"])
    _tool("dcmcrle", src["rle"], files["rle"])
    _tool("dcmcjpeg", "+e1", src["jpeg_lossless"], files["jpeg_lossless"])
    _tool("dcmcjpeg", "+ee", src["jpeg_extended"], files["jpeg_extended"])
    _tool("dcmcjpls", src["jpegls"], files["jpegls"])
    _tool("dcmcjpls", "+en", src["jpegls_near"], files["jpegls_near"])
    _tool("dcmcjpeg", "+eb", _eight_bit(src["jpeg_baseline_gray"], d / "g.dcm", False),
          files["jpeg_baseline_gray"])
    _tool("dcmcjpeg", "+eb", _eight_bit(src["jpeg_baseline_rgb"], d / "c.dcm", True),
          files["jpeg_baseline_rgb"])
    for name, syntax, kwargs in (("j2k", JPEG2000Lossless, {}),
                                 ("j2k_lossy", JPEG2000, {"j2k_cr": [15]})):
        ds = dcmread(src[name])
        ds.compress(syntax, generate_instance_uid=False, **kwargs)
        ds.save_as(files[name], enforce_file_format=True)
    syntaxes = {str(dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
                for f in files.values()}
    assert len(syntaxes) == 11, syntaxes  # Big Endian and JPEG Baseline: two files each
    return files


def _codec_libraries(pid: int) -> set[str]:
    """The codec libraries mapped into a process."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {line.split()[-1] for line in maps.splitlines()
            if any(name in line.lower() for name in CODEC_LIBRARIES)}


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()]


def _check_arrived(corpus: dict[str, Path], arrived: dict[str, Path]) -> None:
    """Every file arrived uncompressed Little Endian with the source's decoded pixels."""
    for name, src in corpus.items():
        source = dcmread(src)
        uid = str(source.SOPInstanceUID)
        assert uid in arrived, f"{name} ({uid}) did not arrive"
        got = dcmread(arrived[uid])
        ts = got.file_meta.TransferSyntaxUID
        assert not ts.is_compressed and ts.is_little_endian, f"{name}: arrived as {ts.name}"
        expected = source.pixel_array
        assert got.pixel_array.shape == expected.shape, name
        assert np.array_equal(got.pixel_array, expected), f"{name}: pixels differ"
        assert got.PhotometricInterpretation in ("MONOCHROME2", "RGB"), name
        if name in LOSSY:
            assert got.get("LossyImageCompression") == "01", f"{name}: lossy not flagged"
        else:
            assert got.get("LossyImageCompression") in (None, "00"), name


@pytest.mark.parametrize("sender", ["fast", "pynetdicom"])
def test_conversions_to_storescp_implicit_only(tmp_path: Path, corpus: dict[str, Path],
                                               sender: str) -> None:
    with StoreSCP(tmp_path / "storescp", aet="IMPLICIT", accept_all=False,
                  extra=["+xi"]) as scp, Router(tmp_path / "router", {
        "destinations": {"old": {"type": "dicom", "ae_title": "IMPLICIT", "host": "127.0.0.1",
                                 "port": scp.port, "sender": sender}},
        "routes": [{"name": "all", "to": ["old"]}],
    }) as router:
        r = run_storescu(list(corpus.values()), router.port, aet=router.aet)
        assert r.returncode == 0, r.stdout + r.stderr
        study = str(dcmread(corpus["rle"]).StudyInstanceUID)
        router.wait_state(study, "delivered", timeout=120)
        arrived = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f
                   for f in scp.files()}
        for f in arrived.values():
            assert dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID == \
                ImplicitVRLittleEndian
        _check_arrived(corpus, arrived)
        assert "converted from Explicit VR Big Endian" in router.log(4000)
        assert "Traceback" not in router.log(10000)
        # the conversions ran in a process of their own (issue 25): the codecs and numpy are
        # loaded there, never in the router process
        assert not _codec_libraries(router.pid), _codec_libraries(router.pid)
        converters = [c for c in _children(router.pid) if _codec_libraries(c)]
        assert converters, "no conversion process with the codecs loaded"


def test_conversions_to_orthanc_little_endian_only(tmp_path: Path, corpus: dict[str, Path],
                                                   orthanc) -> None:
    pacs: Orthanc = orthanc(aet="LEONLY", extra_config={
        "AcceptedTransferSyntaxes": ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]})
    with Router(tmp_path / "router", {
        "destinations": {"pacs": {"type": "dicom", "ae_title": "LEONLY", "host": "127.0.0.1",
                                  "port": pacs.dicom_port}},
        "routes": [{"name": "all", "to": ["pacs"]}],
    }) as router:
        r = run_storescu(list(corpus.values()), router.port, aet=router.aet)
        assert r.returncode == 0, r.stdout + r.stderr
        uids = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f
                for f in corpus.values()}
        pacs.wait_for_instances(uids, timeout=120)
        arrived = {}
        for uid in uids:
            path = tmp_path / f"{uid}.dcm"
            path.write_bytes(pacs.instance_file(uid))
            arrived[uid] = path
        _check_arrived(corpus, arrived)


def test_transfer_syntaxes_preference(tmp_path: Path, corpus: dict[str, Path]) -> None:
    """``transfer_syntaxes`` says what to propose, in order: a peer taking everything gets JPEG
    2000 lossless from one destination and Implicit VR from the other; pixels unchanged."""
    sources = [corpus[n] for n in ("big_endian", "rle", "jpeg_lossless", "jpeg_baseline_rgb")]
    with StoreSCP(tmp_path / "a", aet="J2K") as j2k, \
            StoreSCP(tmp_path / "b", aet="IMPL") as impl, Router(tmp_path / "router", {
                "destinations": {
                    "j2k": {"type": "dicom", "ae_title": "J2K", "host": "127.0.0.1",
                            "port": j2k.port, "transfer_syntaxes": ["JPEG2000Lossless"]},
                    "impl": {"type": "dicom", "ae_title": "IMPL", "host": "127.0.0.1",
                             "port": impl.port, "sender": "pynetdicom",
                             "transfer_syntaxes": ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]}},
                "routes": [{"name": "all", "to": ["j2k", "impl"]}],
            }) as router:
        r = run_storescu(sources, router.port, aet=router.aet)
        assert r.returncode == 0, r.stdout + r.stderr
        wait_until(lambda: len(j2k.files()) == 4 and len(impl.files()) == 4, timeout=120,
                   what="both destinations served")
        for scp, syntax in ((j2k, JPEG2000Lossless), (impl, ImplicitVRLittleEndian)):
            for f in scp.files():
                got = dcmread(f)
                assert got.file_meta.TransferSyntaxUID == syntax
                src = next(s for s in sources
                           if dcmread(s).SOPInstanceUID == got.SOPInstanceUID)
                assert np.array_equal(got.pixel_array, dcmread(src).pixel_array), f


def test_unconvertible_instance_fails_with_its_reason(tmp_path: Path) -> None:
    """A compressed file whose codestream is broken cannot be converted: the job's error says
    why (no 'internal error'), and the other instances are delivered."""
    good = generate(tmp_path / "study", series=1, instances=2, rows=32, cols=32, seed=5)
    broken = tmp_path / "broken.dcm"
    ds = dcmread(good[0])
    ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(broken, enforce_file_format=True)
    raw = bytearray(broken.read_bytes())
    at = raw.index(b"\xff\x4f\xff\x51")  # the J2K codestream: keep its start, wreck the rest
    raw[at + 8:-8] = b"\x00" * (len(raw) - 16 - at)
    broken.write_bytes(bytes(raw))
    with StoreSCP(tmp_path / "scp", aet="IMPLICIT", accept_all=False, extra=["+xi"]) as scp, \
            Router(tmp_path / "router", {
                "destinations": {"old": {"type": "dicom", "ae_title": "IMPLICIT",
                                         "host": "127.0.0.1", "port": scp.port,
                                         "retry": {"max_attempts": 1}}},
                "routes": [{"name": "all", "to": ["old"]}]}) as router:
        assert run_storescu([*good, broken], router.port, aet=router.aet).returncode == 0
        study = str(ds.StudyInstanceUID)
        router.wait_state(study, "failed", timeout=120)
        dead = router.status()["dead"]
        assert len(dead) == 1 and "1 of 3 instance(s) refused" in dead[0]["last_error"]
        assert "conversion failed" in dead[0]["last_error"]
        assert "internal error" not in dead[0]["last_error"]
        assert len(scp.files()) == 2
        assert "Traceback" not in router.log(10000)
