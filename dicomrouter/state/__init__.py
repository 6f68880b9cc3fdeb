"""State of a spool behind one interface (``base.State``); SQLite is the embedded default."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import (
    Instance,
    Job,
    JobState,
    Placement,
    Reception,
    Recorded,
    SourceStudy,
    StateUnavailable,
    Study,
    StudyState,
    priority_name,
)
from .postgres import PostgresState
from .roles import State
from .roles_mpps import Mpps, Outgoing
from .sqlite import SQLiteState

#: what a state call may raise that is not a bug: ``StateUnavailable`` (both backends translate
#: their own errors for a database out of reach, locked, full or broken into it), an OSError
#: like it. Callers that must go on (the tracker, the delivery workers) catch these and log one
#: line.
STATE_ERRORS: tuple[type[BaseException], ...] = (OSError,)


def state_for(cfg: Any, readonly: bool = False, connect_timeout: float | None = None) -> State:
    """The state a configuration names: SQLite in its spool, or the shared PostgreSQL
    (``connect_timeout`` overrides the configured one: a CLI command fails fast)."""
    if cfg.state.type == "postgresql":
        return PostgresState(cfg.state.dsn, cfg.node_id, lock_dir=None if readonly else
                             cfg.spool, lease=cfg.state.lease, pool_size=cfg.state.pool_size,
                             connect_timeout=connect_timeout or cfg.state.connect_timeout,
                             readonly=readonly)
    state = open_state(cfg.state_db, readonly=readonly)
    state.node_id = cfg.node_id
    return state


def open_state(path: Path, readonly: bool = False) -> State:
    """The state database of a spool (SQLite, WAL)."""
    return SQLiteState(path, readonly=readonly)


__all__ = ["STATE_ERRORS", "Instance", "Job", "JobState", "Mpps", "Outgoing", "Placement",
           "Reception", "Recorded", "SourceStudy", "State", "StateUnavailable", "Study",
           "StudyState", "open_state", "priority_name", "state_for"]
