"""The few places where dicomrouter adjusts pynetdicom (3.0.x) from outside.

Kept in one module so each adjustment is visible and can be checked against a new pynetdicom:

* TCP_NODELAY on every association socket. pynetdicom never sets it; DICOM's request/response
  pattern then meets Nagle + delayed ACK (~40 ms per message).
* Chunked C-STORE receive into the spool's own tmp directory, through ``spool.ReceiveFile`` (instead
  of a NamedTemporaryFile in the system temp dir), and chunked C-STORE send from files.
* A response pynetdicom's reactor takes from a waiting sender goes back to it (a race in its
  reactor pause, ``hand_back_stolen_responses``).
* C-MOVE and C-GET requests served by a subclass of pynetdicom's Query/Retrieve service class
  (``scp/retrieve.py``): pynetdicom's own opens the move destination's association before any
  status can be sent, and counts a refusal as one failed sub-operation.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

from pynetdicom import _config, dimse_messages, evt, transport
from pynetdicom.pdu import A_ASSOCIATE_RJ

from .tlsctx import describe_error

_patched = False


def _set_nodelay(sock: socket.socket | None) -> None:
    if sock is None:
        return
    with contextlib.suppress(OSError):  # not a TCP socket, or closed: nothing to tune
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# A-ASSOCIATE-RJ (source, reason) pairs that say the peer will never accept this association as
# configured: our calling AE, its called AE, the application context or protocol version.
PERMANENT_REJECTIONS = frozenset({(1, 2), (1, 3), (1, 7), (2, 2)})


def rejection_is_permanent(result: int, source: int, reason: int) -> bool:
    """A rejection waiting cannot heal: rejected-permanent, for a reason of configuration."""
    return result == 1 and (source, reason) in PERMANENT_REJECTIONS


def _remember_rejection(event: Any) -> None:
    if isinstance(event.pdu, A_ASSOCIATE_RJ):
        event.assoc.dicomrouter_rejection = event.pdu.to_primitive()


#: pass to ``AE.associate(evt_handlers=...)`` so ``association_failure`` and
#: ``rejected_permanently`` can tell what an A-ASSOCIATE-RJ said (pynetdicom only logs it).
#: The PDU is caught as it is decoded: a peer that closes the connection right after its
#: rejection (DCMTK does) can make pynetdicom report an abort, the rejection never reaching
#: its ACSE; what the peer said is what counts.
REJECTION_HANDLERS = [(evt.EVT_PDU_RECV, _remember_rejection)]


def rejection_of(assoc: Any) -> Any:
    """The A-ASSOCIATE-RJ the peer sent on this association (a primitive), if it sent one."""
    return getattr(assoc, "dicomrouter_rejection", None)


def rejected_permanently(assoc: Any) -> bool:
    prim = rejection_of(assoc)
    return bool(prim is not None and rejection_is_permanent(
        prim.result, prim.result_source, prim.diagnostic))


def association_failure(assoc: Any, host: str, port: int, tls: Any = None) -> str:
    """Why an association was not established, in words an integration engineer can act on.

    pynetdicom reports a refused TCP connection (or a failed TLS handshake) as an abort; a
    quick connect (and handshake) tells them apart.
    """
    prim = rejection_of(assoc)
    if assoc.is_rejected or prim is not None:
        said = f" ({prim.result_str}, {prim.source_str}: {prim.reason_str})" if prim else ""
        return (f"association rejected{said}: check the called/calling AE titles and the "
                "peer's allow-list")
    try:
        with socket.create_connection((host, port), timeout=5) as sock:
            if tls is not None:
                with tls.wrap_socket(sock, server_hostname=host):
                    pass
    except ssl.SSLError as exc:
        return f"TLS handshake failed: {describe_error(exc)}"
    except OSError as exc:
        return f"no connection ({exc.strerror or exc}): is the peer up and listening?"
    if assoc.is_aborted:
        return f"association aborted by the peer{not_dicom(host, port, tls)}"
    return "association not established (timeout?)"


# An A-ASSOCIATE-RQ header with a body no DICOM peer accepts: a DICOM peer answers with a PDU
# (A-ASSOCIATE-RJ or A-ABORT) or closes; an HTTP server answers "HTTP/1.1 400" once it has a
# line (the CR LFs end the body as far as HTTP is concerned).
_PROBE = b"\x01\x00\x00\x00\x00\x44" + b"\x00" * 0x40 + b"\r\n\r\n"


def not_dicom(host: str, port: int, tls: Any = None) -> str:
    """After an abort: "" if the peer may speak DICOM, else a clause saying what it spoke."""
    try:
        with socket.create_connection((host, port), timeout=3) as raw:
            sock = tls.wrap_socket(raw, server_hostname=host) if tls is not None else raw
            sock.sendall(_PROBE)
            head = sock.recv(16)
    except (OSError, ssl.SSLError):
        return ""
    return describe_non_dicom(head)


def describe_non_dicom(head: bytes) -> str:
    """What the first bytes a peer sent say about it ("" when they may be a DICOM PDU)."""
    if not head or head[0] in (0x02, 0x03, 0x07):  # A-ASSOCIATE-AC/-RJ, A-ABORT
        return ""
    if head.startswith(b"HTTP/"):
        return ": it answered in HTTP, not DICOM (is this its web port?)"
    return (": it does not speak DICOM (it answered "
            f"{head[:8].decode('ascii', 'backslashreplace')!r})")


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


def receive_c_store_into(factory: Callable[..., Any]) -> None:
    """Chunked C-STORE receive: each dataset is written, as it arrives, to
    ``factory(note=...)``, with the reception note of its association (``set_reception_note``).

    pynetdicom calls ``NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")`` and then uses
    ``.write``, ``.file.flush``, ``.close`` and ``.name``; the factory returns an object with those.
    """
    _config.STORE_RECV_CHUNKED_DATASET = True

    def named_temporary_file(*_args: Any, **_kwargs: Any) -> Any:
        return factory(note=reception_note_here())

    dimse_messages.NamedTemporaryFile = named_temporary_file  # type: ignore[assignment]


def set_reception_note(assoc: Any, note: bytes) -> None:
    """The reception note (``spool/note.py``: AE titles, routing keys) for every dataset
    ``assoc`` receives: set it before the first can arrive (EVT_REQUESTED as an acceptor,
    before the C-GET as a requestor)."""
    assoc.dicomrouter_note = note


def reception_note_here() -> bytes:
    """The reception note of the association this thread reads for: pynetdicom opens the
    chunked-receive file in the association's DUL thread, which knows its association."""
    assoc = getattr(threading.current_thread(), "assoc", None)
    return getattr(assoc, "dicomrouter_note", b"") if assoc is not None else b""


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


def hand_back_stolen_responses() -> None:
    """A response pynetdicom's reactor takes off the queue while a sender waits for it goes back.

    A ``send_*`` pauses the association's reactor by clearing its checkpoint and waiting until
    ``_is_paused``; the reactor sets ``_is_paused`` just before it waits at the checkpoint, so a
    sender that clears it in between sees the flag while the reactor goes on through one more
    turn. That turn can take the sender's response off the DIMSE queue: pynetdicom logs
    "Received unexpected C-STORE service message" and drops it, and the sender waits out its
    DIMSE timeout and aborts the association (a delivery retried, a C-MOVE's sub-operations
    cut short). A thread switch at the wrong moment on a busy machine is enough (seen in CI).
    Here a response taken while the checkpoint is clear (a sender waits) is put back; the
    reactor does not come back to the queue until the sender is done. Any other response is
    logged and dropped as before.
    """
    from pynetdicom.association import Association

    original = Association._serve_request
    if getattr(original, "hands_back_responses", False):
        return

    def _serve_request(self: Association, msg: Any, context_id: int) -> None:
        if not msg.is_valid_request and not self._reactor_checkpoint.is_set():
            self.dimse.msg_queue.put((context_id, msg))
            return
        original(self, msg, context_id)

    _serve_request.hands_back_responses = True  # type: ignore[attr-defined]
    Association._serve_request = _serve_request  # type: ignore[method-assign]


def adjust_associations() -> None:
    """Both adjustments every association of this process needs: TCP_NODELAY, and responses
    kept for the sender waiting for them."""
    enable_tcp_nodelay()
    hand_back_stolen_responses()
