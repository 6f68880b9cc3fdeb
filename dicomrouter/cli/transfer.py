"""``dicomrouter send`` and ``echo``: C-STORE files, C-ECHO a peer."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import click
from pydicom.errors import InvalidDicomError
from pynetdicom import AE

from .. import config as config_mod
from ..destinations import DeliveryError, InstanceRejected
from ..destinations.base import PermanentFailure
from ..destinations.dicom import open_association
from ..destinations.store import Peer, batches
from ..netutil import adjust_associations, association_failure
from .common import (
    check_ae,
    setup_logging,
)


@contextlib.contextmanager
def progress_of(items: list[Any], label: str) -> Iterator[Iterable[Any]]:
    """A progress bar on a terminal; elsewhere (a log, a pipe) the items alone: click writes
    a non-terminal's bar as its label without a newline, glued to the next output."""
    if not sys.stderr.isatty():
        yield items
        return
    with click.progressbar(items, label=label, file=sys.stderr,
                           item_show_func=lambda x: x[0].name if x else None) as bar:
        yield bar


def collect_files(paths: tuple[str, ...]) -> tuple[list[tuple[Path, str, str]], list[Path]]:
    """Files under ``paths`` that are DICOM Part 10 files: (path, SOP class, transfer syntax)."""
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


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=config_mod.DEFAULT_PORT,
              show_default=True)
@click.option("--aet", default=config_mod.DEFAULT_AE_TITLE, show_default=True, callback=check_ae,
              help="Called AE title (the receiver's).")
@click.option("--calling-aet", default="DICOMSEND", show_default=True, callback=check_ae,
              help="Our AE title.")
@click.option("--max-pdu", type=int, default=0, help="Maximum PDU size to receive (0: any).")
def send(paths: tuple[str, ...], host: str, port: int, aet: str, calling_aet: str,
         max_pdu: int) -> None:
    """Send DICOM files and folders (recursively) with C-STORE, over one association."""
    setup_logging("WARNING", quiet_pynetdicom=True)
    files, skipped = collect_files(paths)
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
            with progress_of(chunk, f"C-STORE to {peer}") as bar:
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


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=config_mod.DEFAULT_PORT,
              show_default=True)
@click.option("--aet", default=config_mod.DEFAULT_AE_TITLE, show_default=True, callback=check_ae,
              help="Called AE title.")
@click.option("--calling-aet", default="DICOMSEND", show_default=True, callback=check_ae)
@click.option("--timeout", type=click.FloatRange(0.1), default=10.0, show_default=True)
def echo(host: str, port: int, aet: str, calling_aet: str, timeout: float) -> None:
    """C-ECHO a DICOM peer (is it up, does it accept our AE title?)."""
    from pynetdicom.sop_class import Verification

    setup_logging("WARNING", quiet_pynetdicom=True)
    adjust_associations()
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
