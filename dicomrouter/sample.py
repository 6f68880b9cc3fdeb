"""Synthetic DICOM generator: valid Part 10 files with fresh UIDs and 16-bit pixel data.

Used for demos (``dicomrouter sample``), the committed files in ``sample_dicom/`` and tests.
Pixel content is deterministic for a given ``seed``; UIDs are always fresh so that repeated runs
never collide in a PACS.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

TRANSFER_SYNTAXES: dict[str, UID] = {
    "implicit": ImplicitVRLittleEndian,
    "explicit": ExplicitVRLittleEndian,
    "deflated": DeflatedExplicitVRLittleEndian,
    "rle": RLELossless,
}
"""Short name -> transfer syntax UID for every syntax :func:`generate` can write."""

_BASE_DATE = dt.date(2024, 1, 1)


def resolve_transfer_syntax(value: str) -> UID:
    """Return the UID for a short name (``"rle"``) or a supported UID string."""
    key = value.strip().lower()
    if key in TRANSFER_SYNTAXES:
        return TRANSFER_SYNTAXES[key]
    uid = UID(value.strip())
    if uid in TRANSFER_SYNTAXES.values():
        return uid
    names = ", ".join(TRANSFER_SYNTAXES)
    raise ValueError(f"unsupported transfer syntax {value!r}; use one of: {names} (or their UIDs)")


def sop_class_for(modality: str, frames: int) -> UID:
    """Pick the storage SOP class: CT/MR Image Storage, else (multi-frame) Secondary Capture."""
    if frames > 1:
        return MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    if modality == "CT":
        return CTImageStorage
    if modality == "MR":
        return MRImageStorage
    return SecondaryCaptureImageStorage


def _pixels(rng: np.random.Generator, rows: int, cols: int, frames: int, index: int) -> np.ndarray:
    """A smooth phantom (gradient + disc) with low-amplitude noise, shape (frames, rows, cols)."""
    y, x = np.mgrid[0:rows, 0:cols]
    cy = rows / 2 + rng.uniform(-0.2, 0.2) * rows
    cx = cols / 2 + rng.uniform(-0.2, 0.2) * cols
    radius = max(1.0, min(rows, cols) * rng.uniform(0.15, 0.35))
    base = (x * (1000 / max(cols, 1)) + y * (500 / max(rows, 1))).astype(np.uint16)
    base[(y - cy) ** 2 + (x - cx) ** 2 <= radius**2] += np.uint16(1500 + 50 * (index % 20))
    base += rng.integers(0, 32, size=(rows, cols), dtype=np.uint16)
    if frames == 1:
        return base[np.newaxis]
    # Per-frame offset keeps frames distinct without drawing random numbers for every pixel.
    offsets = (np.arange(frames, dtype=np.uint32) * 7 % 1024).astype(np.uint16)
    return base[np.newaxis, :, :] + offsets[:, np.newaxis, np.newaxis]


def _instance(
    *,
    sop_class: UID,
    modality: str,
    patient_id: str,
    patient_name: str,
    study: dict[str, str],
    series: dict[str, str],
    number: int,
    rows: int,
    cols: int,
    frames: int,
) -> Dataset:
    """Build the dataset (without pixel data) for one instance."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceCreationDate = study["date"]
    ds.InstanceCreationTime = study["time"]
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study["uid"]
    ds.StudyDate = study["date"]
    ds.StudyTime = study["time"]
    ds.AccessionNumber = study["accession"]
    ds.StudyID = study["id"]
    ds.StudyDescription = study["description"]
    ds.ReferringPhysicianName = ""
    ds.SeriesInstanceUID = series["uid"]
    ds.SeriesNumber = series["number"]
    ds.SeriesDescription = series["description"]
    ds.SeriesDate = study["date"]
    ds.SeriesTime = study["time"]
    ds.Modality = modality
    ds.Manufacturer = "dicomrouter synthetic"
    ds.InstanceNumber = number
    ds.ContentDate = study["date"]
    ds.ContentTime = study["time"]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]

    if sop_class in (CTImageStorage, MRImageStorage):
        ds.FrameOfReferenceUID = series["frame_of_reference"]
        ds.PositionReferenceIndicator = ""
        ds.PatientPosition = "HFS"
        ds.AcquisitionNumber = 1
        ds.SliceThickness = "2.0"
        ds.PixelSpacing = ["0.5", "0.5"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.ImagePositionPatient = ["0", "0", f"{2.0 * number:.1f}"]
        ds.SliceLocation = f"{2.0 * number:.1f}"
    if sop_class == CTImageStorage:
        ds.KVP = "120"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
    elif sop_class == MRImageStorage:
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = "500"
        ds.EchoTime = "20"
        ds.EchoTrainLength = "1"
        ds.MagneticFieldStrength = "1.5"
    else:
        ds.ConversionType = "WSD"
    if frames > 1:
        ds.NumberOfFrames = frames
        ds.FrameTime = "100"
        ds.FrameIncrementPointer = 0x00181063  # FrameTime
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "US"

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return ds


def generate(
    out_dir: Path,
    studies: int = 1,
    series: int = 2,
    instances: int = 3,
    modality: str = "CT",
    rows: int = 64,
    cols: int = 64,
    frames: int = 1,
    transfer_syntax: str = ExplicitVRLittleEndian,
    patient_id: str | None = None,
    seed: int | None = None,
) -> list[Path]:
    """Write synthetic studies as ``out_dir/study<n>/series<n>/instance<n>.dcm``; return the paths.

    ``transfer_syntax`` is a UID or a key of :data:`TRANSFER_SYNTAXES`. All studies belong to one
    patient. ``frames > 1`` produces Multi-frame Grayscale Word Secondary Capture instances.
    """
    ts = resolve_transfer_syntax(str(transfer_syntax))
    modality = modality.strip().upper()
    if not modality or len(modality) > 16:
        raise ValueError(f"invalid modality {modality!r}")
    for name, value in (
        ("studies", studies),
        ("series", series),
        ("instances", instances),
        ("rows", rows),
        ("cols", cols),
        ("frames", frames),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if rows > 65535 or cols > 65535:
        raise ValueError("rows and cols must be <= 65535")

    rng = np.random.default_rng(seed)
    if patient_id is None:
        patient_id = f"SYN{rng.integers(0, 10**6):06d}"
    patient_name = f"SYNTHETIC^{patient_id}"
    sop_class = sop_class_for(modality, frames)
    out_dir = Path(out_dir)
    written: list[Path] = []

    for st in range(1, studies + 1):
        date = _BASE_DATE + dt.timedelta(days=int(rng.integers(0, 365)))
        seconds = int(rng.integers(7 * 3600, 19 * 3600))
        study = {
            "uid": generate_uid(),
            "date": date.strftime("%Y%m%d"),
            "time": f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}",
            "accession": f"ACC{rng.integers(0, 10**8):08d}",
            "id": str(st),
            "description": f"Synthetic {modality} study {st}",
        }
        for se in range(1, series + 1):
            series_info = {
                "uid": generate_uid(),
                "frame_of_reference": generate_uid(),
                "number": str(se),
                "description": f"Synthetic {modality} series {se}",
            }
            series_dir = out_dir / f"study{st}" / f"series{se}"
            series_dir.mkdir(parents=True, exist_ok=True)
            for inst in range(1, instances + 1):
                ds = _instance(
                    sop_class=sop_class,
                    modality=modality,
                    patient_id=patient_id,
                    patient_name=patient_name,
                    study=study,
                    series=series_info,
                    number=inst,
                    rows=rows,
                    cols=cols,
                    frames=frames,
                )
                arr = _pixels(rng, rows, cols, frames, inst)
                if frames == 1:
                    arr = arr[0]
                if ts == RLELossless:
                    ds.compress(RLELossless, arr, encoding_plugin="pydicom",
                                generate_instance_uid=False)
                else:
                    ds.PixelData = arr.astype("<u2", copy=False).tobytes()
                    ds["PixelData"].VR = "OW"
                del arr
                ds.file_meta = FileMetaDataset()
                ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.file_meta.TransferSyntaxUID = ts
                path = series_dir / f"instance{inst}.dcm"
                dcmwrite(path, ds, enforce_file_format=True)
                written.append(path)
    return written
