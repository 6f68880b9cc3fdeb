"""De-identification: the DICOM PS3.15 Basic Application Level Confidentiality Profile.

The action table (which attribute is removed, emptied, replaced or has its UID replaced) is the
standard's, as data (``deid_table``); what each action does is ours, so that it is
reproducible:

* UIDs become ``2.25.<HMAC-SHA256(secret, uid)>``: the same study sent twice, and every study of
  one patient, get the same new UIDs, and every reference (whatever its tag) still points at
  the right instance; nobody without the secret can map back.
* PatientID and PatientName become a pseudonym, wherever they occur (also in sequences):
  ``patient_id`` / ``patient_name`` templates with ``{hash}`` / ``{hash:N}`` (HMAC of the
  original PatientID of that dataset or item), or a CSV lookup (``patient_map``).
* D (replace with a dummy value): dates and times get a fixed dummy, text ``ANONYMIZED``; a
  sequence is cleaned item by item.
* Attributes the table does not list: safe by default (``deid_table``'s docstring): text and
  dates emptied, every UID remapped, overlays removed whole.
* Retain options as switches (``retain:``): ``dates``, ``device``, ``patient_characteristics``,
  ``descriptors``; ``shift_dates: true`` moves every date by a per-patient number of days
  instead (Modified Dates option); ``keep: [attributes]`` keeps those attributes as they are
  wherever they occur (the only way an attribute the profile removes survives).
* Private tags are removed unless ``keep_private: true`` (then kept, but UIDs in them remapped
  and public attributes in private sequences cleaned); an instance with Burned In Annotation
  YES is refused (``burned_in: refuse``, the default) or sent (``allow``).
* The File Meta Information is rebuilt: it describes the de-identifier (our implementation UID,
  version name and :data:`SOURCE_AE`), never the sender; the preamble is zeroed.

It works on the header dataset (``transforms.transform_file`` copies the pixel data as bytes)
and records what was done (Patient Identity Removed, De-identification Method, the code sequence
of the options used, Longitudinal Temporal Information Modified).
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import hmac
import os
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence

from .deid_table import (
    CLASS_UIDS,
    CODE_MEANING,
    DATE_VRS,
    DESCRIPTORS,
    DEVICE,
    PATIENT_CHARACTERISTICS,
    PATIENT_ID,
    PATIENT_NAME,
    RETAIN,
    STANDARD_UID_ROOT,
    STRUCTURAL_TEXT,
    TEXT_VALUE,
    TEXT_VRS,
    DeidentifyModel,
    action,
    code_meaning,
    is_overlay,
    table,
)
from .dimse import IMPLEMENTATION_VERSION
from .schema import keyed_error
from .values import ConfigError

__all__ = ["RETAIN", "SOURCE_AE", "Deidentifier", "from_options"]

DUMMY = {"DA": "19000101", "DT": "19000101000000", "TM": "000000", "PN": "ANONYMIZED"}
DUMMY_TEXT = "ANONYMIZED"
SOURCE_AE = "DICOMROUTER_DEID"  # (0002,0016) of every de-identified file: the de-identifier
IDENTITY = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")


@dataclass
class Deidentifier:
    secret: bytes
    retain: frozenset[str] = frozenset()
    shift_dates: bool = False
    keep_private: bool = False
    burned_in: str = "refuse"
    patient_id: str = "ANON-{hash:12}"
    patient_name: str = "ANON^{hash:12}"
    patient_map: dict[str, str] = field(default_factory=dict)
    keep: frozenset[int] = frozenset()  # tags kept as they are, wherever they occur

    def __post_init__(self) -> None:
        self._keep_overlays = any(is_overlay(t) for t in self.keep)
        table()  # loaded with the configuration: a missing package fails there, not later

    # ---- values ------------------------------------------------------------------------------

    def _hmac(self, text: str) -> bytes:
        return hmac.new(self.secret, text.encode(), hashlib.sha256).digest()

    def uid(self, old: str) -> str:
        """The new UID of ``old``: the same for the same secret, 2.25 form (PS3.5 B.2)."""
        return "2.25." + str(int.from_bytes(self._hmac("uid:" + old)[:16], "big"))

    def pseudonym(self, template: str, patient_id: str) -> str:
        if patient_id in self.patient_map:
            return self.patient_map[patient_id]
        digest = self._hmac("patient:" + patient_id).hex().upper()

        def fill(spec: str) -> str:
            n = int(spec) if spec else 12
            return digest[:n]
        out, rest = "", template
        while "{hash" in rest:
            before, _, after = rest.partition("{hash")
            spec, _, rest = after.partition("}")
            out += before + fill(spec.lstrip(":"))
        return (out + rest)[:64]

    def day_shift(self, patient_id: str) -> int:
        """Days every date of this patient moves back (1-365, the same for every study)."""
        return 1 + int.from_bytes(self._hmac("shift:" + patient_id)[:4], "big") % 365

    # ---- the dataset ----------------------------------------------------------------------------

    def apply(self, ds: Dataset) -> dict[str, str]:
        """De-identify ``ds`` (a header: no pixel data needed) in place; old → new UIDs of the
        instance's own identity (SOP Instance, Study, Series)."""
        if str(ds.get("BurnedInAnnotation", "")).upper() == "YES" and \
                self.burned_in == "refuse":
            raise ValueError("Burned In Annotation is YES: refused (deidentify burned_in: refuse)")
        original_id = str(ds.get("PatientID", "") or "")
        shift = self.day_shift(original_id) if self.shift_dates else 0
        own = {str(ds.get(kw)) for kw in IDENTITY if ds.get(kw)}
        mapping = {str(ds.get(kw)): self.uid(str(ds.get(kw))) for kw in IDENTITY[:3]
                   if kw in ds}
        old_meta = getattr(ds, "file_meta", None)
        self._walk(ds, shift, own)
        if PATIENT_ID not in self.keep:
            ds.PatientID = self.pseudonym(self.patient_id, original_id)
        if PATIENT_NAME not in self.keep:
            ds.PatientName = self.pseudonym(self.patient_name, original_id)
        self._record(ds)
        if old_meta is not None:
            ds.file_meta = self._file_meta(ds, old_meta)
            ds.preamble = b"\x00" * 128  # a preamble may carry anything (a TIFF header)
        return mapping

    def _record(self, ds: Dataset) -> None:
        """Patient Identity Removed, the method and its options (PS3.15 E.1.1)."""
        identity_kept = bool({PATIENT_ID, PATIENT_NAME} & self.keep)
        ds.PatientIdentityRemoved = "NO" if identity_kept else "YES"
        methods = ["DICOM PS3.15 Basic Profile"]
        methods += [f"retain {r}" for r in sorted(self.retain)]
        if self.shift_dates:
            methods.append("dates shifted per patient")
        if self.keep:
            methods.append(f"{len(self.keep)} attribute(s) kept")
        ds.DeidentificationMethod = "; ".join(methods)[:64]
        ds.DeidentificationMethodCodeSequence = Sequence([_code("113100", "Basic Application "
                                                                "Confidentiality Profile")])
        for code, meaning, on in (
                ("113106", "Retain Longitudinal Temporal Information Full Dates Option",
                 "dates" in self.retain),
                ("113107", "Retain Longitudinal Temporal Information Modified Dates Option",
                 self.shift_dates),
                ("113108", "Retain Patient Characteristics Option",
                 "patient_characteristics" in self.retain),
                ("113109", "Retain Device Identity Option", "device" in self.retain),
                ("113111", "Retain Safe Private Option", self.keep_private)):
            if on:
                ds.DeidentificationMethodCodeSequence.append(_code(code, meaning))
        ds.LongitudinalTemporalInformationModified = \
            "MODIFIED" if self.shift_dates else "UNMODIFIED" if "dates" in self.retain \
            else "REMOVED"

    def _file_meta(self, ds: Dataset, old: Dataset) -> FileMetaDataset:
        """New File Meta Information: the de-identifier's, none of the source's (Source,
        Sending and Receiving AE titles, the sender's implementation, private information)."""
        from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID

        meta = FileMetaDataset()
        meta.FileMetaInformationVersion = b"\x00\x01"
        meta.MediaStorageSOPClassUID = old.get("MediaStorageSOPClassUID") or \
            ds.get("SOPClassUID")
        meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID") or \
            self.uid(str(old.get("MediaStorageSOPInstanceUID", "")))
        meta.TransferSyntaxUID = old.get("TransferSyntaxUID")
        meta.ImplementationClassUID = PYNETDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION
        meta.SourceApplicationEntityTitle = SOURCE_AE
        return meta

    def _retained(self, tag: int, vr: str) -> bool:
        """Kept by a retain option (or shifted, for dates)."""
        if ("dates" in self.retain or self.shift_dates) and vr in DATE_VRS:
            return True  # retained, or retained and then shifted (Modified Dates option)
        if "device" in self.retain and tag in DEVICE:
            return True
        if "patient_characteristics" in self.retain and tag in PATIENT_CHARACTERISTICS:
            return True
        return "descriptors" in self.retain and tag in DESCRIPTORS

    def _walk(self, ds: Dataset, shift: int, own: set[str]) -> None:
        item_id = str(ds.get("PatientID", "") or "")  # this dataset's (or item's) patient
        for elem in list(ds):
            tag, vr = int(elem.tag), elem.VR
            if elem.tag.is_private:
                if not self.keep_private:
                    del ds[tag]
                elif vr == "UI":  # kept, but a UID in one is remapped like any other
                    self._remap(elem, own, False)
                elif vr == "SQ":  # kept; public attributes in its items follow the rules
                    self._items(elem, shift, own)
                continue
            if is_overlay(tag):  # the whole plane goes (or stays, with keep)
                if not self._keep_overlays:
                    del ds[tag]
                continue
            if tag in self.keep:
                if vr == "SQ":
                    self._items(elem, shift, own)
                continue
            if tag in (PATIENT_ID, PATIENT_NAME):  # E.1-1 wherever they occur: pseudonyms
                template = self.patient_id if tag == PATIENT_ID else self.patient_name
                elem.value = self.pseudonym(template, item_id) if item_id else None
                continue
            act = action(tag)
            if self._retained(tag, vr):
                if shift and vr in ("DA", "DT") and elem.value:
                    elem.value = _shifted(elem.value, shift)
                elif vr == "SQ":
                    self._items(elem, shift, own)
            elif act == "X":
                del ds[tag]
            elif act == "Z":
                _empty(elem)
            elif vr == "SQ":  # D, U, U* (references kept, their UIDs remapped), not listed
                self._items(elem, shift, own)
            elif vr == "UI":  # U, D (a new UID is the consistent dummy), not listed
                self._remap(elem, own, act is None and tag in CLASS_UIDS)
            elif act is not None:  # D
                _dummy(elem)
            elif vr in TEXT_VRS:
                if tag == CODE_MEANING:
                    elem.value = code_meaning(ds.get("CodingSchemeDesignator"),
                                              ds.get("CodeValue")) or DUMMY_TEXT
                elif tag == TEXT_VALUE:
                    elem.value = DUMMY_TEXT
                elif tag not in STRUCTURAL_TEXT:
                    _empty(elem)
            elif vr in DATE_VRS:
                _empty(elem)
            elif vr == "UN":  # a public attribute we cannot read: it could hold anything
                del ds[tag]

    def _items(self, elem: Any, shift: int, own: set[str]) -> None:
        for item in elem.value or []:
            self._walk(item, shift, own)

    def _remap(self, elem: Any, own: set[str], class_uid: bool) -> None:
        """New UIDs for every value but the standard's own UIDs; in an attribute that names a
        class, only this instance's own UIDs (which never belong there) are replaced."""
        if not elem.value:
            return
        multi = isinstance(elem.value, list | tuple) or \
            type(elem.value).__name__ == "MultiValue"
        values = [str(v) for v in (elem.value if multi else [elem.value])]
        new = [v if not v or v.startswith(STANDARD_UID_ROOT) or class_uid and v not in own
               else self.uid(v) for v in values]
        if new != values:
            elem.value = new if multi else new[0]


def _code(value: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue = value
    c.CodingSchemeDesignator = "DCM"
    c.CodeMeaning = meaning
    return c


def _empty(elem: Any) -> None:
    elem.value = [] if elem.VR == "SQ" else None


def _dummy(elem: Any) -> None:
    vr = elem.VR
    if vr in DUMMY:
        elem.value = DUMMY[vr]
    elif vr in ("US", "SS", "UL", "SL", "FL", "FD", "IS", "DS"):
        elem.value = 0 if vr not in ("IS", "DS") else "0"
    elif vr in ("OB", "OW", "OD", "OF", "OL", "OV", "UN"):
        elem.value = b""
    else:
        elem.value = DUMMY_TEXT


def _shifted(value: Any, days: int) -> Any:
    def one(v: str) -> str:
        v = str(v)
        try:
            d = dt.datetime.strptime(v[:8], "%Y%m%d") - dt.timedelta(days=days)
        except ValueError:
            return v
        return d.strftime("%Y%m%d") + v[8:]
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return [one(v) for v in value]
    return one(value)


def from_options(options: dict[str, Any] | None,
                 where: str = "deidentify") -> Deidentifier:
    """A Deidentifier from a ``deidentify:`` entry (``deid_table.DeidentifyModel``); the
    secret from its environment variable."""
    env = (options or {}).get("uid_secret_env") or "DEID_SECRET"
    secret = os.environ.get(env) if isinstance(env, str) else None
    if isinstance(env, str) and not secret:  # first: without it nothing else matters
        raise ConfigError(f"{where}.uid_secret_env", f"environment variable {env} is not set "
                          "(the secret that keys UID remapping and pseudonyms)")
    try:
        m = DeidentifyModel.model_validate(options or {})
    except ValidationError as err:
        e = keyed_error(err, options)
        raise ConfigError(f"{where}.{e.key}" if e.key else where, e.problem) from None
    assert secret is not None
    mapping: dict[str, str] = {}
    if m.patient_map:
        try:
            with open(m.patient_map, newline="", encoding="utf-8") as f:
                mapping = {row[0]: row[1] for row in csv.reader(f) if len(row) >= 2}
        except OSError as exc:
            raise ConfigError(f"{where}.patient_map", f"cannot read it: {exc.strerror}") \
                from None
    return Deidentifier(secret.encode(), frozenset(m.retain), m.shift_dates, m.keep_private,
                        m.burned_in, m.patient_id or "ANON-{hash:12}",
                        m.patient_name or "ANON^{hash:12}", mapping, m.keep)
