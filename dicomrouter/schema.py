"""The building blocks of the configuration models: value types that go through the strict
parsers of ``values.py``, the strict mapping that refuses unknown keys, secrets named by
environment variable, and the one translation of a pydantic error into ``key.path: problem``.

Used by ``config/models.py`` and by the models that live beside the code that reads them (the
``deidentify`` options in ``deid_table.py``); a leaf: imports nothing of the router but
``values.py``.
"""

from __future__ import annotations

import difflib
import os
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from .values import (
    ConfigError,
    parse_ae_title,
    parse_bool,
    parse_choice,
    parse_duration,
    parse_int,
    parse_size,
    parse_str,
    show,
)


def parsed(parser: Any, *args: Any) -> BeforeValidator:
    """One of base.py's parsers as a pydantic validator (the key is added from the location)."""
    return BeforeValidator(lambda value: parser(value, "", *args))


Duration = Annotated[float, parsed(parse_duration)]
Size = Annotated[int, parsed(parse_size)]
AETitle = Annotated[str, parsed(parse_ae_title)]
Text = Annotated[str, parsed(parse_str)]
Bool = Annotated[bool, parsed(parse_bool)]


def _base_dir(info: ValidationInfo) -> Path | None:
    context = info.context if isinstance(info.context, dict) else {}
    base = context.get("base_dir")
    return Path(base) if base is not None else None


def _folder(value: Any, info: ValidationInfo) -> Path:
    """A folder: relative to the configuration file's folder (the validation context's
    ``base_dir``), ``~`` expanded."""
    p = Path(os.path.expanduser(parse_str(value, "")))
    base = _base_dir(info)
    return p if p.is_absolute() or base is None else base / p


def _file(value: Any, info: ValidationInfo) -> str:
    """A file the router reads (a certificate, a key, a CA): resolved like a folder (its
    model checks it is readable, once the keys around it are right)."""
    return str(_folder(value, info))


#: a folder; relative paths are taken from the configuration file's folder
Folder = Annotated[Path, BeforeValidator(_folder)]
#: a file the router reads, as a path string; relative like Folder
ReadableFile = Annotated[str, BeforeValidator(_file)]


def Int(lo: int, hi: int) -> Any:  # noqa: N802 - reads like a type in the models
    return Annotated[int, parsed(parse_int, lo, hi)]


def Choice(*options: str) -> Any:  # noqa: N802
    return Annotated[str, parsed(parse_choice, options)]


class Strict(BaseModel):
    """A YAML mapping: unknown keys are refused with a 'did you mean'."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ConfigError("", f"expected a mapping, got {type(data).__name__}")
        known = {f.alias or name for name, f in cls.model_fields.items()}
        for k in data:
            if k not in known:
                close = difflib.get_close_matches(k, known, n=1) if isinstance(k, str) else []
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise ConfigError(k[:80] if isinstance(k, str) else show(k),
                                  f"unknown key ({hint}known keys: {', '.join(sorted(known))})")
        return data


def readable(path: str | None, key: str) -> None:
    if path and not os.access(os.path.expanduser(path), os.R_OK):
        raise ConfigError(key, f"cannot read {path}")


# False while reading a configuration for a command that only reads the state (status, retry,
# audit...): the destinations' secrets are not needed there, and an operator's shell seldom has
# them. The state's own DSN is always checked.
CHECK_SECRETS: ContextVar[bool] = ContextVar("CHECK_SECRETS", default=True)


def env_set(key: str, env: str | None) -> None:
    """A secret named by environment variable: the named one must be set now."""
    if key != "dsn_env" and not CHECK_SECRETS.get():
        return
    if env and env not in os.environ:
        raise ConfigError(key, f"environment variable {env} is not set")


def keyed_error(err: ValidationError, data: Any,
                unions: dict[str, tuple[str, tuple[str, ...]]] | None = None) -> ConfigError:
    """The first error of a ValidationError, as ``key.path: problem``; ``unions``: top-level
    keys holding tagged unions (key → (what one is called, its types))."""
    e = err.errors(include_url=False)[0]
    loc = list(e["loc"])
    # a tagged union puts the tag into the location: destinations.<name>.<tag>.<key>
    unions = unions or {}
    what, types = unions.get(str(loc[0]) if loc else "", ("mapping", ()))
    if len(loc) >= 3 and loc[0] in unions and loc[2] in types:
        del loc[2]
    cause = (e.get("ctx") or {}).get("error")
    kind = e["type"]
    if isinstance(cause, ConfigError):
        if cause.key:
            loc.append(cause.key)
        problem = cause.problem
    elif kind == "missing" and loc[:1] in (["destinations"], ["sources"]) and len(loc) == 3:
        dest = (data or {}).get(loc[0], {}).get(loc[1], {})
        problem = f"required for a {dest.get('type')} {what}"
    elif kind == "missing":
        problem = "required"
    elif kind == "union_tag_not_found" and not isinstance(e["input"], dict):
        problem = f"expected a mapping, got {type(e['input']).__name__}"
    elif kind == "union_tag_not_found":
        loc.append("type")
        problem = f"required; one of {', '.join(types)}"
    elif kind == "union_tag_invalid":
        loc.append("type")
        problem = f"unknown {what} type {e['ctx']['tag']}; one of {', '.join(types)}"
    elif kind in ("dict_type", "model_type", "model_attributes_type"):
        problem = f"expected a mapping, got {type(e['input']).__name__}"
    elif kind in ("list_type", "tuple_type"):
        problem = f"expected a list, got {type(e['input']).__name__}"
    else:
        problem = e["msg"]
    key = ""
    loc = [p for p in loc if p != "[key]"]  # a dict key that failed: its name says it
    for part in loc:
        if isinstance(part, int) or str(part).startswith("["):
            key += f"[{part}]" if isinstance(part, int) else str(part)
        else:
            key += f".{part}" if key else str(part)
    return ConfigError(key, problem)
