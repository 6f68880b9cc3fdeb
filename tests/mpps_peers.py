"""pynetdicom peers for the MPPS tests: a modality (MPPS SCU and storage SCU) and an SCP that
records the MPPS N-CREATE / N-SET and Instance Availability Notifications it is sent."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pynetdicom import AE, evt
from pynetdicom.sop_class import InstanceAvailabilityNotification, ModalityPerformedProcedureStep

MPPS = ModalityPerformedProcedureStep


def create_attributes(study_uid: str, status: str = "IN PROGRESS",
                      patient_id: str = "MPPS1") -> Dataset:
    """An N-CREATE attribute list as a modality sends it (PS3.4 F.7.2-1, the type 1 ones)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Test^Mpps"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    step = Dataset()
    step.StudyInstanceUID = study_uid
    step.AccessionNumber = "ACC1"
    step.RequestedProcedureID = "RP1"
    step.ScheduledProcedureStepID = "SPS1"
    step.ReferencedStudySequence = []
    step.ScheduledProcedureStepDescription = "CT chest"
    ds.ScheduledStepAttributesSequence = [step]
    ds.PerformedProcedureStepID = "PPS1"
    ds.PerformedStationAETitle = "MODALITY"
    ds.PerformedStationName = "CT1"
    ds.PerformedLocation = "Room 1"
    ds.PerformedProcedureStepStartDate = "20261207"
    ds.PerformedProcedureStepStartTime = "101010"
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepDescription = "CT chest"
    ds.PerformedProcedureTypeDescription = ""
    ds.ProcedureCodeSequence = []
    ds.PerformedProcedureStepEndDate = ""
    ds.PerformedProcedureStepEndTime = ""
    ds.Modality = "CT"
    ds.StudyID = "1"
    ds.PerformedProtocolCodeSequence = []
    ds.PerformedSeriesSequence = []
    return ds


def final_attributes(files: Sequence[Path], status: str = "COMPLETED") -> Dataset:
    """An N-SET that ends the step, listing ``files`` in the Performed Series Sequence."""
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepEndDate = "20261207"
    ds.PerformedProcedureStepEndTime = "102020"
    by_series: dict[str, list[Dataset]] = {}
    for f in files:
        h = dcmread(f, stop_before_pixels=True)
        item = Dataset()
        item.ReferencedSOPClassUID = h.SOPClassUID
        item.ReferencedSOPInstanceUID = h.SOPInstanceUID
        by_series.setdefault(str(h.SeriesInstanceUID), []).append(item)
    series = []
    for uid, items in by_series.items():
        s = Dataset()
        s.SeriesInstanceUID = uid
        s.PerformingPhysicianName = ""
        s.ProtocolName = "chest"
        s.OperatorsName = ""
        s.SeriesDescription = "axial"
        s.RetrieveAETitle = ""
        s.ReferencedImageSequence = DicomSequence(items)
        s.ReferencedNonImageCompositeSOPInstanceSequence = []
        series.append(s)
    ds.PerformedSeriesSequence = series
    if status == "DISCONTINUED":
        reason = Dataset()
        reason.CodeValue = "110514"
        reason.CodingSchemeDesignator = "DCM"
        reason.CodeMeaning = "Incorrect worklist entry selected"
        ds.PerformedProcedureStepDiscontinuationReasonCodeSequence = [reason]
    return ds


class Modality:
    """A modality: MPPS SCU (N-CREATE, N-SET) and storage SCU, each on its own association
    (as most modalities do), through pynetdicom."""

    def __init__(self, port: int, called: str = "DICOMROUTER", ae_title: str = "MODALITY") -> None:
        self.port = port
        self.called = called
        self.ae_title = ae_title

    def _ae(self) -> AE:
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        return ae

    def associate_mpps(self) -> Any:
        ae = self._ae()
        ae.add_requested_context(MPPS)
        return ae.associate("127.0.0.1", self.port, ae_title=self.called)

    def _n(self, op: str, ds: Dataset, uid: str | None) -> tuple[int, Any]:
        assoc = self.associate_mpps()
        assert assoc.is_established, "the router refused the MPPS association"
        try:
            if op == "create":
                status, attrs = assoc.send_n_create(ds, MPPS, uid)
            else:
                status, attrs = assoc.send_n_set(ds, MPPS, uid)
        finally:
            assoc.release()
        assert status is not None and "Status" in status, "no response"
        return int(status.Status), status

    def create(self, ds: Dataset, uid: str | None) -> int:
        return self._n("create", ds, uid)[0]

    def set(self, ds: Dataset, uid: str) -> int:
        return self._n("set", ds, uid)[0]

    def store(self, files: Sequence[Path]) -> None:
        ae = self._ae()
        datasets = [dcmread(f) for f in files]
        for sop_class, ts in {(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID))
                              for d in datasets}:
            ae.add_requested_context(sop_class, ts)
        assoc = ae.associate("127.0.0.1", self.port, ae_title=self.called)
        assert assoc.is_established
        try:
            for d in datasets:
                status = assoc.send_c_store(d)
                assert status is not None and int(status.Status) == 0, status
        finally:
            assoc.release()


class RecordingSCP:
    """A pynetdicom MPPS and IAN SCP that records what it receives, in order:
    (operation, SOP Class UID, SOP Instance UID, dataset)."""

    def __init__(self, port: int, ae_title: str = "MPPSSCP") -> None:
        self.port = port
        self.ae_title = ae_title
        self.received: list[tuple[str, str, str, Dataset]] = []
        self._lock = threading.Lock()
        self.server: Any = None

    def _record(self, op: str, event: evt.Event, ds: Dataset, uid: str) -> None:
        with self._lock:
            self.received.append((op, str(event.request.AffectedSOPClassUID or
                                          event.request.RequestedSOPClassUID), uid, ds))

    def _on_create(self, event: evt.Event) -> tuple[int, Dataset]:
        self._record("N-CREATE", event, event.attribute_list,
                     str(event.request.AffectedSOPInstanceUID))
        return 0x0000, Dataset()

    def _on_set(self, event: evt.Event) -> tuple[int, Dataset]:
        self._record("N-SET", event, event.modification_list,
                     str(event.request.RequestedSOPInstanceUID))
        return 0x0000, Dataset()

    def start(self) -> RecordingSCP:
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(MPPS)
        ae.add_supported_context(InstanceAvailabilityNotification)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_N_CREATE, self._on_create), (evt.EVT_N_SET, self._on_set)])
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def __enter__(self) -> RecordingSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def snapshot(self) -> list[tuple[str, str, str, Dataset]]:
        with self._lock:
            return list(self.received)
