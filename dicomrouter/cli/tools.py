"""``dicomrouter sample``, ``explain`` and ``bench``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .. import explain as ex
from .. import sample as sample_mod
from ..spool import Spool, spool_for
from .common import (
    config_option,
    load_config,
    open_state,
    size_text,
    spool_option,
)


@click.command()
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
    if transfer_syntax not in sample_mod.TRANSFER_SYNTAXES:
        raise click.BadParameter(f"one of {', '.join(sample_mod.TRANSFER_SYNTAXES)}",
                                 param_hint="--transfer-syntax")
    files = sample_mod.generate(Path(out_dir), studies=studies, series=series,
                                instances=instances, modality=modality, rows=rows, cols=cols,
                                frames=frames,
                                transfer_syntax=sample_mod.TRANSFER_SYNTAXES[transfer_syntax],
                                patient_id=patient_id, seed=seed)
    total = sum(f.stat().st_size for f in files)
    click.echo(f"wrote {len(files)} file(s), {size_text(total)}, under {out_dir}")


@click.command()
@click.argument("paths", nargs=-1, type=click.Path(exists=True))
@click.option("--study", default=None, help="A study in the spool instead of files.")
@config_option
@spool_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def explain(paths: tuple[str, ...], study: str | None, config_path: str | None,
            spool: str | None, as_json: bool) -> None:
    """Dry-run the routing table on files or a spooled study: every route, matched or not and
    why. With --config (and --spool), try a candidate table on what the spool holds."""
    if bool(paths) == bool(study):
        raise click.UsageError("give files/folders or --study UID (one of them)")
    cfg = load_config(config_path)
    results = []
    if study:
        state, root = open_state(config_path, spool)
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


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
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
