"""``dicomrouter release`` and ``reject``: an operator's decision on a study a route holds
(``hold: true``), recorded in the study's history (the audit trail) with who, when and why.
The running router sees a release within a second (its idle workers read the jobs)."""

from __future__ import annotations

import getpass

import click

from .common import config_option, open_state, spool_option


def operator() -> str:
    """Who runs the command: the OS user."""
    try:
        return f"{getpass.getuser()} (command line)"
    except (OSError, KeyError):
        return "unknown user (command line)"


def _decide(config_path: str | None, spool: str | None, study: str, reason: str,
            release: bool) -> None:
    if not reason.strip():
        raise click.BadParameter("say why (it goes into the audit trail)", param_hint="'--reason'")
    state, root = open_state(config_path, spool, readonly=False)
    if state.study(study) is None:
        raise click.ClickException(f"no study {study} in {root}")
    decide = state.release_study if release else state.reject_study
    dests = decide(study, operator(), reason.strip())
    if not dests:
        raise click.ClickException(f"study {study} has no held delivery (nothing to "
                                   f"{'release' if release else 'reject'})")
    click.echo(f"{'released' if release else 'rejected'} study {study} for "
               f"{', '.join(dests)}" + ("" if release else " (never delivered there)"))


@click.command()
@config_option
@spool_option
@click.argument("study")
@click.option("--reason", required=True, help="Why (recorded in the audit trail).")
def release(config_path: str | None, spool: str | None, study: str, reason: str) -> None:
    """Deliver a held study (a route with hold: true) now."""
    _decide(config_path, spool, study, reason, True)


@click.command()
@config_option
@spool_option
@click.argument("study")
@click.option("--reason", required=True, help="Why (recorded in the audit trail).")
def reject(config_path: str | None, spool: str | None, study: str, reason: str) -> None:
    """Drop the held deliveries of a study: never delivered there (kept in the spool)."""
    _decide(config_path, spool, study, reason, False)
