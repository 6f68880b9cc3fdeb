"""``type: group`` (issue 29, item 4): a name that stands for its members. It never opens a
session of its own: the delivery workers ask ``groups.py`` which member a study goes to and
send it with that member's destination, under that member's ledger and circuit breaker."""

from __future__ import annotations

from collections.abc import Sequence

from ..config.groups import GroupModel
from ..state import Instance
from .base import Destination, PermanentFailure, Session
from .registry import implements


@implements(GroupModel)
class GroupDestination(Destination):
    """The group's members, its strategy and affinity (``cfg``); delivery goes to a member."""

    whole_study = False  # the member's own setting applies to its run

    @property
    def members(self) -> list[str]:
        return list(self.cfg.members)

    def describe(self) -> str:
        return f"group of {', '.join(self.members)}, {self.cfg.strategy}"

    def open(self, instances: Sequence[Instance], routes: Sequence[str] = ()) -> Session:
        raise PermanentFailure("a group cannot send by itself",
                               "report this: its members send (an internal error)")
