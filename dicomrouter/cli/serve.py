"""``dicomrouter serve``: run the router (or ``--check`` its configuration)."""

from __future__ import annotations

import signal
from typing import Any

import click

from .. import config as config_mod
from .. import preflight
from ..app import ListenError, Router
from ..state import StateUnavailable
from .common import (
    config_option,
    load_config,
    log,
    setup_logging,
)


@click.command()
@config_option
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help="Override the configured port.")
@click.option("--check", is_flag=True, help="Validate the configuration and exit.")
def serve(config_path: str | None, port: int | None, check: bool) -> None:
    """Run the router: Storage SCP, study tracker and delivery workers."""
    cfg = load_config(config_path, warn=True, secrets=True)
    if port is not None:
        cfg = config_mod.replace_port(cfg, port)
    errors, warnings = preflight.check(cfg)
    if check:
        for line in warnings:
            click.echo(f"Warning: {line}", err=True)
        if errors:
            raise click.ClickException("\n".join(errors))
        click.echo(f"configuration OK ({cfg.source}): {len(cfg.destinations)} destination(s), "
                   f"{len(cfg.routes)} route(s), {len(cfg.sources)} source(s)")
        return
    setup_logging(cfg.log_level)
    for line in errors + warnings:  # a folder on a share may come back: deliveries retry
        log.warning("%s", line)
    log.info("dicomrouter starting with %s; spool %s; stable age %.1f s", cfg.source,
             cfg.spool, cfg.stable_age)
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
