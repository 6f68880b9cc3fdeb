"""``dicomweb:``, the router as a DICOMweb server (STOW-RS in; issue 28): where it is served
(the web port, and optionally a listener of its own with TLS), who may use it, its named
endpoints (the ``Endpoint`` routing key) and its limits."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

from pydantic import model_validator

from ..rules import literal_values
from ..schema import (
    CHECK_SECRETS,
    Bool,
    Duration,
    Int,
    ReadableFile,
    Size,
    Strict,
    Text,
    env_set,
    readable,
)
from .base import ConfigError, is_loopback, show

#: the ``Endpoint`` value of an instance posted to /dicom-web/studies (no endpoint name)
DEFAULT_ENDPOINT = "default"
_ENDPOINT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_RESERVED = {DEFAULT_ENDPOINT, "studies", "series", "instances", "servers"}


class DicomwebTlsModel(Strict):
    """``dicomweb.tls``: HTTPS on the DICOMweb server's own listener."""

    cert: ReadableFile
    key: ReadableFile

    @model_validator(mode="after")
    def _files(self) -> DicomwebTlsModel:
        for key in ("cert", "key"):
            readable(getattr(self, key), key)
        return self


class DicomwebAuthModel(Strict):
    """``dicomweb.auth``: a bearer token, HTTP basic auth, or both (either is accepted)."""

    token_env: Text | None = None  # environment variable holding the bearer token
    user: Text | None = None  # basic auth: the user name ...
    password_env: Text | None = None  # ... and the variable holding its password

    @model_validator(mode="after")
    def _secrets(self) -> DicomwebAuthModel:
        for key in ("token_env", "password_env"):
            env = getattr(self, key)
            env_set(key, env)
            if env and CHECK_SECRETS.get() and not os.environ.get(env, "").strip():
                raise ConfigError(key, f"environment variable {env} is empty")
        if bool(self.user) != bool(self.password_env):
            raise ConfigError("password_env" if self.user else "user",
                              "basic auth needs both user and password_env")
        if not self.token_env and not self.user:
            raise ConfigError("token_env", "name a token (token_env) or a user and "
                              "password (user, password_env), or leave auth out")
        return self


class DicomwebModel(Strict):
    """``dicomweb:``. STOW-RS at /dicom-web/studies on the web port (``web.port``) and, with
    ``port``, on a listener of its own."""

    enabled: Bool = True
    bind: Text = "127.0.0.1"  # the own listener's address (with ``port``)
    port: Int(1, 65535) | None = None  # a listener of its own (unset: the web port only)
    tls: DicomwebTlsModel | None = None  # HTTPS on that listener
    auth: DicomwebAuthModel | None = None
    endpoints: tuple[str, ...] = ()  # /dicom-web/<name>/studies, the Endpoint routing key
    max_request_size: Size = 64 << 30  # one STOW-RS request body
    max_instance_size: Size = 4 << 30  # one part (instance) of it
    read_timeout: Duration = 60.0  # no byte of the body this long: the request is dropped
    request_timeout: Duration = 6 * 3600.0  # a request may take this long in all
    max_requests: Int(1, 1000) = 8  # STOW-RS requests ingested at once (more wait)

    @model_validator(mode="before")
    @classmethod
    def _endpoint_list(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("endpoints") is not None:
            eps = data["endpoints"]
            if not isinstance(eps, list | tuple) or not all(isinstance(e, str) for e in eps):
                raise ConfigError("endpoints", f"expected a list of names, got {show(eps)}")
            for e in eps:
                if not _ENDPOINT_NAME.match(e) or e.lower() in _RESERVED:
                    raise ConfigError("endpoints", f"{show(e)} is not an endpoint name "
                                      "(letters, digits, '.', '_', '-'; not one of "
                                      f"{', '.join(sorted(_RESERVED))})")
            if len(set(eps)) != len(eps):
                raise ConfigError("endpoints", "a name is listed twice")
        return data

    @model_validator(mode="after")
    def _limits(self) -> DicomwebModel:
        for key in ("read_timeout", "request_timeout"):
            if getattr(self, key) <= 0:
                raise ConfigError(key, "must be more than 0")
        for key in ("max_request_size", "max_instance_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(key, "must be more than 0")
        if self.tls is not None and self.port is None:
            raise ConfigError("tls", "is for the listener of its own: set dicomweb.port")
        if self.enabled and self.port is not None and self.auth is None and \
                not is_loopback(self.bind):
            raise ConfigError("auth", f"required with dicomweb.bind {self.bind}, which is not "
                              "a loopback address: anyone reaching it could store studies; "
                              "set auth.token_env (or auth.user and auth.password_env), or "
                              "bind 127.0.0.1")
        return self


def check_dicomweb(dicomweb: DicomwebModel, web_port: int | None, ports: dict[int, str],
                   routes: Sequence[Any]) -> None:
    """Across the file: the own port is free, route ``Endpoint`` values name endpoints."""
    if dicomweb.enabled and dicomweb.port is not None and \
            (dicomweb.port in ports or dicomweb.port == web_port):
        raise ConfigError("dicomweb.port", f"{dicomweb.port} is already used by "
                          f"{ports.get(dicomweb.port, 'web.port')}")
    names = {DEFAULT_ENDPOINT, *dicomweb.endpoints}
    for i, route in enumerate(routes):
        wrong = [v for v in literal_values(route.when, "Endpoint") if v not in names]
        if wrong:
            raise ConfigError(f"routes[{i}].when.Endpoint", f"unknown DICOMweb endpoint "
                              f"{show(wrong[0])} (endpoints: {', '.join(sorted(names))})")
