"""Destination groups (issue 29, item 4): which member of a ``type: group`` destination a study
goes to, decided once when the group's job first runs and recorded in the state (a restart
keeps it).

- ``round_robin``: the member after the one the group's latest new study went to;
  ``least_loaded``: the member with the fewest queued studies (the group's and its own);
  ``failover``: the first member, in ``members`` order, whose circuit breaker is closed.
- ``affinity: patient``: a patient's next study goes to the member its previous one went to,
  while that member's breaker is closed.
- A member whose breaker is open gets nothing new; a study assigned to it that is not
  delivered yet moves to another member when its job runs next (its failed jobs are made due
  when the breaker opens). The group's job is sent under the member's name in the ledger, so
  the move sends the *whole* study to the new member (an AI node must receive the study whole),
  never an instance twice to one member; what the old member already acknowledged stays in
  its ledger and the study's history says how much of it that was.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from . import metrics
from .breaker import CLOSED, Breakers
from .destinations import Destination
from .destinations.group import GroupDestination
from .logsafe import escape
from .state import Job, State

log = logging.getLogger("dicomrouter.groups")


class Groups:
    """The destination groups of one router: the choice of a member, its record, the wake-up
    of a group's jobs when one of its members' breakers opens or closes."""

    def __init__(self, state: State, destinations: dict[str, Destination], breakers: Breakers,
                 notify: Callable[[Iterable[str]], None]) -> None:
        self.state = state
        self.destinations = destinations
        self.breakers = breakers
        self.notify = notify
        self.by_name = {name: d for name, d in destinations.items()
                        if isinstance(d, GroupDestination)}
        self._lock = threading.Lock()  # one choice at a time (round_robin reads the last)
        self._seen: dict[str, str] = {}  # each member's breaker state last seen
        for name, group in self.by_name.items():
            for member in group.members:
                metrics.GROUP_STUDIES.labels(name, member)
        breakers.listeners.append(self._member_changed)

    def __contains__(self, name: object) -> bool:
        return name in self.by_name

    def healthy(self, member: str) -> bool:
        """The member's circuit breaker (in this process) is closed."""
        breaker = self.breakers.by_name.get(member)
        return breaker is None or breaker.state == CLOSED

    def admits(self, group: str, wait: Callable[[float], None]) -> bool:
        """A group's workers claim jobs while one of its members is healthy; with every
        member's circuit open its jobs wait without using attempts (the members' own workers
        probe them)."""
        if any(self.healthy(m) for m in self.by_name[group].members):
            return True
        wait(0.5)
        return False

    def member_for(self, job: Job, group: GroupDestination) -> Destination:
        """The member the job's study goes to: the recorded one while it is healthy, else a
        new choice (recorded, with the move in the study's history)."""
        with self._lock:
            current = self.state.group_member(group.name, job.study_uid)
            healthy = [m for m in group.members if self.healthy(m)]
            if current in group.members and (current in healthy or not healthy):
                return self.destinations[current]
            study = self.state.study(job.study_uid)
            patient = study.patient_id if study is not None else ""
            choice, how = self._choose(group, healthy or group.members, patient or "")
            note = ""
            if current is not None:
                had = len(self.state.delivered_uids(job.study_uid, current))
                why = f"{current}'s circuit breaker is open" if current in group.members \
                    else f"{current} is no longer a member"
                note = (f"{why}; the whole study goes to {choice} ({current} had "
                        f"acknowledged {had} instance(s) of it)")
            member = self.state.group_assign(group.name, job.study_uid, choice, how,
                                             patient or "", current, note)
        if member == choice:
            metrics.GROUP_STUDIES.labels(group.name, member).inc()
            if current is not None:
                metrics.GROUP_MOVES.labels(group.name, current).inc()
                log.warning("study %s → group %s: moved from %s to %s (%s)", job.study_uid,
                            group.name, current, member, escape(note))
            else:
                log.info("study %s → group %s: member %s (%s)", job.study_uid, group.name,
                         member, how)
        return self.destinations[member]

    def _choose(self, group: GroupDestination, healthy: list[str],
                patient: str) -> tuple[str, str]:
        """(member, how it was chosen) among ``healthy``, in ``members`` order."""
        strategy = group.cfg.strategy
        if group.cfg.affinity == "patient" and patient:
            before = self.state.group_patient_member(group.name, patient)
            if before in healthy:
                return before, f"{strategy}, same patient"
        if strategy == "failover":
            return healthy[0], strategy
        if strategy == "least_loaded":
            load = self.state.group_load(group.name, group.members)
            return min(healthy, key=lambda m: (load.get(m, 0), group.members.index(m))), \
                strategy
        last = self.state.group_last_member(group.name)
        start = group.members.index(last) + 1 if last in group.members else 0
        ring = group.members[start:] + group.members[:start]
        return next(m for m in ring if m in healthy), strategy

    def _member_changed(self, member: str, state: str) -> None:
        """A member's breaker opened (its groups' waiting studies move now) or closed (it
        may get studies again): make the groups' failed jobs due and wake their workers."""
        if self._seen.get(member, CLOSED) == state:
            return  # a failed probe, not a transition
        self._seen[member] = state
        groups = [name for name, g in self.by_name.items() if member in g.members]
        for name in groups:
            if state != CLOSED:
                try:
                    self.state.retry_now(name)
                except Exception as exc:  # the state is down: delivery is failing anyway
                    log.error("group %s: could not make its jobs due: %s: %s", name,
                              type(exc).__name__, exc)
        if groups:
            self.notify(groups)
