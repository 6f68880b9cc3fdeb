"""``dicomrouter find`` and ``dicomrouter move``: Query/Retrieve from the command line."""

from __future__ import annotations

import json
from typing import Any

import click
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset

from ..qrscu import PeerError, Remote, find, move
from ..query import LEVELS
from .common import (
    check_ae,
    load_config,
    setup_logging,
)

DEFAULT_KEYS = {
    "PATIENT": ("PatientID", "PatientName", "PatientBirthDate", "NumberOfPatientRelatedStudies"),
    "STUDY": ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "AccessionNumber",
              "ModalitiesInStudy", "StudyDescription", "NumberOfStudyRelatedInstances"),
    "SERIES": ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
               "NumberOfSeriesRelatedInstances"),
    "IMAGE": ("SOPInstanceUID", "SOPClassUID", "InstanceNumber"),
}


def _keys(ctx: click.Context, param: click.Parameter,
          values: tuple[str, ...]) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    for item in values:
        keyword, eq, value = item.partition("=")
        keyword = keyword.strip()
        if tag_for_keyword(keyword) is None:
            raise click.BadParameter(f"{keyword!r} is not a DICOM keyword (e.g. PatientName, "
                                     "StudyDate, ModalitiesInStudy)")
        out.append((keyword, value if eq else None))
    return out


def _identifier(level: str, keys: list[tuple[str, str | None]],
                defaults: bool = True) -> tuple[Dataset, list[str]]:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    columns = list(DEFAULT_KEYS[level]) if defaults else []
    given = dict(keys)
    for kw, _ in keys:
        if kw not in columns:
            columns.append(kw)
    for kw in columns:
        value = given.get(kw) or ""
        vr = dictionary_VR(kw)
        setattr(ds, kw, value.split("\\") if "\\" in value and vr != "SQ" else value)
    return ds, columns


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def _table(rows: list[dict[str, str]], columns: list[str]) -> str:
    widths = {c: min(max([len(c)] + [len(r.get(c, "")) for r in rows]), 64) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines.append("  ".join("-" * widths[c] for c in columns))
    for r in rows:
        lines.append("  ".join(r.get(c, "")[:64].ljust(widths[c]) for c in columns))
    return "\n".join(lines)


port_type = click.IntRange(1, 65535)


@click.command("find")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=port_type, default=11112, show_default=True)
@click.option("--aet", default="DICOMROUTER", show_default=True, callback=check_ae,
              help="The called AE title (the peer's).")
@click.option("--calling-aet", default="DICOMFIND", show_default=True, callback=check_ae)
@click.option("--level", type=click.Choice(LEVELS, case_sensitive=False), default="STUDY",
              show_default=True)
@click.option("--model", type=click.Choice(["study", "patient"]), default="study",
              show_default=True, help="Study Root or Patient Root information model.")
@click.option("-k", "--key", "keys", multiple=True, callback=_keys, metavar="KEY[=VALUE]",
              help="A matching key (PatientName=DOE*, StudyDate=20240101-20240131, "
                   "StudyInstanceUID=1.2\\1.3) or, without a value, a key to return.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per answer, in a list.")
@click.option("--timeout", type=click.FloatRange(0.1), default=30.0, show_default=True)
@click.option("--limit", type=click.IntRange(0), default=0, help="Stop after this many answers.")
def find_command(host: str, port: int, aet: str, calling_aet: str, level: str, model: str,
                 keys: list[tuple[str, str | None]], as_json: bool, timeout: float,
                 limit: int) -> None:
    """C-FIND a DICOM peer and print the answers as a table (or JSON)."""
    setup_logging("WARNING", quiet_pynetdicom=True)
    level = level.upper()
    if level == "PATIENT" and model != "patient":
        model = "patient"
    identifier, columns = _identifier(level, keys)
    remote = Remote(aet, host, port, calling_aet, timeout)
    try:
        answers = find(remote, identifier, model, limit)
    except PeerError as exc:
        raise click.ClickException(f"C-FIND: {exc}") from None
    rows = [{c: _text(ds.get(c)) for c in columns} for ds in answers]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"C-FIND to {remote}: no match at the {level} level")
        return
    click.echo(_table(rows, columns))
    click.echo(f"{len(rows)} match(es)")


@click.command("move")
@click.argument("study_uid")
@click.option("--from", "source", required=True, callback=check_ae,
              help="AE title of the peer holding the study (host and port from the "
                   "configuration's known_aes, or --host/--port).")
@click.option("--to", "target", required=True, callback=check_ae,
              help="AE title the peer sends the study to (it must know it).")
@click.option("--host", default=None, help="The peer's host (default: known_aes).")
@click.option("--port", type=port_type, default=None, help="The peer's port (default: known_aes).")
@click.option("--calling-aet", default=None, callback=check_ae,
              help="Our AE title (default: known_aes calling_ae, else the router's).")
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Router configuration with known_aes (default: $DICOMROUTER_CONFIG or the "
                   "embedded defaults).")
@click.option("--timeout", type=click.FloatRange(0.1), default=600.0, show_default=True,
              help="Seconds to wait for each C-MOVE response.")
def move_command(study_uid: str, source: str, target: str, host: str | None, port: int | None,
                 calling_aet: str | None, config_path: str | None, timeout: float) -> None:
    """Ask a peer to C-MOVE one study to an AE title; print the outcome."""
    setup_logging("WARNING", quiet_pynetdicom=True)
    cfg = load_config(config_path)
    known = cfg.known_aes.get(source)
    if host is None or port is None:
        if known is None:
            raise click.UsageError(f"{source} is not in known_aes of {cfg.source}: give "
                                   "--host and --port")
        host = host or known.host
        port = port or known.port
    calling = calling_aet or (known.calling_ae if known else None) or cfg.ae_title
    remote = Remote(source, host, port, calling, timeout)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    try:
        result = move(remote, identifier, target)
    except PeerError as exc:
        raise click.ClickException(f"C-MOVE to {target}: {exc}") from None
    text = f"C-MOVE of study {study_uid} from {remote} to {target}: {result.describe()}"
    if not result.ok:
        raise click.ClickException(text)
    click.echo(text)
