"""C-MOVE and C-GET from the router of one study held in every syntax of the interop corpus.

One router holds one CT study whose twelve instances are each in another transfer syntax
(Implicit, Explicit, Big Endian, Deflated, RLE, JPEG Lossless, JPEG Extended, JPEG Baseline,
JPEG-LS lossless and near-lossless, JPEG 2000 lossless and lossy), made by DCMTK's own tools and
openjpeg. It is retrieved by DCMTK movescu into storescp accepting everything (``+xa``) and
accepting only uncompressed syntaxes, by DCMTK getscu (default, and ``+xs``: a preferred syntax
the router cannot encode to), by pynetdicom as a C-GET requester proposing one context per
syntax, and by a real Orthanc (REST ``/modalities/router/move``).

Every instance must arrive: in its stored syntax when the receiver took it (the very bytes the
router holds), else converted losslessly; decoded pixels equal the sent file's; a lossy instance
that was decoded arrives flagged Lossy Image Compression 01. Sub-operation counts are read from
the tools' own output. A second study with more (SOP class, syntax) pairs than one association
can carry (128 contexts) is moved over several associations.
"""

from __future__ import annotations

import re
import subprocess
import urllib.error
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from peers import (
    Orthanc,
    StoreSCP,
    dcmtk,
    find_dcmtk,
    find_orthanc,
    peer_env,
    require_peer,
    run_storescu,
    wait_until,
)
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, AllStoragePresentationContexts, build_context, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet
from router_fixtures import Router, dataset_bytes

from dicomrouter.sample import generate

LOSSY = {"jpeg_baseline", "jpeg_extended", "jpegls_near", "j2k_lossy"}
NAMES = ["implicit", "explicit", "big_endian", "deflated", "rle", "jpeg_lossless",
         "jpeg_extended", "jpeg_baseline", "jpegls", "jpegls_near", "j2k", "j2k_lossy"]


def _tool(tool: str, *args: str | Path) -> None:
    r = subprocess.run([dcmtk(tool), *map(str, args)], capture_output=True, text=True,
                       env=peer_env(), timeout=120, check=False)
    assert r.returncode == 0, f"{tool} failed: {r.stdout}{r.stderr}"


def _eight_bit_rgb(src: Path, out: Path) -> Path:
    """An 8-bit RGB image (JPEG Baseline takes only 8-bit samples)."""
    ds = dcmread(src)
    arr = ds.pixel_array
    gray = ((arr - arr.min()) * 255 // max(1, int(arr.max() - arr.min()))).astype(np.uint8)
    ds.PixelData = np.stack([gray, 255 - gray, gray // 2], axis=-1).tobytes()
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds["PixelData"].VR = "OB"
    ds.save_as(out, enforce_file_format=True)
    return out


def _make_corpus(d: Path) -> dict[str, Path]:
    """name → file, one study, one series, each instance in its own syntax."""
    sources = generate(d / "src", series=1, instances=len(NAMES), rows=48, cols=64, seed=23)
    src = dict(zip(NAMES, sorted(sources, key=lambda p: int(dcmread(p).InstanceNumber)),
                   strict=True))
    out = d / "send"
    out.mkdir()
    files = {n: out / f"{n}.dcm" for n in NAMES}
    for name, flag in (("implicit", "+ti"), ("explicit", "+te"), ("big_endian", "+tb"),
                       ("deflated", "+td")):
        _tool("dcmconv", flag, src[name], files[name])
    _tool("dcmcrle", src["rle"], files["rle"])
    _tool("dcmcjpeg", "+e1", src["jpeg_lossless"], files["jpeg_lossless"])
    _tool("dcmcjpeg", "+ee", src["jpeg_extended"], files["jpeg_extended"])
    _tool("dcmcjpeg", "+eb", _eight_bit_rgb(src["jpeg_baseline"], d / "rgb.dcm"),
          files["jpeg_baseline"])
    _tool("dcmcjpls", src["jpegls"], files["jpegls"])
    _tool("dcmcjpls", "+en", src["jpegls_near"], files["jpegls_near"])
    for name, syntax, kwargs in (("j2k", JPEG2000Lossless, {}),
                                 ("j2k_lossy", JPEG2000, {"j2k_cr": [15]})):
        ds = dcmread(src[name])
        ds.compress(syntax, generate_instance_uid=False, **kwargs)
        ds.save_as(files[name], enforce_file_format=True)
    syntaxes = {str(dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
                for f in files.values()}
    assert len(syntaxes) == len(NAMES), syntaxes
    return files


def _many_classes(d: Path, classes: int = 50) -> list[Path]:
    """A study of tiny instances in ``classes`` storage SOP classes, each in Explicit VR and
    in RLE Lossless: 3 contexts per class, more than one association carries."""
    d.mkdir()
    sop_classes = sorted(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)
    study, series = generate_uid(), generate_uid()
    rng = np.random.default_rng(5)
    files = []
    for n, sop_class in enumerate(sop_classes[:classes]):
        for syntax in (ExplicitVRLittleEndian, RLELossless):
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.PatientID, ds.PatientName, ds.Modality = "MANY", "MANY^CLASSES", "OT"
            ds.InstanceNumber = len(files) + 1
            ds.Rows = ds.Columns = 8
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
            ds.PixelData = rng.integers(0, 4000, (8, 8), dtype=np.uint16).tobytes()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            if syntax == RLELossless:
                ds.compress(RLELossless, generate_instance_uid=False)
            path = d / f"{n:03d}-{syntax.name.split()[0]}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    return files


class Site:
    """The router holding the studies, and the peers that retrieve them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = _make_corpus(root / "corpus")
        self.by_uid = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): (n, f)
                       for n, f in self.files.items()}
        self.study = str(dcmread(self.files["rle"], stop_before_pixels=True).StudyInstanceUID)
        self.many = _many_classes(root / "many")
        self.many_study = str(dcmread(self.many[0], stop_before_pixels=True).StudyInstanceUID)
        self.all = StoreSCP(root / "all", aet="STOREALL", extra=["-pm"])
        self.plain = StoreSCP(root / "plain", aet="STOREPLAIN", accept_all=False)
        self.orthanc = Orthanc(root / "orthanc", aet="ORTHANCQR", extra_config={
            "AcceptedTransferSyntaxes": ["1.2.840.10008.1.*"]})
        self.router = Router(root / "router", {
            "destinations": {}, "routes": [],
            "known_aes": {"STOREALL": {"host": "127.0.0.1", "port": self.all.port},
                          "STOREPLAIN": {"host": "127.0.0.1", "port": self.plain.port},
                          "ORTHANCQR": {"host": "127.0.0.1", "port": self.orthanc.dicom_port}}})
        self.peers = ExitStack()

    def start(self) -> None:
        for peer in (self.all, self.plain, self.router):
            self.peers.enter_context(peer)
        self.orthanc.modalities = {"router": ["DICOMROUTER", "127.0.0.1", self.router.port]}
        self.peers.enter_context(self.orthanc)
        r = run_storescu(list(self.files.values()), self.router.port)
        assert r.returncode == 0, r.stdout + r.stderr
        r = run_storescu(self.many, self.router.port)
        assert r.returncode == 0, r.stdout + r.stderr
        self.router.wait_state(self.study, "unrouted")
        self.router.wait_state(self.many_study, "unrouted")

    def stop(self) -> None:
        self.peers.close()

    def stored(self, uid: str) -> Path:
        """The router's spool file of an instance."""
        return self.router.spool / "data" / self.study / f"{uid}.dcm"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    for tool in ("movescu", "getscu", "storescu", "storescp", "dcmcjpeg", "dcmcjpls"):
        require_peer(f"DCMTK {tool}", find_dcmtk(tool) is not None, "dcmtk")
    require_peer("Orthanc", find_orthanc() is not None, "orthanc")
    s = Site(tmp_path_factory.mktemp("retrieve"))
    try:
        s.start()
        yield s
        log = s.router.log(200_000)
        assert "Traceback" not in log, "a traceback in the router's log"
    finally:
        s.stop()


def _counts(output: str, final_marker: str) -> dict[str, int]:
    """Completed/Failed/Warning sub-operations of the final response, from DCMTK's output."""
    final = output[output.rindex(final_marker):]
    out = {}
    for kind in ("Completed", "Failed", "Warning"):
        m = re.search(rf"{kind} Suboperations\s*:\s*(\d+)", final, re.IGNORECASE)
        assert m, f"no {kind} count in: {final}"
        out[kind] = int(m.group(1))
    return out


def _movescu(site: Site, destination: str, study: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dcmtk("movescu"), "-d", "-S", "-aet", "MOVESCU", "-aec", "DICOMROUTER", "-aem",
         destination, "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
         "127.0.0.1", str(site.router.port)],
        capture_output=True, text=True, env=peer_env(), timeout=120)


def _check(site: Site, arrived: dict[str, Path], as_stored: set[str] | None = None) -> None:
    """Every instance of the corpus arrived with the source's decoded pixels; those in their
    stored syntax with the router's very bytes (``as_stored``: names that must have), the
    others converted losslessly, a decoded lossy one flagged."""
    assert set(arrived) == set(site.by_uid), set(site.by_uid) - set(arrived)
    for uid, path in arrived.items():
        name, src = site.by_uid[uid]
        source, got = dcmread(src), dcmread(path)
        stored_ts = source.file_meta.TransferSyntaxUID
        ts = got.file_meta.TransferSyntaxUID
        if as_stored is not None and name in as_stored:
            assert ts == stored_ts, f"{name}: arrived as {ts.name}, stored as {stored_ts.name}"
        if ts == stored_ts and stored_ts.is_compressed:
            # the codestream the router holds, not a re-encoding of it
            assert got.PixelData == dcmread(site.stored(uid)).PixelData, name
        assert np.array_equal(got.pixel_array, source.pixel_array), f"{name}: pixels differ"
        assert str(got.SOPInstanceUID) == uid
        flag = got.get("LossyImageCompression")
        if ts == stored_ts:
            assert flag == source.get("LossyImageCompression"), name  # unchanged
        elif name in LOSSY:
            assert flag == "01", f"{name}: decoded from a lossy syntax, not flagged"
        else:
            assert flag in (None, "00"), name


def _received(scp: StoreSCP, uids: set[str] | dict[str, Any]) -> dict[str, Path]:
    """The files of ``uids`` that storescp wrote, once all of them are there."""
    def files() -> dict[str, Path] | None:
        found = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f
                 for f in scp.files()}
        found = {uid: f for uid, f in found.items() if uid in uids}
        return found if len(found) == len(uids) else None

    return wait_until(files, timeout=60, what=f"{len(uids)} files in {scp.aet}")


def test_movescu_to_storescp_accepting_every_syntax(site: Site) -> None:
    """Each instance goes in its stored syntax: one context per (SOP class, syntax)."""
    r = _movescu(site, "STOREALL", site.study)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert _counts(out, "Received Final Move Response") == \
        {"Completed": len(NAMES), "Failed": 0, "Warning": 0}, out
    assert "DIMSE Status                  : 0x0000" in out[out.rindex("Final Move"):], out
    arrived = _received(site.all, site.by_uid)
    _check(site, arrived, as_stored=set(NAMES))
    for uid, path in arrived.items():  # not re-encoded: the bytes the router holds
        if site.by_uid[uid][0] != "deflated":  # storescp writes deflated data inflated
            assert dataset_bytes(path) == dataset_bytes(site.stored(uid)), site.by_uid[uid]


def test_movescu_to_storescp_accepting_uncompressed_only(site: Site) -> None:
    """The compressed and deflated instances are converted; none fails."""
    r = _movescu(site, "STOREPLAIN", site.study)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert _counts(out, "Received Final Move Response") == \
        {"Completed": len(NAMES), "Failed": 0, "Warning": 0}, out
    arrived = _received(site.plain, site.by_uid)
    _check(site, arrived, as_stored={"implicit", "explicit", "big_endian"})
    for path in arrived.values():
        assert not dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID \
            .is_compressed
    log = site.router.log(100_000)
    assert "converted from JPEG 2000 Image Compression (Lossless Only) to" in log


@pytest.mark.parametrize("prefer", [[], ["+xs"]], ids=["default", "prefer-jpeg-lossless"])
def test_getscu_retrieves_every_syntax(site: Site, tmp_path: Path, prefer: list[str]) -> None:
    """getscu proposes one context per SOP class ([preferred,] Explicit LE, BE, Implicit): the
    router takes an uncompressed syntax (it can convert every instance to it), never a syntax
    it could not encode to (``+xs``: JPEG Lossless)."""
    r = subprocess.run(
        [dcmtk("getscu"), "-v", "-S", *prefer, "-aet", "GETSCU", "-aec", "DICOMROUTER",
         "-od", str(tmp_path), "-k", "QueryRetrieveLevel=STUDY",
         "-k", f"StudyInstanceUID={site.study}", "127.0.0.1", str(site.router.port)],
        capture_output=True, text=True, env=peer_env(), timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert _counts(out, "Final status report") == \
        {"Completed": len(NAMES), "Failed": 0, "Warning": 0}, out
    arrived = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
               for p in tmp_path.iterdir()}
    _check(site, arrived, as_stored={"explicit"})
    for path in arrived.values():
        assert dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == \
            ExplicitVRLittleEndian


def test_cget_requester_with_one_context_per_syntax_gets_the_stored_bytes(site: Site) -> None:
    """pynetdicom as a C-GET requester proposing one storage context per syntax (SCP role):
    every instance comes on the context of its own syntax, as the router holds it."""
    syntaxes = sorted({str(dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
                       for f in site.files.values()})
    ct = str(dcmread(site.files["rle"], stop_before_pixels=True).SOPClassUID)
    got: dict[str, tuple[str, bytes]] = {}

    def on_store(event: evt.Event) -> int:
        got[str(event.request.AffectedSOPInstanceUID)] = (
            str(event.context.transfer_syntax), bytes(event.request.DataSet.getvalue()))
        return 0x0000

    ae = AE(ae_title="PYGET")
    contexts = [build_context(StudyRootQueryRetrieveInformationModelGet)]
    contexts += [build_context(ct, [ts]) for ts in syntaxes]
    assoc = ae.associate("127.0.0.1", site.router.port, contexts=contexts,
                         ae_title="DICOMROUTER", ext_neg=[build_role(ct, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = site.study
        responses = list(assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()
    final = responses[-1][0]
    assert final.Status == 0x0000, final
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations,
            final.NumberOfWarningSuboperations) == (len(NAMES), 0, 0)
    assert set(got) == set(site.by_uid)
    for uid, (ts, data) in got.items():
        name, _src = site.by_uid[uid]
        stored = site.stored(uid)
        assert ts == str(dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        assert data == dataset_bytes(stored), f"{name}: not the bytes the router holds"


def test_orthanc_moves_the_mixed_study_from_the_router(site: Site) -> None:
    """Orthanc's REST API asks the router (a modality of Orthanc's) to C-MOVE the study to
    Orthanc itself (the REST call fails on a failure status: shown with an unknown AE)."""
    orthanc = site.orthanc
    with pytest.raises(urllib.error.HTTPError):
        orthanc.post("/modalities/router/move", {
            "Level": "Study", "Resources": [{"StudyInstanceUID": site.study}],
            "TargetAet": "NOSUCHAE"})
    orthanc.post("/modalities/router/move", {
        "Level": "Study", "Resources": [{"StudyInstanceUID": site.study}],
        "TargetAet": "ORTHANCQR"})
    orthanc.wait_for_instances(site.by_uid, timeout=90)
    arrived = {}
    for uid in site.by_uid:
        path = site.root / "orthanc-got" / f"{uid}.dcm"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(orthanc.instance_file(uid))
        arrived[uid] = path
    # each syntax has a context of its own, and Orthanc takes them all: all arrive as stored
    # (before, one context per SOP class listed every syntax: Orthanc took one, the rest failed)
    _check(site, arrived, as_stored=set(NAMES))


def test_move_needing_more_than_128_contexts_uses_several_associations(site: Site) -> None:
    """50 SOP classes × (Explicit VR, RLE) + an uncompressed context each: 150 contexts."""
    associations_before = site.all.log_path.read_text().count("Association Received")
    r = _movescu(site, "STOREALL", site.many_study)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert _counts(out, "Received Final Move Response") == \
        {"Completed": len(site.many), "Failed": 0, "Warning": 0}, out
    uids = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in site.many}
    arrived = _received(site.all, uids)
    for uid, path in arrived.items():
        src, got = dcmread(uids[uid]), dcmread(path)
        assert got.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
        assert np.array_equal(got.pixel_array, src.pixel_array)
    # 3 contexts per class (Explicit VR, RLE, an uncompressed fallback): 42 classes fit in 128
    associations = site.all.log_path.read_text().count("Association Received")
    assert associations - associations_before == 2


def test_cget_cancelled_after_the_first_instance(site: Site) -> None:
    """A C-CANCEL sent while the first sub-operation is under way: the router stops there and
    answers Cancel with the counts (1 completed, the others remaining)."""
    ct = str(dcmread(site.files["rle"], stop_before_pixels=True).SOPClassUID)
    stored: list[str] = []
    model = StudyRootQueryRetrieveInformationModelGet

    def on_store(event: evt.Event) -> int:
        if not stored:
            event.assoc.send_c_cancel(7, None, model)
        stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    ae = AE(ae_title="PYGET")
    contexts = [build_context(model), build_context(ct, [ExplicitVRLittleEndian])]
    assoc = ae.associate("127.0.0.1", site.router.port, contexts=contexts,
                         ae_title="DICOMROUTER", ext_neg=[build_role(ct, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = site.study
        responses = list(assoc.send_c_get(identifier, model, msg_id=7))
    finally:
        assoc.release()
    final = responses[-1][0]
    assert final.Status == 0xFE00, final
    assert (final.NumberOfRemainingSuboperations, final.NumberOfCompletedSuboperations,
            final.NumberOfFailedSuboperations) == (len(NAMES) - 1, 1, 0)
    assert len(stored) == 1
