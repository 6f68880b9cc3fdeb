"""``dicomrouter purge``: remove a study from the spool and the state, on purpose."""

from __future__ import annotations

import click

from ..spool import Spool, spool_for
from .common import config_option, load_config, open_state, size_text, spool_option


@click.command()
@config_option
@spool_option
@click.option("--study", required=True, help="Study Instance UID to remove.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def purge(config_path: str | None, spool: str | None, study: str, yes: bool) -> None:
    """Remove a study from the spool and the state database, on purpose."""
    state, root = open_state(config_path, spool, readonly=False)
    if state.study(study) is None:
        raise click.ClickException(f"no study {study} in {root}")
    if not yes:
        click.confirm(f"remove study {study} and its files from {root}?", abort=True)
    cfg = load_config(config_path) if spool is None else None
    store = spool_for(cfg, state) if cfg is not None and cfg.shared_spool else Spool(root, state)
    freed = store.purge(study)
    click.echo(f"purged study {study} ({size_text(freed)} freed)")
