"""``dicomrouter bench``: the router against DCMTK storescp and an Orthanc gateway, on loopback.

A plain click command: ``dicomrouter bench`` hands its arguments to it (the runtime package
does not import the benchmark otherwise); ``python -m dicomrouter_bench.cli`` runs it on its own.
"""

from __future__ import annotations

import json
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType
from typing import Any

import click

from dicomrouter.config import destination_types

from . import machine, report
from .corpus import make_corpus
from .procs import BenchError, find_dcmtk, stop_all
from .profile import profile_receive
from .scenarios import Bench, Settings
from .soak import SoakSettings, render, run_soak

SCENARIO_NAMES = ("P1", "P2", "P3", "P4", "P5", "P7", "P8")
OPT_IN = ("SOAK",)  # long: only when named in --only


def _scenarios(value: str) -> frozenset[str]:
    chosen = {v.strip().upper() for v in value.split(",") if v.strip()}
    unknown = chosen - set(SCENARIO_NAMES) - set(OPT_IN)
    if unknown or not chosen:
        raise click.BadParameter(f"a comma-separated list of {', '.join(SCENARIO_NAMES)} "
                                 "or soak", param_hint="--only")
    return frozenset(chosen)


def _progress(message: str) -> None:
    click.echo(message, err=True)


def _terminated(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the peers


@click.command()
@click.option("--runs", type=click.IntRange(1, 100), default=3, show_default=True,
              help="Repetitions; the table shows medians.")
@click.option("--only", default=",".join(SCENARIO_NAMES), show_default=True,
              help="Scenarios to run, comma-separated.")
@click.option("--small", type=click.IntRange(1, 100_000), default=1000, show_default=True,
              help="Instances (64×64) in the small corpus.")
@click.option("--ct", type=click.IntRange(1, 10_000), default=300, show_default=True,
              help="Instances (512×512) in the CT corpus.")
@click.option("--large-mb", type=click.FloatRange(0.1, 4000), default=500.0, show_default=True,
              help="Size in MB of the one multi-frame instance of P4.")
@click.option("--study-mb", type=click.FloatRange(1, 20000), default=2000.0, show_default=True,
              help="Size in MB of P4's big study (instances of 4 frames 512×512, 2.1 MB).")
@click.option("--stable-age", type=click.IntRange(1, 60), default=1, show_default=True,
              help="Whole seconds (Orthanc's StableAge), the same for the router (P2, P4).")
@click.option("--associations", type=click.IntRange(2, 64), default=8, show_default=True,
              help="Concurrent storescu associations in P5.")
@click.option("--forward-associations", type=click.IntRange(1, 16), default=4,
              show_default=True,
              help="The router's `associations` towards the target Orthanc in P2 (the Orthanc "
              "gateway always uses one).")
@click.option("--stow-concurrency", type=click.IntRange(1, 16), default=4, show_default=True,
              help="The router's `parallel_requests` (STOW-RS requests in flight per study) "
              "towards the target Orthanc in P3 (its C-STORE baseline uses one association).")
@click.option("--storescp-pdu", type=click.IntRange(4096, 131072), default=131072,
              show_default=True,
              help="storescp's maximum receive PDU in P1/P5. The router accepts any size, so "
              "storescu sends it its largest PDUs (128 kB); storescp gets the same unless this "
              "is lowered (storescp's own default is 16384).")
@click.option("--nodes", type=click.IntRange(1, 64), default=3, show_default=True,
              help="P7: measure 1..N router nodes on one PostgreSQL + S3 (moto).")
@click.option("--flat-studies", type=click.IntRange(1, 10_000_000), default=20_000,
              show_default=True, help="P8: studies in the large synthetic state.")
@click.option("--flat-instances", type=click.IntRange(1, 100_000_000), default=1_000_000,
              show_default=True, help="P8: instances in the large synthetic state.")
@click.option("--minutes", type=click.FloatRange(0.5, 24 * 60), default=30.0,
              show_default=True, help="soak: how long the senders send while faults are injected.")
@click.option("--soak-senders", type=click.IntRange(1, 32), default=3, show_default=True,
              help="soak: concurrent sending modalities.")
@click.option("--soak-cluster", is_flag=True,
              help="soak: two router nodes on PostgreSQL + the S3 shared spool (PostgreSQL is "
              "stopped and restarted too).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable results only.")
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the machine-readable results to this file.")
@click.option("--markdown", is_flag=True, help="Print the table as Markdown.")
@click.option("--keep", is_flag=True, help="Keep the temporary directory (corpora, logs).")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to make the temporary directory (default: the system's).")
@click.option("--profile", "profile_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Also record the router receiving the small and the ct corpus "
              "with py-spy into this directory (collapsed stacks + summary.txt).")
def bench(runs: int, only: str, small: int, ct: int, large_mb: float, study_mb: float,
          stable_age: int,
          associations: int, forward_associations: int, stow_concurrency: int,
          storescp_pdu: int | None,
          nodes: int, flat_studies: int, flat_instances: int, minutes: float,
          soak_senders: int, soak_cluster: bool, as_json: bool,
          json_out: Path | None, markdown: bool, keep: bool,
          workdir: Path | None, profile_dir: Path | None) -> None:
    """Measure receive throughput (P1), end-to-end time against an Orthanc gateway (P2), peak
    memory with a large instance and a big study (P4), concurrent associations (P5),
    several routers on PostgreSQL + S3 (P7) and the cost of everyday operations on a state of
    a million instances against an empty one (P8). ``--only soak`` runs the chaos soak
    (soak.py): senders while destinations, the router and the spool's disk fail in turn.

    Starts its own DCMTK storescp, Orthanc and router processes on free loopback ports, and stops
    them all at the end. Progress goes to stderr, the table to stdout. Exits 1 if a measurement
    failed (missed targets are reported, not failures).
    """
    import shutil


    missing = [t for t in ("storescu", "storescp", "echoscu") if find_dcmtk(t) is None]
    if missing:
        raise click.ClickException(f"DCMTK {', '.join(missing)} not found: apt-get install dcmtk "
                                   "(or set DCMTK_BIN)")
    settings = Settings(runs=runs, scenarios=_scenarios(only), small=small, ct=ct,
                        large_mb=large_mb, study_mb=study_mb, stable_age=stable_age,
                        associations=associations,
                        forward_associations=forward_associations,
                        stow_concurrency=stow_concurrency, storescp_pdu=storescp_pdu,
                        nodes=nodes, flat_studies=flat_studies,
                        flat_instances=flat_instances, keep=keep)
    if not settings.orthanc:
        _progress("Orthanc not found (apt-get install orthanc): P2 and the Orthanc column are "
                  "skipped")
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    info = machine.machine_info()
    _progress(f"machine: {machine.describe(info)}")
    root = Path(tempfile.mkdtemp(prefix="dicomrouter-bench-", dir=workdir))
    _progress(f"work directory: {root}")
    previous = signal.signal(signal.SIGTERM, _terminated)
    runner = Bench(settings, root, _progress)
    profile_text = ""
    soak: dict[str, Any] | None = None
    try:
        runner.prepare()
        runner.run()
        if "SOAK" in settings.scenarios:
            try:
                soak = run_soak(SoakSettings(minutes=minutes, senders=soak_senders,
                                             cluster=soak_cluster), root / "soak", _progress)
            except BenchError as exc:
                soak = {"ok": False, "problems": [str(exc)], "error": str(exc)}
            if not soak["ok"]:
                runner.errors += 1
        if profile_dir is not None:
            for name, count, size in (("small", small, 64), ("ct", ct, 512)):
                if name not in runner.corpora:
                    runner.corpora[name] = make_corpus(name, root / "corpora", count, size, size)
            try:
                profile_text = profile_receive([runner.corpora["small"], runner.corpora["ct"]],
                                               root / "profile", profile_dir, _progress)
            except BenchError as exc:
                runner.errors += 1
                _progress(f"profile: FAILED: {exc}")
    finally:
        stop_all()
        signal.signal(signal.SIGTERM, previous)
        if keep:
            _progress(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    rows = report.build_rows(settings, runner.runs,
                             dicomweb_available="dicomweb" in destination_types())
    extra = report.notes(runner.runs)
    data = report.as_json(settings, runner.corpora, runner.runs, rows, info, extra)
    soak_lines: list[str] = []
    if soak is not None:
        data["soak"] = soak
        soak_lines = render(soak) if "error" not in soak else [f"soak: FAILED: {soak['error']}"]
    table = bool(settings.scenarios - set(OPT_IN))
    if json_out is not None:
        json_out.write_text(json.dumps(data, indent=2) + "\n")
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        corpora = "; ".join(f"{n} {c.describe()}" for n, c in runner.corpora.items())
        click.echo(f"dicomrouter bench, {info['date']}: {runs} run(s); medians, ratios are "
                   "medians of per-run ratios")
        click.echo(f"machine: {machine.describe(info)}")
        click.echo(f"corpora: {corpora}")
        if table:
            click.echo("")
            click.echo(report.render_markdown(rows) if markdown else report.render_text(rows))
            for line in extra:
                click.echo(line)
        if soak_lines:
            click.echo("")
        for line in soak_lines:
            click.echo(line)
        if profile_text:
            click.echo("")
            click.echo(profile_text.rstrip())
    if runner.errors:
        _progress(f"{runner.errors} measurement(s) failed; see the messages above")
        sys.exit(1)


if __name__ == "__main__":
    bench()
