"""Priorities and holds (issue 26): how the jobs a routing creates are queued, and the chunks
a delivery run is cut into so that more urgent work overtakes it.

A route's ``priority`` (stat, high, routine, low) applies to the destinations it names; a
destination named by several matching routes takes the most urgent. A route with ``hold: true``
holds the jobs of the destinations it names, whatever other routes say (a quarantine is never
bypassed by a second route). Claims take the most urgent due job, then the oldest; a run sends
at most ``chunk_instances`` instances and, if a more urgent job of its destination is due
then, goes back to pending (the ledger makes the next run send only the rest), so a STAT study
waits for one chunk, not for a 2,000-instance routine study.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from .state import Placement
from .values import PRIORITIES

T = TypeVar("T")


def placement(routes: Iterable[Any], matched: Sequence[str],
              destinations: Sequence[str]) -> Placement:
    """The priorities and held destinations of ``destinations`` under the ``matched`` routes
    (names) of ``routes`` (the configuration's route models)."""
    by_name = {r.name: r for r in routes}
    priorities: dict[str, int] = {}
    held: set[str] = set()
    for name in matched:
        r = by_name.get(name)
        if r is None:
            continue
        rank = PRIORITIES.index(r.priority)
        for dest in r.to:
            if dest not in destinations:
                continue
            priorities[dest] = min(rank, priorities.get(dest, rank))
            if r.hold:
                held.add(dest)
    return Placement(priorities, frozenset(held))


def route_priority(route: Any) -> int:
    """A route's priority as a job stores it (0: stat)."""
    return PRIORITIES.index(route.priority)


def chunks(todo: Sequence[T], size: int) -> list[Sequence[T]]:
    """``todo`` cut into runs of at most ``size`` (one chunk when ``size`` is 0)."""
    if size <= 0 or len(todo) <= size:
        return [todo]
    return [todo[i:i + size] for i in range(0, len(todo), size)]
