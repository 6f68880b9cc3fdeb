"""Query/Retrieve as an SCU (pynetdicom): C-FIND, C-MOVE and C-GET to a peer, with results an
operator can read. Used by the ``move`` destination, the ``dicom`` pull source and the
``find`` / ``move`` commands.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, build_context, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    ModalityWorklistInformationFind,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from pynetdicom.status import QR_MOVE_SERVICE_CLASS_STATUS

from .netutil import (
    REJECTION_HANDLERS,
    adjust_associations,
    association_failure,
    rejected_permanently,
    set_reception_note,
)
from .spool.note import pack as pack_note
from .storage_contexts import ACCEPTED_SYNTAXES

log = logging.getLogger("dicomrouter.qrscu")

MODELS = {
    "study": (StudyRootQueryRetrieveInformationModelFind,
              StudyRootQueryRetrieveInformationModelMove,
              StudyRootQueryRetrieveInformationModelGet),
    "patient": (PatientRootQueryRetrieveInformationModelFind,
                PatientRootQueryRetrieveInformationModelMove,
                PatientRootQueryRetrieveInformationModelGet),
    "worklist": (ModalityWorklistInformationFind, None, None),  # C-FIND only (coerce)
}


class PeerError(Exception):
    """The peer could not be reached, refused, or answered with a failure status.

    ``permanent``: it refused for a reason of configuration (our AE title), so asking again
    later will not help."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class Remote:
    """A Q/R peer: its AE title and address, and the AE title the router calls it with."""

    ae_title: str
    host: str
    port: int
    calling_ae: str = "DICOMROUTER"
    timeout: float = 60.0  # association set-up and between two responses
    tls: Any = None  # an ssl.SSLContext for DICOM TLS (tlsctx.client_context)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}" + (" (TLS)" if self.tls else "")


@dataclass
class RetrieveResult:
    """The final C-MOVE/C-GET response: status and sub-operation counts."""

    status: int = 0
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)
    comment: str = ""

    @property
    def ok(self) -> bool:
        return self.status in (0x0000, 0xB000) and self.failed == 0

    def describe(self) -> str:
        kind, text = QR_MOVE_SERVICE_CLASS_STATUS.get(self.status, ("Failure", "unknown status"))
        meaning = f"{kind}: {text}" if text else kind
        out = (f"status 0x{self.status:04X} ({meaning}), {self.completed} completed, "
               f"{self.failed} failed, {self.warning} warning")
        if self.comment:
            out += f" ({self.comment})"
        if self.failed_uids:
            out += f"; failed: {', '.join(self.failed_uids[:5])}"
            out += f" and {len(self.failed_uids) - 5} more" if len(self.failed_uids) > 5 else ""
        return out


@contextmanager
def associate(remote: Remote, contexts: list[Any], roles: list[Any] | None = None,
              handlers: list[Any] | None = None) -> Iterator[Association]:
    adjust_associations()
    ae = AE(ae_title=remote.calling_ae)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = remote.timeout
    try:
        assoc = ae.associate(remote.host, remote.port, contexts=contexts,
                             ae_title=remote.ae_title, ext_neg=roles or [],
                             evt_handlers=[*(handlers or []), *REJECTION_HANDLERS],
                             tls_args=(remote.tls, remote.host) if remote.tls else None)
    except OSError as exc:  # an unknown host name, no route
        raise PeerError(f"cannot reach {remote}: {exc.strerror or exc}") from None
    if not assoc.is_established:
        raise PeerError(f"cannot associate with {remote}: "
                        f"{association_failure(assoc, remote.host, remote.port, remote.tls)}",
                        permanent=rejected_permanently(assoc))
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def _check_context(assoc: Association, model: Any, remote: Remote, what: str) -> None:
    if not any(cx.abstract_syntax == model for cx in assoc.accepted_contexts):
        raise PeerError(f"{remote} does not support {what} ({model.name})")


class FindTruncated(PeerError):
    """The peer stopped answering a C-FIND before every match: 0xFE00 (Orthanc's
    ``LimitFindResults``), a warning, or 0xA700 after some answers (a PACS or router that caps
    its answers). ``answers`` holds what it did send: a caller narrows its query and keeps them."""

    def __init__(self, message: str, answers: list[Dataset], status: int) -> None:
        super().__init__(message)
        self.answers = answers
        self.status = status


def _truncates(code: int, answers: int) -> bool:
    """Whether a final C-FIND status means "these are not all the matches"."""
    return code == 0xFE00 or 0xB000 <= code <= 0xBFFF or (code == 0xA700 and answers > 0)


def _find_on(assoc: Association, sop: Any, identifier: Dataset, remote: Remote,
             limit: int = 0) -> list[Dataset]:
    answers: list[Dataset] = []
    for status, ds in assoc.send_c_find(identifier, sop):
        if not status:
            raise no_response(assoc, remote, "C-FIND")
        code = int(status.Status)
        if code in (0xFF00, 0xFF01):
            if ds is not None:
                answers.append(ds)
            if limit and len(answers) >= limit:
                assoc.send_c_cancel(1, None, sop)  # best effort; the rest are dropped
                break
        elif code != 0x0000:
            comment = str(status.get("ErrorComment", ""))
            text = f"0x{code:04X}" + (f" ({comment})" if comment else "")
            if _truncates(code, len(answers)):
                raise FindTruncated(f"{remote} ended the C-FIND with {text} after "
                                    f"{len(answers)} answer(s)", answers, code)
            raise PeerError(f"{remote} answered C-FIND with {text}")
    return answers


def find(remote: Remote, identifier: Dataset, model: str = "study",
         limit: int = 0) -> list[Dataset]:
    """The C-FIND answers (identifiers) of ``identifier``; raises PeerError on failure
    (FindTruncated, with the answers received, when the peer capped them)."""
    sop = MODELS[model][0]
    with associate(remote, [build_context(sop)]) as assoc:
        _check_context(assoc, sop, remote, "C-FIND")
        return _find_on(assoc, sop, identifier, remote, limit)


class Finder:
    """Several C-FINDs over one association (opened at the first, opened again if the peer
    closed it meanwhile): a pull source's study, series and image queries of one poll."""

    def __init__(self, remote: Remote, model: str = "study") -> None:
        self.remote = remote
        self.sop = MODELS[model][0]
        self.queries = 0
        self._cm: Any = None
        self._assoc: Association | None = None

    def __enter__(self) -> Finder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        cm, self._cm, self._assoc = self._cm, None, None
        if cm is not None:
            cm.__exit__(None, None, None)

    def find(self, identifier: Dataset) -> list[Dataset]:
        self.queries += 1
        for attempt in range(2):
            fresh = self._assoc is None or not self._assoc.is_established
            if fresh:
                self._open()
            assert self._assoc is not None
            try:
                return _find_on(self._assoc, self.sop, identifier, self.remote)
            except FindTruncated:
                raise
            except PeerError:
                self.close()
                if fresh or attempt:  # an idle association the peer had closed: once more
                    raise
        raise AssertionError("not reached")

    def _open(self) -> None:
        self.close()
        self._cm = associate(self.remote, [build_context(self.sop)])
        self._assoc = self._cm.__enter__()
        try:
            _check_context(self._assoc, self.sop, self.remote, "C-FIND")
        except PeerError:
            self.close()
            raise


def no_response(assoc: Association, remote: Remote, what: str) -> PeerError:
    deadline = time.monotonic() + 2.0  # the reactor thread records an A-ABORT a bit later
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    if assoc.is_aborted or not assoc.is_established:
        return PeerError(f"{remote} aborted the association instead of answering the {what} "
                         f"(does it accept {what} from the calling AE title "
                         f"{remote.calling_ae}?)")
    return PeerError(f"{remote}: no {what} response within {remote.timeout:.0f} s")


def _final(status: Dataset, identifier: Dataset | None, remote: Remote,
           what: str) -> RetrieveResult:
    result = RetrieveResult(
        status=int(status.Status),
        completed=int(status.get("NumberOfCompletedSuboperations", 0) or 0),
        failed=int(status.get("NumberOfFailedSuboperations", 0) or 0),
        warning=int(status.get("NumberOfWarningSuboperations", 0) or 0),
        comment=str(status.get("ErrorComment", "")))
    if identifier is not None and "FailedSOPInstanceUIDList" in identifier:
        value = identifier.FailedSOPInstanceUIDList
        values = [value] if isinstance(value, str) else list(value or [])
        result.failed_uids = [str(v) for v in values if str(v)]
    return result


def _last_response(responses: Any, assoc: Association, remote: Remote,
                   what: str) -> RetrieveResult:
    """Read a C-MOVE/C-GET's responses up to the final one (pending ones carry counts only)."""
    last: tuple[Dataset | None, Dataset | None] = (None, None)
    for status, ds in responses:
        if not status:
            raise no_response(assoc, remote, what)
        last = (status, ds)
        if int(status.Status) != 0xFF00:
            break
    if last[0] is None:
        raise PeerError(f"{remote}: no {what} response")
    return _final(*last, remote, what)


def move(remote: Remote, identifier: Dataset, destination: str,
         model: str = "study") -> RetrieveResult:
    """C-MOVE ``identifier`` from ``remote`` to the AE ``destination``: the final response."""
    sop = MODELS[model][1]
    with associate(remote, [build_context(sop)]) as assoc:
        _check_context(assoc, sop, remote, "C-MOVE")
        return _last_response(assoc.send_c_move(identifier, destination, sop), assoc, remote,
                              "C-MOVE")


def get(remote: Remote, identifier: Dataset, on_store: Callable[[Any], Any],
        sop_classes: list[str] | None = None, model: str = "study", called: str = "",
        tags: dict[str, str] | None = None) -> RetrieveResult:
    """C-GET ``identifier`` from ``remote``; every instance goes to ``on_store`` (an EVT_C_STORE
    handler) on the same association. Each instance's file carries the reception note
    (``spool/note.py``) of ``remote``'s AE title, ``called`` and the index ``tags`` the
    handler gives it, for start-up's adoption."""
    sop = MODELS[model][2]
    storage = [cx.abstract_syntax for cx in StoragePresentationContexts]
    if sop_classes:
        storage = list(dict.fromkeys(sop_classes))
    storage = storage[:127]
    contexts = [build_context(sop)] + [build_context(s, ACCEPTED_SYNTAXES) for s in storage]
    roles = [build_role(s, scp_role=True) for s in storage]
    with associate(remote, contexts, roles, [(evt.EVT_C_STORE, on_store)]) as assoc:
        _check_context(assoc, sop, remote, "C-GET")
        set_reception_note(assoc, pack_note(remote.ae_title, called, tags or {}))
        return _last_response(assoc.send_c_get(identifier, sop), assoc, remote, "C-GET")
