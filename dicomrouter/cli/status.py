"""``dicomrouter status``, ``audit`` and ``retry``: the state, while serve runs. (They do not
import the spool: ``status`` is run in loops, and the spool brings the DICOM and S3 stacks.)"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
from typing import Any

import click

from .. import config as config_mod
from ..config import ConfigError
from ..config.prefetch import order_trigger_key
from ..hl7wire import describe_order
from ..processing.steps_view import study_steps
from ..state import JobState
from ..values import PRIORITIES
from .common import (
    config_option,
    load_config,
    open_state,
    size_text,
    spool_option,
    when,
)

RECENT_HOURS = 24  # status lists the studies delivered this recently by default
RECENT_LIMIT = 50
DEFAULT_LIMIT = 200  # studies listed; a spool of 20,000 is counted, not printed


def job_progress(job: dict[str, Any]) -> str:
    """``pacs: running 1200 of 3000`` (instances confirmed delivered there); a failed or dead
    job says why."""
    line = f"{job['destination']}: {job['state']} {job['delivered']} of {job['total']}"
    if job.get("missing"):
        line += (f", partial: {job['missing']} instance(s) missing (deleted from the spool "
                 "before the study was routed there)")
    if job["state"] in (JobState.FAILED, JobState.DEAD) and job.get("last_error"):
        line += f" ({job['attempts']} attempt(s)): {job['last_error']}"
    if job.get("priority", "routine") != "routine":
        line += f" [priority {job['priority']}]"
    if job["state"] == JobState.HELD:
        line += f" (held: 'dicomrouter release {job['study_uid']} --reason ...' delivers it)"
    return line


def breakers(state: Any) -> dict[str, dict[str, Any]]:
    """Each destination's circuit breaker as the running router(s) last recorded it
    (breaker.py): destination → its view, with ``node`` and ``open_on`` (the nodes where it
    is open; each node of a cluster has its own). Nodes that stopped are left out."""
    out: dict[str, dict[str, Any]] = {}
    for node in state.nodes():
        if not node["alive"]:
            continue
        for dest, view in (node["info"].get("breakers") or {}).items():
            entry = out.setdefault(dest, {"open_on": []})
            if view.get("state") == "open":
                entry["open_on"].append(node["node_id"])
            if len(entry) == 1 or view.get("state") == "open":
                entry.update(view, node=node["node_id"])
    return out


def breaker_text(view: dict[str, Any], cluster: bool = False) -> str:
    """``circuit breaker OPEN since 11:02: why; 3 failed probe(s) (C-ECHO), next at 11:04``."""
    where = f" on node(s) {', '.join(view.get('open_on') or [])}" if cluster else ""
    return (f"circuit breaker OPEN{where} since {when(view.get('since'))}: "
            f"{view.get('reason') or '?'}; {view.get('failed_probes', 0)} failed probe(s) "
            f"({view.get('probe', '?')}), next at {when(view.get('next_probe'))}; its jobs wait")


def group_lines(groups: dict[str, dict[str, Any]]) -> list[str]:
    """``groups:`` then per group its spread (studies per member) and each queued study's
    member."""
    out = ["groups (studies per member):"] if groups else []
    for name, spread in sorted(groups.items()):
        moved = f"; {spread['moved']} moved after a member's breaker opened" \
            if spread["moved"] else ""
        out.append(f"  {name:<16} " + ", ".join(
            f"{m} {n}" for m, n in sorted(spread["studies"].items())) + moved)
        out += [f"    {p['study_uid']} → {p['member']} ({p['state']})"
                for p in spread["pending"]]
    return out


def since_time(value: str) -> float:
    """``24h`` / ``7d`` (that long ago) or an ISO date or date-time → Unix time."""
    try:
        return time.time() - config_mod.parse_duration(value, "--since")
    except ConfigError:
        pass
    try:
        return dt.datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise click.BadParameter(f"expected a duration (24h, 7d) or a date (2026-11-24, "
                                 f"2026-11-24T08:00), got {value!r}",
                                 param_hint="'--since'") from None


def _outbox(data: dict[str, Any]) -> None:
    """MPPS forwarded (forward_mpps) and IAN sent (ian), per peer; what waits for a retry."""
    if not data["dimse_outbox"]:
        return
    click.echo("MPPS / IAN outbox:")
    for dest, counts in sorted(data["dimse_outbox"].items()):
        click.echo(f"  {dest:<16} " + "  ".join(f"{s} {counts.get(s, 0)}"
                                                for s in ("pending", "sent", "refused")))
    for m in data["dimse_outbox_waiting"]:
        click.echo(f"  {m['what']} → {m['destination']}: failed {m['attempts']} time(s), "
                   f"next attempt at {when(m['next_attempt'])}: {m['last_error']}")


@click.command()
@config_option
@spool_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--all", "show_all", is_flag=True, help="Include delivered studies already "
              "removed from the spool.")
@click.option("--study", default=None, help="The history of one study.")
@click.option("--limit", default=DEFAULT_LIMIT, show_default=True, type=click.IntRange(min=0),
              help="List the newest N studies (0: all of them); the counts cover them all.")
def status(config_path: str | None, spool: str | None, as_json: bool, show_all: bool,
           study: str | None, limit: int) -> None:
    """Studies in the spool, delivery queues and dead letters (works while serve runs)."""
    state, root = open_state(config_path, spool)
    if study:
        row = state.study(study)
        if row is None:
            raise click.ClickException(f"no study {study} in {root}")
        order = state.study_hl7_order(study)
        history = state.history(study)
        if order:  # its order's prefetch decisions (kept under order:<control id>, issue 27)
            history = sorted(history + state.history(order_trigger_key(order)),
                             key=lambda e: e[0])
        jobs = state.jobs(study_uids=[study])
        steps = study_steps(history, load_config(config_path).routes if spool is None else (),
                            jobs)
        if as_json:
            click.echo(json.dumps({"study": dataclasses.asdict(row), "history": history,
                                   "summary": state.study_rows(study_uid=study),
                                   "mpps": [dataclasses.asdict(m)
                                            for m in state.mpps_reports(study)],
                                   "jobs": jobs, "hl7_order": order,
                                   "processing": [s.as_dict() for s in steps]}, indent=2))
            return
        click.echo(f"study {study}: {row.state}, generation {row.generation}, patient "
                   f"{row.patient_id}, from {row.calling_ae}")
        by = next(iter(state.study_rows(study_uid=study)), {}).get("received_by") or {}
        if len(by) > 1 or (by and getattr(state, "leases", False)):
            click.echo("  received by " + ", ".join(f"{k} ({v} instance(s))"
                                                     for k, v in sorted(by.items())))
        if order:
            click.echo(f"  {describe_order(order)}")
        for j in jobs:
            click.echo(f"  {job_progress(j)}")
        for step in state.mpps_reports(study):
            click.echo(f"  {step}")
        incomplete = next(iter(state.study_rows(study_uid=study)), {}).get("incomplete")
        if incomplete:
            click.echo(f"  INCOMPLETE: {incomplete}")
        for ts, event in history:
            click.echo(f"  {when(ts)}  {event}")
        if steps:  # processing steps, step by step (issue 29)
            click.echo("processing:")
            for s in steps:
                click.echo(f"  {s.line()}")
        return
    data = state.summary(with_done=show_all, limit=limit)
    data["held"] = state.held_studies()
    data["breakers"] = breakers(state)
    data["groups"] = state.group_spreads()  # destination groups: studies per member
    if as_json:  # a sum over the whole ledger: only what the JSON carries pays for it
        data["ledger"] = state.ledger_stats()
    if not show_all:  # what a user who just sent studies looks for
        since = time.time() - RECENT_HOURS * 3600
        in_list = {s["study_uid"] for s in data["studies"]}
        recent = [s for s in state.recent_studies(RECENT_LIMIT, state="delivered", since=since)
                  if s["study_uid"] not in in_list]
        delivered_to: dict[str, list[str]] = {}
        for j in state.jobs(study_uids=[s["study_uid"] for s in recent]):
            if j["state"] == JobState.DELIVERED:
                delivered_to.setdefault(j["study_uid"], []).append(j["destination"])
        data["recently_delivered"] = [
            {"study_uid": s["study_uid"], "patient_id": s["patient_id"],
             "instances": s["instances"], "calling_ae": s["calling_ae"],
             "delivered_at": s["delivered_at"],
             "destinations": sorted(delivered_to.get(s["study_uid"], []))} for s in recent]
        data["delivered_earlier"] = state.count_studies("delivered", since)
    data["dimse_outbox"] = state.outbox_counts()  # forward_mpps, ian (issue 27)
    data["dimse_outbox_waiting"] = [m for m in state.outbox_rows(200)
                                    if m["state"] == "pending" and m["attempts"]]
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"spool {root}: {data['studies_total']} study(ies), "
               f"{size_text(data['spool_bytes'])}")
    click.echo("queues:")
    if not data["queues"]:
        click.echo("  (no delivery jobs yet)")
    windows = {}
    if spool is None:  # the configuration says which destinations have a delivery window
        windows = {n: d.schedule for n, d in load_config(config_path).destinations.items()
                   if d.schedule is not None}
    for dest, counts in sorted(data["queues"].items()):
        parts = "  ".join(f"{s} {counts.get(s, 0)}" for s in
                          ("pending", "running", "failed", "dead", "delivered"))
        parts += "".join(f"  {s} {counts[s]}" for s in ("held", "rejected") if counts.get(s))
        if by := data["by_priority"].get(dest):
            parts += "  (by priority: " + ", ".join(f"{p} {by[p]}" for p in PRIORITIES
                                                     if by.get(p)) + ")"
        held = [j for j in state.jobs("pending", dest) if not j["attempts"]
                and (j["next_attempt"] or 0) > time.time()]
        if held:
            parts += f"  ({len(held)} scheduled, the first until " \
                     f"{when(min(j['next_attempt'] for j in held))})"
        if (part := data["partial"].get(dest)) is not None:
            parts += f"  ({part['jobs']} partial: {part['missing']} instance(s) missing)"
        window = windows.get(dest)
        if window is not None and counts.get("pending") and not window.is_open(time.time()):
            parts += f"  (scheduled until {when(window.next_open(time.time()))}, " \
                     f"window {window.describe()})"
        if (breaker := data["breakers"].get(dest, {})).get("state") == "open":
            parts += f"  ({breaker_text(breaker, bool(data.get('cluster')))})"
        click.echo(f"  {dest:<16} {parts}")
    for line in group_lines(data["groups"]):
        click.echo(line)
    if data.get("sources"):
        click.echo("sources:")
        for src in data["sources"]:
            health = f"failing: {src['last_error']}" if src["last_error"] else "ok"
            click.echo(f"  {src['name']:<16} {health}; last poll {when(src['last_poll'])}, "
                       f"last success {when(src['last_success'])}; {src['studies_pulled']} "
                       f"study(ies), {src['instances_pulled']} instance(s) pulled")
    _outbox(data)
    if data["held"]:
        click.echo("held (a route with hold: true; 'dicomrouter release STUDY --reason ...' "
                   "delivers, 'dicomrouter reject' drops):")
        for h in data["held"]:
            click.echo(f"  {h['study_uid']}  patient {h['patient_id'] or '-'} → "
                       f"{', '.join(h['destinations'])}, held since {when(h['since'])}")
    if data["retrying"]:
        click.echo("retrying:")
        for j in data["retrying"]:
            click.echo(f"  {j['study_uid']} → {j['destination']}: failed {j['attempts']} "
                       f"time(s), next attempt at {when(j['next_attempt'])}: "
                       f"{j['last_error']}")
    if data["dead"]:
        click.echo("dead letters ('dicomrouter retry --dead' requeues them):")
        for j in data["dead"]:
            click.echo(f"  {j['study_uid']} → {j['destination']}: {j['attempts']} attempts, "
                       f"last error: {j['last_error']}")
    if data.get("cluster"):
        click.echo("nodes:")
        for n in data["nodes"]:
            info = n["info"]
            click.echo(f"  {n['node_id']:<16} {'alive' if n['alive'] else 'gone':<6} last "
                       f"heartbeat {when(n['heartbeat'])}, started {when(n['started'])}; "
                       f"{n['running_jobs']} job(s) running, {n['instances_in_spool']} "
                       f"instance(s) received in the spool; {', '.join(info.get('listeners', []))}"
                       f" (ack_after {info.get('ack_after', '?')})")
    recent = data.get("recently_delivered") or []
    if recent:
        click.echo(f"delivered in the last {RECENT_HOURS} h (newest first):")
        for s in recent:
            click.echo(f"  {s['study_uid']}  patient {s['patient_id'] or '-':<12} "
                       f"{s['instances']:>5} instance(s) from {s['calling_ae'] or '-'} → "
                       f"{', '.join(s['destinations']) or '-'} at {when(s['delivered_at'])}")
    if data.get("delivered_earlier"):
        click.echo(f"  ... and {data['delivered_earlier']} study(ies) delivered earlier "
                   "(status --all lists them)")
    click.echo("studies:" if show_all else "studies in the spool:")
    if not data["studies"]:
        click.echo("  (none)")
    elif data["studies_total"] > len(data["studies"]):
        click.echo(f"  ... {data['studies_total'] - len(data['studies'])} older study(ies) "
                   f"not listed (the newest {len(data['studies'])} follow; --limit 0 lists "
                   "them all)")
    jobs: dict[str, list[dict[str, Any]]] = {}
    for j in state.jobs(study_uids=[s["study_uid"] for s in data["studies"]]):
        jobs.setdefault(j["study_uid"], []).append(j)
    for s in data["studies"]:
        where = "in the spool" if s["in_spool"] else "received, deleted from the spool"
        n, size = (s["instances_in_spool"], s["bytes_in_spool"]) if s["in_spool"] else \
            (s["instances_received"], s["bytes_received"])
        click.echo(f"  {s['study_uid']}  {s['state']:<10} patient {s['patient_id'] or '-':<12}"
                   f" {n:>5} instance(s) {size_text(size):>9} {where}"
                   f"  from {s['calling_ae'] or '-'}  last received {when(s['last_received'])}"
                   + (f"  received by {', '.join(f'{k} ({v})' for k, v in by.items())}"
                      if data.get("cluster") and (by := s.get("received_by")) else "")
                   + (f"  {s['moved_out']} instance(s) moved to another study"
                      if s.get("moved_out") else "")
                   + (f"  {s['moved_in']} instance(s) moved here from another study"
                      if s.get("moved_in") else "")
                   + (f"  INCOMPLETE ({s['incomplete']})" if s.get("incomplete") else ""))
        for j in jobs.get(s["study_uid"], []):
            click.echo(f"      {job_progress(j)}")


@click.command()
@config_option
@spool_option
@click.option("--since", default="24h", show_default=True,
              help="A duration (24h, 7d) or an ISO date/date-time.")
@click.option("--study", default=None, help="Only this Study Instance UID.")
def audit(config_path: str | None, spool: str | None, since: str, study: str | None) -> None:
    """The audit trail as JSON lines: every study event (received from whom, routed where,
    delivered, failed, deleted, purged) since a time, oldest first."""
    start = since_time(since)
    state, _root = open_state(config_path, spool)
    for e in state.events_since(start, study):
        e["time"] = dt.datetime.fromtimestamp(e["ts"]).astimezone().isoformat(
            timespec="milliseconds")
        click.echo(json.dumps(e, ensure_ascii=False))


@click.command()
@config_option
@spool_option
@click.option("--dead", is_flag=True, help="Only dead-lettered jobs.")
@click.option("--study", default=None, help="Only this Study Instance UID.")
@click.option("--destination", default=None, help="Only this destination.")
def retry(config_path: str | None, spool: str | None, dead: bool, study: str | None,
          destination: str | None) -> None:
    """Requeue failed or dead deliveries now (the running router picks them up)."""
    state, _root = open_state(config_path, spool, readonly=False)
    if destination is not None:
        known = set(state.summary()["queues"])
        if spool is None:
            known |= set(load_config(config_path).destinations)
        if destination not in known:
            raise click.ClickException(f"no destination {destination!r} (known: "
                                       f"{', '.join(sorted(known)) or 'none'})")
    if study is not None and state.study(study) is None:
        raise click.ClickException(f"no study {study} in the state database")
    n = state.requeue(dead, study, destination)
    what = "dead" if dead else "failed or dead"
    click.echo(f"requeued {n} job(s)" if n else f"nothing to requeue: no {what} job"
               + (f" for {destination}" if destination else "")
               + (f" of study {study}" if study else ""))
