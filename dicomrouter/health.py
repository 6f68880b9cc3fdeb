"""What keeps the router from doing its job now: the answer of ``/ready`` (and of a load
balancer's health check), from the state, the spool's disk, the listeners and the sources."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from .config import Config
from .state import State


def spool_problems(root: Path, min_free: int) -> list[str]:
    problems = []
    if not os.access(root, os.W_OK):
        problems.append(f"spool {root} is not writable")
    try:
        if min_free and shutil.disk_usage(root).free < min_free:
            problems.append("less than min_free_disk free on the spool's disk")
    except OSError as exc:
        problems.append(f"spool {root}: {exc.strerror}")
    return problems


def source_problems(rows: list[dict[str, Any]],
                    intervals: dict[str, float]) -> dict[str, str]:
    """Sources failing, or not polling for three intervals (and a minute): name → why."""
    now = time.time()
    out = {}
    for r in rows:
        interval = intervals.get(r["name"])
        if interval is None:
            continue
        if r["last_error"]:
            out[r["name"]] = f"source {r['name']} failing: {r['last_error']}"
        elif not r["last_poll"] or now - r["last_poll"] > 3 * interval + 60:
            out[r["name"]] = (f"source {r['name']} has not polled for "
                              f"{now - (r['last_poll'] or 0):.0f} s")
    return out


def readiness(cfg: Config, state: State, spool: Any, listening: bool) -> dict[str, str]:
    """What keeps the router from doing its job now (empty: ready)."""
    problems: dict[str, str] = {}
    try:
        rows = state.source_rows()
    except Exception as exc:
        problems["state"] = f"state database: {type(exc).__name__}: {exc}"
        rows = []
    if not cfg.cluster and not os.access(cfg.state_db, os.W_OK):
        problems["state"] = f"state database {cfg.state_db} is not writable"
    if (why := spool.health()):
        problems["shared_spool"] = why
    for p in spool_problems(cfg.spool, cfg.limits.min_free_disk):
        problems["spool"] = p
    if not listening:
        problems["listener"] = "the DICOM listener is not started"
    polled = {n: s.interval for n, s in cfg.sources.items() if s.poll}  # not prefetch-only
    for name, p in source_problems(rows, polled).items():
        problems[f"source {name}"] = p
    return problems
