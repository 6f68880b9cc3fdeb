"""The few places where dicomrouter adjusts pynetdicom (3.0.x) from outside.

Kept in one module so each adjustment is visible and can be checked against a new pynetdicom:

* TCP_NODELAY on every association socket. pynetdicom never sets it; DICOM's request/response
  pattern then meets Nagle + delayed ACK (~40 ms per message).
* Chunked C-STORE receive into the spool's own tmp directory, through ``spool.ReceiveFile`` (instead
  of a NamedTemporaryFile in the system temp dir), and chunked C-STORE send from files.
* C-MOVE and C-GET requests served by a subclass of pynetdicom's Query/Retrieve service class
  (``scp/retrieve.py``): pynetdicom's own opens the move destination's association before any
  status can be sent, and counts a refusal as one failed sub-operation.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import Any

from pynetdicom import _config, dimse_messages, transport

_patched = False


def _set_nodelay(sock: socket.socket | None) -> None:
    if sock is None:
        return
    with contextlib.suppress(OSError):  # not a TCP socket, or closed: nothing to tune
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def association_failure(assoc: Any, host: str, port: int, tls: Any = None) -> str:
    """Why an association was not established, in words an integration engineer can act on.

    pynetdicom reports a refused TCP connection (or a failed TLS handshake) as an abort; a
    quick connect (and handshake) tells them apart.
    """
    if assoc.is_rejected:
        return "association rejected (check the called/calling AE titles and the peer's allow-list)"
    try:
        with socket.create_connection((host, port), timeout=5) as sock:
            if tls is not None:
                with tls.wrap_socket(sock, server_hostname=host):
                    pass
    except ssl.SSLError as exc:
        from .tlsctx import describe_error

        return f"TLS handshake failed: {describe_error(exc)}"
    except OSError as exc:
        return f"no connection ({exc.strerror or exc}): is the peer up and listening?"
    if assoc.is_aborted:
        return "association aborted by the peer"
    return "association not established (timeout?)"


def enable_tcp_nodelay() -> None:
    """Set TCP_NODELAY on every pynetdicom association socket, requestor and acceptor."""
    global _patched
    if _patched:
        return
    original = transport.AssociationSocket.__init__

    def __init__(self: transport.AssociationSocket, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        _set_nodelay(self.socket)

    transport.AssociationSocket.__init__ = __init__  # type: ignore[method-assign]
    _patched = True


def stream_c_store_from_files() -> None:
    """``send_c_store(path)`` streams the dataset bytes from the file, never decoding them."""
    _config.STORE_SEND_CHUNKED_DATASET = True


def receive_c_store_into(factory: Callable[[], Any]) -> None:
    """Chunked C-STORE receive: each dataset is written, as it arrives, to ``factory()``.

    pynetdicom calls ``NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")`` and then uses
    ``.write``, ``.file.flush``, ``.close`` and ``.name``; the factory returns an object with those.
    """
    _config.STORE_RECV_CHUNKED_DATASET = True

    def named_temporary_file(*_args: Any, **_kwargs: Any) -> Any:
        return factory()

    dimse_messages.NamedTemporaryFile = named_temporary_file  # type: ignore[assignment]


def serve_query_retrieve_with(service_class: type) -> None:
    """Serve the Query/Retrieve SOP classes with ``service_class`` (a subclass of pynetdicom's
    ``QueryRetrieveServiceClass``) in every association of this process."""
    from pynetdicom import association
    from pynetdicom.service_class import QueryRetrieveServiceClass

    original = association.uid_to_service_class
    if getattr(original, "replaced_by", None) is service_class:
        return

    def uid_to_service_class(uid: str) -> type:
        cls = original(uid)
        return service_class if cls is QueryRetrieveServiceClass else cls

    uid_to_service_class.replaced_by = service_class  # type: ignore[attr-defined]
    association.uid_to_service_class = uid_to_service_class  # type: ignore[assignment]
