"""One HTTP session for every DICOMweb / REST peer: basic auth or a bearer token from a secret
(environment variable or file, never the configuration), TLS verification as configured."""

from __future__ import annotations

from typing import Any

import requests
from dicomweb_client.session_utils import create_session, create_session_from_user_pass

from .destinations.base import secret


def http_session(options: dict[str, Any]) -> requests.Session:
    """A requests session for ``options`` (``username`` + ``password_env``/``password_file``,
    or ``token_env``/``token_file``, and ``verify_tls``)."""
    if options.get("username"):
        password = secret(options, "password")
        session = create_session_from_user_pass(options["username"], password or "")
    else:
        session = create_session()
        token = secret(options, "token")
        if token:
            session.headers["Authorization"] = f"Bearer {token}"
    session.verify = options.get("verify_tls", True)
    return session
