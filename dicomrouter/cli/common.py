"""What the commands share: the config and spool options, logging, loading the configuration
(one line on error), opening the state, AE title checks, formatting."""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
from pathlib import Path

import click

from .. import config as config_mod
from .. import logsafe
from ..config import Config, ConfigError, extras
from ..state import StateUnavailable, state_for
from ..state import open_state as open_sqlite_state

log = logging.getLogger("dicomrouter")


config_option = click.option(
    "--config", "-c", "config_path", type=click.Path(dir_okay=False), default=None,
    help=f"Router configuration (YAML). Default: ${config_mod.CONFIG_ENV}, else the embedded "
         "defaults (DICOMROUTER on port 11112, every study to ./received).")


def setup_logging(level: str, quiet_pynetdicom: bool = False) -> None:
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


def load_config(path: str | None, warn: bool = False, secrets: bool = False) -> Config:
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
        warn_about(cfg)
    return cfg


def warn_about(cfg: Config) -> None:
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


def open_state(config_path: str | None, spool: str | None, readonly: bool = True):  # type: ignore[no-untyped-def]
    if spool is None:
        cfg = load_config(config_path)
        if cfg.cluster:  # the shared PostgreSQL: every node's view is the same
            # fail fast, in one line: psycopg's pool logs each failed connection attempt
            logging.getLogger("psycopg").setLevel(logging.CRITICAL)
            try:
                state = state_for(cfg, readonly=readonly,
                                  connect_timeout=min(CLI_DB_TIMEOUT, cfg.state.connect_timeout))
                if readonly and not state.schema_version():
                    raise click.ClickException("no router has run on this PostgreSQL database "
                                               "yet (its schema is made at the first start)")
                if readonly and state.schema_behind():
                    raise click.ClickException(OLDER_SCHEMA)
                return state, cfg.spool
            except StateUnavailable as exc:
                raise click.ClickException(str(exc)) from None
    root = Path(spool) if spool else cfg.spool
    db = root / "state.db"
    if not db.exists():
        raise click.ClickException(f"no state database at {db} (has the router run with this "
                                   "spool? use --config or --spool)")
    try:
        state = open_sqlite_state(db, readonly=readonly)
        if readonly and state.schema_behind():  # the router migrates it when it opens it
            state.close()
            raise click.ClickException(OLDER_SCHEMA)
    except StateUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    return state, root


#: a read-only command on a state database the router (of this version) has not migrated yet
OLDER_SCHEMA = ("the state database is from an older version; start the router once to "
                "upgrade it")
CLI_DB_TIMEOUT = 3.0  # a command waits this long for PostgreSQL, not the server's timeout


spool_option = click.option("--spool", type=click.Path(file_okay=False), default=None,
                            help="The spool directory (instead of reading it from the config).")


def when(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def size_text(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def check_ae(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return value
    if not 0 < len(value.strip()) <= 16 or "\\" in value or not value.isascii():
        raise click.BadParameter(f"an AE title is 1-16 ASCII characters, got {value!r}")
    return value.strip()
