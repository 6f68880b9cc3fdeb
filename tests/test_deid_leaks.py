"""De-identification against a study built to leak (issue 22): identifying values everywhere a
real study carries them, each one a unique marker, so that a byte search of every output file
finds any survivor.

The study: two CT series (the second derived from the first, one instance RLE-compressed), a
Comprehensive SR and a Key Object Selection; private groups, overlays and curves; patients,
issuers, procedure codes, free text and dates at every nesting depth; references to the study's
instances under listed and unlisted tags. It goes through the router (C-STORE in, `deidentify`
on the route) to a folder and to a real Orthanc over STOW-RS.
"""

from __future__ import annotations

import copy
import datetime as dt
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from peers import Orthanc, run_storescu
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)
from router_fixtures import Router, dataset_bytes

from dicomrouter.deid import SOURCE_AE, Deidentifier, from_options
from dicomrouter.deid_table import CLASS_UIDS
from dicomrouter.transforms import Op, transform_file

SECRET = "leak-test-secret"
CT, SR, KOS = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.88.33", \
    "1.2.840.10008.5.1.4.1.1.88.59"
CALLING_AE = "LEAKAE00X"  # the sender: lands in the spool's file meta (0002,0016)


@pytest.fixture(autouse=True)
def secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEID_SECRET", SECRET)


class LeakyStudy:
    """The study, its markers (value → where it was put), dates, UIDs and original pixels."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.marks: dict[str, str] = {CALLING_AE: "file meta Source AE Title (the sender)"}
        self.dates: dict[str, str] = {}
        self.uids: dict[str, str] = {}
        self.pixels: dict[str, np.ndarray] = {}  # SOP Instance UID → pixels before encoding
        self.files: dict[str, Path] = {}  # name → file
        self._day = dt.date(1951, 3, 7)
        self._n = 0
        self._common: Dataset | None = None

    # ---- values ---------------------------------------------------------------------------

    def mark(self, where: str) -> str:
        self._n += 1
        value = f"LEAK{self._n:03d}X"
        self.marks[value] = where
        return value

    def name(self, where: str) -> str:
        return f"{self.mark(where + ' (family)')}^{self.mark(where + ' (given)')}"

    def date(self, where: str) -> str:
        self._day += dt.timedelta(days=397)
        value = self._day.strftime("%Y%m%d")
        self.dates[value] = where
        return value

    def time(self, where: str) -> str:
        self._n += 1
        value = f"{self._n % 24:02d}{self._n % 60:02d}17.{self._n:06d}"
        self.dates[value] = where
        return value

    def datetime(self, where: str) -> str:
        return self.date(where) + self.time(where)

    def uid(self, key: str) -> str:
        if key not in self.uids:
            self.uids[key] = generate_uid(entropy_srcs=["issue 22 leak study", key])
        return self.uids[key]

    def code(self, value: str, scheme: str, meaning: str | None, where: str) -> Dataset:
        c = Dataset()
        c.CodeValue = value
        c.CodingSchemeDesignator = scheme
        c.CodeMeaning = meaning if meaning is not None else f"{self.mark(where)} SCAN OF DOE"
        return c

    # ---- the study ------------------------------------------------------------------------

    def common(self, ds: Dataset) -> None:
        """Patient, study and equipment attributes every instance carries (the same values)."""
        if self._common is None:
            self._common = Dataset()
            self._study_level(self._common, "study level")
        for elem in self._common:
            ds.add(copy.deepcopy(elem))

    def _study_level(self, ds: Dataset, what: str) -> None:
        m = self.mark
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = self.name(f"{what} PatientName")
        ds.PatientID = m(f"{what} PatientID")
        ds.IssuerOfPatientID = m(f"{what} IssuerOfPatientID")
        ds.PatientBirthDate = self.date(f"{what} PatientBirthDate")
        ds.PatientSex = "F"
        ds.OtherPatientIDs = m(f"{what} OtherPatientIDs")
        ds.PatientAddress = m(f"{what} PatientAddress")
        ds.StudyInstanceUID = self.uid("study")
        ds.StudyDate = self.date(f"{what} StudyDate")
        ds.StudyTime = self.time(f"{what} StudyTime")
        ds.StudyUpdateDateTime = self.datetime(f"{what} StudyUpdateDateTime (0008,041F)")
        ds.AccessionNumber = m(f"{what} AccessionNumber")
        issuer = Dataset()
        issuer.LocalNamespaceEntityID = m(f"{what} IssuerOfAccessionNumberSequence "
                                          "LocalNamespaceEntityID")
        issuer.UniversalEntityID = m(f"{what} IssuerOfAccessionNumberSequence UniversalEntityID")
        issuer.UniversalEntityIDType = "ISO"
        ds.IssuerOfAccessionNumberSequence = [issuer]
        ds.StudyID = m(f"{what} StudyID")
        ds.StudyDescription = m(f"{what} StudyDescription")
        ds.ReferringPhysicianName = self.name(f"{what} ReferringPhysicianName")
        ds.InstitutionName = m(f"{what} InstitutionName")
        ds.InstitutionAddress = m(f"{what} InstitutionAddress")
        ds.StationName = m(f"{what} StationName")
        ds.Manufacturer = "ACME MEDICAL"
        ds.ProcedureCodeSequence = [
            self.code("CTCHEST01", "99LOCAL", None, f"{what} ProcedureCodeSequence CodeMeaning")]
        source = Dataset()  # Source Patient Group Identification Sequence (0010,0026)
        source.PatientID = m(f"{what} SourcePatientGroupIdentificationSequence PatientID")
        source.IssuerOfPatientID = m(f"{what} SourcePatientGroupIdentificationSequence Issuer")
        ds.SourcePatientGroupIdentificationSequence = [source]
        group = Dataset()  # Group of Patients Identification Sequence (0010,0027)
        group.PatientID = m(f"{what} GroupOfPatientsIdentificationSequence PatientID")
        group.PatientName = self.name(f"{what} GroupOfPatientsIdentificationSequence "
                                      "PatientName")
        ds.GroupOfPatientsIdentificationSequence = [group]
        request = Dataset()  # Referenced Request Sequence: not listed, cleaned inside
        request.AccessionNumber = m(f"{what} ReferencedRequestSequence AccessionNumber")
        request.StudyInstanceUID = self.uid("study")
        request.RequestedProcedureID = m(f"{what} ReferencedRequestSequence "
                                         "RequestedProcedureID")
        request.RequestedProcedureDescription = m(f"{what} ReferencedRequestSequence "
                                                  "RequestedProcedureDescription")
        request.PlacerOrderNumberImagingServiceRequest = m(f"{what} PlacerOrderNumber")
        request.RequestedProcedureCodeSequence = [
            self.code("REQ1", "99LOCAL", None, f"{what} RequestedProcedureCodeSequence")]
        request.AssertionComments = m(f"{what} AssertionComments (UT, not listed, nested)")
        request.CommentsOnTheScheduledProcedureStep = m(f"{what} nested LT, not listed")
        request.PotentialReasonsForProcedure = m(f"{what} nested UC, not listed")
        request.RequestedProcedureCodeSequence[0].ExtendedCodeMeaning = m(
            f"{what} ExtendedCodeMeaning (LT) at depth 2")
        ds.ReferencedRequestSequence = [request]
        ds.RetrieveURL = f"https://pacs.example/studies/{self.uid('study')}?{m('RetrieveURL')}"
        scheme = Dataset()
        scheme.CodingSchemeDesignator = "99LOCAL"
        scheme.CodingSchemeResponsibleOrganization = m(f"{what} coding scheme organization")
        ds.CodingSchemeIdentificationSequence = [scheme]
        ds.add_new(0x00080FFE, "UN", m(f"{what} public element of unknown VR").encode())
        ds.ContentDescription = m(f"{what} ContentDescription (LO, not listed)")
        ds.SecondaryReviewerName = self.name(f"{what} SecondaryReviewerName (PN, not listed)")
        ds.DocumentTitle = m(f"{what} DocumentTitle (ST, not listed)")
        ds.add_new(0x00090010, "LO", m(f"{what} private creator"))
        ds.add_new(0x00091001, "LO", m(f"{what} private (0009,1001)"))
        ds.add_new(0x00091002, "OB", m(f"{what} private OB (0009,1002)").encode())
        ds.add_new(0x50000022, "LO", m(f"{what} CurveDescription (5000,0022)"))

    def meta(self, ds: Dataset, ts: str = ExplicitVRLittleEndian) -> None:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ts

    def overlay(self, ds: Dataset, group: int, what: str) -> None:
        g = group << 16
        ds.add_new(g | 0x0010, "US", 16)
        ds.add_new(g | 0x0011, "US", 16)
        ds.add_new(g | 0x0040, "CS", "G")
        ds.add_new(g | 0x0050, "SS", [1, 1])
        ds.add_new(g | 0x0100, "US", 1)
        ds.add_new(g | 0x0102, "US", 0)
        ds.add_new(g | 0x0022, "LO", self.mark(f"{what} OverlayDescription ({group:04X},0022)"))
        ds.add_new(g | 0x1500, "LO", self.mark(f"{what} OverlayLabel ({group:04X},1500)"))
        ds.add_new(g | 0x4000, "LT", self.mark(f"{what} OverlayComments ({group:04X},4000)"))
        ds.add_new(g | 0x3000, "OW", bytes(range(32)))

    def image_ref(self, sop_key: str, purpose: str | None = None) -> Dataset:
        ref = Dataset()
        ref.ReferencedSOPClassUID = CT
        ref.ReferencedSOPInstanceUID = self.uid(sop_key)
        if purpose:
            ref.PurposeOfReferenceCodeSequence = [
                self.code("121320", "DCM", "Uncompressed predecessor", "")]
        return ref

    def ct(self, series: int, number: int, rle: bool = False) -> Path:
        what = f"CT {series}.{number}"
        m = self.mark
        ds = Dataset()
        self.common(ds)
        ds.SOPClassUID = CT
        ds.SOPInstanceUID = self.uid(f"ct{series}.{number}")
        ds.SeriesInstanceUID = self.uid(f"series{series}")
        ds.FrameOfReferenceUID = self.uid("frame of reference")
        ds.PositionReferenceIndicator = ""
        ds.Modality = "CT"
        ds.SeriesNumber = series
        ds.InstanceNumber = number
        ds.SeriesDate = self.date(f"{what} SeriesDate")
        ds.ContentDate = self.date(f"{what} ContentDate")
        ds.ContentTime = self.time(f"{what} ContentTime")
        ds.AcquisitionDateTime = self.datetime(f"{what} AcquisitionDateTime")
        ds.SeriesDescription = m(f"{what} SeriesDescription")
        ds.ProtocolName = m(f"{what} ProtocolName")
        ds.OperatorsName = self.name(f"{what} OperatorsName")
        ds.PerformingPhysicianName = self.name(f"{what} PerformingPhysicianName")
        ds.ImageComments = m(f"{what} ImageComments")
        ds.ConvolutionKernel = "B30F"
        ds.ImageType = ["DERIVED" if series == 2 else "ORIGINAL", "PRIMARY", "AXIAL"]
        ds.BurnedInAnnotation = "NO"
        ds.ImagePositionPatient = [0, 0, float(number)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.5, 0.5]
        ds.SliceThickness = 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.Rows = ds.Columns = 16
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        region = Dataset()
        region.CodeValue, region.CodingSchemeDesignator = "51185008", "SCT"
        region.CodeMeaning = "Chest"  # a standard code: its meaning is the dictionary's
        ds.AnatomicRegionSequence = [region]
        pixels = np.random.default_rng(series * 10 + number).integers(
            0, 4096, (16, 16), dtype=np.uint16)
        self.pixels[ds.SOPInstanceUID] = pixels
        ds.PixelData = pixels.tobytes()
        self.overlay(ds, 0x6000, what)
        self.overlay(ds, 0x6002, what)
        if series == 2:  # derived from series 1: references under listed and unlisted tags
            ds.ReferencedImageSequence = [self.image_ref("ct1.1"), self.image_ref("ct1.2")]
            ds.SourceImageSequence = [self.image_ref("ct1.1", "purpose")]
            derivation = Dataset()
            derivation.DerivationDescription = m(f"{what} DerivationDescription")
            derivation.DerivationCodeSequence = [
                self.code("113072", "DCM", "Multiplanar reformatting", "")]
            derivation.SourceImageSequence = [self.image_ref("ct1.2"), self.image_ref("ct1.3")]
            derivation.add_new(0x00110010, "LO", m(f"{what} nested private creator"))
            derivation.add_new(0x00111001, "LO", m(f"{what} nested private value"))
            ds.DerivationImageSequence = [derivation]
            ds.MultiFrameSourceSOPInstanceUID = self.uid("ct1.1")  # (0008,1167)
            ds.SOPInstanceUIDOfConcatenationSource = self.uid("ct1.2")  # (0020,0242)
            study = Dataset()
            study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
            study.ReferencedSOPInstanceUID = self.uid("study")
            ds.ReferencedStudySequence = [study]
        if rle:
            ds.compress(RLELossless, pixels, generate_instance_uid=False)
        self.meta(ds, ds.file_meta.TransferSyntaxUID if rle else ExplicitVRLittleEndian)
        return self.save(f"ct{series}.{number}", ds)

    def save(self, name: str, ds: Dataset) -> Path:
        path = self.folder / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        self.files[name] = path
        return path

    # ---- structured reports ---------------------------------------------------------------

    def item(self, relation: str, value_type: str, concept: Dataset, **values: Any) -> Dataset:
        it = Dataset()
        it.RelationshipType = relation
        it.ValueType = value_type
        it.ConceptNameCodeSequence = [concept]
        for k, v in values.items():
            setattr(it, k, v)
        return it

    def evidence(self) -> Sequence:
        """Current Requested Procedure Evidence: every CT instance, by series."""
        out = []
        for series, numbers in ((1, (1, 2, 3)), (2, (1, 2))):
            s = Dataset()
            s.SeriesInstanceUID = self.uid(f"series{series}")
            s.RetrieveAETitle = self.mark("evidence RetrieveAETitle")
            s.ReferencedSOPSequence = [self.image_ref(f"ct{series}.{n}") for n in numbers]
            out.append(s)
        study = Dataset()
        study.StudyInstanceUID = self.uid("study")
        study.ReferencedSeriesSequence = out
        return Sequence([study])

    def sr(self) -> Path:
        m = self.mark
        ds = Dataset()
        self.common(ds)
        ds.SOPClassUID, ds.Modality = SR, "SR"
        ds.SOPInstanceUID = self.uid("sr")
        ds.SeriesInstanceUID = self.uid("series sr")
        ds.SeriesNumber, ds.InstanceNumber = 3, 1
        ds.ContentDate = self.date("SR ContentDate")
        ds.ContentTime = self.time("SR ContentTime")
        ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
        ds.ConceptNameCodeSequence = [self.code("18748-4", "LN", "Diagnostic imaging report",
                                                "")]
        ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "VERIFIED"
        ds.CompletionFlagDescription = m("SR CompletionFlagDescription")
        observer = Dataset()
        observer.VerifyingObserverName = self.name("SR VerifyingObserverName")
        observer.VerifyingOrganization = m("SR VerifyingOrganization")
        observer.VerificationDateTime = self.datetime("SR VerificationDateTime")
        observer.VerifyingObserverIdentificationCodeSequence = [
            self.code("EMP77", "99LOCAL", None, "SR verifying observer code")]
        ds.VerifyingObserverSequence = [observer]
        ds.CurrentRequestedProcedureEvidenceSequence = self.evidence()
        image = self.item("CONTAINS", "IMAGE", self.code("121233", "DCM", "Source image for "
                                                         "segmentation", ""),
                          ReferencedSOPSequence=[self.image_ref("ct2.1")])
        scoord = self.item("INFERRED FROM", "SCOORD3D",
                           self.code("111030", "DCM", "Image Region", ""),
                           GraphicType="POINT", GraphicData=[1.0, 2.0, 3.0],
                           ReferencedFrameOfReferenceUID=self.uid("frame of reference"))
        deep = self.item("CONTAINS", "CONTAINER", self.code("125007", "DCM",
                                                            "Measurement Group", ""),
                         ContinuityOfContent="SEPARATE")
        deep.ContentSequence = [
            self.item("CONTAINS", "TEXT", self.code("121071", "DCM", "Finding", ""),
                      TextValue=f"{m('SR TextValue at depth 3')} JOHN DOE HAS A NODULE"),
            self.item("CONTAINS", "CODE", self.code("121071", "DCM", "Finding", ""),
                      ConceptCodeSequence=[self.code("27925004", "SCT", "Nodule", "")]),
            self.item("CONTAINS", "CODE", self.code("LOC1", "99LOCAL", None,
                                                    "SR local concept name"),
                      ConceptCodeSequence=[self.code("LOC2", "99LOCAL", None,
                                                     "SR local concept code")]),
            image, scoord]
        ds.ContentSequence = [
            self.item("HAS OBS CONTEXT", "PNAME", self.code("121008", "DCM",
                                                            "Person Observer Name", ""),
                      PersonName=self.name("SR PNAME content item")),
            self.item("HAS OBS CONTEXT", "UIDREF", self.code("121018", "DCM",
                                                             "Procedure Study Instance UID",
                                                             ""),
                      UID=self.uid("study")),
            self.item("HAS OBS CONTEXT", "DATE", self.code("111060", "DCM", "Study Date", ""),
                      Date=self.date("SR DATE content item")),
            self.item("HAS OBS CONTEXT", "TIME", self.code("111061", "DCM", "Study Time", ""),
                      Time=self.time("SR TIME content item")),
            self.item("HAS OBS CONTEXT", "DATETIME", self.code("111526", "DCM",
                                                               "DateTime Started", ""),
                      DateTime=self.datetime("SR DATETIME content item"),
                      ObservationDateTime=self.datetime("SR ObservationDateTime")),
            self.item("CONTAINS", "TEXT", self.code("121071", "DCM", "Finding", ""),
                      TextValue=f"{m('SR TextValue')} JOHN DOE HAS A NODULE"),
            deep]
        self.meta(ds)
        return self.save("sr", ds)

    def kos(self) -> Path:
        ds = Dataset()
        self.common(ds)
        ds.SOPClassUID, ds.Modality = KOS, "KO"
        ds.SOPInstanceUID = self.uid("kos")
        ds.SeriesInstanceUID = self.uid("series kos")
        ds.SeriesNumber, ds.InstanceNumber = 4, 1
        ds.ContentDate = self.date("KOS ContentDate")
        ds.ContentTime = self.time("KOS ContentTime")
        ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
        ds.ConceptNameCodeSequence = [self.code("113000", "DCM", "Of Interest", "")]
        ds.CurrentRequestedProcedureEvidenceSequence = self.evidence()
        sr_ref = Dataset()
        sr_ref.ReferencedSOPClassUID = SR
        sr_ref.ReferencedSOPInstanceUID = self.uid("sr")
        ds.ContentSequence = [
            self.item("CONTAINS", "TEXT", self.code("113012", "DCM", "Key Object Description",
                                                    ""),
                      TextValue=f"{self.mark('KOS TextValue')} FOR DR SMITH, PATIENT DOE"),
            self.item("CONTAINS", "IMAGE", self.code("113001", "DCM", "Rejected for Quality "
                                                     "Reasons", ""),
                      ReferencedSOPSequence=[self.image_ref("ct1.3")]),
            self.item("CONTAINS", "IMAGE", self.code("113001", "DCM", "Rejected for Quality "
                                                     "Reasons", ""),
                      ReferencedSOPSequence=[self.image_ref("ct2.2")]),
            self.item("CONTAINS", "COMPOSITE", self.code("113001", "DCM", "Rejected for "
                                                         "Quality Reasons", ""),
                      ReferencedSOPSequence=[sr_ref])]
        self.meta(ds)
        return self.save("kos", ds)

    def build(self) -> list[Path]:
        self.folder.mkdir(parents=True, exist_ok=True)
        for n in (1, 2, 3):
            self.ct(1, n)
        self.ct(2, 1)
        self.ct(2, 2, rle=True)
        self.sr()
        self.kos()
        return list(self.files.values())


# ---- checks -----------------------------------------------------------------------------------

def uid_values(ds: Dataset, where: str = "") -> Iterator[tuple[str, int, str]]:
    """(path, tag, value) of every UI value, into sequences."""
    for elem in ds:
        name = f"{where}{elem.keyword or elem.tag}"
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value or []):
                yield from uid_values(item, f"{name}[{i}].")
        elif elem.VR == "UI" and elem.value:
            values = elem.value if type(elem.value).__name__ == "MultiValue" else [elem.value]
            for v in values:
                yield name, int(elem.tag), str(v)


def assert_nothing_leaks(study: LeakyStudy, outputs: dict[str, bytes], where: str) -> None:
    """No marker, date or original UID in any output byte (file meta, names included)."""
    survivors = []
    for name, data in outputs.items():
        for value, origin in [*study.marks.items(), *study.dates.items()]:
            if value.encode() in data or value in name:
                survivors.append(f"{origin} ({value}) in {name}")
        for key, uid in study.uids.items():
            if uid.encode() in data or uid in name:
                survivors.append(f"original UID of {key} in {name}")
    assert not survivors, f"{where}: {len(survivors)} survivor(s):\n" + "\n".join(survivors)


def assert_references_resolve(study: LeakyStudy, copies: dict[str, Dataset]) -> None:
    """Every UID in the copies (but class UIDs and the standard's) is the identity of an output
    instance, series, study or frame of reference, and the right one."""
    d = Deidentifier(SECRET.encode())
    identities: set[str] = set()
    for ds in copies.values():
        identities |= {str(ds.get(k)) for k in ("SOPInstanceUID", "SeriesInstanceUID",
                                                "StudyInstanceUID", "FrameOfReferenceUID")
                       if ds.get(k)}
    assert len(identities) == 7 + 4 + 1 + 1
    checked = 0
    for name, ds in copies.items():
        for path, tag, value in [*uid_values(ds.file_meta, "meta."), *uid_values(ds)]:
            if tag in CLASS_UIDS or value.startswith("1.2.840.10008."):
                continue
            assert value in identities, f"{name}: {path} = {value} points at nothing"
            checked += 1
    assert checked > 60, checked
    new = {k: d.uid(v) for k, v in study.uids.items()}  # where each must point
    ct2 = copies["ct2.1"]
    assert ct2[0x00081167].value == new["ct1.1"]  # Multi-frame Source SOP Instance UID
    assert ct2[0x00200242].value == new["ct1.2"]  # SOP Instance UID of Concatenation Source
    assert [r.ReferencedSOPInstanceUID for r in ct2.ReferencedImageSequence] == \
        [new["ct1.1"], new["ct1.2"]]  # kept (U*), remapped
    assert ct2.SourceImageSequence[0].ReferencedSOPInstanceUID == new["ct1.1"]
    assert [r.ReferencedSOPInstanceUID for r in
            ct2.DerivationImageSequence[0].SourceImageSequence] == [new["ct1.2"], new["ct1.3"]]
    assert ct2.FrameOfReferenceUID == copies["ct1.1"].FrameOfReferenceUID
    sr = copies["sr"]
    deep = sr.ContentSequence[6].ContentSequence
    assert deep[3].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == new["ct2.1"]
    assert deep[4].ReferencedFrameOfReferenceUID == new["frame of reference"]
    assert str(sr.ContentSequence[1].UID) == new["study"]  # a UIDREF content item
    kos = copies["kos"]
    assert [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for i in kos.ContentSequence[1:]] == [new["ct1.3"], new["ct2.2"], new["sr"]]
    evidence = kos.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == new["study"]
    assert [s.SeriesInstanceUID for s in evidence.ReferencedSeriesSequence] == \
        [new["series1"], new["series2"]]


def assert_pixels_identical(study: LeakyStudy, copies: dict[str, Dataset]) -> None:
    for name, ds in copies.items():
        src = dcmread(study.files[name])
        if "PixelData" not in src:
            continue
        assert ds.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
        assert ds.PixelData == src.PixelData, f"{name}: pixel data bytes changed"
        original = study.pixels[str(src.SOPInstanceUID)]
        assert np.array_equal(ds.pixel_array, original), f"{name}: decoded pixels differ"
    assert copies["ct2.2"].file_meta.TransferSyntaxUID == RLELossless  # the RLE one decoded


def assert_structure_kept(study: LeakyStudy, copies: dict[str, Dataset]) -> None:
    """What must stay for the data to be usable: pseudonyms, codes, technique, the record."""
    d = Deidentifier(SECRET.encode())
    patient = str(dcmread(study.files["ct1.1"], stop_before_pixels=True).PatientID)
    for name, ds in copies.items():
        assert ds.PatientIdentityRemoved == "YES", name
        assert ds.file_meta.SourceApplicationEntityTitle == SOURCE_AE, name
        assert ds.PatientID == d.pseudonym("ANON-{hash:12}", patient), name
        assert ds.PatientName == d.pseudonym("ANON^{hash:12}", patient), name
        assert ds.Manufacturer == "ACME MEDICAL", name  # structural text kept
        group = ds.GroupOfPatientsIdentificationSequence[0]
        assert group.PatientID.startswith("ANON-") and str(group.PatientName).startswith("ANON^")
        assert not any(0x6000 <= e.tag.group <= 0x60FF for e in ds), f"{name}: overlay kept"
        assert "IssuerOfAccessionNumberSequence" not in ds
        assert not ds.get("StudyUpdateDateTime")
        code = ds.ProcedureCodeSequence[0]
        assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == \
            ("CTCHEST01", "99LOCAL", "ANONYMIZED"), name
    ct = copies["ct1.1"]
    # a standard code's meaning is the coding scheme's (pydicom's PS3.16 dictionaries), never
    # the text that came with it
    assert ct.AnatomicRegionSequence[0].CodeMeaning == "Thoracic structure (body structure)"
    assert (ct.Modality, ct.ConvolutionKernel, ct.RescaleType, list(ct.ImageType)) == \
        ("CT", "B30F", "HU", ["ORIGINAL", "PRIMARY", "AXIAL"])
    sr = copies["sr"]
    finding = sr.ContentSequence[6].ContentSequence[1]
    assert finding.ConceptCodeSequence[0].CodeMeaning == "Nodule"
    assert sr.ContentSequence[5].TextValue == "ANONYMIZED"


def test_a_study_built_to_leak_leaks_nothing_to_a_folder_and_over_stow_rs(
        tmp_path: Path, orthanc) -> None:
    study = LeakyStudy(tmp_path / "study")
    files = study.build()
    pacs: Orthanc = orthanc(aet="CLOUD", dicomweb=True)
    out = tmp_path / "research"
    d = Deidentifier(SECRET.encode())
    with Router(tmp_path / "router", {
        "keep_after_delivery": True,
        "destinations": {"folder": {"type": "folder", "path": str(out)},
                         "cloud": {"type": "dicomweb", "url": f"{pacs.url}/dicom-web"}},
        "routes": [{"name": "research", "to": ["folder", "cloud"],
                    "transforms": [{"deidentify": {"profile": "basic"}}]}],
    }) as router:
        sent = run_storescu(files, router.port, calling=CALLING_AE)
        assert sent.returncode == 0, sent.stderr
        router.wait_state(study.uid("study"), "delivered", timeout=120)
        assert router.status()["ledger"]["resent"] == 0
        spool = {p.stem: p for p in (router.spool / "data").rglob("*.dcm")}
        log = router.log(5000)
    assert "Traceback" not in log
    # the spool keeps the originals, byte for byte (and the sender's AE in its file meta)
    originals = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
    assert set(spool) == set(originals)
    for uid, f in originals.items():
        assert dataset_bytes(spool[uid]) == dataset_bytes(f), f"spool copy of {f.name} changed"
        assert dcmread(spool[uid]).file_meta.SourceApplicationEntityTitle == CALLING_AE

    names = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): n
             for n, f in study.files.items()}
    new_uids = {d.uid(uid): names[uid] for uid in originals}

    # (a) the folder: every file (manifests too) and every path name
    folder = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert sum(n.endswith(".dcm") for n in folder) == len(files)
    assert_nothing_leaks(study, folder, "folder")
    copies = {}
    for n, data in folder.items():
        if n.endswith(".dcm"):
            ds = dcmread(io.BytesIO(data))
            copies[new_uids[str(ds.SOPInstanceUID)]] = ds
    assert_references_resolve(study, copies)
    assert_pixels_identical(study, copies)
    assert_structure_kept(study, copies)

    # (b) STOW-RS into Orthanc: what Orthanc stored
    assert pacs.instance_sop_uids() == set(new_uids)
    stored = {f"orthanc:{new_uids[u]}": pacs.instance_file(u) for u in new_uids}
    assert_nothing_leaks(study, stored, "STOW-RS")
    copies = {n.split(":")[1]: dcmread(io.BytesIO(b)) for n, b in stored.items()}
    assert_references_resolve(study, copies)
    assert_pixels_identical(study, copies)
    assert_structure_kept(study, copies)


def test_every_marker_date_and_uid_is_in_the_input_bytes(tmp_path: Path) -> None:
    """The byte search can fail: every marker, date and UID is in the input bytes."""
    study = LeakyStudy(tmp_path / "study")
    study.build()
    raw = {n: p.read_bytes() for n, p in study.files.items()}
    with pytest.raises(AssertionError, match="survivor"):
        assert_nothing_leaks(study, raw, "input")
    everywhere = set(study.marks) - {CALLING_AE}
    everywhere |= set(study.dates) | set(study.uids.values())
    found = {m for m in everywhere if any(m.encode() in b for b in raw.values())}
    assert found == everywhere


def transformed(src: Path, dst: Path, **options: Any) -> Dataset:
    deid = from_options({"profile": "basic", **options})
    with open(src, "rb") as f:
        transform_file(f, [Op("deidentify", 0, deid=deid)], str(dst))
    return dcmread(dst)


def test_file_meta_and_preamble_describe_the_deidentifier(tmp_path: Path) -> None:
    """A file as a pull source delivers it: the sender's implementation, AE titles and private
    information in its file meta, something in its preamble."""
    study = LeakyStudy(tmp_path / "study")
    study.build()
    ds = dcmread(study.files["ct1.1"])
    m = study.mark
    ds.preamble = m("preamble").encode().ljust(128, b"\0")
    meta = ds.file_meta
    meta.ImplementationClassUID = study.uid("sender implementation")
    meta.ImplementationVersionName = m("ImplementationVersionName")
    meta.SourceApplicationEntityTitle = m("SourceApplicationEntityTitle")
    meta.SendingApplicationEntityTitle = m("SendingApplicationEntityTitle")
    meta.ReceivingApplicationEntityTitle = m("ReceivingApplicationEntityTitle")
    meta.PrivateInformationCreatorUID = study.uid("private information creator")
    meta.PrivateInformation = m("PrivateInformation").encode()
    src = tmp_path / "meta.dcm"
    ds.save_as(src, enforce_file_format=True)
    out = transformed(src, tmp_path / "out.dcm")
    assert_nothing_leaks(study, {"out": (tmp_path / "out.dcm").read_bytes()}, "file meta")
    assert out.preamble == b"\0" * 128
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID

    assert {e.keyword: e.value for e in out.file_meta} == {
        "FileMetaInformationGroupLength": out.file_meta.FileMetaInformationGroupLength,
        "FileMetaInformationVersion": b"\0\1", "MediaStorageSOPClassUID": CT,
        "MediaStorageSOPInstanceUID": out.SOPInstanceUID,
        "TransferSyntaxUID": ExplicitVRLittleEndian,
        "ImplementationClassUID": PYNETDICOM_IMPLEMENTATION_UID,
        "ImplementationVersionName": "DICOMROUTER_01", "SourceApplicationEntityTitle": SOURCE_AE}


def test_keep_is_the_only_way_a_listed_attribute_survives(tmp_path: Path) -> None:
    study = LeakyStudy(tmp_path / "study")
    study.build()
    src = study.files["sr"]
    original = dcmread(src)
    out = transformed(src, tmp_path / "kept.dcm",
                      keep=["PatientAge", "TextValue", "(0010,1000)", "CodeMeaning",
                            "StudyUpdateDateTime", "OverlayData"])
    # a table X attribute (OtherPatientIDs, (0010,1000)) kept wherever it is; free text at
    # depth 3 too; code meanings as written; unlisted dates kept
    assert out.OtherPatientIDs == original.OtherPatientIDs
    deep = out.ContentSequence[6].ContentSequence
    assert deep[0].TextValue == original.ContentSequence[6].ContentSequence[0].TextValue
    assert out.ProcedureCodeSequence[0].CodeMeaning == \
        original.ProcedureCodeSequence[0].CodeMeaning
    assert out.StudyUpdateDateTime == original.StudyUpdateDateTime
    # what is not listed still goes
    assert not out.get("AccessionNumber") and not out.get("StudyDescription")
    assert "ANON-" in out.PatientID and out.PatientIdentityRemoved == "YES"
    assert out.DeidentificationMethod.endswith("6 attribute(s) kept")
    # overlays: kept whole when any overlay attribute is kept, removed whole otherwise
    ct = study.files["ct1.1"]
    whole = transformed(ct, tmp_path / "overlay.dcm", keep=["OverlayData"])
    ct_src = dcmread(ct)
    for group in (0x6000, 0x6002):
        for elem in (0x0010, 0x0022, 0x1500, 0x3000, 0x4000):
            tag = group << 16 | elem
            assert whole[tag].value == ct_src[tag].value
    gone = transformed(ct, tmp_path / "no-overlay.dcm")
    assert not [e for e in gone if 0x6000 <= e.tag.group <= 0x601E]
    kept_id = transformed(ct, tmp_path / "id.dcm", keep=["PatientID"])
    assert kept_id.PatientID == ct_src.PatientID and kept_id.PatientIdentityRemoved == "NO"
    # nested PatientID keeps its own (the keep applies at every depth)
    assert kept_id.GroupOfPatientsIdentificationSequence[0].PatientID == \
        ct_src.GroupOfPatientsIdentificationSequence[0].PatientID


def test_nested_patients_get_their_own_consistent_pseudonyms(tmp_path: Path) -> None:
    study = LeakyStudy(tmp_path / "study")
    study.build()
    src = dcmread(study.files["ct1.1"])
    out = transformed(study.files["ct1.1"], tmp_path / "o.dcm")
    d = Deidentifier(SECRET.encode())
    group, source = src.GroupOfPatientsIdentificationSequence[0], \
        src.SourcePatientGroupIdentificationSequence[0]
    out_group = out.GroupOfPatientsIdentificationSequence[0]
    assert out_group.PatientID == d.pseudonym("ANON-{hash:12}", group.PatientID)
    assert out_group.PatientName == d.pseudonym("ANON^{hash:12}", group.PatientID)
    assert out.SourcePatientGroupIdentificationSequence[0].PatientID == \
        d.pseudonym("ANON-{hash:12}", source.PatientID)
    assert out.PatientID == d.pseudonym("ANON-{hash:12}", src.PatientID) != out_group.PatientID


def test_keep_private_keeps_private_values_but_not_uids_or_public_ones_inside(
        tmp_path: Path) -> None:
    study = LeakyStudy(tmp_path / "study")
    study.build()
    ds = dcmread(study.files["ct1.1"])
    ds.add_new(0x00090010, "LO", "ACME 1.0")
    ds.add_new(0x00091003, "UI", study.uid("ct1.2"))  # vendors keep references privately
    inner = Dataset()
    inner.PatientName = study.name("private sequence PatientName")
    inner.ReferencedSOPInstanceUID = study.uid("ct1.3")
    inner.add_new(0x00091001, "LO", "vendor value")
    ds.add_new(0x00091004, "SQ", Sequence([inner]))
    src = tmp_path / "private.dcm"
    ds.save_as(src, enforce_file_format=True)
    out = transformed(src, tmp_path / "out.dcm", keep_private=True)
    d = Deidentifier(SECRET.encode())
    assert out[0x00091001].value == ds[0x00091001].value  # a private value: kept
    assert out[0x00091003].value == d.uid(study.uid("ct1.2"))
    item = out[0x00091004].value[0]
    assert not item.get("PatientName") and item[0x00091001].value == "vendor value"
    assert item.ReferencedSOPInstanceUID == d.uid(study.uid("ct1.3"))
    assert "113111" in [c.CodeValue for c in out.DeidentificationMethodCodeSequence]
