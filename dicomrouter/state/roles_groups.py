"""The state's role for destination groups (issue 29, item 4; ``roles.State``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any


class GroupAssignments(ABC):
    """Destination groups (issue 29, item 4): the member each study of a group goes to."""

    @abstractmethod
    def group_member(self, group: str, study_uid: str) -> str | None: ...

    @abstractmethod
    def group_assign(self, group: str, study_uid: str, member: str, strategy: str,
                     patient_id: str, replaces: str | None = None, note: str = "") -> str:
        """Record the study's member (or move it from ``replaces``); the member in effect."""

    @abstractmethod
    def group_last_member(self, group: str) -> str | None: ...

    @abstractmethod
    def group_patient_member(self, group: str, patient_id: str) -> str | None: ...

    @abstractmethod
    def group_load(self, group: str, members: Sequence[str]) -> dict[str, int]:
        """Studies queued per member (the group's and the member's own)."""

    @abstractmethod
    def group_spread(self, group: str, pending_limit: int = 50) -> dict[str, Any]:
        """Studies per member, how many moved, the member of each queued study."""

    @abstractmethod
    def group_spreads(self, pending_limit: int = 50) -> dict[str, dict[str, Any]]:
        """``group_spread`` of every group that has given out a study."""
