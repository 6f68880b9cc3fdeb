"""Reading the configuration file: strict YAML (no duplicate keys), then the schema."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .base import CONFIG_ENV, ConfigError, parse_int, show
from .models import ConfigModel as Config
from .models import from_dict


def embedded_default(base_dir: Path | None = None) -> Config:
    """No config file: listen as DICOMROUTER on 11112, every study to ./received as a tree."""
    return from_dict(
        {
            "destinations": {"received": {"type": "folder", "path": "received"}},
            "routes": [{"name": "everything to ./received", "to": ["received"]}],
        },
        base_dir or Path.cwd(),
        "embedded defaults",
    )


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, second: int) -> None:
        super().__init__(f"{key}: given twice in one mapping (lines {first} and {second}); "
                         "keep one")
        self.key = key if isinstance(key, str) else show(key)
        self.lines = (first, second)


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping: last-wins would silently undo
    the first (a second ``allowed_calling_aes: []`` opens the router to anyone)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> Any:
    # keys written in this mapping; keys merged in (``<<: *defaults``) may be overridden
    own = [k for k, _v in node.value if k.tag != "tag:yaml.org,2002:merge"]
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node in own:
        key = loader.construct_object(key_node, deep=False)
        try:
            hash(key)
        except TypeError:
            continue  # SafeConstructor reports an unhashable key itself
        if key in seen:
            raise _DuplicateKey(key, seen[key] + 1, key_node.start_mark.line + 1)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                              _mapping_without_duplicates)

# A configuration is a few hundred values; aliases may repeat a block (``<<: *defaults``), but
# nine nested aliases of nine ("billion laughs") expand to 387 million, which any later step
# that walks or prints the value (a duration parser calling str(), pydantic) would expand.
MAX_EXPANDED_VALUES = 100_000


class _AliasBomb(yaml.YAMLError):
    def __init__(self, path: str, size: int | None) -> None:
        super().__init__(path)
        self.path = path
        self.size = size


def _expanded_size(node: yaml.Node, memo: dict[int, int], active: set[int], path: str) -> int:
    """How many values ``node`` becomes once its aliases are expanded (memoised per node, so
    the count itself stays linear in the file's size); a node inside itself is refused."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        raise _AliasBomb(path, None)
    active.add(key)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        for i, child in enumerate(node.value):
            total += _expanded_size(child, memo, active, f"{path}[{i}]")
    elif isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            name = k.value if isinstance(k, yaml.ScalarNode) else "?"
            total += _expanded_size(k, memo, active, path)
            total += _expanded_size(v, memo, active, f"{path}.{name}" if path else str(name))
    active.discard(key)
    memo[key] = total
    return total


def _blame(node: yaml.Node, memo: dict[int, int], path: str) -> str:
    """The deepest key path under which the expansion is still too large."""
    children: list[tuple[str, yaml.Node]] = []
    if isinstance(node, yaml.SequenceNode):
        # into a list of mappings (routes[1]), not into a list of values (the key is blamed)
        children = [(f"{path}[{i}]", c) for i, c in enumerate(node.value)
                    if isinstance(c, yaml.MappingNode)]
    elif isinstance(node, yaml.MappingNode):
        children = [(f"{path}.{k.value}" if path else str(k.value), v) for k, v in node.value
                    if isinstance(k, yaml.ScalarNode)]
    for child_path, child in children:
        if memo.get(id(child), 0) > MAX_EXPANDED_VALUES:
            return _blame(child, memo, child_path)
    return path


def _check_expansion(node: yaml.Node | None) -> None:
    if node is None:
        return
    memo: dict[int, int] = {}
    size = _expanded_size(node, memo, set(), "")
    if size > MAX_EXPANDED_VALUES:
        raise _AliasBomb(_blame(node, memo, ""), size)


def _safe_load(text: str) -> Any:
    """``yaml.load`` with the strict loader, refusing alias expansions past
    MAX_EXPANDED_VALUES before anything is constructed."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        _check_expansion(node)
        return loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()


def load(path: str | os.PathLike[str] | None = None, secrets: bool = True) -> Config:
    """Load ``path``, else ``$DICOMROUTER_CONFIG``, else the embedded default. ``secrets``:
    check that the environment variables naming secrets are set (``serve``)."""
    chosen = path or os.environ.get(CONFIG_ENV)
    if not chosen:
        return embedded_default()
    p = Path(chosen)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {p}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"{p} is not UTF-8 text (byte 0x{exc.object[exc.start]:02X} at "
                          f"offset {exc.start})") from None
    try:
        raw = _safe_load(text)
    except _AliasBomb as exc:
        if exc.size is None:
            raise ConfigError(exc.path, "a YAML alias refers to a value that contains it; "
                              "aliases may not refer to themselves") from None
        raise ConfigError(exc.path, f"YAML aliases expand this value to {exc.size:,} values "
                          f"(at most {MAX_EXPANDED_VALUES:,}); write it out or use fewer "
                          "nested aliases") from None
    except _DuplicateKey as exc:
        raise ConfigError(exc.key[:80], f"given twice in one mapping (lines {exc.lines[0]} and "
                          f"{exc.lines[1]} of {p}); keep one") from None
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{p} is not valid YAML: {str(exc)[:1000]}") from None
    return from_dict(raw or {}, p.resolve().parent, str(p), secrets=secrets)


def replace_port(cfg: Config, port: int) -> Config:
    """The same configuration listening on another port (``serve --port``)."""
    return cfg.with_port(parse_int(port, "--port", 1, 65535))
