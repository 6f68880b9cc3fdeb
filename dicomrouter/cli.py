"""``dicomrouter`` command line: serve, send, echo, find, move, status, retry, purge, sample."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import click

from . import config as config_mod
from . import logsafe
from .config import Config, ConfigError, extras

log = logging.getLogger("dicomrouter")

config_option = click.option(
    "--config", "-c", "config_path", type=click.Path(dir_okay=False), default=None,
    help=f"Router configuration (YAML). Default: ${config_mod.CONFIG_ENV}, else the embedded "
         "defaults (DICOMROUTER on port 11112, every study to ./received).")


def _setup_logging(level: str, quiet_pynetdicom: bool = False) -> None:
    logging.basicConfig(level=getattr(logging, level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    logsafe.install()  # values from the wire never forge a log line
    # pynetdicom is chatty at INFO (every association, every C-STORE); keep its warnings, and in
    # the client commands not even those: our own error says the same, in plainer words.
    pnd = logging.CRITICAL if quiet_pynetdicom else logging.WARNING
    logging.getLogger("pynetdicom").setLevel(
        logging.DEBUG if os.environ.get("DICOMROUTER_DEBUG_PYNETDICOM") else pnd)
    # The HTTP stacks of the dicomweb and s3 destinations log every request and, at DEBUG,
    # every refused connection with its traceback; our job errors already say what failed.
    for name in logsafe.HTTP_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)


def _load_config(path: str | None, warn: bool = False, secrets: bool = False) -> Config:
    """The configuration, or one error line. ``secrets``: the destinations' secrets must be in
    the environment (``serve``); commands that read the state need none of them."""
    try:
        cfg = config_mod.load(path, secrets=secrets)
    except ConfigError as exc:
        where = path or os.environ.get(config_mod.CONFIG_ENV) or "configuration"
        raise click.ClickException(f"invalid configuration ({where}): {exc}") from None
    absent = extras.missing(cfg)
    if absent:
        raise click.ClickException("\n".join(absent))
    if warn:
        _warn_about(cfg)
    return cfg


def _warn_about(cfg: Config) -> None:
    """What a valid configuration does that its author probably did not mean."""
    if cfg.source == "embedded defaults":
        return
    file = Path(cfg.source)
    empty = file.is_file() and not file.read_text(encoding="utf-8", errors="replace").strip()
    if empty:
        click.echo(f"Warning: {cfg.source} is empty: no destinations and no routes, so every "
                   "study stays unrouted in the spool. Without any configuration file the "
                   "router uses its embedded defaults (every study to ./received).", err=True)
    elif not cfg.routes:
        click.echo(f"Warning: {cfg.source} has no routes: every study stays unrouted in the "
                   "spool (shown by 'dicomrouter status').", err=True)


def _ae(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from .cli_qr import _ae as check

    return check(ctx, param, value)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dicomrouter")
def main() -> None:
    """dicomrouter: receive DICOM studies, route them by rules, deliver them reliably."""


@main.command()
@config_option
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help="Override the configured port.")
@click.option("--check", is_flag=True, help="Validate the configuration and exit.")
def serve(config_path: str | None, port: int | None, check: bool) -> None:
    """Run the router: Storage SCP, study tracker and delivery workers."""
    cfg = _load_config(config_path, warn=True, secrets=True)
    if port is not None:
        cfg = config_mod.replace_port(cfg, port)
    from . import preflight

    errors, warnings = preflight.check(cfg)
    if check:
        for line in warnings:
            click.echo(f"Warning: {line}", err=True)
        if errors:
            raise click.ClickException("\n".join(errors))
        click.echo(f"configuration OK ({cfg.source}): {len(cfg.destinations)} destination(s), "
                   f"{len(cfg.routes)} route(s), {len(cfg.sources)} source(s)")
        return
    _setup_logging(cfg.log_level)
    for line in errors + warnings:  # a folder on a share may come back: deliveries retry
        log.warning("%s", line)
    from .app import Router

    log.info("dicomrouter starting with %s; spool %s; stable age %.1f s", cfg.source,
             cfg.spool, cfg.stable_age)
    from .app import ListenError
    from .state import StateUnavailable

    try:
        router = Router(cfg)
    except ListenError as exc:
        raise click.ClickException(str(exc.strerror)) from None
    except StateUnavailable as exc:
        raise click.ClickException(f"{exc} (state.dsn_env/dsn_file)") from None
    except OSError as exc:
        raise click.ClickException(f"cannot open the spool {cfg.spool}: {exc}") from None

    def _stop(signum: int, _frame: Any) -> None:
        log.info("signal %s received", signal.Signals(signum).name)
        router.request_stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        router.run_forever()
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {cfg.bind}:{cfg.port}: {exc}") from None


@contextlib.contextmanager
def _progress_of(items: list[Any], label: str) -> Iterator[Iterable[Any]]:
    """A progress bar on a terminal; elsewhere (a log, a pipe) the items alone: click writes
    a non-terminal's bar as its label without a newline, glued to the next output."""
    if not sys.stderr.isatty():
        yield items
        return
    with click.progressbar(items, label=label, file=sys.stderr,
                           item_show_func=lambda x: x[0].name if x else None) as bar:
        yield bar


def _collect(paths: tuple[str, ...]) -> tuple[list[tuple[Path, str, str]], list[Path]]:
    """Files under ``paths`` that are DICOM Part 10 files: (path, SOP class, transfer syntax)."""
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import read_file_meta_info

    found: list[tuple[Path, str, str]] = []
    skipped: list[Path] = []
    for p in paths:
        root = Path(p)
        files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
        for f in files:
            try:
                meta = read_file_meta_info(f)
                found.append((f, str(meta.MediaStorageSOPClassUID),
                              str(meta.TransferSyntaxUID)))
            except (InvalidDicomError, AttributeError, OSError, ValueError, EOFError) as exc:
                skipped.append(f)
                why = str(exc).replace("Use force=True to force reading.", "").strip()
                click.echo(f"warning: skipping {f}: not a DICOM Part 10 file"
                           + (f" ({why})" if why else ""), err=True)
    return found, skipped


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=config_mod.DEFAULT_PORT,
              show_default=True)
@click.option("--aet", default=config_mod.DEFAULT_AE_TITLE, show_default=True, callback=_ae,
              help="Called AE title (the receiver's).")
@click.option("--calling-aet", default="DICOMSEND", show_default=True, callback=_ae,
              help="Our AE title.")
@click.option("--max-pdu", type=int, default=0, help="Maximum PDU size to receive (0: any).")
def send(paths: tuple[str, ...], host: str, port: int, aet: str, calling_aet: str,
         max_pdu: int) -> None:
    """Send DICOM files and folders (recursively) with C-STORE, over one association."""
    from .destinations import DeliveryError, InstanceRejected
    from .destinations.base import PermanentFailure
    from .destinations.dicom import open_association
    from .destinations.store import Peer, batches

    _setup_logging("WARNING", quiet_pynetdicom=True)
    files, skipped = _collect(paths)
    if not files:
        raise click.ClickException("no DICOM files found")
    peer = Peer(aet, host, port, calling_aet, max_pdu)
    failed: list[str] = []
    sent = 0
    started = time.monotonic()
    for group in batches([(c, t) for _f, c, t in files]):
        chunk = [files[i] for i in group]
        try:
            assoc = open_association(peer, {(c, t) for _f, c, t in chunk})
        except PermanentFailure as exc:  # its advice is a destination's: say this command's
            raise click.ClickException(
                f"{exc.reason}: the peer does not accept the calling AE title {calling_aet} or "
                f"the called AE title {aet}; give ones it accepts with --calling-aet / --aet "
                "(a router refuses calling AE titles not in its allowed_calling_aes)") from None
        except DeliveryError as exc:
            raise click.ClickException(str(exc)) from None
        try:
            with _progress_of(chunk, f"C-STORE to {peer}") as bar:
                for f, sop_class, ts in bar:
                    try:
                        assoc.store(f, sop_class, ts)
                        sent += 1
                    except InstanceRejected as exc:
                        failed.append(f"{f}: {exc}")
                    except DeliveryError as exc:
                        failed.append(f"{f}: {exc}")
                        break
        finally:
            assoc.release()
    took = time.monotonic() - started
    for line in failed:
        click.echo(f"failed: {line}", err=True)
    rate = sent / took if took > 0 else 0.0
    click.echo(f"sent {sent} of {len(files)} instance(s) to {peer} in {took:.2f} s "
               f"({rate:.0f}/s); {len(failed)} failed; {len(skipped)} non-DICOM file(s) skipped")
    if failed or sent < len(files):
        sys.exit(1)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=config_mod.DEFAULT_PORT,
              show_default=True)
@click.option("--aet", default=config_mod.DEFAULT_AE_TITLE, show_default=True, callback=_ae,
              help="Called AE title.")
@click.option("--calling-aet", default="DICOMSEND", show_default=True, callback=_ae)
@click.option("--timeout", type=click.FloatRange(0.1), default=10.0, show_default=True)
def echo(host: str, port: int, aet: str, calling_aet: str, timeout: float) -> None:
    """C-ECHO a DICOM peer (is it up, does it accept our AE title?)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from .netutil import association_failure, enable_tcp_nodelay

    _setup_logging("WARNING", quiet_pynetdicom=True)
    enable_tcp_nodelay()
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    started = time.monotonic()
    try:
        assoc = ae.associate(host, port, ae_title=aet)
    except OSError as exc:  # an unknown host name, no route
        raise click.ClickException(f"C-ECHO to {aet}@{host}:{port}: cannot reach {host}: "
                                   f"{exc.strerror or exc}") from None
    if not assoc.is_established:
        why = association_failure(assoc, host, port)
        raise click.ClickException(f"C-ECHO to {aet}@{host}:{port}: {why}")
    try:
        rsp = assoc.send_c_echo()
    finally:
        assoc.release()
    ms = (time.monotonic() - started) * 1000
    if not rsp or "Status" not in rsp:
        raise click.ClickException(f"C-ECHO to {aet}@{host}:{port}: no response")
    if rsp.Status != 0:
        raise click.ClickException(f"C-ECHO to {aet}@{host}:{port}: status 0x{rsp.Status:04X}")
    click.echo(f"C-ECHO to {aet}@{host}:{port}: success in {ms:.0f} ms")


def _state_for(config_path: str | None, spool: str | None, readonly: bool = True):  # type: ignore[no-untyped-def]
    from .state import StateUnavailable, open_state, state_for

    if spool is None:
        cfg = _load_config(config_path)
        if cfg.cluster:  # the shared PostgreSQL: every node's view is the same
            # fail fast, in one line: psycopg's pool logs each failed connection attempt
            logging.getLogger("psycopg").setLevel(logging.CRITICAL)
            try:
                state = state_for(cfg, readonly=readonly,
                                  connect_timeout=min(CLI_DB_TIMEOUT, cfg.state.connect_timeout))
                if readonly and not state.schema_version():  # type: ignore[attr-defined]
                    raise click.ClickException("no router has run on this PostgreSQL database "
                                               "yet (its schema is made at the first start)")
                return state, cfg.spool
            except StateUnavailable as exc:
                raise click.ClickException(str(exc)) from None
    root = Path(spool) if spool else cfg.spool
    db = root / "state.db"
    if not db.exists():
        raise click.ClickException(f"no state database at {db} (has the router run with this "
                                   "spool? use --config or --spool)")
    return open_state(db, readonly=readonly), root


CLI_DB_TIMEOUT = 3.0  # a command waits this long for PostgreSQL, not the server's timeout

spool_option = click.option("--spool", type=click.Path(file_okay=False), default=None,
                            help="The spool directory (instead of reading it from the config).")


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


@main.command()
@config_option
@spool_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--all", "show_all", is_flag=True, help="Include delivered studies already "
              "removed from the spool.")
@click.option("--study", default=None, help="The history of one study.")
def status(config_path: str | None, spool: str | None, as_json: bool, show_all: bool,
           study: str | None) -> None:
    """Studies in the spool, delivery queues and dead letters (works while serve runs)."""
    state, root = _state_for(config_path, spool)
    if study:
        row = state.study(study)
        if row is None:
            raise click.ClickException(f"no study {study} in {root}")
        history = state.history(study)
        if as_json:
            click.echo(json.dumps({"study": dataclasses.asdict(row), "history": history,
                                   "summary": state.study_rows(study_uid=study),
                                   "jobs": state.jobs(study_uids=[study])}, indent=2))
            return
        click.echo(f"study {study}: {row.state}, generation {row.generation}, patient "
                   f"{row.patient_id}, from {row.calling_ae}")
        by = next(iter(state.study_rows(study_uid=study)), {}).get("received_by") or {}
        if len(by) > 1 or (by and getattr(state, "leases", False)):
            click.echo("  received by " + ", ".join(f"{k} ({v} instance(s))"
                                                     for k, v in sorted(by.items())))
        for j in state.jobs(study_uids=[study]):
            click.echo(f"  {_progress(j)}")
        for ts, event in history:
            click.echo(f"  {_when(ts)}  {event}")
        return
    data = state.summary(with_done=show_all)
    data["ledger"] = state.ledger_stats()
    if not show_all:  # what a user who just sent studies looks for
        since = time.time() - RECENT_HOURS * 3600
        in_list = {s["study_uid"] for s in data["studies"]}
        recent = [s for s in state.recent_studies(RECENT_LIMIT, state="delivered", since=since)
                  if s["study_uid"] not in in_list]
        delivered_to: dict[str, list[str]] = {}
        for j in state.jobs(study_uids=[s["study_uid"] for s in recent]):
            if j["state"] == "delivered":
                delivered_to.setdefault(j["study_uid"], []).append(j["destination"])
        data["recently_delivered"] = [
            {"study_uid": s["study_uid"], "patient_id": s["patient_id"],
             "instances": s["instances"], "calling_ae": s["calling_ae"],
             "delivered_at": s["delivered_at"],
             "destinations": sorted(delivered_to.get(s["study_uid"], []))} for s in recent]
        data["delivered_earlier"] = state.count_studies("delivered", since)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"spool {root}: {len(data['studies'])} study(ies), {_size(data['spool_bytes'])}")
    click.echo("queues:")
    if not data["queues"]:
        click.echo("  (no delivery jobs yet)")
    windows = {}
    if spool is None:  # the configuration says which destinations have a delivery window
        windows = {n: d.schedule for n, d in _load_config(config_path).destinations.items()
                   if d.schedule is not None}
    for dest, counts in sorted(data["queues"].items()):
        parts = "  ".join(f"{s} {counts.get(s, 0)}" for s in
                          ("pending", "running", "failed", "dead", "delivered"))
        held = [j for j in state.jobs("pending", dest) if not j["attempts"]
                and (j["next_attempt"] or 0) > time.time()]
        if held:
            parts += f"  ({len(held)} scheduled, the first until " \
                     f"{_when(min(j['next_attempt'] for j in held))})"
        if (part := data["partial"].get(dest)) is not None:
            parts += f"  ({part['jobs']} partial: {part['missing']} instance(s) missing)"
        window = windows.get(dest)
        if window is not None and counts.get("pending") and not window.is_open(time.time()):
            parts += f"  (scheduled until {_when(window.next_open(time.time()))}, " \
                     f"window {window.describe()})"
        click.echo(f"  {dest:<16} {parts}")
    if data.get("sources"):
        click.echo("sources:")
        for src in data["sources"]:
            health = f"failing: {src['last_error']}" if src["last_error"] else "ok"
            click.echo(f"  {src['name']:<16} {health}; last poll {_when(src['last_poll'])}, "
                       f"last success {_when(src['last_success'])}; {src['studies_pulled']} "
                       f"study(ies), {src['instances_pulled']} instance(s) pulled")
    if data["retrying"]:
        click.echo("retrying:")
        for j in data["retrying"]:
            click.echo(f"  {j['study_uid']} → {j['destination']}: failed {j['attempts']} "
                       f"time(s), next attempt at {_when(j['next_attempt'])}: "
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
                       f"heartbeat {_when(n['heartbeat'])}, started {_when(n['started'])}; "
                       f"{n['running_jobs']} job(s) running, {n['instances_in_spool']} "
                       f"instance(s) received in the spool; {', '.join(info.get('listeners', []))}"
                       f" (ack_after {info.get('ack_after', '?')})")
    recent = data.get("recently_delivered") or []
    if recent:
        click.echo(f"delivered in the last {RECENT_HOURS} h (newest first):")
        for s in recent:
            click.echo(f"  {s['study_uid']}  patient {s['patient_id'] or '-':<12} "
                       f"{s['instances']:>5} instance(s) from {s['calling_ae'] or '-'} → "
                       f"{', '.join(s['destinations']) or '-'} at {_when(s['delivered_at'])}")
    if data.get("delivered_earlier"):
        click.echo(f"  ... and {data['delivered_earlier']} study(ies) delivered earlier "
                   "(status --all lists them)")
    click.echo("studies:" if show_all else "studies in the spool:")
    if not data["studies"]:
        click.echo("  (none)")
    jobs: dict[str, list[dict[str, Any]]] = {}
    for j in state.jobs(study_uids=[s["study_uid"] for s in data["studies"]]):
        jobs.setdefault(j["study_uid"], []).append(j)
    for s in data["studies"]:
        where = "in the spool" if s["in_spool"] else "received, deleted from the spool"
        n, size = (s["instances_in_spool"], s["bytes_in_spool"]) if s["in_spool"] else \
            (s["instances_received"], s["bytes_received"])
        click.echo(f"  {s['study_uid']}  {s['state']:<10} patient {s['patient_id'] or '-':<12}"
                   f" {n:>5} instance(s) {_size(size):>9} {where}"
                   f"  from {s['calling_ae'] or '-'}  last received {_when(s['last_received'])}"
                   + (f"  received by {', '.join(f'{k} ({v})' for k, v in by.items())}"
                      if data.get("cluster") and (by := s.get("received_by")) else "")
                   + (f"  {s['moved_out']} instance(s) moved to another study"
                      if s.get("moved_out") else "")
                   + (f"  {s['moved_in']} instance(s) moved here from another study"
                      if s.get("moved_in") else ""))
        for j in jobs.get(s["study_uid"], []):
            click.echo(f"      {_progress(j)}")


RECENT_HOURS = 24  # status lists the studies delivered this recently by default
RECENT_LIMIT = 50


def _progress(job: dict[str, Any]) -> str:
    """``pacs: running 1200 of 3000`` (instances confirmed delivered there); a failed or dead
    job says why."""
    line = f"{job['destination']}: {job['state']} {job['delivered']} of {job['total']}"
    if job.get("missing"):
        line += (f", partial: {job['missing']} instance(s) missing (deleted from the spool "
                 "before the study was routed there)")
    if job["state"] in ("failed", "dead") and job.get("last_error"):
        line += f" ({job['attempts']} attempt(s)): {job['last_error']}"
    return line


def _since(value: str) -> float:
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


@main.command()
@config_option
@spool_option
@click.option("--since", default="24h", show_default=True,
              help="A duration (24h, 7d) or an ISO date/date-time.")
@click.option("--study", default=None, help="Only this Study Instance UID.")
def audit(config_path: str | None, spool: str | None, since: str, study: str | None) -> None:
    """The audit trail as JSON lines: every study event (received from whom, routed where,
    delivered, failed, deleted, purged) since a time, oldest first."""
    start = _since(since)
    state, _root = _state_for(config_path, spool)
    for e in state.events_since(start, study):
        e["time"] = dt.datetime.fromtimestamp(e["ts"]).astimezone().isoformat(
            timespec="milliseconds")
        click.echo(json.dumps(e, ensure_ascii=False))


@main.command()
@config_option
@spool_option
@click.option("--dead", is_flag=True, help="Only dead-lettered jobs.")
@click.option("--study", default=None, help="Only this Study Instance UID.")
@click.option("--destination", default=None, help="Only this destination.")
def retry(config_path: str | None, spool: str | None, dead: bool, study: str | None,
          destination: str | None) -> None:
    """Requeue failed or dead deliveries now (the running router picks them up)."""
    state, _root = _state_for(config_path, spool, readonly=False)
    if destination is not None:
        known = set(state.summary()["queues"])
        if spool is None:
            known |= set(_load_config(config_path).destinations)
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


@main.command()
@config_option
@spool_option
@click.option("--study", required=True, help="Study Instance UID to remove.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def purge(config_path: str | None, spool: str | None, study: str, yes: bool) -> None:
    """Remove a study from the spool and the state database, on purpose."""
    from .spool import Spool, spool_for

    state, root = _state_for(config_path, spool, readonly=False)
    if state.study(study) is None:
        raise click.ClickException(f"no study {study} in {root}")
    if not yes:
        click.confirm(f"remove study {study} and its files from {root}?", abort=True)
    cfg = _load_config(config_path) if spool is None else None
    store = spool_for(cfg, state) if cfg is not None and cfg.shared_spool else Spool(root, state)
    freed = store.purge(study)
    click.echo(f"purged study {study} ({_size(freed)} freed)")


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--studies", type=click.IntRange(1, 65535), default=1, show_default=True)
@click.option("--series", type=click.IntRange(1, 65535), default=2, show_default=True)
@click.option("--instances", type=click.IntRange(1, 65535), default=3, show_default=True,
              help="Instances per series.")
@click.option("--modality", default="CT", show_default=True)
@click.option("--rows", type=click.IntRange(1, 65535), default=64, show_default=True)
@click.option("--cols", type=click.IntRange(1, 65535), default=64, show_default=True)
@click.option("--frames", type=click.IntRange(1, 65535), default=1, show_default=True)
@click.option("--transfer-syntax", default="explicit", show_default=True,
              help="implicit, explicit, deflated or rle.")
@click.option("--patient-id", default=None)
@click.option("--seed", type=int, default=None)
def sample(out_dir: str, studies: int, series: int, instances: int, modality: str, rows: int,
           cols: int, frames: int, transfer_syntax: str, patient_id: str | None,
           seed: int | None) -> None:
    """Generate synthetic studies (N studies × M series × K instances) for tests and demos."""
    from . import sample as sample_mod

    if transfer_syntax not in sample_mod.TRANSFER_SYNTAXES:
        raise click.BadParameter(f"one of {', '.join(sample_mod.TRANSFER_SYNTAXES)}",
                                 param_hint="--transfer-syntax")
    files = sample_mod.generate(Path(out_dir), studies=studies, series=series,
                                instances=instances, modality=modality, rows=rows, cols=cols,
                                frames=frames,
                                transfer_syntax=sample_mod.TRANSFER_SYNTAXES[transfer_syntax],
                                patient_id=patient_id, seed=seed)
    total = sum(f.stat().st_size for f in files)
    click.echo(f"wrote {len(files)} file(s), {_size(total)}, under {out_dir}")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
              add_help_option=False)
@click.pass_context
def bench(ctx: click.Context) -> None:
    """The benchmark against DCMTK storescp and Orthanc (docs/performance.md); --help for its
    options. It lives in the dicomrouter_bench package, installed beside the router."""
    try:
        from dicomrouter_bench.cli import bench as command  # not the runtime: optional
    except ImportError as exc:
        raise click.ClickException(f"the benchmark is not installed ({exc}): install the "
                                   "project from its repository (pip install .)") from None
    command.main(args=ctx.args, prog_name="dicomrouter bench", standalone_mode=True)

if __name__ == "__main__":
    main()


@main.command()
@click.argument("paths", nargs=-1, type=click.Path(exists=True))
@click.option("--study", default=None, help="A study in the spool instead of files.")
@config_option
@spool_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def explain(paths: tuple[str, ...], study: str | None, config_path: str | None,
            spool: str | None, as_json: bool) -> None:
    """Dry-run the routing table on files or a spooled study: every route, matched or not and
    why. With --config (and --spool), try a candidate table on what the spool holds."""
    from . import explain as ex

    if bool(paths) == bool(study):
        raise click.UsageError("give files/folders or --study UID (one of them)")
    cfg = _load_config(config_path)
    results = []
    if study:
        from .spool import Spool, spool_for

        state, root = _state_for(config_path, spool)
        reader = Spool(Path(root), state) if spool else spool_for(cfg, state)
        found = ex.explain_spooled(cfg, state, reader, study)
        if found is None:
            raise click.ClickException(f"no study {study} in {root}")
        results.append(found)
    else:
        studies, skipped = ex.instances_from_files(paths)
        for f in skipped:
            click.echo(f"Warning: {f}: not a DICOM file, skipped", err=True)
        if not studies:
            raise click.ClickException("no DICOM files found")
        for uid, insts in studies.items():
            results.append(ex.as_dict(uid, insts, ex.explain(cfg, insts, ex.open_file), cfg))
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    click.echo(f"routing table: {cfg.source}")
    for r in results:
        click.echo(ex.render(r))


def _register() -> None:
    from .cli_qr import find_command, move_command

    main.add_command(find_command)
    main.add_command(move_command)


_register()
