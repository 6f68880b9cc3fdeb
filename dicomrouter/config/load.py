"""Reading the configuration file: strict YAML (no duplicate keys), then the schema."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .base import CONFIG_ENV, Config, ConfigError, _int, _show
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
        self.key = key if isinstance(key, str) else _show(key)
        self.lines = (first, second)


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping: last-wins would silently undo
    the first (a second ``allowed_calling_aes: []`` opens the router to anyone)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> Any:
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _value in node.value:
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


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Load ``path``, else ``$DICOMROUTER_CONFIG``, else the embedded default."""
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
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as exc:
        raise ConfigError(exc.key[:80], f"given twice in one mapping (lines {exc.lines[0]} and "
                          f"{exc.lines[1]} of {p}); keep one") from None
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{p} is not valid YAML: {str(exc)[:1000]}") from None
    return from_dict(raw or {}, p.resolve().parent, str(p))


def replace_port(cfg: Config, port: int) -> Config:
    """The same configuration listening on another port (``serve --port``)."""
    from dataclasses import replace

    port = _int(port, "--port", 1, 65535)
    listeners = cfg.listeners
    if listeners:
        listeners = (replace(listeners[0], port=port), *listeners[1:])
    return replace(cfg, port=port, listeners=listeners)
