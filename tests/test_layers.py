"""The package's structure, checked: the layer order of docs/architecture.md, no import cycle,
no import of the package's own modules inside a function, no private name imported from another
module, no module over the size limit. Read from the source with ``ast`` (nothing imported)."""

from __future__ import annotations

import ast
from collections import defaultdict
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dicomrouter"
MAX_LINES = 600  # issue 24: "no module over ~600 lines"

# Top to bottom; a module may import from its own layer (without a cycle) or any layer below.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("faces", ("cli", "__main__")),
    ("composition root", ("app",)),
    ("operations", ("web", "health", "preflight", "receivers", "notifications")),
    ("policy", ("completion", "routing", "explain", "delivery", "feed", "ordering", "breaker",
                "sources", "scp", "priority", "coerce", "hl7", "prefetch", "proxy", "groups",
                "processing")),
    ("ways out", ("destinations", "qrscu", "commitment", "lookups", "outbox")),
    ("durable storage", ("spool", "state", "query")),
    ("leaves", ("config", "common", "values", "schema", "rules", "schedule", "sweep",
                "transforms", "deid", "deid_table", "pseudonym", "dicomfile", "dimse", "walk",
                "transcode",
                "conversion", "ratelimit", "pixelframes",
                "logsafe", "tlsctx", "netutil", "metrics", "sample", "storage_contexts",
                "hl7wire", "mpps_data")),
]
LAYER_OF = {name: i for i, (_title, names) in enumerate(LAYERS) for name in names}
# Lazy on purpose: an optional package the runtime does not depend on; the web stack, imported
# only when the web server is enabled (issue 25: idle memory).
LAZY_ALLOWED = {("dicomrouter.cli.tools", "dicomrouter_bench.cli"),
                ("dicomrouter.app", "dicomrouter.web.api"),
                ("dicomrouter.app", "dicomrouter.web.server"),
                ("dicomrouter.app", "dicomrouter.web.dicomweb"),
                # only when configured: python-hl7 and asyncio (HL7), the proxy's fetchers;
                # the idle router's memory (P4, issue 25)
                ("dicomrouter.app", "dicomrouter.hl7"),
                ("dicomrouter.app", "dicomrouter.proxy")}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


@cache
def imports() -> list[tuple[str, str, int, bool, list[str]]]:
    """(importer, imported module, line, inside a function or block, names) for every import
    of the package's own modules (and of dicomrouter_bench)."""
    mods = modules()
    found = []
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [(a.name, []) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                names = [a.name for a in node.names]
                targets = [(f"{module}.{n}", []) for n in names if f"{module}.{n}" in mods]
                targets.append((module, [n for n in names if f"{module}.{n}" not in mods]))
            else:
                continue
            for target, names in targets:
                if not target.startswith(("dicomrouter.", "dicomrouter_bench")) and \
                        target != "dicomrouter":
                    continue
                while target not in mods and "." in target and \
                        not target.startswith("dicomrouter_bench"):
                    target = target.rpartition(".")[0]
                found.append((name, target, node.lineno, node.col_offset > 0, names))
    return found


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_module_has_a_layer() -> None:
    missing = sorted({_top(m) for m in modules() if _top(m) and _top(m) not in LAYER_OF})
    assert not missing, f"add these to LAYERS (and docs/architecture.md): {missing}"


def test_imports_point_down_or_sideways() -> None:
    upward = []
    for importer, imported, line, _nested, _names in imports():
        a, b = _top(importer), _top(imported)
        if not a or not b or imported.startswith("dicomrouter_bench"):
            continue
        if LAYER_OF[b] < LAYER_OF[a]:
            upward.append(f"{importer}:{line} imports {imported} "
                          f"({LAYERS[LAYER_OF[a]][0]} → {LAYERS[LAYER_OF[b]][0]})")
    assert not upward, "imports from a lower layer up:\n" + "\n".join(upward)


def test_no_import_cycle() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for importer, imported, _line, _nested, _names in imports():
        if imported in modules() and imported != importer:
            graph[importer].add(imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in list(modules()):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_function_level_import_of_own_modules() -> None:
    nested = [f"{i}:{line} imports {m}" for i, m, line, inner, _n in imports()
              if inner and (i, m) not in LAZY_ALLOWED]
    assert not nested, "import at the top (only optional packages are imported lazily):\n" + \
        "\n".join(nested)


def test_no_private_name_imported_from_another_module() -> None:
    private = [f"{i}:{line} imports {m}.{n}" for i, m, line, _inner, names in imports()
               for n in names if n.startswith("_") and not n.startswith("__")]
    assert not private, "make these public (or keep them in their module):\n" + \
        "\n".join(private)


@pytest.mark.parametrize("name", sorted(modules()))
def test_modules_stay_small(name: str) -> None:
    lines = len(modules()[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines (at most {MAX_LINES}): split it by job"


def test_every_package_says_what_it_owns() -> None:
    silent = [name for name, path in modules().items()
              if path.name == "__init__.py" and ast.get_docstring(ast.parse(path.read_text()))
              is None]
    assert not silent, f"these packages need a docstring (what they own, what they import): " \
        f"{silent}"


@pytest.mark.parametrize("name", ["serve", "send", "echo", "find", "move", "status", "retry",
                                  "release", "reject", "audit", "explain", "purge", "sample",
                                  "bench"])
def test_every_cli_command_resolves(name: str) -> None:
    """The command line imports its commands by name when they run (see dicomrouter/cli): each
    name the README uses resolves to the click command of that name, and nothing else is listed."""
    from dicomrouter.cli import COMMANDS, load_command  # noqa: PLC0415 - the one import by name

    assert load_command(name).name == name
    assert len(COMMANDS) == 14
