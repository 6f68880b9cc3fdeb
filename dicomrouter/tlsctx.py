"""TLS contexts for DICOM (PS3.15 Secure Transport Connection Profiles, BCP 195 ciphers).

Receive: ``server_context(listener.tls)``; send: ``client_context(destination tls)``. TLS 1.2 is
the floor by default (``min_version``); with TLS 1.2 only forward-secret AEAD suites are offered
(BCP 195); TLS 1.3 suites are OpenSSL's, all of them AEAD.
"""

from __future__ import annotations

import ssl
from typing import Any

BCP195_TLS12 = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!SHA1"
VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def server_context(tls: Any) -> ssl.SSLContext:
    """For a TLS listener: its certificate and key; with ``verify_client`` a client certificate
    signed by ``ca`` is required (the handshake fails otherwise)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = VERSIONS[tls.min_version]
    ctx.set_ciphers(BCP195_TLS12)
    ctx.load_cert_chain(tls.cert, tls.key)
    if tls.ca:
        ctx.load_verify_locations(tls.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.verify_client else \
        ssl.CERT_OPTIONAL if tls.ca else ssl.CERT_NONE
    return ctx


def client_context(tls: Any) -> ssl.SSLContext:
    """For a destination or source (its ``tls:`` model): verify the peer against ``ca`` (or
    the system's CAs), check its name unless ``check_hostname: false``, present ``cert``/``key``
    if given."""
    ctx = ssl.create_default_context(cafile=tls.ca or None)
    ctx.minimum_version = VERSIONS[tls.min_version or "TLSv1.2"]
    ctx.set_ciphers(BCP195_TLS12)
    ctx.check_hostname = bool(tls.check_hostname)
    if tls.cert:
        ctx.load_cert_chain(tls.cert, tls.key or None)
    return ctx


def subject_of(cert: dict[str, Any] | None) -> str:
    """``CN=...`` of a peer certificate as ``getpeercert()`` returns it ('' if none)."""
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return f"CN={value}"
    return ""


def describe_error(exc: BaseException) -> str:
    """A handshake failure in words (the verify message when there is one)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not accepted: {exc.verify_message}"
    reason = getattr(exc, "reason", None)
    return str(reason or exc).replace("_", " ").lower() if reason else str(exc)
