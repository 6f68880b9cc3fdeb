"""Reversible pseudonymization (issue 29, item 3): a route's ``deidentify: {reversible: true}``
keeps the mapping original ↔ pseudonymized in the state, encrypted; results that come back
(SR, SEG, SC, KOS, PR referencing the pseudonymized study) are re-identified with it.

* The pseudonyms are the de-identifier's (``deid.py``): HMACs of the originals, so the same
  original always gets the same pseudonyms (re-sends and late arrivals agree); the mapping is
  one per (route, original study), written as each instance is de-identified: the identity
  (original Study Instance UID, PatientID, PatientName, AccessionNumber, study dates, the day
  shift, and the pseudonyms they became) and every UID the de-identification replaced.
* Sealed with Fernet (AES-128-CBC + HMAC-SHA256, ``cryptography``) under a key derived from an
  environment variable (``key_env``, default ``PSEUDONYM_KEY``, at least 32 characters). The
  state finds a mapping by a keyed hash of the pseudonymized Study Instance UID and purges it
  by the original one (which the state holds for the study anyway): no original value and no
  pseudonym is in the clear, so the state alone does not link one to the other.
* :func:`reidentify` puts the originals back in a result: every UID of the mapping wherever it
  occurs (references nested at any depth), the patient's pseudonyms wherever they occur, the
  study's identity and dates; UIDs the mapping does not know (the result's own SOP Instance
  and Series UIDs) stay. A wrong key is an error (:class:`PseudonymKeyError`), never a
  half-restored dataset.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset

from .deid import Deidentifier
from .values import ConfigError

if TYPE_CHECKING:  # imported where used: cryptography costs ~6 MB in every router
    from cryptography.fernet import Fernet

__all__ = ["DEFAULT_KEY_ENV", "MIN_KEY_LENGTH", "PseudonymKey", "PseudonymKeyError", "load_key",
           "original_study", "pseudonymize", "reidentify"]

DEFAULT_KEY_ENV = "PSEUDONYM_KEY"
MIN_KEY_LENGTH = 32
#: study-level attributes whose originals the mapping keeps and re-identification restores
IDENTITY = ("PatientID", "PatientName", "AccessionNumber", "PatientBirthDate", "StudyDate",
            "StudyTime", "StudyID", "ReferringPhysicianName")


class PseudonymKeyError(Exception):
    """The mapping cannot be opened with this key (another key sealed it)."""


@dataclass(frozen=True)
class PseudonymKey:
    """The two keys derived from the configured one: Fernet seals, ``tag`` names a
    pseudonymized UID in the state without showing it."""

    fernet: Fernet
    lookup: bytes

    def tag(self, text: str) -> str:
        return hmac.new(self.lookup, text.encode(), hashlib.sha256).hexdigest()

    @property
    def check(self) -> str:
        """The key's fingerprint (a wrong key is told from a study without a mapping)."""
        return self.tag("\x00key check")[:16]


def load_key(env: str | None, where: str) -> PseudonymKey:
    """The keys from environment variable ``env``; ConfigError naming ``where`` when it is
    missing, empty or too short."""
    name = env or DEFAULT_KEY_ENV
    value = os.environ.get(name, "")
    if not value:
        raise ConfigError(where, f"environment variable {name} is not set (the key that "
                          "encrypts the pseudonymization mapping)")
    if len(value) < MIN_KEY_LENGTH:
        raise ConfigError(where, f"environment variable {name} is too short: at least "
                          f"{MIN_KEY_LENGTH} characters (e.g. openssl rand -base64 32)")
    from cryptography.fernet import Fernet

    raw = value.encode()
    return PseudonymKey(
        Fernet(base64.urlsafe_b64encode(hmac.new(raw, b"seal", hashlib.sha256).digest())),
        hmac.new(raw, b"lookup", hashlib.sha256).digest())


def _seal(key: PseudonymKey, value: Any) -> str:
    return key.fernet.encrypt(json.dumps(value).encode()).decode()


def _open(key: PseudonymKey, token: str) -> Any:
    from cryptography.fernet import InvalidToken

    try:
        return json.loads(key.fernet.decrypt(token.encode()))
    except InvalidToken:
        raise PseudonymKeyError("the pseudonymization mapping cannot be decrypted with this "
                                "key (key_env names another key than the one that sealed "
                                "it)") from None


@dataclass
class _Recording(Deidentifier):
    """The route's de-identifier, noting every UID it replaces (one per instance: not
    shared between threads)."""

    seen: dict[str, str] = field(default_factory=dict)  # new → original

    def uid(self, old: str) -> str:
        new = super().uid(old)
        self.seen[new] = old
        return new


def pseudonymize(ds: Dataset, deid: Deidentifier, key: PseudonymKey, state: Any,
                 scope: str) -> None:
    """De-identify ``ds`` with ``deid`` and keep its mapping (``scope``: the route) in the
    state, sealed with ``key``; the mapping is written before the copy can leave."""
    if state is None:
        raise ValueError("reversible de-identification needs the router's state")
    study = str(ds.get("StudyInstanceUID", "") or "")
    if not study:
        raise ValueError("no Study Instance UID: nothing to key the mapping by")
    original = {kw: str(ds.get(kw, "") or "") for kw in IDENTITY}
    recorder = _Recording(**{f.name: getattr(deid, f.name) for f in fields(Deidentifier)})
    recorder.apply(ds)
    pseudo = {kw: str(ds.get(kw, "") or "") for kw in IDENTITY}
    shift = deid.day_shift(original["PatientID"]) if deid.shift_dates else 0
    identity = {"study_uid": study, "original": original, "pseudo": pseudo, "shift": shift}
    state.pseudonym_save(scope, study, key.tag(deid.uid(study)), _seal(key, identity),
                         {key.tag(new): _seal(key, [new, old])
                          for new, old in recorder.seen.items()}, key.check)


def original_study(state: Any, key: PseudonymKey, pseudo_study_uid: str) -> str | None:
    """The original Study Instance UID a pseudonymized one stands for (None: no mapping), for
    matching results that come back to the study that went out."""
    found = state.pseudonym_find(key.tag(pseudo_study_uid))
    return None if found is None else str(_open(key, found["sealed"])["study_uid"])


def reidentify(ds: Dataset, state: Any, key: PseudonymKey) -> bool:
    """Restore the originals in ``ds`` (a result referencing a pseudonymized study), in place;
    True if a mapping matched (False: ``ds`` is left as it is). Raises PseudonymKeyError
    (``ds`` untouched) when ``key`` cannot open the mapping."""
    found = state.pseudonym_find(key.tag(str(ds.get("StudyInstanceUID", "") or "")))
    if found is None:
        others = state.pseudonym_key_checks() - {key.check}
        if others and key.check not in state.pseudonym_key_checks():
            raise PseudonymKeyError(f"no pseudonymization mapping can be decrypted with this "
                                    f"key ({len(others)} other key(s) sealed the ones kept: "
                                    "key_env names another key than the one that "
                                    "pseudonymized)")
        return False
    identity = _open(key, found["sealed"])  # first: a wrong key changes nothing
    uids = dict(_open(key, sealed) for sealed in found["uids"].values())
    uids[str(ds.StudyInstanceUID)] = identity["study_uid"]
    original, pseudo = identity["original"], identity["pseudo"]
    patients = {pseudo[kw]: original[kw] for kw in ("PatientID", "PatientName")
                if pseudo.get(kw)}
    _restore(ds, uids, patients)
    for kw in IDENTITY:  # the study's identity, as the originals had it
        if original.get(kw):
            setattr(ds, kw, original[kw])
        elif kw in ds:
            del ds[kw]
    for kw in ("PatientIdentityRemoved", "DeidentificationMethod",
               "DeidentificationMethodCodeSequence", "LongitudinalTemporalInformationModified"):
        if kw in ds:
            del ds[kw]
    meta = getattr(ds, "file_meta", None)
    if meta is not None and str(meta.get("MediaStorageSOPInstanceUID", "")) in uids:
        meta.MediaStorageSOPInstanceUID = uids[str(meta.MediaStorageSOPInstanceUID)]
    return True


def _restore(ds: Dataset, uids: dict[str, str], patients: dict[str, str]) -> None:
    """Every UID value the mapping knows and every patient pseudonym, at every depth."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value or []:
                _restore(item, uids, patients)
        elif elem.VR == "UI" and elem.value:
            multi = type(elem.value).__name__ == "MultiValue" or isinstance(elem.value, list)
            values = [str(v) for v in (elem.value if multi else [elem.value])]
            new = [uids.get(v, v) for v in values]
            if new != values:
                elem.value = new if multi else new[0]
        elif elem.VR in ("LO", "PN") and elem.value and str(elem.value) in patients:
            elem.value = patients[str(elem.value)]
