"""One HTTP session for every DICOMweb / REST peer: basic auth or a bearer token from a secret
(environment variable or file, never the configuration), TLS verification as configured."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

import requests

from .secrets import secret


def http_session(peer: Any) -> requests.Session:
    """A requests session for an HTTP peer's model (``config.peers.HttpPeer``: ``username`` +
    ``password_env``/``password_file``, or ``token_env``/``token_file``, and ``verify_tls``)."""
    # a plain requests session, as dicomweb_client.session_utils makes it: importing that
    # module imports dicomweb_client, numpy and Pillow (+19 MB in a router sending STOW-RS)
    session = requests.Session()
    if peer.username:
        password = secret(peer, "password")
        session.auth = (peer.username, password or "")
    else:
        token = secret(peer, "token")
        if token:
            session.headers["Authorization"] = f"Bearer {token}"
    session.verify = peer.verify_tls
    return session


_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")


def request_failure(exc: BaseException, url: str = "") -> str:
    """A failed HTTP request in one short line (host, port, what failed), like the DIMSE
    errors: requests and urllib3 wrap the cause in a paragraph of pool and retry details."""
    where = ""
    if url:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        where = f"{parts.hostname}:{port}: "
    text = str(exc)
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return f"{where}no connection within the timeout (is the server up and reachable?)"
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return f"{where}no answer within the timeout"
    if isinstance(exc, requests.exceptions.SSLError):
        reason = re.search(r"\[SSL[^\]]*\] ([^(')]+)", text)
        return f"{where}TLS handshake failed: {(reason.group(1) if reason else text).strip()}"
    if isinstance(exc, requests.exceptions.ConnectionError):
        cause = _ERRNO.search(text)
        if "Failed to resolve" in text or "Name or service not known" in text:
            return f"{where}cannot resolve the host name"
        if cause:
            return f"{where}cannot connect: {cause.group(1).strip()}"
        if "RemoteDisconnected" in text or "Connection aborted" in text:
            return f"{where}the server closed the connection"
        return f"{where}connection failed"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"{where}{type(exc).__name__}: {first[:200]}"
