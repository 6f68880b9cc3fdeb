"""``dicomrouter explain``: a dry run of the routing table on files or on a spooled study.

For every route: matched or not and the condition that decided, the destinations, and the
rules that apply around it (completion, first-match ``stop``, ``fallback``). With ``--config``
a candidate routing table is tried against what the spool holds (a shadow run) before it is
deployed. Nothing is sent, nothing in the spool or the state database changes.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

from .coerce import specs as coerce_specs
from .config import Config
from .config.prefetch import order_trigger_key
from .dicomfile import UnreadableDataset, identify
from .hl7wire import describe_order
from .priority import placement
from .routing import Decision, route
from .sources import source_names
from .spool import Spool
from .state import Instance, State
from .values import PRIORITIES


def instances_from_files(paths: Iterable[str]) -> tuple[dict[str, list[Instance]], list[str]]:
    """Study UID → instances for the DICOM files under ``paths``; and the files skipped."""
    studies: dict[str, list[Instance]] = {}
    skipped: list[str] = []
    for root in paths:
        p = Path(root)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            try:
                tags, tsuid = identify(f)
            except UnreadableDataset:
                skipped.append(str(f))
                continue
            inst = Instance(tags["SOPInstanceUID"], tags["StudyInstanceUID"],
                            tags.get("SeriesInstanceUID", ""), tags.get("SOPClassUID", ""),
                            tsuid, str(f), f.stat().st_size, "", "", tags)
            studies.setdefault(inst.study_uid, []).append(inst)
    return studies, skipped


def open_file(inst: Instance) -> BinaryIO:
    return open(inst.key, "rb")  # noqa: SIM115 - the caller closes it


def explain(cfg: Config, instances: list[Instance], opener: Any,
            orders: Any = None) -> Decision:
    """``orders``: ``State.hl7_order``, for the ``Order*`` keys of the HL7 order."""
    return route(cfg.routes, instances, opener, source_names(cfg), orders=orders)


def as_dict(study_uid: str, instances: list[Instance], decision: Decision,
            cfg: Config) -> dict[str, Any]:
    modalities = sorted({i.tags.get("Modality", "") for i in instances} - {""})
    placed = placement(cfg.routes, decision.routes, decision.destinations)
    return {
        "study_uid": study_uid,
        "instances": len(instances),
        "series": len({i.series_uid for i in instances}),
        "modalities": modalities,
        "calling_aes": sorted({i.calling_ae for i in instances} - {""}),
        "routes": [r.as_dict() for r in decision.explanation],
        "destinations": list(decision.destinations),
        "transforms": {d: [op.describe() for op in _ops(cfg, decision, d)]
                       for d in decision.destinations if _ops(cfg, decision, d)},
        "coerce": {d: [f"{where}: {spec.describe()}" for where, spec in _coerce(cfg, decision, d)]
                   for d in decision.destinations if _coerce(cfg, decision, d)},
        "schedules": {d: cfg.destinations[d].schedule.describe()
                      for d in decision.destinations
                      if d in cfg.destinations and cfg.destinations[d].schedule is not None},
        "priorities": {d: PRIORITIES[placed.priority(d)] for d in decision.destinations},
        "held": sorted(placed.held),
        "completion": f"stable_age {cfg.stable_age:g} s after the last instance" + "".join(
            f"; route {r.name!r}: {r.stable_age:g} s" for r in cfg.routes
            if r.stable_age is not None and r.name in decision.routes),
    }


def _ops(cfg: Config, decision: Decision, destination: str) -> list[Any]:
    ops: list[Any] = []
    for r in cfg.routes:
        if r.name in decision.routes and destination in r.to:
            ops += r.transforms
    if destination in cfg.destinations:
        ops += cfg.destinations[destination].transforms
    return ops


def _coerce(cfg: Config, decision: Decision, destination: str) -> list[tuple[str, Any]]:
    """The ``coerce`` blocks that apply to ``destination`` (coerce.Coercer.specs)."""
    if destination not in cfg.destinations:
        return []
    return coerce_specs(cfg, decision.routes, destination)


def render(d: dict[str, Any]) -> str:
    lines = [f"study {d['study_uid']}: {d['instances']} instance(s) in {d['series']} "
             f"series, {', '.join(d['modalities']) or 'no modality'}"
             + (f", from {', '.join(d['calling_aes'])}" if d["calling_aes"] else "")]
    for r in d["routes"]:
        flags = "".join([" [stop]" if r["stop"] else "", " [fallback]" if r["fallback"] else ""])
        if r["matched"]:
            state = "MATCHED"
        elif r["skipped"]:
            state = f"skipped ({r['skipped']})"
        else:
            state = "not matched"
        lines.append(f"  route {r['name']!r}{flags} → {', '.join(r['to'])}: {state}")
        lines.append(f"      {r['why']}")
    lines.append(f"  destinations: {', '.join(d['destinations']) or 'none (kept as unrouted)'}")
    for dest, ops in d["transforms"].items():
        lines.append(f"  transforms for {dest}: {'; '.join(ops)}")
    for dest, coercions in d.get("coerce", {}).items():
        for c in coercions:
            lines.append(f"  before the transforms for {dest}: {c}")
    for line in d.get("coerced", []):
        lines.append(f"  done: {line}")
    for line in d.get("corrections", []):
        lines.append(f"  correction: {line}")
    for dest, window in d["schedules"].items():
        lines.append(f"  {dest} delivers only {window}")
    urgent = [f"{dest} {p}" for dest, p in d.get("priorities", {}).items() if p != "routine"]
    if urgent:
        lines.append(f"  priority: {', '.join(urgent)}")
    if d.get("held"):
        lines.append(f"  held for {', '.join(d['held'])} (hold: true): waits for "
                     "'dicomrouter release' or 'reject'")
    if d.get("hl7_order"):
        lines.append(f"  {describe_order(d['hl7_order'])}")
    lines.append(f"  completion: {d['completion']}")
    pf = d.get("prefetch") or {}
    if pf.get("brought_by"):
        b = pf["brought_by"]
        lines.append(f"  prefetch: a prior, brought by rule {b['rule']!r} for {b['trigger_key']}"
                     " (routing key Prefetch: true, PrefetchRule: " + repr(b["rule"]) + ")")
    for r in pf.get("runs", []):
        lines.append(f"  prefetch rule {r['rule']!r} triggered: {r['state']}"
                     + (f", {r['outcome']}" if r["outcome"] else "")
                     + (f" (last error: {r['last_error']})" if r["last_error"] else ""))
    for text in pf.get("decisions", []):
        lines.append(f"    {text}")
    return "\n".join(lines)


def explain_spooled(cfg: Config, state: State, spool: Spool,
                    study_uid: str) -> dict[str, Any] | None:
    """The routing table on a study the spool holds (read through ``Spool.open``: a key is an
    object key in cluster mode, not a path under the spool's root)."""
    instances = state.instances(study_uid, present_only=False)
    if not instances:
        return None
    out = as_dict(study_uid, instances, explain(cfg, instances, spool.open,
                                                state.hl7_order), cfg)
    # what coerce changed (or why it did not), as the study's history recorded it
    out["coerced"] = [event for _ts, event in state.history(study_uid)
                      if event.startswith("coerce for ")]
    # corrections that followed the ledger (IOCM rejection notes, corrected instances)
    out["corrections"] = [event for _ts, event in state.history(study_uid)
                          if event.startswith(("rejection note ", "corrected instance "))]
    out["hl7_order"] = state.study_hl7_order(study_uid)  # the expected study (issue 27)
    out["prefetch"] = prefetch_story(state, study_uid, out["hl7_order"])
    steps = [str(step) for step in state.mpps_reports(study_uid)]
    if steps:  # a COMPLETED one that lists them all completes the study (completion/mpps.py)
        out["mpps"] = steps
        out["completion"] += "; or when a COMPLETED MPPS's instances are all in: " + \
            "; ".join(steps)
    return out


def prefetch_story(state: State, study_uid: str,
                   order: dict[str, Any] | None = None) -> dict[str, Any]:
    """Prior prefetch around a study: the rule and trigger that brought it (a prior), the
    runs it or its HL7 ``order`` triggered with their state, and every decision from its
    history (an order without a Study Instance UID keeps them under its trigger key)."""
    prior = state.prefetch_prior(study_uid)
    by_order = order_trigger_key(order) if order else ""
    runs = [{k: r[k] for k in ("rule", "trigger_key", "state", "attempts", "outcome",
                               "last_error")}
            for r in state.prefetch_runs(study_uid, (by_order,) if by_order else ())]
    events = state.history(study_uid) + (state.history(by_order) if by_order else [])
    decisions = [text for _ts, text in sorted(events, key=lambda e: e[0])
                 if text.startswith("prefetch rule ")]
    return {"brought_by": prior, "runs": runs, "decisions": decisions}
