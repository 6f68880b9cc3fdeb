"""Optional dependencies: which configuration keys need a package that ``pip install
dicomrouter`` (no extras) does not bring, and the one line that says so.

The base install runs every feature the README shows; an extra is only for what a configuration
explicitly opts into. ``serve --check``, ``serve`` and the CLI commands that open the state call
:func:`missing` and stop with its lines instead of failing later with an ImportError (or, worse,
starting and failing every delivery). ``tests/test_base_install.py`` checks that every import of
the runtime package is either satisfied by the base requirements or listed here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Needs:
    """``key`` (as the user wrote it) needs ``modules``, installed by ``extra``."""

    key: str
    what: str
    modules: tuple[str, ...]
    extra: str

    def line(self, absent: list[str]) -> str:
        return (f"{self.key}: {self.what} needs the Python package(s) {', '.join(absent)}, "
                f"not installed: pip install 'dicomrouter[{self.extra}]'")


# Top-level modules the runtime package may import that the base install does not bring, and
# the extra that brings each one.
OPTIONAL_MODULES: dict[str, str] = {
    "psycopg": "cluster",
    "psycopg_pool": "cluster",
}


def needs(cfg: Any) -> list[Needs]:
    """What this configuration opts into that needs an optional package."""
    found: list[Needs] = []
    if cfg.state.type == "postgresql":
        found.append(Needs("state.type", "postgresql", ("psycopg", "psycopg_pool"), "cluster"))
    return found


def _importable(module: str) -> bool:
    """Imported, not only found: psycopg without its binary part finds no libpq at import."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def missing(cfg: Any) -> list[str]:
    """One line per key whose optional packages are not installed (empty: nothing missing)."""
    lines = []
    for need in needs(cfg):
        absent = [m for m in need.modules if not _importable(m)]
        if absent:
            lines.append(need.line(absent))
    return lines
