"""Ordered delivery inside a study (issue 26, item 6): the route key ``order``.

The destination is a pynetdicom Storage SCP that records the order in which C-STOREs arrive
(across all its associations) and can refuse chosen instances. The study is built to break the
feature: a key object selection, a structured report and a presentation state referencing
images of two series, sent to the router *before* the images and mixed with them, in series
whose numbers come first; the router delivers over three associations.
"""

from __future__ import annotations

import random
import re
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from peers import free_port, run_storescu, wait_until
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from router_fixtures import Router
from stow_server import StowServer

from dicomrouter.sample import generate

KOS = "1.2.840.10008.5.1.4.1.1.88.59"
SR = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"


class RecordingSCP:
    """A Storage SCP noting each C-STORE's SOP Instance UID as it arrives (one list for all
    associations); instances in ``refuse`` are answered 0xA700 (out of resources), those in
    ``slow`` after that many seconds."""

    def __init__(self, aet: str = "ORDERED") -> None:
        self.aet = aet
        self.port = free_port()
        self.arrived: list[str] = []  # stored, in arrival order
        self.refused: list[str] = []
        self.refuse: set[str] = set()
        self.slow: dict[str, float] = {}
        self.associations: set[int] = set()
        self._lock = threading.Lock()
        self._server: Any = None

    def _store(self, event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        if uid in self.slow:
            time.sleep(self.slow[uid])  # a peer busy with this one: the others go on
        with self._lock:
            self.associations.add(id(event.assoc))
            if uid in self.refuse:
                self.refused.append(uid)
                return 0xA700
            self.arrived.append(uid)
        return 0x0000

    def snapshot(self) -> list[str]:
        with self._lock:
            return list(self.arrived)

    def __enter__(self) -> RecordingSCP:
        ae = AE(ae_title=self.aet)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.maximum_associations = 20
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._store)])
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()


def _destination(scp: RecordingSCP, associations: int) -> dict[str, Any]:
    return {"type": "dicom", "ae_title": scp.aet, "host": "127.0.0.1", "port": scp.port,
            "associations": associations, "timeout": "30s",
            "retry": {"initial": "1s", "max_delay": "2s", "max_attempts": 1000}}


def _write(path: Path, ds: Dataset, sop_class: str) -> Path:
    ds.SOPClassUID = sop_class
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _base(image: Dataset, series_number: int, modality: str) -> Dataset:
    """A new object in ``image``'s study, in a series of its own."""
    ds = Dataset()
    for kw in ("PatientID", "PatientName", "StudyInstanceUID", "StudyDate", "StudyTime",
               "AccessionNumber", "StudyID"):
        setattr(ds, kw, image.get(kw, ""))
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    ds.InstanceNumber = 1
    ds.Modality = modality
    ds.SOPInstanceUID = generate_uid()
    return ds


def _ref(uid: str, sop_class: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = uid
    return item


def _by_series(images: list[Dataset]) -> dict[str, list[Dataset]]:
    out: dict[str, list[Dataset]] = {}
    for ds in images:
        out.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    return out


def kos(image: Dataset, targets: list[Dataset]) -> Dataset:
    """A key object selection: its evidence lists the targets by series, its content too."""
    ds = _base(image, 0, "KO")
    evidence = Dataset()
    evidence.StudyInstanceUID = image.StudyInstanceUID
    evidence.ReferencedSeriesSequence = []
    for series, members in _by_series(targets).items():
        item = Dataset()
        item.SeriesInstanceUID = series
        item.ReferencedSOPSequence = [_ref(t.SOPInstanceUID, t.SOPClassUID) for t in members]
        evidence.ReferencedSeriesSequence.append(item)
    ds.CurrentRequestedProcedureEvidenceSequence = [evidence]
    ds.ContentSequence = []
    for t in targets:
        content = Dataset()
        content.RelationshipType = "CONTAINS"
        content.ValueType = "IMAGE"
        content.ReferencedSOPSequence = [_ref(t.SOPInstanceUID, t.SOPClassUID)]
        ds.ContentSequence.append(content)
    return ds


def sr(image: Dataset, targets: list[Dataset]) -> Dataset:
    """A structured report whose only references are nested IMAGE content items."""
    ds = _base(image, 0, "SR")
    outer = Dataset()
    outer.RelationshipType = "CONTAINS"
    outer.ValueType = "CONTAINER"
    outer.ContentSequence = []
    for t in targets:
        content = Dataset()
        content.RelationshipType = "INFERRED FROM"
        content.ValueType = "IMAGE"
        content.ReferencedSOPSequence = [_ref(t.SOPInstanceUID, t.SOPClassUID)]
        outer.ContentSequence.append(content)
    ds.ContentSequence = [outer]
    return ds


def gsps(image: Dataset, targets: list[Dataset], extra: list[str] = ()) -> Dataset:
    """A presentation state (ReferencedSeriesSequence > ReferencedImageSequence); ``extra``:
    UIDs of images the study does not have."""
    ds = _base(image, 0, "PR")
    ds.ReferencedSeriesSequence = []
    for series, members in _by_series(targets).items():
        item = Dataset()
        item.SeriesInstanceUID = series
        item.ReferencedImageSequence = [_ref(t.SOPInstanceUID, t.SOPClassUID) for t in members]
        ds.ReferencedSeriesSequence.append(item)
    if extra:
        item = Dataset()
        item.SeriesInstanceUID = generate_uid()
        item.ReferencedImageSequence = [_ref(uid, targets[0].SOPClassUID) for uid in extra]
        ds.ReferencedSeriesSequence.append(item)
    return ds


def _study(tmp_path: Path, seed: int) -> tuple[list[Path], list[Dataset], dict[str, Path]]:
    """Two series of 14 images; a KOS, an SR and a GSPS referencing images of both series
    (the last images of each, so that they go late); the referencing files first, then the
    images, shuffled."""
    files = generate(tmp_path / "images", series=2, instances=14, rows=16, cols=16, seed=seed)
    images = [dcmread(p, stop_before_pixels=True) for p in files]
    a, b = list(_by_series(images).values())
    objects = {
        "kos": _write(tmp_path / "refs" / "kos.dcm", kos(images[0], [a[-1], a[-3], b[-1]]), KOS),
        "sr": _write(tmp_path / "refs" / "sr.dcm", sr(images[0], [a[-2], b[-2], b[-4]]), SR),
        "gsps": _write(tmp_path / "refs" / "gsps.dcm",
                       gsps(images[0], [b[-1], a[-1]], extra=[generate_uid()]), GSPS),
    }
    shuffled = list(files)
    random.Random(seed).shuffle(shuffled)
    return [*objects.values(), *shuffled], images, objects


def _targets(path: Path) -> set[str]:
    """Every ReferencedSOPInstanceUID in a file, at any depth."""
    out: set[str] = set()

    def walk(ds: Dataset) -> None:
        for elem in ds:
            if elem.keyword == "ReferencedSOPInstanceUID":
                out.add(str(elem.value))
            elif elem.VR == "SQ":
                for item in elem.value:
                    walk(item)

    walk(dcmread(path))
    return out


def _router(tmp_path: Path, scp: RecordingSCP, order: str, associations: int = 3,
            name: str = "router") -> Router:
    return Router(tmp_path / name, {
        "destinations": {"viewer": _destination(scp, associations)},
        "routes": [{"name": "ordered", "to": ["viewer"], "order": order}]})


def test_references_go_after_every_instance_they_reference(tmp_path: Path) -> None:
    files, images, objects = _study(tmp_path, seed=61)
    every = {str(ds.SOPInstanceUID) for ds in images} | {
        str(dcmread(p).SOPInstanceUID) for p in objects.values()}
    with RecordingSCP() as scp:
        # the destination is slow with one image every object references: the others must
        # wait for its answer, not only for it to leave
        scp.slow = {sorted(_targets(objects["kos"]) & _targets(objects["gsps"]))[0]: 1.5}
        router = _router(tmp_path, scp, "references")
        router.start()
        try:
            # one association: the referencing objects arrive at the router first
            assert run_storescu(files, router.port, aet=router.aet).returncode == 0
            wait_until(lambda: set(scp.snapshot()) >= every, timeout=120,
                       what=f"the whole study at the destination (log: {router.log_path})")
            arrived = scp.snapshot()
            assert len(arrived) == len(every)  # each once
            assert len(scp.associations) > 1  # delivered over several associations
            position = {uid: n for n, uid in enumerate(arrived)}
            for name, path in objects.items():
                uid = str(dcmread(path).SOPInstanceUID)
                inside = _targets(path) & every
                assert inside, name
                assert all(position[t] < position[uid] for t in inside), \
                    f"{name} arrived before an instance it references"
            # the GSPS references an image the study does not have: sent after the rest
            gsps_uid = str(dcmread(objects["gsps"]).SOPInstanceUID)
            assert position[gsps_uid] == len(arrived) - 1
            log = router.log_path.read_text()
            assert "reference instances the spool does not hold" in log
        finally:
            router.stop()


def test_a_refused_reference_holds_the_key_object_back(tmp_path: Path) -> None:
    files, images, objects = _study(tmp_path, seed=62)
    every = {str(ds.SOPInstanceUID) for ds in images} | {
        str(dcmread(p).SOPInstanceUID) for p in objects.values()}
    kos_uid = str(dcmread(objects["kos"]).SOPInstanceUID)
    refused = sorted(_targets(objects["kos"]) - _targets(objects["sr"]) -
                     _targets(objects["gsps"]))[0]  # referenced by the KOS alone
    with RecordingSCP() as scp:
        scp.refuse = {refused}
        router = _router(tmp_path, scp, "references")
        web = free_port()
        router.config["web"] = {"enabled": True, "bind": "127.0.0.1", "port": web}
        router.start()
        try:
            assert run_storescu(files, router.port, aet=router.aet).returncode == 0
            # first attempt: everything but the refused image and the KOS
            wait_until(lambda: set(scp.snapshot()) >= every - {refused, kos_uid},
                       timeout=120, what=f"the rest of the study (log: {router.log_path})")
            wait_until(lambda: "held back" in router.log_path.read_text() and
                       len(scp.refused) >= 2, timeout=60,
                       what="a retry refused again, the KOS held back")
            assert kos_uid not in scp.snapshot()  # never sent while its target is refused
            with urllib.request.urlopen(f"http://127.0.0.1:{web}/metrics", timeout=30) as rsp:
                text = rsp.read().decode()
            assert re.search(r'^dicomrouter_instances_held_back_total\{destination="viewer"\} '
                             r'([2-9]|\d\d)', text, re.M), "held back once per attempt"
            scp.refuse = set()  # the destination accepts it now: the retry sends both
            wait_until(lambda: kos_uid in scp.snapshot(), timeout=60,
                       what=f"the KOS once its image is delivered (log: {router.log_path})")
            arrived = scp.snapshot()
            assert arrived.index(refused) < arrived.index(kos_uid)
            assert set(arrived) == every and len(arrived) == len(every)
            router.wait_state(str(images[0].StudyInstanceUID), "delivered")
        finally:
            router.stop()


def _series_study(tmp_path: Path) -> tuple[list[Path], dict[str, tuple[int, int]]]:
    """Three series; the one numbered 1 arrives last, instances shuffled."""
    files = generate(tmp_path / "series", series=3, instances=10, rows=16, cols=16, seed=63)
    numbers = {}
    for p in files:  # renumber: series in reverse arrival order
        ds = dcmread(p)
        ds.SeriesNumber = 4 - int(ds.SeriesNumber)
        ds.save_as(p)
        numbers[str(ds.SOPInstanceUID)] = (int(ds.SeriesNumber), int(ds.InstanceNumber))
    shuffled = list(files)
    random.Random(63).shuffle(shuffled)
    shuffled.sort(key=lambda p: -numbers[str(dcmread(p).SOPInstanceUID)][0])
    return shuffled, numbers


def test_series_go_out_series_by_series(tmp_path: Path) -> None:
    files, numbers = _series_study(tmp_path)
    with RecordingSCP("ONE") as one, RecordingSCP("THREE") as three:
        # the first instance of each series is slow: without the barrier the next series
        # would overtake it on the other associations
        three.slow = {u: 1.5 for u, (_s, n) in numbers.items() if n == 1}
        router = Router(tmp_path / "router", {
            "destinations": {"one": _destination(one, 1), "three": _destination(three, 3)},
            "routes": [{"name": "ordered", "to": ["one", "three"], "order": "series"}]})
        router.start()
        try:
            assert run_storescu(files, router.port, aet=router.aet).returncode == 0
            for scp in (one, three):
                wait_until(lambda s=scp: set(s.snapshot()) >= set(numbers), timeout=120,
                           what=f"the study at {scp.aet} (log: {router.log_path})")
            # one association: exactly series by series, instances by number
            got = [numbers[u] for u in one.snapshot()]
            assert got == sorted(numbers.values())
            # three: series never overlap, each in SeriesNumber order
            assert len(three.associations) > 1
            series = [numbers[u][0] for u in three.snapshot()]
            assert series == sorted(series)
        finally:
            router.stop()


def test_a_session_that_confirms_at_its_end_sends_the_references_in_a_second_round(
        tmp_path: Path) -> None:
    """DICOMweb: the STOW-RS batch is confirmed only when it is posted, so the referencing
    objects cannot go in the batch of what they reference: they go in the next request, once
    the ledger shows their targets delivered (and every instance once)."""
    files, images, objects = _study(tmp_path, seed=64)
    every = {str(ds.SOPInstanceUID) for ds in images} | {
        str(dcmread(p).SOPInstanceUID) for p in objects.values()}
    with StowServer() as server:
        router = Router(tmp_path / "router", {
            "destinations": {"web": {"type": "dicomweb", "url": server.url, "timeout": "30s"}},
            "routes": [{"name": "ordered", "to": ["web"], "order": "references"}]})
        router.start()
        try:
            assert run_storescu(files, router.port, aet=router.aet).returncode == 0
            router.wait_state(str(images[0].StudyInstanceUID), "delivered", timeout=120)
            received = list(server.received)
            assert sorted(received) == sorted(every)  # each once
            position = {uid: n for n, uid in enumerate(received)}
            for name, path in objects.items():
                uid = str(dcmread(path).SOPInstanceUID)
                assert all(position[t] < position[uid] for t in _targets(path) & every), name
            assert server.posts == 2  # the images; then the objects referencing them
        finally:
            router.stop()


def test_instances_that_reference_each_other_are_all_sent(tmp_path: Path) -> None:
    """Two reports referencing each other (and an image each): neither waits forever."""
    files = generate(tmp_path / "images", series=1, instances=10, rows=16, cols=16, seed=65)
    images = [dcmread(p, stop_before_pixels=True) for p in files]
    first, second = sr(images[0], [images[3]]), sr(images[0], [images[5]])
    first.ContentSequence[0].ContentSequence.append(_item(second))
    second.ContentSequence[0].ContentSequence.append(_item(first))
    reports = [_write(tmp_path / "refs" / "a.dcm", first, SR),
               _write(tmp_path / "refs" / "b.dcm", second, SR)]
    with RecordingSCP() as scp:
        router = _router(tmp_path, scp, "references", associations=1)
        router.start()
        try:
            assert run_storescu([*reports, *files], router.port, aet=router.aet).returncode == 0
            router.wait_state(str(images[0].StudyInstanceUID), "delivered", timeout=120)
            arrived = scp.snapshot()
            assert len(arrived) == 12 and len(set(arrived)) == 12
            position = {uid: n for n, uid in enumerate(arrived)}
            assert position[str(first.SOPInstanceUID)] > position[str(images[3].SOPInstanceUID)]
            assert position[str(second.SOPInstanceUID)] > position[str(images[5].SOPInstanceUID)]
            assert "instances reference each other" in router.log_path.read_text()
        finally:
            router.stop()


def _item(report: Dataset) -> Dataset:
    content = Dataset()
    content.RelationshipType = "INFERRED FROM"
    content.ValueType = "COMPOSITE"
    content.ReferencedSOPSequence = [_ref(report.SOPInstanceUID, SR)]
    return content


def test_a_cycle_waiting_for_a_refused_image_is_held_back_whole(tmp_path: Path) -> None:
    """Report A references an image the destination refuses and report B; B references A.
    Breaking their cycle must not send B while A cannot go: both wait for the image."""
    files = generate(tmp_path / "images", series=1, instances=10, rows=16, cols=16, seed=66)
    images = [dcmread(p, stop_before_pixels=True) for p in files]
    first, second = sr(images[0], [images[4]]), sr(images[0], [])
    first.ContentSequence[0].ContentSequence.append(_item(second))
    second.ContentSequence[0].ContentSequence.append(_item(first))
    reports = [_write(tmp_path / "refs" / "a.dcm", first, SR),
               _write(tmp_path / "refs" / "b.dcm", second, SR)]
    image = str(images[4].SOPInstanceUID)
    a, b = str(first.SOPInstanceUID), str(second.SOPInstanceUID)
    with RecordingSCP() as scp:
        scp.refuse = {image}
        router = _router(tmp_path, scp, "references", associations=1)
        router.start()
        try:
            assert run_storescu([*reports, *files], router.port, aet=router.aet).returncode == 0
            wait_until(lambda: len(scp.refused) >= 2 and len(scp.snapshot()) >= 9, timeout=120,
                       what=f"two attempts refused (log: {router.log_path})")
            assert not {a, b} & set(scp.snapshot())
            scp.refuse = set()
            router.wait_state(str(images[0].StudyInstanceUID), "delivered", timeout=120)
            arrived = scp.snapshot()
            assert len(arrived) == 12 and len(set(arrived)) == 12
            assert arrived.index(image) < min(arrived.index(a), arrived.index(b))
        finally:
            router.stop()
