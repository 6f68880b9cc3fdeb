"""MPPS and Instance Availability Notification datasets (PS3.4 annex F and R): the SOP classes,
what an MPPS lists, the IAN the router sends, and datasets kept as text in the state.

A leaf: pydicom and pynetdicom's encoder only. The MPPS SCP (``scp/mpps.py``), MPPS-driven
completion (``completion/mpps.py``) and the outbox sender (``outbox.py``) share it.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import generate_uid
from pynetdicom.dsutils import decode, encode

MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"  # Modality Performed Procedure Step
IAN_SOP_CLASS = "1.2.840.10008.5.1.4.33"  # Instance Availability Notification

IN_PROGRESS, COMPLETED, DISCONTINUED = "IN PROGRESS", "COMPLETED", "DISCONTINUED"
STATUSES = (IN_PROGRESS, COMPLETED, DISCONTINUED)
FINAL = (COMPLETED, DISCONTINUED)

#: Attributes PS3.4 table F.7.2-1 marks "Not allowed" in an N-SET (set once, by the N-CREATE)
NOT_ALLOWED_IN_SET = tuple(Tag(k) for k in (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "ReferencedPatientSequence", "ScheduledStepAttributesSequence", "PerformedProcedureStepID",
    "PerformedStationAETitle", "PerformedStationName", "PerformedLocation",
    "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime", "Modality",
    "StudyID", "AdmissionID"))


class Undecodable(ValueError):
    """A dataset pydicom cannot encode or decode (a peer's broken attribute list)."""


def to_text(ds: Dataset) -> str:
    """``ds`` as Explicit VR Little Endian, base64: how the state keeps an MPPS or an IAN."""
    raw = encode(ds, False, True)
    if raw is None:
        raise Undecodable("the dataset cannot be encoded")
    return base64.b64encode(raw).decode("ascii")


def from_text(text: str) -> Dataset:
    """The dataset ``to_text`` kept."""
    return decode(BytesIO(base64.b64decode(text)), False, True)


def status_of(ds: Dataset) -> str:
    """The Performed Procedure Step Status, stripped and upper case ('' when absent)."""
    return str(ds.get("PerformedProcedureStepStatus", "") or "").strip().upper()


def study_uids(ds: Dataset) -> list[str]:
    """The studies an MPPS names (Scheduled Step Attributes Sequence)."""
    out = []
    for item in ds.get("ScheduledStepAttributesSequence", None) or []:
        uid = str(item.get("StudyInstanceUID", "") or "").strip()
        if uid:
            out.append(uid)
    return list(dict.fromkeys(out))


def listed_instances(ds: Dataset) -> list[str]:
    """The SOP Instance UIDs an MPPS lists: Performed Series Sequence → Referenced Image
    Sequence and Referenced Non-Image Composite SOP Instance Sequence."""
    out = []
    for series in ds.get("PerformedSeriesSequence", None) or []:
        for key in ("ReferencedImageSequence",
                    "ReferencedNonImageCompositeSOPInstanceSequence"):
            for item in series.get(key, None) or []:
                uid = str(item.get("ReferencedSOPInstanceUID", "") or "").strip()
                if uid:
                    out.append(uid)
    return list(dict.fromkeys(out))


def merge(stored: Dataset, modification: Dataset) -> Dataset:
    """An N-SET applied to the MPPS (PS3.7 10.1.1: each attribute replaces the stored one; a
    sequence is replaced whole)."""
    for elem in modification:
        stored[elem.tag] = elem
    return stored


def ian_dataset(study_uid: str, instances: Iterable[tuple[str, str, str]],
                retrieve_ae: str, mpps: Sequence[str] = ()) -> Dataset:
    """The N-CREATE attribute list of an Instance Availability Notification (PS3.3 C.4.23):
    ``instances`` are (series, SOP class, SOP instance) the router holds ONLINE; ``mpps``
    the procedure steps that reported the study."""
    ds = Dataset()
    refs = []
    for uid in mpps:
        item = Dataset()
        item.ReferencedSOPClassUID = MPPS_SOP_CLASS
        item.ReferencedSOPInstanceUID = uid
        item.PerformedWorkitemCodeSequence = []
        refs.append(item)
    ds.ReferencedPerformedProcedureStepSequence = refs
    ds.StudyInstanceUID = study_uid
    by_series: dict[str, list[Dataset]] = {}
    for series, sop_class, sop in instances:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop
        item.InstanceAvailability = "ONLINE"
        item.RetrieveAETitle = retrieve_ae
        by_series.setdefault(series, []).append(item)
    series_items = []
    for series, items in by_series.items():
        s = Dataset()
        s.SeriesInstanceUID = series
        s.ReferencedSOPSequence = items
        series_items.append(s)
    ds.ReferencedSeriesSequence = series_items
    return ds


def new_uid() -> str:
    return str(generate_uid())
