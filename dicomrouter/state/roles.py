"""The state's interface, by role: each part of the router depends on the roles it uses
(receiving on ``Receptions``, the tracker on ``Studies``, the workers on ``Deliveries``, ...);
``State`` is all of them, as each backend implements it. Values in and out are the plain
dataclasses and enums of ``base.py``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

from ..query import Query
from .base import Instance, Job, Placement, Reception, Recorded, SourceStudy, Study
from .roles_groups import GroupAssignments
from .roles_mpps import ProcedureSteps
from .roles_pseudonyms import Pseudonyms
from .roles_remote import RemoteAwaits


class Receptions(ABC):
    """Recording what arrives, and finding it again."""
    @abstractmethod
    def record_instance(self, tags: dict[str, str], tsuid: str, key: str, size: int,
                        calling_ae: str, called_ae: str,
                        shared: bool = True) -> Recorded:
        """Record a durable instance. ``shared``: already in the shared store (cluster mode),
        or there is none. A SOP Instance UID lives in one study at a time: received under
        another study, it moves there (the history of both says so)."""

    @abstractmethod
    def reception(self, sop_uid: str) -> Reception | None:
        """The newest recorded reception of a SOP Instance UID, if any."""

    @abstractmethod
    def known_keys(self, study_uid: str | None = None) -> set[str]:
        """Spool keys of every instance present (of one study)."""

    @abstractmethod
    def spool_bytes(self) -> int:
        """Bytes of every instance present."""

    @abstractmethod
    def study_lock(self, study_uid: str) -> AbstractContextManager[None]:
        """Exclusion of ingest and deletion of one study, across threads and processes."""


    @abstractmethod
    def instance(self, sop_uid: str) -> Instance | None: ...

    @abstractmethod
    def all_keys(self) -> set[str]:
        """The keys of every instance row, present or not (cluster: the objects rows know)."""

    @abstractmethod
    def mark_shared(self, uploaded: Sequence[tuple[str, str]]) -> None:
        """These (SOP Instance UID, key) receptions are now in the shared store too (one
        transaction)."""

    @abstractmethod
    def current_keys(self, sop_uids: Sequence[str]) -> dict[str, str]:
        """SOP Instance UID → the key of its current reception."""

    @abstractmethod
    def moves(self, study_uid: str) -> list[dict[str, Any]]:
        """Instances that moved out of or into a study, oldest first."""


class Studies(ABC):
    """Completion and routing: stable, held, expected, routed, swept studies."""
    @abstractmethod
    def due_studies(self, stable_age: float, now: float | None = None,
                    force_after: float = 0.0) -> list[str]:
        """Studies receiving with no arrival for ``stable_age`` seconds (or complete by the
        announced count, or receiving for ``force_after`` seconds)."""

    @abstractmethod
    def receiving_for(self, study_uid: str, now: float | None = None) -> float: ...

    @abstractmethod
    def hold_study(self, study_uid: str, why: str) -> None: ...

    @abstractmethod
    def note(self, study_uid: str, text: str) -> None:
        """Append one event to a study's history."""

    @abstractmethod
    def hold_jobs(self, study_uid: str, destinations: Sequence[str], until: float,
                  why: str) -> None: ...

    @abstractmethod
    def studies_in_state(self, state: str) -> list[str]: ...

    @abstractmethod
    def study(self, study_uid: str) -> Study | None: ...

    @abstractmethod
    def instances(self, study_uid: str, present_only: bool = True) -> list[Instance]: ...

    @abstractmethod
    def route_study(self, study_uid: str, destinations: Sequence[str], routes: Sequence[str],
                    seen: Study, explanation: str = "",
                    placement: Placement | None = None) -> bool:
        """Routed (a job per destination, queued as ``placement`` says: priorities, held
        jobs) or unrouted, unless an instance arrived since ``seen`` (then False)."""

    @abstractmethod
    def sweepable_studies(self) -> list[str]: ...

    @abstractmethod
    def stable_series(self, age: float, route: str,
                      now: float | None = None) -> list[tuple[str, str, int]]: ...

    @abstractmethod
    def route_series(self, study_uid: str, series_uid: str, generation: int, route: str,
                     destinations: Sequence[str], why: str,
                     priority: int | None = None) -> None: ...

    @abstractmethod
    def receiving_studies(self) -> list[tuple[str, int, float]]:
        """(study, generation, last arrival) of the studies still receiving."""

    @abstractmethod
    def forward_now(self, study_uid: str, generation: int, route: str,
                    destinations: Sequence[str], why: str,
                    priority: int | None = None) -> list[str]:
        """``forward: immediate``: the destinations' jobs take what the study holds now; the
        destinations whose job is due now (``why`` is noted once per new job, ``{dest}``
        filled in)."""

    @abstractmethod
    def set_await(self, study_uid: str, until: float | None, why: str = "") -> None:
        """A route waits for its own stable age until ``until`` (None: none waits)."""

    @abstractmethod
    def awaiting_studies(self, now: float | None = None) -> list[str]: ...

    @abstractmethod
    def to_count(self, calling_aes: Sequence[str]) -> list[tuple[str, str]]:
        """(study, calling AE) of receiving studies whose sender was not asked yet."""

    @abstractmethod
    def set_expected(self, study_uid: str, count: int, why: str) -> None: ...

    @abstractmethod
    def all_announced_in(self, study_uid: str) -> bool: ...

    @abstractmethod
    def sweep_study(self, study_uid: str, destinations: Sequence[str], routes: Sequence[str],
                    explanation: str = "", why: str = "sweep",
                    placement: Placement | None = None) -> list[str]:
        """Jobs for the destinations the study has none for yet (the sweep); those added."""


class Deliveries(ABC):
    """Delivery jobs and the per-instance ledger."""
    @abstractmethod
    def reset_running_jobs(self) -> tuple[int, int]: ...

    @abstractmethod
    def claim_job(self, destination: str, now: float | None = None) -> Job | None:
        """The most urgent due job of a destination (then the oldest), now running; None
        without writing if none. Held jobs are never due."""

    @abstractmethod
    def release_job(self, job: Job) -> None: ...

    @abstractmethod
    def next_due(self, destination: str) -> float | None: ...

    @abstractmethod
    def retry_now(self, destination: str) -> int:
        """The destination's failed jobs waiting for their retry become due now (attempts
        kept): its circuit breaker closed. Returns how many."""

    @abstractmethod
    def undelivered(self, study_uid: str, destination: str) -> list[Instance]: ...

    @abstractmethod
    def mark_sending(self, sop_uid: str, destination: str, study_uid: str,
                     delivered_before: str | None = None, count: bool = True,
                     digest: str | None = None) -> None: ...

    @abstractmethod
    def count_sends(self, sop_uids: Sequence[str], destination: str, study_uid: str,
                    delta: int = 1) -> None: ...

    @abstractmethod
    def mark_delivered(self, sop_uids: Sequence[str], destination: str,
                       digests: Mapping[str, str] | None = None) -> None: ...

    @abstractmethod
    def delivered_digests(self, study_uid: str, destination: str) -> dict[str, str]: ...

    @abstractmethod
    def delivered_uids(self, study_uid: str, destination: str) -> set[str]:
        """The SOP Instance UIDs of the study the ledger shows as delivered to ``destination``
        (ordered delivery waits on it, ``ordering.py``)."""

    @abstractmethod
    def mark_identical(self, sop_uids: Sequence[str], destination: str,
                       study_uid: str) -> None: ...

    @abstractmethod
    def record_sent_uid(self, sop_uid: str, destination: str, sent_uid: str) -> None:
        """The (de-identified) SOP Instance UID the destination got for ``sop_uid``."""

    @abstractmethod
    def finish_job(self, job: Job, error: str | None, max_attempts: int,
                   retry_in: float, permanent: bool = False) -> str:
        """Delivered, failed (retried in ``retry_in`` s) or dead (attempts used up, or
        ``permanent``: waiting cannot heal it); returns the new state."""

    @abstractmethod
    def settle_study(self, study_uid: str) -> bool:
        """Mark a routed study delivered once every job is (the history names partial ones)."""

    @abstractmethod
    def partial_jobs(self, study_uid: str | None = None) -> list[dict[str, Any]]:
        """Jobs (study_uid, destination, state, missing) whose destination misses instances
        deleted from the spool before the study was routed there."""

    @abstractmethod
    def forget_spool(self, study_uid: str, why: str) -> None: ...

    @abstractmethod
    def delivered_in_spool_before(self, cutoff: float) -> list[str]: ...

    @abstractmethod
    def requeue(self, dead_only: bool, study_uid: str | None,
                destination: str | None) -> int: ...

    @abstractmethod
    def purge(self, study_uid: str) -> list[str]: ...


    @abstractmethod
    def forget_delivered(self, study_uid: str, why: str) -> list[Instance] | None:
        """A delivered study's instances, marked gone from the spool in one step (None: it is
        not delivered, or something arrived meanwhile)."""


class Holds(ABC):
    """Priorities and held jobs (issue 26): what a worker yields to, what an operator
    releases or rejects."""
    @abstractmethod
    def urgent_due(self, destination: str, priority: int, now: float | None = None) -> bool:
        """Whether a job more urgent than ``priority`` is due for ``destination`` (a read)."""

    @abstractmethod
    def hold_placed(self, study_uid: str, placement: Placement) -> list[str]:
        """Pending or failed jobs of the placement's held destinations are held now (not
        those an operator released this generation), more urgent ones get its priority; the
        destinations held now."""

    @abstractmethod
    def release_study(self, study_uid: str, who: str, why: str) -> list[str]:
        """The study's held jobs become pending now; the audit trail says who and why. The
        destinations released (none: nothing was held)."""

    @abstractmethod
    def reject_study(self, study_uid: str, who: str, why: str) -> list[str]:
        """The study's held jobs are dropped (``rejected``, never delivered); audited like
        a release. The destinations rejected."""

    @abstractmethod
    def queued_by_priority(self) -> dict[str, dict[str, int]]:
        """Jobs waiting (pending, failed, running) per destination and priority name."""

    @abstractmethod
    def held_studies(self) -> list[dict[str, Any]]:
        """Studies with held jobs, oldest first (study_uid, patient_id, destinations, since)."""


class QueryIndex(ABC):
    """The Q/R index over what the spool holds (the router as a Q/R SCP)."""
    @abstractmethod
    def qr_rows(self, query: Query, limit: int = 0, offset: int = 0) -> list[dict[str, str]]:
        """C-FIND (and QIDO-RS) matches at the query's level: keyword → value, aggregates
        included; at most ``limit`` (0: all) after skipping ``offset``."""

    @abstractmethod
    def qr_instances(self, query: Query) -> list[Instance]:
        """The instances (present in the spool) a C-MOVE/C-GET identifier selects."""

    @abstractmethod
    def proxy_used(self, study_uid: str, now: float) -> None:
        """The Q/R proxy fetched or served the study now (its cache clock starts again)."""

    @abstractmethod
    def proxy_unused_since(self, before: float) -> list[str]:
        """Studies the Q/R proxy fetched and nobody retrieved since ``before``."""

    @abstractmethod
    def proxy_forget(self, study_uid: str) -> None:
        """The study left the proxy's cache."""


class SourceCursors(ABC):
    """Pull sources: cursors, health, what was pulled (and deleted at the source)."""
    @abstractmethod
    def source_cursor(self, name: str) -> str | None: ...

    @abstractmethod
    def source_polled(self, name: str, error: str | None, cursor: str | None = None) -> None:
        """Record a poll (its error, or success) and, if given, the new cursor."""

    @abstractmethod
    def source_studies(self, name: str, keys: Sequence[str]) -> dict[str, SourceStudy]:
        """The rows of those of ``keys`` the source ``name`` has pulled or begun to pull."""

    @abstractmethod
    def source_held(self, study_uid: str) -> dict[str, str]:
        """SOP Instance UID → Series Instance UID of every instance of the study the router
        holds or held (present in the spool or delivered and removed): what a pull skips."""

    @abstractmethod
    def source_pull_started(self, name: str, study_key: str, study_uid: str) -> None:
        """A pull of the study begins: the router's instance count of the study is kept as the
        baseline of what this pull brings (unless an interrupted pull left one)."""

    @abstractmethod
    def source_pulled(self, name: str, study_key: str, study_uid: str,
                      source_instances: int | None, delete_after: bool) -> tuple[bool, int]:
        """A pull ended (``source_instances``: the source's count when nothing is missing any
        more, None when the pull failed or left some). Counts what it brought since its
        baseline: (the study's first instances from this source, instances brought)."""

    @abstractmethod
    def source_deletable(self, name: str) -> list[tuple[str, str]]:
        """Studies pulled with move semantics that are now delivered to every destination."""

    @abstractmethod
    def source_delivered(self, study_uid: str) -> set[str]:
        """SOP Instance UIDs of the study's instances delivered to every destination it has a
        job for (what move semantics may delete at the source)."""

    @abstractmethod
    def source_deleted(self, name: str, study_key: str, study_uid: str, deleted: int = 0,
                       left: int = 0) -> None:
        """The study's delivered instances were deleted at the source (``deleted`` of them;
        ``left``: instances stored there since, kept for the next pull)."""

    @abstractmethod
    def has_instance(self, sop_uid: str) -> bool: ...


class Commitments(ABC):
    """Storage commitment transactions (reports may reach any receiver process)."""
    @abstractmethod
    def expect_commitment(self, transaction_uid: str, peer: str) -> None: ...

    @abstractmethod
    def record_commitment(self, transaction_uid: str, committed: Sequence[str],
                          failed: dict[str, int]) -> None: ...

    @abstractmethod
    def commitment(self, transaction_uid: str) -> tuple[list[str], dict[str, int]] | None:
        """(committed, failed) once the report of ``transaction_uid`` arrived, else None."""

    @abstractmethod
    def held_instances(self, sop_uids: Iterable[str]) -> dict[str, str]:
        """SOP Instance UID → SOP Class UID of the given instances the spool holds now."""

    @abstractmethod
    def source_rows(self) -> list[dict[str, Any]]: ...


class Reporting(ABC):
    """What status, the web side and the audit read; the operator's actions."""
    @abstractmethod
    def study_rows(self, with_done: bool = False, study_uid: str | None = None,
                   limit: int = 0) -> list[dict[str, Any]]: ...

    @abstractmethod
    def study_counts(self, with_done: bool = False) -> dict[str, int]: ...

    @abstractmethod
    def gauges(self) -> dict[str, Any]:
        """Queues, retrying and dead jobs, partial jobs, spool bytes, sources: what /metrics
        and the destinations' health read on every scrape (no cost per instance)."""

    @abstractmethod
    def summary(self, with_done: bool = False, limit: int = 0) -> dict[str, Any]: ...

    @abstractmethod
    def history(self, study_uid: str) -> list[tuple[float, str]]: ...

    @abstractmethod
    def count_studies(self, state: str, before: float) -> int:
        """How many studies in ``state`` were last received before ``before``."""

    @abstractmethod
    def recent_studies(self, limit: int, offset: int = 0, state: str | None = None,
                       patient_id: str | None = None,
                       since: float | None = None) -> list[dict[str, Any]]: ...

    @abstractmethod
    def jobs(self, state: str | None = None, destination: str | None = None,
             study_uids: Sequence[str] | None = None,
             limit: int = 1000) -> list[dict[str, Any]]: ...

    @abstractmethod
    def requeue_job(self, job_id: int) -> dict[str, Any] | None: ...

    @abstractmethod
    def reopen_study(self, study_uid: str) -> bool: ...

    @abstractmethod
    def throughput(self, since: float, bucket: float) -> list[tuple[float, int]]: ...

    @abstractmethod
    def events_since(self, since: float, study_uid: str | None = None
                     ) -> list[dict[str, Any]]: ...

    @abstractmethod
    def ledger_stats(self, destination: str | None = None) -> dict[str, int]: ...


class Prefetches(ABC):
    """Prior prefetch (issue 27): triggers, their suppression window, the priors fetched."""
    @abstractmethod
    def prefetch_trigger(self, rule: str, trigger_key: str, patient_id: str, study_uid: str,
                         detail: dict[str, Any], window: float,
                         now: float | None = None) -> tuple[str, dict[str, Any] | None]:
        """Record a trigger: ('new', None), ('seen', its row) or ('suppressed', the earlier
        trigger of the rule for the patient inside ``window``)."""

    @abstractmethod
    def prefetch_claim(self, now: float | None = None) -> dict[str, Any] | None: ...

    @abstractmethod
    def prefetch_next_due(self) -> float | None: ...

    @abstractmethod
    def prefetch_finished(self, rule: str, trigger_key: str, state: str, outcome: str,
                          error: str | None = None, next_attempt: float = 0.0,
                          attempts: int | None = None) -> None: ...

    @abstractmethod
    def prefetch_reset_running(self) -> int: ...

    @abstractmethod
    def prefetch_mark_prior(self, study_uid: str, rule: str, trigger_key: str) -> None: ...

    @abstractmethod
    def prefetch_prior(self, study_uid: str) -> dict[str, Any] | None: ...

    @abstractmethod
    def prefetch_runs(self, study_uid: str,
                      trigger_keys: Sequence[str] = ()) -> list[dict[str, Any]]: ...

    @abstractmethod
    def prefetch_queue(self) -> list[dict[str, Any]]: ...


class Nodes(ABC):
    """The routers sharing this state (several on PostgreSQL; one with SQLite)."""
    node_id: str = ""

    @abstractmethod
    def heartbeat(self, info: dict[str, Any] | None = None) -> None:
        """This node is alive (``info`` at start-up); renews the leases of its running jobs."""

    def hold_lease(self, name: str, ttl: float) -> bool:
        """Whether this node may do the singleton work ``name`` now (one node: always)."""
        return True

    @abstractmethod
    def nodes(self) -> list[dict[str, Any]]:
        """Every node known, with ``alive``, its heartbeat and what it holds and runs."""

    @abstractmethod
    def publish_breakers(self, breakers: dict[str, dict[str, Any]]) -> None:
        """This node's circuit breakers (destination → its view), kept in its row's ``info``
        under ``breakers`` for ``status`` (breaker.py; replaced at the node's next start)."""

    @abstractmethod
    def close(self) -> None: ...

    def schema_version(self) -> int:
        """The schema's version (0: no router has run on this database yet)."""
        return 1

    def schema_behind(self) -> bool:
        """Whether the database lacks migrations this version applies when the router starts
        (a read-only command cannot read it then)."""
        return False


class Hl7Orders(ABC):
    """HL7 v2 (issue 27): messages stored before their ACK, handled once, and the latest
    order / demographics / merges they told (``sql_hl7``)."""

    @abstractmethod
    def store_hl7_message(self, raw: str, message_type: str, control_id: str,
                          sending_application: str, sending_facility: str,
                          peer: str) -> int:
        """Store a received message durably (committed and on disk); its id."""

    @abstractmethod
    def hl7_unhandled(self, limit: int = 1000) -> list[dict[str, Any]]: ...

    @abstractmethod
    def hl7_messages(self, limit: int = 100) -> list[dict[str, Any]]: ...

    @abstractmethod
    def hl7_handled(self, message_id: int, outcome: str,
                    order: Mapping[str, str] | None = None,
                    merge: tuple[str, str] | None = None) -> None: ...

    @abstractmethod
    def hl7_order(self, accession: str) -> dict[str, str] | None: ...

    @abstractmethod
    def merged_patient_id(self, patient_id: str) -> str: ...

    @abstractmethod
    def study_hl7_order(self, study_uid: str) -> dict[str, str] | None: ...

    @abstractmethod
    def purge_hl7_messages(self, before: float) -> int: ...

    @abstractmethod
    def latest_hl7_order(self, accession: str | None = None,
                         patient_id: str | None = None) -> dict[str, str] | None:
        """The latest order (or ADT for a patient) as DICOM keywords → values."""


class Corrections(ABC):
    """IOCM rejection notes and corrected instances follow the ledger (issue 29, item 5;
    ``sql_iocm``)."""

    @abstractmethod
    def unexamined_notes(self, sop_class: str, limit: int = 100) -> list[Instance]:
        """Instances of ``sop_class`` (Key Object Selection) not examined yet."""

    @abstractmethod
    def note_examined(self, sop_uid: str) -> None: ...

    @abstractmethod
    def reject_instances(self, note: Instance, code: str, meaning: str,
                         rejected: Sequence[str]) -> dict[str, Any]:
        """Reject these instances (never sent again), cancel their due sends, send the note
        only where one of them was delivered; what happened, for the log."""

    @abstractmethod
    def rejected_uids(self, study_uid: str) -> set[str]:
        """The study's instances a rejection note rejected (never sent again)."""

    @abstractmethod
    def directed_instances(self, study_uid: str, generation: int) -> dict[str, list[str]]:
        """destination → series of this generation's notes that go only there."""

    @abstractmethod
    def replaced_deliveries(self, study_uid: str,
                            generation: int) -> dict[str, dict[str, str | None]]:
        """Re-received instances: SOP UID → {destination that had the earlier version: its
        digest}."""

    @abstractmethod
    def send_also(self, study_uid: str, series: Mapping[str, Sequence[str]], why: str) -> None:
        """Jobs (limited to these series) for destinations routing did not pick."""


class State(Receptions, Studies, Deliveries, Holds, QueryIndex, SourceCursors, Commitments,
            Reporting, Prefetches, Nodes, Hl7Orders, ProcedureSteps, Corrections,
            GroupAssignments, Pseudonyms, RemoteAwaits):
    """The state of one spool (or of a cluster): every role."""

    #: write transactions so far (idle workers must not write: tests count them)
    write_transactions: int = 0
