"""Secrets are never in the configuration: it names an environment variable (``<name>_env``)
or a file (``<name>_file``) that holds each one."""

from __future__ import annotations

import os
from typing import Any


class SecretUnavailable(OSError):
    """A secret the configuration names is not there (the variable unset, the file
    unreadable): the destination or source that needs it cannot work now."""


def secret(model: Any, name: str) -> str | None:
    """The secret ``name`` of a configuration model: from the environment variable its
    ``<name>_env`` names or the file its ``<name>_file`` names (first line, stripped); None
    if neither is configured."""
    env, path = getattr(model, f"{name}_env", None), getattr(model, f"{name}_file", None)
    if env:
        value = os.environ.get(env)
        if value is None:
            raise SecretUnavailable(f"environment variable {env} ({name}) is not set")
        return value
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                return f.readline().strip()
        except OSError as exc:
            raise SecretUnavailable(f"cannot read {name}_file {path}: {exc.strerror}") from None
    return None
