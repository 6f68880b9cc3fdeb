"""Storage Commitment Push Model (PS3.4 annex J), both roles, through pynetdicom.

As SCU (a ``dicom`` destination with ``storage_commitment: true``): after the C-STOREs, an
N-ACTION asks the peer to commit the stored instances; its N-EVENT-REPORT may come on the same
association or on a new one to the router's listener. Reports are kept in the state database
(``record_commitment``), so one that reaches another receiver process is seen too, and the
session waits for its transaction (bounded by ``commitment_timeout``).

As SCP: an N-ACTION from a peer is answered at once; the report follows on a new association to
the peer (``known_aes``) or, if the router does not know it, on the requesting association.
An instance is committed when the router holds it in its spool; otherwise it fails with
0x0112 (no such object instance).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import build_context, build_role, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from .config import Config
from .qrscu import PeerError, Remote, associate
from .state import State

log = logging.getLogger("dicomrouter.commitment")

INSTANCE_UID = "1.2.840.10008.1.20.1.1"  # the well-known SOP instance of the push model
NO_SUCH_INSTANCE = 0x0112
PROCESSING_FAILURE = 0x0110
_arrived = threading.Condition()  # wakes waiting sessions when a report lands in this process


@dataclass
class Report:
    transaction_uid: str
    committed: list[str] = field(default_factory=list)
    failed: dict[str, int] = field(default_factory=dict)  # SOP Instance UID → Failure Reason


def report_dataset(report: Report, classes: dict[str, str]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = report.transaction_uid
    ok = []
    for uid in report.committed:
        item = Dataset()
        item.ReferencedSOPClassUID = classes.get(uid, "")
        item.ReferencedSOPInstanceUID = uid
        ok.append(item)
    if ok:
        ds.ReferencedSOPSequence = ok
    bad = []
    for uid, reason in report.failed.items():
        item = Dataset()
        item.ReferencedSOPClassUID = classes.get(uid, "")
        item.ReferencedSOPInstanceUID = uid
        item.FailureReason = reason
        bad.append(item)
    if bad:
        ds.FailedSOPSequence = bad
    return ds


def parse_report(ds: Dataset) -> Report:
    report = Report(str(ds.get("TransactionUID", "")))
    for item in ds.get("ReferencedSOPSequence", []) or []:
        report.committed.append(str(item.get("ReferencedSOPInstanceUID", "")))
    for item in ds.get("FailedSOPSequence", []) or []:
        report.failed[str(item.get("ReferencedSOPInstanceUID", ""))] = \
            int(item.get("FailureReason", PROCESSING_FAILURE) or PROCESSING_FAILURE)
    return report


def _store_report(state: State, ds: Dataset | None, peer: str) -> int:
    if ds is None or "TransactionUID" not in ds:
        log.warning("storage commitment report from %s without a Transaction UID: ignored", peer)
        return 0x0110
    report = parse_report(ds)
    state.record_commitment(report.transaction_uid, report.committed, report.failed)
    log.info("storage commitment report from %s for transaction %s: %d committed, %d failed",
             peer, report.transaction_uid, len(report.committed), len(report.failed))
    with _arrived:
        _arrived.notify_all()
    return 0x0000


# ---- SCU: ask a peer to commit ---------------------------------------------------------------

def request(remote: Remote, refs: Sequence[tuple[str, str]], state: State,
            timeout: float) -> Report:
    """N-ACTION for ``refs`` (SOP Class UID, SOP Instance UID), then wait for the report.

    Raises PeerError when the peer refuses or no report came within ``timeout`` seconds.
    """
    uid = generate_uid()
    ds = Dataset()
    ds.TransactionUID = uid
    items = []
    for sop_class, sop_uid in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_uid
        items.append(item)
    ds.ReferencedSOPSequence = items
    state.expect_commitment(uid, remote.ae_title)
    handlers = [(evt.EVT_N_EVENT_REPORT,
                 lambda event: (_store_report(state, event.event_information, remote.ae_title),
                                None))]
    context = build_context(StorageCommitmentPushModel)
    role = build_role(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    with associate(remote, [context], [role], handlers) as assoc:
        status, _reply = assoc.send_n_action(ds, 1, StorageCommitmentPushModel, INSTANCE_UID)
        if not status:
            raise PeerError(f"{remote}: no N-ACTION response to the storage commitment request")
        if int(status.Status) != 0x0000:
            raise PeerError(f"{remote} refused the storage commitment request with status "
                            f"0x{int(status.Status):04X}")
        log.info("storage commitment of %d instance(s) requested from %s (transaction %s); "
                 "waiting up to %.0f s for the report", len(items), remote, uid, timeout)
        report = _wait(state, uid, timeout, lambda: assoc.is_established)
    if report is None:
        report = _wait(state, uid, 0, lambda: False)  # it may have come as we released
    if report is None:
        raise PeerError(f"no storage commitment report from {remote} within {timeout:.0f} s "
                        f"(transaction {uid}); is the router's AE title known there, with "
                        "this host and port, so it can send the N-EVENT-REPORT?")
    return report


def _wait(state: State, uid: str, timeout: float, _open: Any) -> Report | None:
    deadline = time.monotonic() + timeout
    while True:
        found = state.commitment(uid)
        if found is not None:
            return Report(uid, *found)
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        with _arrived:
            # another process may record it: look at the database at least every 0.5 s
            _arrived.wait(min(left, 0.5))


# ---- SCP: answer a peer's request --------------------------------------------------------------

class CommitmentSCP:
    """N-ACTION (a peer asks the router) and N-EVENT-REPORT (a peer answers the router)."""

    def __init__(self, cfg: Config, state: State) -> None:
        self.cfg = cfg
        self.state = state

    def services(self) -> list[tuple[str, Any, Any]]:
        return [(str(StorageCommitmentPushModel), evt.EVT_N_ACTION, self.on_action),
                (str(StorageCommitmentPushModel), evt.EVT_N_EVENT_REPORT, self.on_report)]

    def on_report(self, event: evt.Event) -> tuple[int, None]:
        peer = event.assoc.requestor.ae_title
        return _store_report(self.state, event.event_information, peer), None

    def on_action(self, event: evt.Event) -> tuple[int, None]:
        peer = event.assoc.requestor.ae_title
        try:
            ds = event.action_information
            uid = str(ds.TransactionUID)
            refs = [(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
                    for i in ds.ReferencedSOPSequence]
        except Exception as exc:
            log.warning("storage commitment request from %s refused: unreadable (%s: %s)", peer,
                        type(exc).__name__, exc)
            return 0x0110, None
        report = Report(uid)
        held = self.state.held_instances(u for _, u in refs)
        for sop_class, sop in refs:
            if held.get(sop) == sop_class:
                report.committed.append(sop)
            else:
                report.failed[sop] = NO_SUCH_INSTANCE
        log.info("storage commitment request from %s (transaction %s): %d of %d instance(s) "
                 "held", peer, uid, len(report.committed), len(refs))
        classes = dict((u, c) for c, u in refs)
        threading.Thread(target=self._report, args=(event.assoc, peer, report, classes),
                         name="commitment-report", daemon=True).start()
        return 0x0000, None

    def _report(self, assoc: Any, peer: str, report: Report, classes: dict[str, str]) -> None:
        ds = report_dataset(report, classes)
        event_type = 2 if report.failed else 1
        known = self.cfg.known_aes.get(peer)
        try:
            if known is not None:
                remote = Remote(peer, known.host, known.port,
                                known.calling_ae or self.cfg.ae_title, 60.0)
                role = build_role(StorageCommitmentPushModel, scu_role=True, scp_role=True)
                with associate(remote, [build_context(StorageCommitmentPushModel)],
                               [role]) as out:
                    status, _ = out.send_n_event_report(ds, event_type,
                                                        StorageCommitmentPushModel, INSTANCE_UID)
            elif assoc.is_established:
                status, _ = assoc.send_n_event_report(ds, event_type,
                                                      StorageCommitmentPushModel, INSTANCE_UID)
            else:
                log.warning("storage commitment report for %s (transaction %s) not sent: %s "
                            "closed the association and is not in known_aes", peer,
                            report.transaction_uid, peer)
                return
        except PeerError as exc:
            log.warning("storage commitment report for %s not sent: %s", peer, exc)
            return
        code = int(status.Status) if status and "Status" in status else None
        if code == 0x0000:
            log.info("storage commitment report sent to %s (transaction %s)", peer,
                     report.transaction_uid)
        else:
            log.warning("storage commitment report to %s answered with %s", peer,
                        f"0x{code:04X}" if code is not None else "nothing")

