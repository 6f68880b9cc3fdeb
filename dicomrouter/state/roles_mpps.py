"""The state's role for Modality Performed Procedure Steps (issue 27): the MPPS the router
answered (kept before the response), the studies they name, and the outbox of N-CREATE /
N-SET messages (MPPS forwarded, Instance Availability Notifications) sent in order per peer."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Mpps:
    """One Modality Performed Procedure Step, as its last N-CREATE / N-SET left it."""

    uid: str
    status: str  # IN PROGRESS | COMPLETED | DISCONTINUED
    calling_ae: str
    created: float
    updated: float
    study_uids: tuple[str, ...] = ()
    listed: tuple[str, ...] = ()  # SOP Instance UIDs of its Performed Series Sequence
    dataset: str = ""  # mpps_data.to_text of the merged attribute list
    outcome: str | None = None  # None: still deciding; complete | incomplete | discontinued


@dataclass(frozen=True)
class StepReport:
    """What ``status --study`` and ``explain`` say about one procedure step of a study."""

    uid: str
    status: str
    listed: int
    arrived: int
    outcome: str | None

    def __str__(self) -> str:
        """``MPPS 1.2.3 COMPLETED: 12/12 instances``."""
        if self.status == "IN PROGRESS" and not self.listed:
            return f"MPPS {self.uid} IN PROGRESS"
        return (f"MPPS {self.uid} {self.status}: {self.arrived}/{self.listed} instances"
                + (" (flagged incomplete)" if self.outcome == "incomplete" else ""))


@dataclass(frozen=True)
class Outgoing:
    """A message queued for a peer (``dimse_outbox``): sent in ``id`` order per destination."""

    id: int
    destination: str
    operation: str  # N-CREATE | N-SET
    sop_class: str
    sop_uid: str
    dataset: str
    what: str
    attempts: int = 0
    extra: dict[str, str] = field(default_factory=dict)


class ProcedureSteps(ABC):
    """MPPS records, their studies and the DIMSE outbox."""

    @abstractmethod
    def mpps_create(self, mpps: Mpps, forward: Sequence[str], why: str) -> bool:
        """Record an N-CREATE (and queue it for ``forward``) in one transaction; False when
        the SOP Instance UID exists already."""

    @abstractmethod
    def mpps(self, uid: str) -> Mpps | None: ...

    @abstractmethod
    def mpps_set(self, mpps: Mpps, modification: str, forward: Sequence[str],
                 why: str) -> bool:
        """Record an N-SET (``mpps``: the merged result; ``modification``: what came, queued
        for ``forward``) if the step is still IN PROGRESS; False when it is not (any more)."""

    @abstractmethod
    def mpps_for_study(self, study_uid: str) -> list[Mpps]: ...

    @abstractmethod
    def mpps_reports(self, study_uid: str) -> list[StepReport]:
        """The study's steps, with how many of their listed instances arrived."""

    @abstractmethod
    def mpps_open(self, incomplete_since: float | None = None) -> list[Mpps]:
        """Steps COMPLETED or DISCONTINUED whose effect on their studies is not decided (and
        those decided incomplete, ended since ``incomplete_since``: their instances may come
        late)."""

    @abstractmethod
    def mpps_resolve(self, uid: str, outcome: str, notes: dict[str, str]) -> None:
        """Decide a step (``notes``: study → history line)."""

    @abstractmethod
    def arrived_in(self, sop_uids: Sequence[str]) -> dict[str, str]:
        """SOP Instance UID → study, for those of ``sop_uids`` the router received."""

    @abstractmethod
    def flag_incomplete(self, study_uid: str, why: str, clear: bool = False) -> None:
        """Flag a study incomplete (status, web) and say why in its history (``clear``: the
        flag goes, ``why`` says why)."""

    @abstractmethod
    def outbox_add(self, destinations: Sequence[str], operation: str, sop_class: str,
                   sop_uid: str, dataset: str, what: str, study_uid: str = "") -> None: ...

    @abstractmethod
    def outbox_destinations(self, now: float) -> list[str]:
        """Destinations whose first pending message is due."""

    @abstractmethod
    def outbox_next(self, destination: str) -> Outgoing | None:
        """The destination's oldest pending message (the others wait behind it)."""

    @abstractmethod
    def outbox_done(self, msg_id: int, state: str, error: str = "") -> None:
        """sent, or refused (the peer answered with a failure: not sent again)."""

    @abstractmethod
    def outbox_retry(self, msg_id: int, error: str, next_attempt: float) -> None: ...

    @abstractmethod
    def outbox_counts(self) -> dict[str, dict[str, int]]:
        """destination → state → messages."""

    @abstractmethod
    def outbox_rows(self, limit: int = 50) -> list[dict[str, Any]]: ...
