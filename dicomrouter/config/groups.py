"""The model of a destination group (issue 29, item 4): ``type: group``, a study goes whole to
one of ``members`` (other destinations), chosen by ``strategy`` and kept by ``affinity``. The
checks that need the other destinations (members exist, are not groups) are in
``check_groups``, called by the configuration once every destination is validated."""

from __future__ import annotations

from typing import Any

from pydantic import model_validator

from ..schema import Choice, Text
from .base import ConfigError, show
from .peers import DestinationBase, destination_type

STRATEGIES = ("round_robin", "least_loaded", "failover")
AFFINITIES = ("study", "patient")

#: keys every destination has that a group cannot use: its members' own settings decide
_MEMBERS_DECIDE = {
    "transforms": "put transforms on the route or on the members",
    "breaker_failures": "a group has no circuit breaker of its own: each member's breaker "
                        "decides whether it gets studies",
    "probe_every": "a group has no circuit breaker of its own: set it on the members",
    "max_rate": "set max_rate on the members",
    "coerce": "set coerce on the members",
}


@destination_type("group")
class GroupModel(DestinationBase):
    """``type: group``: one study goes whole to one member."""

    members: list[Text]
    strategy: Choice(*STRATEGIES) = "round_robin"
    affinity: Choice(*AFFINITIES) = "study"

    @model_validator(mode="after")
    def _members(self) -> GroupModel:
        for key, why in _MEMBERS_DECIDE.items():
            if key in self.model_fields_set:
                raise ConfigError(key, f"not for a group: {why}")
        if len(self.members) < 2:
            raise ConfigError("members", f"a group needs at least 2 members, got "
                              f"{len(self.members)}")
        twice = next((m for i, m in enumerate(self.members) if m in self.members[:i]), None)
        if twice is not None:
            raise ConfigError("members", f"{show(twice)} is listed twice")
        return self

    def whole_study(self) -> str:
        return "a group sends each study whole to the one member chosen for it"


def check_groups(cfg: Any) -> Any:
    """Every group's members are destinations defined in the configuration and not groups
    themselves (no nesting)."""
    known = cfg.destinations or {}
    for name, dest in known.items():
        if not isinstance(dest, GroupModel):
            continue
        for member in dest.members:
            if member == name:
                raise ConfigError(f"destinations.{name}.members",
                                  f"{show(member)} is the group itself")
            if member not in known:
                raise ConfigError(f"destinations.{name}.members", f"unknown destination "
                                  f"{show(member)} (known: {', '.join(known)})")
            if isinstance(known[member], GroupModel):
                raise ConfigError(f"destinations.{name}.members", f"{show(member)} is a group; "
                                  "groups do not nest")
    return cfg
