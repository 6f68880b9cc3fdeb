"""A remote AI node for the tests of remote processing steps (issue 29): pynetdicom as its
Storage SCP (the router sends it the study), highdicom to write its result (a DICOM SEG of the
first series it got, referencing every source image), pynetdicom to C-STORE the result back to
the router from its own AE title, as an AI node does.

``answer`` says when it sends results: ``"auto"`` once nothing new has arrived for ``idle``
seconds, ``"never"`` until the test calls ``send_results()``. ``new_study`` puts the SEG in a
study of its own (referencing the one it got) instead of the study it was sent."""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from peers import free_port
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, _config, dimse_messages, evt
from pynetdicom.sop_class import SegmentationStorage

AI_AE = "AINODE"


class AiNode:
    def __init__(self, folder: Path, router_port: int, router_aet: str,
                 answer: str = "auto", idle: float = 1.5, new_study: bool = False) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.router = ("127.0.0.1", router_port, router_aet)
        self.answer = answer
        self.idle = idle
        self.new_study = new_study
        self.port = free_port()
        self.aet = "AI"
        self.received: list[Dataset] = []  # every instance it was sent, in order
        self.sent: list[Dataset] = []  # every result it sent back
        self._pending: list[Dataset] = []
        self._last = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> AiNode:
        # an in-process router earlier in this test worker (netutil.receive_c_store_into) may
        # have switched pynetdicom to chunked receives into its spool: plain ones while we run
        self._saved = (_config.STORE_RECV_CHUNKED_DATASET, dimse_messages.NamedTemporaryFile)
        _config.STORE_RECV_CHUNKED_DATASET = False
        dimse_messages.NamedTemporaryFile = tempfile.NamedTemporaryFile
        ae = AE(ae_title=self.aet)
        ae.supported_contexts = AllStoragePresentationContexts
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        if self._thread is not None:
            self._thread.join(10)
        _config.STORE_RECV_CHUNKED_DATASET, dimse_messages.NamedTemporaryFile = self._saved

    def _store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.received.append(ds)
            self._pending.append(ds)
            self._last = time.monotonic()
        return 0x0000

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            with self._lock:
                due = self.answer == "auto" and self._pending and \
                    time.monotonic() - self._last > self.idle
            if due:
                self.send_results()

    def answered(self) -> bool:
        """Everything received has been answered (``answer="auto"``)."""
        with self._lock:
            return not self._pending

    def send_results(self) -> Dataset:
        """Segment what arrived since the last answer and send the SEG to the router."""
        with self._lock:
            got, self._pending = self._pending, []
        if not got:
            raise AssertionError("the AI node has nothing to answer")
        seg = segment(got, self.new_study)
        host, port, aet = self.router
        store_back(seg, port, aet)
        self.sent.append(seg)
        seg.save_as(self.folder / f"{seg.SOPInstanceUID}.dcm", enforce_file_format=True)
        return seg


def segment(images: list[Dataset], new_study: bool = False) -> Dataset:
    """A binary SEG of the first series among ``images`` (a square in every frame)."""
    first = images[0].SeriesInstanceUID
    unique = {str(d.SOPInstanceUID): d for d in images}  # sent twice: segmented once
    series = sorted((d for d in unique.values() if d.SeriesInstanceUID == first),
                    key=lambda d: int(d.get("InstanceNumber", 0) or 0))
    mask = np.zeros((len(series), int(series[0].Rows), int(series[0].Columns)), dtype=bool)
    mask[:, 2:6, 2:6] = True
    desc = hd.seg.SegmentDescription(
        segment_number=1, segment_label="finding",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Nodule,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="test-ai", version="1", family=codes.cid7162.ArtificialIntelligence))
    seg = hd.seg.Segmentation(
        source_images=series, pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[desc],
        series_instance_uid=generate_uid(), series_number=90, sop_instance_uid=generate_uid(),
        instance_number=1, manufacturer="test", manufacturer_model_name="ai-node",
        software_versions="1", device_serial_number="1")
    if new_study:  # a study of its own, which references the one it segments
        ref = Dataset()
        ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management
        ref.ReferencedSOPInstanceUID = series[0].StudyInstanceUID
        seg.ReferencedStudySequence = [ref]
        seg.StudyInstanceUID = generate_uid()
    return seg


def store_back(ds: Dataset, port: int, aet: str) -> None:
    """C-STORE a result to the router from the AI node's AE title."""
    ae = AE(ae_title=AI_AE)
    ae.add_requested_context(SegmentationStorage, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=aet)
    assert assoc.is_established, "the router refused the AI node's association"
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert status is not None and status.Status == 0, status


def referenced_sops(seg: Dataset) -> set[str]:
    return {str(i.ReferencedSOPInstanceUID) for s in seg.ReferencedSeriesSequence
            for i in s.ReferencedInstanceSequence}
