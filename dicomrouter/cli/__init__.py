"""The ``dicomrouter`` command line: one module per command group, each parsing its options,
calling the router's parts and formatting the answer (no policy here). Errors are one line and
exit 1; usage errors exit 2.
"""

from __future__ import annotations

import click

from .qr import find_command, move_command
from .serve import serve
from .status import audit, purge, retry, status
from .tools import bench, explain, sample
from .transfer import echo, send


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dicomrouter")
def main() -> None:
    """dicomrouter: receive DICOM studies, route them by rules, deliver them reliably."""


for command in (serve, send, echo, find_command, move_command, status, retry, audit, explain,
                purge, sample, bench):
    main.add_command(command)

__all__ = ["main"]
