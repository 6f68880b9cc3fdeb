"""Who may use the DICOMweb server: a bearer token, HTTP basic auth, or nobody asked.

``dicomweb.auth`` names the credentials; without it the web port's DICOMweb routes take the web
token (``web.token_env``) when the web server is reachable from the network, and are open on
loopback, as the status page is. A listener of its own off loopback must name credentials (the
configuration refuses it otherwise). Each server (the web app, the own listener's app) keeps its
``Credentials`` in ``app.state.dicomweb_auth``; ``require_dicomweb_auth`` reads them there, so
the QIDO-RS/WADO-RS routes of the same servers use the same check.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
from dataclasses import dataclass

from fastapi import HTTPException, Request

from ...config import Config


@dataclass(frozen=True)
class Credentials:
    """What a request must carry; nothing at all when every field is None and not ``closed``."""

    token: str | None = None  # Authorization: Bearer <token>
    user: str | None = None  # Authorization: Basic user:password
    password: str | None = None
    any_user: bool = False  # basic auth with any user name and the token as the password
    closed: bool = False  # credentials were asked for but none are set: refuse everything

    @property
    def required(self) -> bool:
        return self.closed or self.token is not None or self.user is not None

    def accepts(self, authorization: str) -> bool:
        """The Authorization header carries these credentials (compared in constant time)."""
        scheme, _, value = authorization.partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer":
            return self.token is not None and _same(value, self.token)
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(value, validate=True).decode("utf-8") \
                .partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        if self.user is not None and self.password is not None and \
                _same(user, self.user) & _same(password, self.password):
            return True
        return self.any_user and self.token is not None and _same(password, self.token)


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def credentials(cfg: Config, own_listener: bool) -> Credentials:
    """The credentials of the DICOMweb routes on the web port or on their own listener."""
    auth = cfg.dicomweb.auth
    if auth is not None:
        token = os.environ.get(auth.token_env, "").strip() if auth.token_env else None
        password = os.environ.get(auth.password_env, "") if auth.password_env else None
        creds = Credentials(token or None, auth.user or None, password or None)
        return creds if creds.required else Credentials(closed=True)
    if own_listener:
        return Credentials()  # loopback only (the configuration checked it)
    if not cfg.web.protected:
        return Credentials()
    token = os.environ.get(cfg.web.token_env, "").strip() if cfg.web.token_env else ""
    return Credentials(token=token, any_user=True) if token else Credentials(closed=True)


def require_dicomweb_auth(request: Request) -> None:
    """FastAPI dependency of every DICOMweb route: 401 unless the request carries the server's
    credentials (refused too when the server has none recorded: never open by mistake)."""
    creds: Credentials | None = getattr(request.app.state, "dicomweb_auth", None)
    if creds is None:
        creds = Credentials(closed=True)
    if not creds.required:
        return
    if not creds.accepts(request.headers.get("authorization", "")):
        challenge = 'Basic realm="dicomweb", charset="UTF-8"' if creds.user else "Bearer"
        raise HTTPException(401, "this DICOMweb server needs credentials (Authorization: "
                            "Bearer <token> or Basic)", headers={"WWW-Authenticate": challenge})
