"""The state interface: what the router, delivery and spool need from the state database.

Plain dataclasses go in and out; no SQL dialect, no driver row type and no config type crosses
it, so a PostgreSQL implementation (``SKIP LOCKED`` claims, advisory locks for the per-study
exclusion, leases) can follow without touching the callers. ``sqlite.py`` is the embedded
default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

from ..values import PRIORITIES

#: a job's priority as stored (the index in ``PRIORITIES``: 0 is stat, the most urgent)
ROUTINE = PRIORITIES.index("routine")


class StudyState(StrEnum):
    """Where a study is (``studies.state``); equal to its text, as stored."""

    RECEIVING = "receiving"  # instances arriving; completes when stable
    ROUTED = "routed"  # jobs created, being delivered
    UNROUTED = "unrouted"  # complete, no route matched: kept in the spool
    DELIVERED = "delivered"  # every job delivered
    FAILED = "failed"  # a job is dead-lettered
    HELD = "held"  # force_complete: hold; waits for an operator's reroute
    MOVED = "moved"  # every instance moved to other studies
    REJECTED = "rejected"  # every job of it rejected by an operator (hold: true); kept


class JobState(StrEnum):
    """Where a delivery job is (``jobs.state``); equal to its text, as stored."""

    PENDING = "pending"
    RUNNING = "running"
    FAILED = "failed"  # retried at next_attempt
    DEAD = "dead"  # dead-lettered
    DELIVERED = "delivered"
    HELD = "held"  # a route with hold: true: waits for release or reject by an operator
    REJECTED = "rejected"  # held, then rejected: never delivered


def priority_name(value: int | None) -> str:
    """``stat`` for 0, ...; an unknown stored value reads as routine."""
    return PRIORITIES[value] if value is not None and 0 <= value < len(PRIORITIES) \
        else "routine"


@dataclass(frozen=True)
class Placement:
    """How the jobs a routing creates are queued: each destination's priority (index in
    ``PRIORITIES``; routine when not named) and the destinations whose jobs are held."""

    priorities: Mapping[str, int] = field(default_factory=dict)
    held: frozenset[str] = frozenset()

    def priority(self, destination: str) -> int:
        return self.priorities.get(destination, ROUTINE)


#: ``jobs.requeue`` of a running job: what becomes of it when its run ends (0: it ends as the
#: run says). New instances arrived meanwhile: pending again; and a route holds them: held.
REQUEUE, REQUEUE_HELD = 1, 2


class StateUnavailable(OSError):
    """The state database cannot be reached now (PostgreSQL down or restarting): an OSError,
    so every "one log line, try again" path (ingest → 0xA700, tracker, workers) handles it."""


@dataclass(frozen=True)
class Job:
    """One (study, destination) delivery, as claimed by a worker."""

    id: int
    study_uid: str
    destination: str
    attempts: int
    generation: int
    routes: tuple[str, ...] = ()  # the routes that sent the study there (for manifests)
    series_only: tuple[str, ...] | None = None  # level: series, study still receiving
    priority: int = ROUTINE  # index in PRIORITIES (0: stat)


@dataclass(frozen=True)
class Instance:
    sop_uid: str
    study_uid: str
    series_uid: str
    sop_class: str
    transfer_syntax: str
    key: str  # where the spool keeps it, relative to the spool root (Spool.open reads it)
    size: int
    calling_ae: str
    called_ae: str
    tags: dict[str, str]
    generation: int = 1
    node: str = ""  # the node that received it (several routers); "" when unknown


class Recorded(NamedTuple):
    """What recording a received instance did (``State.record_instance``)."""

    replaced: bool  # the SOP Instance UID was there before (a re-send, or a move)
    generation: int  # the study's generation now
    replaced_size: int  # bytes of the earlier copy still in the spool (0: none)
    #: the earlier copy's spool key when it is now superseded by this one under another key
    #: (a move to another study; in cluster mode every re-send): the caller deletes it
    superseded: str = ""
    moved_from: str = ""  # the study the SOP Instance UID was in, when it was another one


@dataclass(frozen=True)
class Reception:
    """The newest recorded reception of a SOP Instance UID (recovery compares files to it)."""

    study_uid: str
    key: str
    received_at: float
    present: bool


@dataclass(frozen=True)
class Study:
    study_uid: str
    state: str  # receiving | routed | delivered | unrouted | failed
    generation: int
    patient_id: str
    calling_ae: str
    last_received: float
    in_spool: bool


@dataclass(frozen=True)
class SourceStudy:
    """What a pull source remembers of one study it pulled (or began to pull)."""

    key: str  # the source's id of the study (Study Instance UID, Orthanc's id)
    study_uid: str
    pulled_at: float | None  # the last pull that finished (None: none finished yet)
    source_instances: int | None  # the source's count when a pull last left nothing missing
    instances: int  # instances this source brought into the router for it, so far
