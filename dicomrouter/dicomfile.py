"""Reading the few tags the router needs from a file, and making wire values safe for paths."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

# Tags recorded in the state database for every instance: enough to group, route and name files
# without reopening the file. Other keywords are read from the file when a rule or template needs
# them.
INDEX_KEYWORDS = (
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyDescription", "StudyID",
    "ReferringPhysicianName", "InstitutionName",
    "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "Modality", "BodyPartExamined",
    "StationName", "Manufacturer",
    "SOPInstanceUID", "SOPClassUID", "InstanceNumber",
)

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class UnreadableDataset(ValueError):
    """The received bytes are not a dataset we can identify; the sender gets a 0xC000 status."""


def valid_uid(uid: str) -> bool:
    """A DICOM UID: digits and dots, at most 64 characters (it is about to name a file)."""
    return 0 < len(uid) <= 64 and bool(_UID.match(uid))


def text(value: Any) -> str:
    """A tag value as plain text; multi-valued elements are joined with a backslash."""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(text(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("latin-1", "replace").strip("\x00 ")
    return str(value).strip()


def read_header(path: str | Path) -> Dataset:
    """The dataset without pixel data (the rest is read lazily, never the bulk)."""
    return dcmread(path, stop_before_pixels=True)


def identify(path: str | Path) -> tuple[dict[str, str], str]:
    """Index tags and transfer syntax of a received Part 10 file.

    Raises UnreadableDataset when the file cannot be parsed or lacks valid study/SOP UIDs.
    """
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=list(INDEX_KEYWORDS))
        tags = {kw: text(ds.get(kw)) for kw in INDEX_KEYWORDS}
        tsuid = str(ds.file_meta.TransferSyntaxUID)
    except (InvalidDicomError, ValueError, KeyError, EOFError, OSError, AttributeError,
            TypeError, IndexError, OverflowError, NotImplementedError) as exc:
        raise UnreadableDataset(f"cannot parse dataset: {exc}") from exc
    for kw in ("StudyInstanceUID", "SOPInstanceUID", "SeriesInstanceUID"):
        if not tags[kw]:
            if kw == "SeriesInstanceUID":
                continue
            raise UnreadableDataset(f"dataset has no {kw}")
        if not valid_uid(tags[kw]):
            raise UnreadableDataset(f"{kw} {tags[kw][:80]!r} is not a valid UID")
    return tags, tsuid


_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')


def safe_component(value: str, max_len: int = 120) -> str:
    """One path component from an untrusted tag value.

    No separators, no control characters, never ``.``/``..`` and never empty (→ ``UNKNOWN``), so a
    PatientID of ``../../etc`` stays a harmless name inside the output folder.
    """
    v = unicodedata.normalize("NFC", value)
    v = _UNSAFE.sub("_", v).strip().strip(".")
    v = v[:max_len].strip()
    return v or "UNKNOWN"


_FIELD = re.compile(r"{([^{}]*)}")


def render_template(template: str, lookup: dict[str, str]) -> Path:
    """Fill ``{Keyword}`` fields with sanitised values; each ``/`` of the template is a level."""
    parts = []
    for raw_part in template.split("/"):
        if not raw_part:
            continue
        filled = _FIELD.sub(lambda m: safe_component(lookup.get(m.group(1), "")), raw_part)
        parts.append(safe_component(filled))
    return Path(*parts)
