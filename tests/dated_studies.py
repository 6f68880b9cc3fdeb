"""Studies of one patient dated relative to today, as the prefetch and order tests need them
(a PACS's priors: this modality, that body part, so many days old)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from pydicom import dcmread
from router_fixtures import tags_of

from dicomrouter.sample import generate

TODAY = dt.date.today()


def dated_study(root: Path, name: str, modality: str = "CT", days_ago: int = 0,
                body_part: str = "CHEST", *, patient: str, accession: str | None = None,
                patient_name: str | None = None, series: int = 2,
                instances: int = 2) -> list[Path]:
    """A study of ``patient``, ``days_ago`` old, of one modality and body part, described as
    ``name`` (in ``root/name``)."""
    files = generate(root / name, series=series, instances=instances, rows=8, cols=8,
                     modality=modality, patient_id=patient)
    date = (TODAY - dt.timedelta(days=days_ago)).strftime("%Y%m%d")
    for f in files:
        ds = dcmread(f)
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
        ds.BodyPartExamined = body_part
        ds.StudyDescription = name
        if accession is not None:
            ds.AccessionNumber = accession
        if patient_name is not None:
            ds.PatientName = patient_name
        ds.save_as(f)
    return files


def uid(files: list[Path]) -> str:
    """The Study Instance UID of a study's files."""
    return tags_of(files[0], "StudyInstanceUID")[0]
