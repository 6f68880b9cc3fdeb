"""What the de-identifier does with each attribute: the PS3.15 Table E.1-1 actions as data, and
the rules for everything the table does not list.

The table comes from the ``dicom-anonymizer`` package (``dicomfields_2026c``, the standard's
table as published). Attributes it does not list are handled *safe by default*
(``deid.Deidentifier`` applies this):

* text (VR PN, LO, SH, LT, ST, UT, UC, and AE, UR, which name sites and may hold UIDs) is
  emptied, at every depth, unless it is on :data:`STRUCTURAL_TEXT` (a short list of attributes
  set by the equipment or a coding scheme, needed to read the data) or on the route's ``keep``;
  Code Meaning is replaced by the coding scheme's own meaning (:func:`code_meaning`) and Text
  Value by a dummy, so SR and KOS trees stay valid;
* dates and times are emptied (unless dates are retained or shifted);
* every UID is remapped wherever it occurs, whatever the tag, except those the DICOM standard
  itself defines (``1.2.840.10008.*``: SOP classes, transfer syntaxes, coding schemes) and the
  attributes that name a class or a syntax (:data:`CLASS_UIDS`);
* a public element of unknown VR (UN) is removed; CS, numbers, binary values and sequences stay
  (a sequence's items are cleaned by the same rules);
* overlay groups (60xx) are removed whole (the table removes only Overlay Data and Comments,
  which would leave a plane without its bitmap but with its description and label).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Annotated, Any

from pydantic import model_validator
from pydicom.datadict import tag_for_keyword

from .schema import Bool, Choice, Strict, Text, parsed
from .values import ConfigError, show

# Retain options (PS3.15 E.3): attributes a switch keeps
RETAIN = ("dates", "device", "patient_characteristics", "descriptors")


def _pairs(*tags: tuple[int, int]) -> frozenset[int]:
    return frozenset(g << 16 | e for g, e in tags)


DEVICE = _pairs((0x0008, 0x1010), (0x0018, 0x1000), (0x0018, 0x1002), (0x0018, 0x700A),
                (0x0018, 0x1008), (0x0018, 0x1004), (0x0018, 0x1005), (0x0018, 0x1007),
                (0x0018, 0x1009), (0x0018, 0x100A), (0x0018, 0x1200), (0x0018, 0x1201),
                (0x0008, 0x1040), (0x0008, 0x0080), (0x0008, 0x0081))
PATIENT_CHARACTERISTICS = _pairs((0x0010, 0x0040), (0x0010, 0x1010), (0x0010, 0x1020),
                                 (0x0010, 0x1030), (0x0010, 0x2160), (0x0010, 0x21A0),
                                 (0x0010, 0x21C0), (0x0010, 0x2203), (0x0010, 0x2110))
DESCRIPTORS = _pairs((0x0008, 0x1030), (0x0008, 0x103E), (0x0018, 0x1030), (0x0040, 0x0254),
                     (0x0008, 0x2111), (0x0040, 0x0007), (0x0018, 0x0015), (0x0020, 0x4000))

TEXT_VRS = frozenset({"PN", "LO", "SH", "LT", "ST", "UT", "UC", "AE", "UR"})
DATE_VRS = frozenset({"DA", "DT", "TM"})
STANDARD_UID_ROOT = "1.2.840.10008."  # UIDs the standard defines: never a patient's


def _tags(*keywords: str) -> frozenset[int]:
    out = set()
    for kw in keywords:
        tag = tag_for_keyword(kw)
        assert tag is not None, kw
        out.add(tag)
    return frozenset(out)


# Text attributes the table does not list that stay: they are set by the equipment or by a
# coding scheme (not typed about a patient), and the data cannot be read without them.
STRUCTURAL_TEXT = _tags(
    # a code is its scheme, value and version (the meaning is replaced: code_meaning)
    "CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion", "LongCodeValue",
    "URNCodeValue", "MappingResourceName",
    # make and model (device identity, serial numbers and names, is the table's: removed)
    "Manufacturer", "ManufacturerModelName", "SoftwareVersions",
    "SecondaryCaptureDeviceManufacturer", "SecondaryCaptureDeviceManufacturerModelName",
    "SecondaryCaptureDeviceSoftwareVersions",
    # how to read the values
    "RescaleType", "WindowCenterWidthExplanation", "LUTExplanation",
    "PositionReferenceIndicator", "MIMETypeOfEncapsulatedDocument",
    # acquisition and reconstruction technique, as the scanner writes it
    "ConvolutionKernel", "FilterType", "SequenceName", "PulseSequenceName", "ImagedNucleus",
    "ReceiveCoilName", "TransmitCoilName", "CollimatorGridName", "ContrastBolusRoute",
    "Radiopharmaceutical", "ReconstructionMethod", "AttenuationCorrectionMethod",
    "ScatterCorrectionMethod", "TransducerData", "ProcessingFunction",
    "AcquisitionDeviceProcessingCode")

CODE_MEANING = tag_for_keyword("CodeMeaning")
TEXT_VALUE = tag_for_keyword("TextValue")  # Type 1 in a TEXT content item: a dummy, not empty

# UID attributes whose value names a kind of thing (a SOP class, a transfer syntax, a coding
# scheme), not an instance: never remapped
CLASS_UIDS = _tags(
    "SOPClassUID", "ReferencedSOPClassUID", "MediaStorageSOPClassUID", "AffectedSOPClassUID",
    "RequestedSOPClassUID", "ReferencedSOPClassUIDInFile", "RelatedGeneralSOPClassUID",
    "OriginalSpecializedSOPClassUID", "ReferencedRelatedGeneralSOPClassUIDInFile",
    "SOPClassesInStudy", "SOPClassesSupported", "PertinentSOPClassesInStudy",
    "PertinentSOPClassesInSeries", "RTVCommunicationSOPClassUID", "TransferSyntaxUID",
    "ReferencedTransferSyntaxUIDInFile", "StoredInstanceTransferSyntaxUID",
    "AvailableTransferSyntaxUID", "FlowTransferSyntaxUID", "MACCalculationTransferSyntaxUID",
    "EncryptedContentTransferSyntaxUID", "CodingSchemeUID", "ContextUID", "MappingResourceUID",
    "CreatorVersionUID", "SegmentationTemplateUID", "ImplementationClassUID")

# Our additions to the table (the table's own actions are never weakened)
EXTRA_ACTIONS = {
    # the issuer of a number the table empties: it names the site (as Issuer of Patient ID,
    # Issuer of Admission ID Sequence, which the table removes)
    tag_for_keyword("IssuerOfAccessionNumberSequence"): "X",
}

PATIENT_ID = tag_for_keyword("PatientID")
PATIENT_NAME = tag_for_keyword("PatientName")


def is_overlay(tag: int) -> bool:
    """An element of an overlay group (6000-601E, even)."""
    group = tag >> 16
    return 0x6000 <= group <= 0x601E and not group & 1


@functools.lru_cache(maxsize=1)
def table() -> tuple[dict[int, str], tuple[tuple[int, int, str], ...]]:
    """Tag → action, and the masked (repeating group) entries as (tag, mask, action).

    Actions: X (remove), Z (empty), D (dummy), U (new UID), U* (a sequence of references: kept,
    its UIDs remapped: the U option of X/Z/U*). Of X/Z, X/D, X/Z/D the stronger X is taken,
    of Z/D the D (PatientID: a pseudonym)."""
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

    tags = dicom_anonymization_database_selector("dicomfields_2026c")
    actions = {"D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "D",
               "X_Z_TAGS": "X", "X_D_TAGS": "X", "X_Z_D_TAGS": "X", "X_Z_U_STAR_TAGS": "U*"}
    exact: dict[int, str] = {}
    masked: list[tuple[int, int, str]] = []
    for group, action in actions.items():
        for t in tags[group]:
            if len(t) == 4:
                masked.append((t[0] << 16 | t[1], t[2] << 16 | t[3], action))
            else:
                exact[t[0] << 16 | t[1]] = action
    for tag, action in EXTRA_ACTIONS.items():
        exact.setdefault(tag, action)
    return exact, tuple(masked)


def action(tag: int) -> str | None:
    """The table's action for ``tag`` (None: not listed, the safe defaults apply)."""
    exact, masked = table()
    found = exact.get(tag)
    if found is None:
        for value, mask, act in masked:
            if tag & mask == value:
                return act
    return found


@functools.lru_cache(maxsize=1)
def _meanings() -> dict[tuple[str, str], str]:
    from pydicom.sr._concepts_dict import concepts  # the standard's code dictionaries

    return {(scheme, value): meaning for scheme, names in concepts.items()
            for codes in names.values() for value, (meaning, _cids) in codes.items()}


def code_meaning(scheme: Any, value: Any) -> str | None:
    """The meaning PS3.16 (DCM, SCT, LN, UCUM, ...) gives a code; None for any other code (a
    local one: its meaning is whatever the site wrote)."""
    if not scheme or not value:
        return None
    return _meanings().get((str(scheme).strip(), str(value).strip()))


_TAG = re.compile(r"^\(?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?$")


def parse_keep(names: Any, key: str = "keep") -> frozenset[int]:
    """``keep: [Keyword | "(gggg,eeee)", ...]`` → tags. File meta, pixel data and private tags
    are refused (the first two are not the profile's, the third is ``keep_private``)."""
    if names is None:
        return frozenset()
    if not isinstance(names, list):
        raise ConfigError(key, f"expected a list of DICOM keywords or (gggg,eeee) tags, got "
                          f"{show(names)}")
    out = set()
    for i, name in enumerate(names):
        where = f"[{i}]"
        m = _TAG.match(str(name)) if isinstance(name, str) else None
        tag = (int(m.group(1), 16) << 16 | int(m.group(2), 16)) if m else \
            _keyword_tag(name) if isinstance(name, str) else None
        if tag is None:
            raise ConfigError(where, f"{show(name)} is not a DICOM keyword or (gggg,eeee) tag")
        if tag >> 16 <= 0x0002 or tag >= 0x7FE00000:
            raise ConfigError(where, f"{show(name)}: the file meta information and the pixel "
                              "data are not the profile's to keep")
        if (tag >> 16) & 1:
            raise ConfigError(where, f"{show(name)} is a private tag (keep_private: true keeps "
                              "private tags)")
        out.add(overlay_base(tag))
    return frozenset(out)


def _keyword_tag(keyword: str) -> int | None:
    """A keyword's tag; a repeating group's (OverlayData) as its first group (6000,3000)."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        from pydicom.datadict import RepeatersDictionary

        for mask, entry in RepeatersDictionary.items():
            if entry[4] == keyword:
                return int(mask.replace("x", "0"), 16)
    return tag


def overlay_base(tag: int) -> int:
    """60xx,eeee → 6000,eeee (a keep names every overlay group at once)."""
    return tag & 0xFF00FFFF if is_overlay(tag) else tag


def keywords(tags: Iterable[int]) -> list[str]:
    """Names for messages and descriptions."""
    from pydicom.datadict import keyword_for_tag

    return sorted(keyword_for_tag(t) or f"({t >> 16:04X},{t & 0xFFFF:04X})" for t in tags)


def _deid_retain(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or any(r not in RETAIN for r in value):
        raise ConfigError(key, f"a list of {', '.join(RETAIN)}; got {show(value)}")
    return tuple(value)


def _deid_keep(value: Any, key: str) -> frozenset[int]:
    return parse_keep(value, key)


class DeidentifyModel(Strict):
    """A ``deidentify:`` transform (PS3.15 basic profile; read by ``deid.from_options``)."""

    profile: Choice("basic") = "basic"
    retain: Annotated[tuple[str, ...], parsed(_deid_retain)] = ()
    shift_dates: Bool = False
    keep: Annotated[frozenset[int], parsed(_deid_keep)] = frozenset()  # tags, kept as they are
    keep_private: Bool = False
    burned_in: Choice("refuse", "allow") = "refuse"
    patient_id: Text | None = None  # default ANON-{hash:12}
    patient_name: Text | None = None  # default ANON^{hash:12}
    patient_map: Text | None = None  # a CSV of original,pseudonym
    uid_secret_env: Text | None = None  # default DEID_SECRET
    # reversible pseudonymization (pseudonym.py): the mapping kept, encrypted, in the state
    reversible: Bool = False
    key_env: Text | None = None  # default PSEUDONYM_KEY (only with reversible)

    @model_validator(mode="after")
    def _dates(self) -> DeidentifyModel:
        if "dates" in self.retain and self.shift_dates:
            raise ConfigError("shift_dates", "either retain dates or shift them")
        if self.key_env and not self.reversible:
            raise ConfigError("key_env", "only with reversible: true (the key encrypts the "
                              "mapping a reversible de-identification keeps)")
        return self
