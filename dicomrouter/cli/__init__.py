"""The ``dicomrouter`` command line: one module per command group, each parsing its options,
calling the router's parts and formatting the answer (no policy here). Errors are one line and
exit 1; usage errors exit 2.

Commands are imported when they run, not when the program starts: importing them all (the web
app, the Q/R services, the destinations) cost 1.2 s of CPU per invocation, and operators' scripts
and the tests run ``dicomrouter status`` in loops. This is the one place that imports by name;
``tests/test_layers.py`` checks that every entry resolves to a click command.
"""

from __future__ import annotations

import importlib

import click

from ..common import nocodecs

#: command name -> (module in this package, attribute): the order ``--help`` lists them in
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("serve", "serve"),
    "send": ("transfer", "send"),
    "echo": ("transfer", "echo"),
    "find": ("qr", "find_command"),
    "move": ("qr", "move_command"),
    "status": ("status", "status"),
    "retry": ("status", "retry"),
    "release": ("hold", "release"),
    "reject": ("hold", "reject"),
    "audit": ("status", "audit"),
    "explain": ("tools", "explain"),
    "purge": ("purge", "purge"),
    "sample": ("tools", "sample"),
    "bench": ("tools", "bench"),
}


#: commands that never decode pixel data: pydicom is imported without its pixel codecs
#: (common/nocodecs.py): the router process (conversions run in processes of their own), and
#: the state commands, which operators run in loops (the codecs cost ~0.3 s of start-up:
#: ``status`` took over 1 s against a PostgreSQL state)
NO_CODECS = frozenset({"serve", "status", "retry", "audit", "release", "reject", "purge"})


def load_command(name: str) -> click.Command:
    """The click command ``name`` is bound to, imported now."""
    module, attr = COMMANDS[name]
    if name in NO_CODECS:
        nocodecs.import_pydicom_without_codecs()
    command = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    if not isinstance(command, click.Command):
        raise TypeError(f"{module}.{attr} is not a click command")
    return command


class LazyGroup(click.Group):
    """A group whose commands are imported when they are invoked (or listed in ``--help``)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return load_command(cmd_name) if cmd_name in COMMANDS else None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dicomrouter")
def main() -> None:
    """dicomrouter: receive DICOM studies, route them by rules, deliver them reliably."""


__all__ = ["COMMANDS", "load_command", "main"]
