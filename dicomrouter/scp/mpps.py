"""The router as a Modality Performed Procedure Step SCP (PS3.4 annex F), through pynetdicom
on the listeners' ports (like Q/R and storage commitment; ``mpps: false`` leaves it out of
the negotiation).

Each N-CREATE / N-SET is committed to the state (and queued for ``forward_mpps``) before its
response, so an acknowledged step survives a crash. The rules of PS3.4 F.7.2:

* N-CREATE: Performed Procedure Step Status must be IN PROGRESS (absent: 0x0120 missing
  attribute; another value: 0x0106 invalid attribute value); a known SOP Instance UID is
  0x0111 (duplicate); no Affected SOP Instance UID: the router assigns one and returns it.
* N-SET: an unknown SOP Instance UID is 0x0112; a step already COMPLETED or DISCONTINUED is
  0x0110 with Error ID 0xA710 (may no longer be updated); an attribute table F.7.2-1 does not
  allow in an N-SET (patient, scheduled step, start, modality...) is 0x0105 with its tag in
  the Attribute Identifier List; a status other than the three is 0x0106.
* An attribute list that cannot be decoded is 0x0110 with a comment; the state out of reach
  is 0x0213 (resource limitation): the modality sends it again later.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt

from .. import metrics
from ..config import Config
from ..dimse import error_comment
from ..mpps_data import (
    FINAL,
    IN_PROGRESS,
    MPPS_SOP_CLASS,
    NOT_ALLOWED_IN_SET,
    STATUSES,
    Undecodable,
    from_text,
    listed_instances,
    merge,
    new_uid,
    status_of,
    study_uids,
    to_text,
)
from ..state import STATE_ERRORS, Mpps, State
from ..walk import check_bytes

log = logging.getLogger("dicomrouter.mpps")

NO_SUCH_ATTRIBUTE, INVALID_VALUE, PROCESSING_FAILURE = 0x0105, 0x0106, 0x0110
DUPLICATE, NO_SUCH_INSTANCE, MISSING_ATTRIBUTE, RESOURCES = 0x0111, 0x0112, 0x0120, 0x0213
MAY_NO_LONGER_BE_UPDATED = 0xA710  # the Error ID PS3.4 F.7.2.2 gives 0x0110 here


class Refused(Exception):
    """An N-CREATE / N-SET answered with a failure status (and why)."""

    def __init__(self, status: int, why: str, **extra: Any) -> None:
        super().__init__(why)
        self.status = status
        self.extra = extra

    def response(self) -> Dataset:
        ds = Dataset()
        ds.Status = self.status
        ds.ErrorComment = error_comment(str(self))
        for key, value in self.extra.items():
            setattr(ds, key, value)
        return ds


def _refuse(what: str, event: evt.Event, uid: str,
            error: Exception) -> tuple[Dataset, None]:
    """The failure response of an N-CREATE / N-SET and its one log line: a ``Refused``
    as it says, anything else as an attribute list that cannot be read."""
    exc = error if isinstance(error, Refused) else Refused(
        PROCESSING_FAILURE, f"cannot read the attribute list: {type(error).__name__}: {error}")
    metrics.MPPS.labels(what, "refused").inc()
    log.warning("MPPS %s %s from %s refused with 0x%04X: %s", what, uid, _peer(event),
                exc.status, exc)
    return exc.response(), None


def _peer(event: evt.Event) -> str:
    r = event.assoc.requestor
    return f"{r.ae_title} ({r.address}:{r.port})"


class MppsSCP:
    """N-CREATE and N-SET of the MPPS SOP class, recorded in the state."""

    def __init__(self, cfg: Config, state: State) -> None:
        self.cfg = cfg
        self.state = state

    def services(self) -> list[tuple[str, Any, Any]]:
        return [(MPPS_SOP_CLASS, evt.EVT_N_CREATE, self.on_create),
                (MPPS_SOP_CLASS, evt.EVT_N_SET, self.on_set)]

    def _dataset(self, event: evt.Event, raw: Any, what: str) -> Dataset:
        """The attribute / modification list, checked (lengths, depth) before pydicom."""
        try:
            if raw is not None:
                check_bytes(raw.getvalue(), str(event.context.transfer_syntax),
                            self.cfg.limits.max_sequence_depth)
            ds = event.attribute_list if what == "N-CREATE" else event.modification_list
            list(ds)  # every element read now, not later in a handler's corner
            return ds
        except Exception as exc:
            raise Refused(PROCESSING_FAILURE, f"cannot read the {what} attribute list: "
                          f"{type(exc).__name__}: {exc}") from None

    def on_create(self, event: evt.Event) -> tuple[int | Dataset, Dataset | None]:
        uid = str(event.request.AffectedSOPInstanceUID or "").strip()
        try:
            return self._create(event, uid)
        except Exception as error:  # a value pydicom cannot read deep inside: no traceback
            return _refuse("N-CREATE", event, uid or "(no UID)", error)

    def _create(self, event: evt.Event, uid: str) -> tuple[int, Dataset | None]:
        ds = self._dataset(event, event.request.AttributeList, "N-CREATE")
        status = status_of(ds)
        if not status:
            raise Refused(MISSING_ATTRIBUTE, "no Performed Procedure Step Status")
        if status != IN_PROGRESS:
            raise Refused(INVALID_VALUE, f"Performed Procedure Step Status is {status!r}; an "
                          "N-CREATE must be IN PROGRESS (PS3.4 F.7.2.1)")
        answer = None
        if not uid:
            uid = new_uid()
            answer = Dataset()
            answer.AffectedSOPInstanceUID = uid
        now = time.time()
        studies = study_uids(ds)
        try:
            record = Mpps(uid, IN_PROGRESS, event.assoc.requestor.ae_title, now, now,
                          tuple(studies), tuple(listed_instances(ds)), to_text(ds))
        except Undecodable as exc:
            raise Refused(PROCESSING_FAILURE, str(exc)) from None
        step = str(ds.get("PerformedProcedureStepID", "") or "")
        why = f"MPPS {uid} IN PROGRESS (N-CREATE from {event.assoc.requestor.ae_title}" + \
            (f", procedure step {step})" if step else ")")
        try:
            if not self.state.mpps_create(record, self.cfg.forward_mpps, why):
                raise Refused(DUPLICATE, f"MPPS {uid} exists already")
        except STATE_ERRORS as exc:
            raise Refused(RESOURCES, f"the state is out of reach ({exc})") from None
        metrics.MPPS.labels("N-CREATE", "accepted").inc()
        log.info("MPPS N-CREATE %s from %s: IN PROGRESS, study %s%s", uid, _peer(event),
                 ", ".join(studies) or "(not named)", f"; queued for "
                 f"{', '.join(self.cfg.forward_mpps)}" if self.cfg.forward_mpps else "")
        return 0x0000, answer

    def on_set(self, event: evt.Event) -> tuple[int | Dataset, Dataset | None]:
        uid = str(event.request.RequestedSOPInstanceUID or "").strip()
        try:
            return self._set(event, uid)
        except Exception as error:  # a value pydicom cannot read deep inside: no traceback
            return _refuse("N-SET", event, uid, error)

    def _set(self, event: evt.Event, uid: str) -> tuple[int, None]:
        try:
            record = self.state.mpps(uid)
        except STATE_ERRORS as exc:
            raise Refused(RESOURCES, f"the state is out of reach ({exc})") from None
        if record is None:
            raise Refused(NO_SUCH_INSTANCE, f"no MPPS {uid} here")
        if record.status in FINAL:
            raise Refused(PROCESSING_FAILURE, f"the MPPS is {record.status}: it may no longer "
                          "be updated", ErrorID=MAY_NO_LONGER_BE_UPDATED)
        mod = self._dataset(event, event.request.ModificationList, "N-SET")
        wrong = [tag for tag in NOT_ALLOWED_IN_SET if tag in mod]
        if wrong:
            names = ", ".join(mod[t].keyword or str(t) for t in wrong)
            raise Refused(NO_SUCH_ATTRIBUTE, f"not allowed in an N-SET: {names}",
                          AttributeIdentifierList=wrong)
        status = status_of(mod) or record.status
        if status not in STATUSES:
            raise Refused(INVALID_VALUE, f"Performed Procedure Step Status {status!r} is not "
                          "IN PROGRESS, COMPLETED or DISCONTINUED")
        try:
            merged = merge(from_text(record.dataset), mod)
            listed = listed_instances(merged)
            new = Mpps(uid, status, record.calling_ae, record.created, time.time(),
                       record.study_uids, tuple(listed), to_text(merged))
            modification = to_text(mod)
        except Exception as exc:  # a value pydicom cannot encode again
            raise Refused(PROCESSING_FAILURE, f"cannot keep the N-SET: {type(exc).__name__}: "
                          f"{exc}") from None
        series = len(merged.get("PerformedSeriesSequence", None) or [])
        why = f"MPPS {uid} {status} (N-SET from {event.assoc.requestor.ae_title}" + \
            (f": {len(listed)} instance(s) listed in {series} series)" if status != IN_PROGRESS
             or listed else ")")
        if status == "DISCONTINUED":
            reason = merged.get("PerformedProcedureStepDiscontinuationReasonCodeSequence")
            if reason:
                why += f"; reason: {reason[0].get('CodeMeaning', '')}"
        try:
            if not self.state.mpps_set(new, modification, self.cfg.forward_mpps, why):
                raise Refused(PROCESSING_FAILURE, "the MPPS was completed meanwhile: it may no "
                              "longer be updated", ErrorID=MAY_NO_LONGER_BE_UPDATED)
        except STATE_ERRORS as exc:
            raise Refused(RESOURCES, f"the state is out of reach ({exc})") from None
        metrics.MPPS.labels("N-SET", "accepted").inc()
        log.info("MPPS N-SET %s from %s: %s, %d instance(s) listed", uid, _peer(event), status,
                 len(listed))
        return 0x0000, None
