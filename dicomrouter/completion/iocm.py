"""Corrections follow the ledger (issue 29, item 5): IOCM rejection notes and corrected
instances go exactly where the ledger shows the affected instances went.

- A **rejection note** (a Key Object Selection Document whose ConceptNameCodeSequence is one
  of the IOCM rejection codes) is examined by the tracker's tick as soon as it is recorded,
  before its study completes: the instances its CurrentRequestedProcedureEvidenceSequence
  lists are rejected (never sent anywhere again, also after a restart), their sends still due
  are cancelled in the ledger, and the note itself may go only to the destinations the ledger
  shows received at least one of them.
- A **corrected instance** (same SOP Instance UID, other content: its receive digest differs
  from the one the ledger kept for a destination) goes, when its study completes again, to
  every destination that received the earlier version, also where routing would not send the
  study now; destinations that never got it are left to routing (they get the current
  version). Identical re-sends are not corrections (the workers skip them).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence

from pydicom import dcmread

from ..spool import Spool
from ..state import Instance, State
from ..state.sql_iocm import KOS

log = logging.getLogger("dicomrouter")

#: DICOM PS3.16 CID 7011 "Rejected for Quality Reasons" and its kin (scheme DCM)
REJECTION_CODES = {
    "113001": "Rejected for Quality Reasons",
    "113037": "Rejected for Patient Safety Reasons",
    "113038": "Incorrect Modality Worklist Entry",
    "113039": "Data Retention Policy Expired",
}


def rejection(data: io.RawIOBase) -> tuple[str, list[str]] | None:
    """(code, rejected SOP Instance UIDs) if the Key Object Selection read from ``data`` is
    a rejection note, else None."""
    ds = dcmread(io.BufferedReader(data), stop_before_pixels=True,
                 specific_tags=["ConceptNameCodeSequence",
                                "CurrentRequestedProcedureEvidenceSequence"])
    names = ds.get("ConceptNameCodeSequence") or []
    if not names:
        return None
    code = str(names[0].get("CodeValue", "")).strip()
    scheme = str(names[0].get("CodingSchemeDesignator", "")).strip()
    if scheme != "DCM" or code not in REJECTION_CODES:
        return None
    uids: list[str] = []
    for study in ds.get("CurrentRequestedProcedureEvidenceSequence") or []:
        for series in study.get("ReferencedSeriesSequence") or []:
            for ref in series.get("ReferencedSOPSequence") or []:
                uid = str(ref.get("ReferencedSOPInstanceUID", "")).strip()
                if uid:
                    uids.append(uid)
    return code, uids


class Corrections:
    """The tracker's part for rejection notes (each tick) and corrections (at completion)."""

    def __init__(self, state: State, spool: Spool,
                 notify: Callable[[Sequence[str]], None]) -> None:
        self.state = state
        self.spool = spool
        self.notify = notify

    def tick(self) -> None:
        """Examine the Key Object Selections recorded since the last tick."""
        for note in self.state.unexamined_notes(KOS):
            self.examine(note)

    def examine(self, note: Instance) -> None:
        try:
            with self.spool.open(note) as data:
                found = rejection(data)
        except Exception as exc:  # an unreadable note is routed like any other instance
            log.warning("study %s: key object selection %s not read (%s: %s); routed as an "
                        "ordinary instance", note.study_uid, note.sop_uid, type(exc).__name__,
                        exc)
            found = None
        if found is None:
            self.state.note_examined(note.sop_uid)
            return
        code, uids = found
        done = self.state.reject_instances(note, code, REJECTION_CODES[code], uids)
        if not done["text"]:
            return  # examined meanwhile by another node's tracker
        log.info("study %s: %s", note.study_uid, done["text"])
        if done["cancelled"]:
            self.notify(list(done["cancelled"]))  # their runs now have less (or nothing) to do

    def after_routing(self, study_uid: str, generation: int, routed: Sequence[str]) -> None:
        """A completed study: rejection notes and corrected instances of this generation also
        go to the destinations that need them and that routing did not pick."""
        extra: dict[str, list[str]] = {}
        for dest, series in self.state.directed_instances(study_uid, generation).items():
            if dest not in routed:
                extra.setdefault(dest, []).extend(series)
        corrected: dict[str, list[str]] = {}  # SOP UID → destinations with the old version
        if generation > 1:
            by_uid = {i.sop_uid: i for i in self.state.instances(study_uid)}
            for sop, had in self.state.replaced_deliveries(study_uid, generation).items():
                inst = by_uid.get(sop)
                if inst is None:
                    continue
                digest = self._digest(inst)
                dests = sorted(d for d, old in had.items() if old is None or old != digest)
                if not dests:
                    continue  # an identical re-send: nothing to correct
                corrected[sop] = dests
                for dest in dests:
                    if dest not in routed and inst.series_uid not in extra.get(dest, []):
                        extra.setdefault(dest, []).append(inst.series_uid)
        for sop, dests in corrected.items():
            text = f"corrected instance {sop} → {', '.join(dests)}"
            self.state.note(study_uid, text)
            log.info("study %s: %s", study_uid, text)
        if extra:
            self.state.send_also(study_uid, extra, "corrections follow the ledger: also to " +
                                 ", ".join(sorted(extra)) + " (they received the instances "
                                 "concerned)")
            self.notify(list(extra))

    def _digest(self, inst: Instance) -> str | None:
        try:
            with self.spool.open(inst) as data:
                return data.digest()
        except OSError:
            return None
