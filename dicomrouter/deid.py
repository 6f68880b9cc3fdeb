"""De-identification: the DICOM PS3.15 Basic Application Level Confidentiality Profile.

The action table (which attribute is removed, emptied, replaced or has its UID replaced) is the
standard's, as data, from the ``dicom-anonymizer`` package (``dicomfields_2026c``); what each
action does is ours, so that it is reproducible:

* UIDs (action U) become ``2.25.<HMAC-SHA256(secret, uid)>``: the same study sent twice, and
  every study of one patient, get the same new UIDs; nobody without the secret can map back.
* PatientID and PatientName become a pseudonym: ``patient_id`` / ``patient_name`` templates
  with ``{hash}`` / ``{hash:N}`` (HMAC of the original PatientID), or a CSV lookup
  (``patient_map``: original,pseudonym).
* D (replace with a dummy value): dates and times get a fixed dummy, text ``ANONYMIZED``.
* Retain options as switches (``retain:``): ``dates`` (Retain Longitudinal Temporal Information
  with Full Dates), ``device`` (Retain Device Identity), ``patient_characteristics`` (Retain
  Patient Characteristics), ``descriptors`` (keep Study/Series descriptions etc.: the option's
  cleaning is then the operator's responsibility); ``shift_dates: true`` moves every date by a
  per-patient number of days instead (Modified Dates option).
* Private tags are removed unless ``keep_private: true``; an instance with Burned In Annotation
  YES is refused (``burned_in: refuse``, the default) or sent (``allow``).

It works on the header dataset (``transforms.transform_file`` copies the pixel data as bytes),
recursing into sequences, and records what was done (Patient Identity Removed, De-identification
Method, the code sequence of the options used).
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import hmac
import os
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from .config.base import ConfigError, _show

RETAIN = ("dates", "device", "patient_characteristics", "descriptors")
DEVICE = {(0x0008, 0x1010), (0x0018, 0x1000), (0x0018, 0x1002), (0x0018, 0x700A),
          (0x0018, 0x1008), (0x0018, 0x1004), (0x0018, 0x1005), (0x0018, 0x1007),
          (0x0018, 0x1009), (0x0018, 0x100A), (0x0018, 0x1200), (0x0018, 0x1201),
          (0x0008, 0x1040), (0x0008, 0x0080), (0x0008, 0x0081)}
PATIENT_CHARACTERISTICS = {(0x0010, 0x0040), (0x0010, 0x1010), (0x0010, 0x1020),
                           (0x0010, 0x1030), (0x0010, 0x2160), (0x0010, 0x21A0),
                           (0x0010, 0x21C0), (0x0010, 0x2203), (0x0010, 0x2110)}
DESCRIPTORS = {(0x0008, 0x1030), (0x0008, 0x103E), (0x0018, 0x1030), (0x0040, 0x0254),
               (0x0008, 0x2111), (0x0040, 0x0007), (0x0018, 0x0015), (0x0020, 0x4000)}
DATE_VRS = {"DA", "DT", "TM"}
DUMMY = {"DA": "19000101", "DT": "19000101000000", "TM": "000000", "PN": "ANONYMIZED",
         "UI": "", "SQ": None}
PATIENT_ID, PATIENT_NAME = (0x0010, 0x0020), (0x0010, 0x0010)


def _table() -> tuple[dict[tuple[int, int], str], list[tuple[int, int, int, int, str]]]:
    """Tag → action (X, Z, D, U; for X/Z, X/D, Z/D, X/Z/D the stronger X or D), and the
    masked tags (repeating groups)."""
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

    tags = dicom_anonymization_database_selector("dicomfields_2026c")
    actions = {"D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "D",
               "X_Z_TAGS": "X", "X_D_TAGS": "X", "X_Z_D_TAGS": "X", "X_Z_U_STAR_TAGS": "X"}
    table: dict[tuple[int, int], str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for group, action in actions.items():
        for t in tags[group]:
            if len(t) == 4:
                masked.append((t[0], t[1], t[2], t[3], action))
            else:
                table[(t[0], t[1])] = action
    return table, masked


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
    _table: Any = None

    def __post_init__(self) -> None:
        self._table = _table()

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
        mapping: dict[str, str] = {}
        for kw in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            if kw in ds:
                mapping[str(ds.get(kw))] = self.uid(str(ds.get(kw)))
        self._walk(ds, shift)
        ds.PatientID = self.pseudonym(self.patient_id, original_id)
        ds.PatientName = self.pseudonym(self.patient_name, original_id)
        ds.PatientIdentityRemoved = "YES"
        methods = ["DICOM PS3.15 Basic Application Level Confidentiality Profile"]
        methods += [f"retain {r}" for r in sorted(self.retain)]
        if self.shift_dates:
            methods.append("dates shifted per patient")
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
        if getattr(ds, "file_meta", None) is not None and "SOPInstanceUID" in ds:
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        return mapping

    def _action(self, tag: tuple[int, int]) -> str | None:
        table, masked = self._table
        action = table.get(tag)
        if action is None:
            for g, e, gm, em, a in masked:
                if tag[0] & gm == g and tag[1] & em == e:
                    return a
        return action

    def _kept(self, tag: tuple[int, int], vr: str) -> bool:
        if ("dates" in self.retain or self.shift_dates) and vr in DATE_VRS:
            return True  # retained, or retained and then shifted (Modified Dates option)
        if "device" in self.retain and tag in DEVICE:
            return True
        if "patient_characteristics" in self.retain and tag in PATIENT_CHARACTERISTICS:
            return True
        return "descriptors" in self.retain and tag in DESCRIPTORS

    def _walk(self, ds: Dataset, shift: int) -> None:
        for elem in list(ds):
            tag = (elem.tag.group, elem.tag.element)
            if elem.tag.is_private:
                if not self.keep_private:
                    del ds[elem.tag]
                continue
            if tag in (PATIENT_ID, PATIENT_NAME):
                continue  # pseudonyms, set after the walk
            action = self._action(tag)
            if action is None or self._kept(tag, elem.VR):
                if shift and elem.VR in ("DA", "DT") and elem.value:
                    elem.value = _shifted(elem.value, shift)
                elif elem.VR == "SQ":
                    for item in elem.value or []:
                        self._walk(item, shift)
                continue
            if action == "X":
                del ds[elem.tag]
            elif action == "Z":
                _empty(elem)
            elif action == "U":
                if elem.VR == "UI" and elem.value:
                    values = elem.value if isinstance(elem.value, list | tuple) or \
                        type(elem.value).__name__ == "MultiValue" else [elem.value]
                    new = [self.uid(str(v)) for v in values]
                    elem.value = new if len(new) > 1 else new[0]
                elif elem.VR == "SQ":
                    for item in elem.value or []:
                        self._walk(item, shift)
            else:  # D: a dummy value of the same VR (a sequence is cleaned item by item)
                if elem.VR == "SQ":
                    for item in elem.value or []:
                        self._walk(item, shift)
                elif shift and elem.VR in ("DA", "DT") and elem.value:
                    elem.value = _shifted(elem.value, shift)
                else:
                    _dummy(elem)


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
    if vr in DUMMY and DUMMY[vr] is not None:
        elem.value = DUMMY[vr]
    elif vr in ("US", "SS", "UL", "SL", "FL", "FD", "IS", "DS"):
        elem.value = 0 if vr not in ("IS", "DS") else "0"
    elif vr in ("OB", "OW", "OD", "OF", "OL", "OV", "UN"):
        elem.value = b""
    else:
        elem.value = "ANONYMIZED"


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


def from_options(options: dict[str, Any], where: str = "deidentify") -> Deidentifier:
    """A Deidentifier from a ``deidentify:`` entry; the secret from its environment variable."""
    env = options.get("uid_secret_env") or "DEID_SECRET"
    secret = os.environ.get(env)
    if not secret:
        raise ConfigError(f"{where}.uid_secret_env", f"environment variable {env} is not set "
                          "(the secret that keys UID remapping and pseudonyms)")
    retain = options.get("retain") or []
    if not isinstance(retain, list) or any(r not in RETAIN for r in retain):
        raise ConfigError(f"{where}.retain", f"a list of {', '.join(RETAIN)}; got "
                          f"{_show(retain)}")
    if "dates" in retain and options.get("shift_dates"):
        raise ConfigError(f"{where}.shift_dates", "either retain dates or shift them")
    burned = options.get("burned_in", "refuse")
    if burned not in ("refuse", "allow"):
        raise ConfigError(f"{where}.burned_in", "refuse or allow")
    mapping: dict[str, str] = {}
    if options.get("patient_map"):
        try:
            with open(options["patient_map"], newline="", encoding="utf-8") as f:
                mapping = {row[0]: row[1] for row in csv.reader(f) if len(row) >= 2}
        except OSError as exc:
            raise ConfigError(f"{where}.patient_map", f"cannot read it: {exc.strerror}") \
                from None
    unknown = set(options) - {"profile", "retain", "shift_dates", "keep_private", "burned_in",
                              "patient_id", "patient_name", "patient_map", "uid_secret_env"}
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}", "unknown key")
    if options.get("profile", "basic") != "basic":
        raise ConfigError(f"{where}.profile", "only basic (PS3.15 Table E.1-1)")
    return Deidentifier(secret.encode(), frozenset(retain), bool(options.get("shift_dates")),
                        bool(options.get("keep_private")), burned,
                        str(options.get("patient_id") or "ANON-{hash:12}"),
                        str(options.get("patient_name") or "ANON^{hash:12}"), mapping)
