"""State of a spool behind one interface (``base.State``); SQLite is the embedded default."""

from __future__ import annotations

from pathlib import Path

from .base import Instance, Job, State, Study


def open_state(path: Path, readonly: bool = False) -> State:
    """The state database of a spool (SQLite, WAL)."""
    from .sqlite import SQLiteState

    return SQLiteState(path, readonly=readonly)


__all__ = ["Instance", "Job", "State", "Study", "open_state"]
