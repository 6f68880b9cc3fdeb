"""Where the router keeps its state and how its pages are reached: ``state:`` (SQLite in the
spool, or the cluster's PostgreSQL and node id), ``shared_spool:`` (the cluster's S3 store) and
``web:`` (status page, REST API, /metrics). Split from ``models.py`` by job; declared once here.
"""

from __future__ import annotations

import os
import re
import socket
from typing import Any, Literal

from pydantic import PrivateAttr, model_validator

from ..schema import (
    CHECK_SECRETS,
    Bool,
    Choice,
    Duration,
    Int,
    ReadableFile,
    Strict,
    Text,
    env_set,
    readable,
)
from .base import (
    ConfigError,
    is_loopback,
    parse_str,
    show,
)
from .peers import (
    S3Access,
)


class StateModel(Strict):
    """``state:``: where the router keeps its state. ``sqlite`` (the embedded default: a file
    in the spool) or ``postgresql`` (several routers share it; the DSN comes from an
    environment variable or a file, never from the YAML)."""

    type: Choice("sqlite", "postgresql") = "sqlite"
    dsn_env: Text | None = None
    dsn_file: ReadableFile | None = None
    lease: Duration = 30.0  # a node that stops heartbeating this long is gone; its jobs resume
    pool_size: Int(2, 500) = 8
    connect_timeout: Duration = 10.0

    _dsn: str = PrivateAttr("")

    @property
    def dsn(self) -> str:
        """The PostgreSQL connection string (a secret: from dsn_env or dsn_file)."""
        return self._dsn

    @model_validator(mode="after")
    def _check_dsn(self) -> StateModel:
        if self.type == "sqlite":
            for key in ("dsn_env", "dsn_file"):
                if getattr(self, key):
                    raise ConfigError(key, "only for type: postgresql")
            return self
        if not self.dsn_env and not self.dsn_file:
            raise ConfigError("dsn_env", "required for type: postgresql (the environment "
                              "variable holding the connection string, e.g. DICOMROUTER_DSN)")
        if self.dsn_env and self.dsn_file:
            raise ConfigError("dsn_file", "give dsn_env or dsn_file, not both")
        env_set("dsn_env", self.dsn_env)
        readable(self.dsn_file, "dsn_file")
        if self.lease < 3:
            raise ConfigError("lease", "must be at least 3 s (heartbeats renew it every "
                              "third of it)")
        if self.dsn_env:
            self._dsn = os.environ[self.dsn_env]
        elif self.dsn_file:
            with open(self.dsn_file, encoding="utf-8") as f:
                self._dsn = f.readline().strip()
        return self


class SharedSpoolModel(S3Access):
    """``shared_spool:``: the instances of every node in one S3 bucket (cluster mode)."""

    type: Literal["s3"]
    prefix: Text = ""
    timeout: Duration = 10.0  # per S3 request: a C-STORE waits for it in ack_after: shared

    @model_validator(mode="after")
    def _prefix(self) -> SharedSpoolModel:
        if self.prefix.startswith("/") or ".." in self.prefix.split("/"):
            raise ConfigError("prefix", "must be a relative key prefix (no leading /, no ..)")
        return self


def node_id_value(value: Any, key: str) -> str:
    text = parse_str(value, key)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", text):
        raise ConfigError(key, f"{show(text)} is not a node id (letters, digits, '.', '_', "
                          "'-'; at most 64)")
    return text


def default_node_id() -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64].strip("-.")
    return name or "node"


class WebModel(Strict):
    """``web:``. Off loopback, every endpoint but /health (and /metrics with
    ``metrics_public``) needs the token: the pages list patients and their studies."""

    enabled: Bool = True
    bind: Text = "127.0.0.1"
    port: Int(1, 65535) = 8080
    token_env: Text | None = None  # the bearer token for state-changing calls
    metrics_public: Bool = False  # /metrics without the token off loopback (a scraper)

    @property
    def protected(self) -> bool:
        """Every endpoint but /health needs the token (not bound to loopback only)."""
        return not is_loopback(self.bind)

    @model_validator(mode="after")
    def _token(self) -> WebModel:
        env_set("token_env", self.token_env)
        if self.token_env and CHECK_SECRETS.get() and \
                not os.environ.get(self.token_env, "").strip():
            raise ConfigError("token_env", f"environment variable {self.token_env} is empty")
        if self.enabled and not is_loopback(self.bind) and not self.token_env:
            raise ConfigError("token_env", f"required with web.bind {self.bind}, which is not "
                              "a loopback address: the status page and the REST API list "
                              "patients and their studies; name an environment variable "
                              "holding a token (or bind 127.0.0.1)")
        return self
