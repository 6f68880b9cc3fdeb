"""What the lean listener tracks of one TCP connection, and a test of whether its peer is gone."""

from __future__ import annotations

import socket
import ssl

_TCP_CLOSE_WAIT = 8  # tcp_info.tcpi_state (Linux): the peer sent FIN


def peer_closed(sock: socket.socket) -> bool:
    """Whether the peer ended its side: a peek cannot tell (it keeps returning the bytes that
    are there), so a half-closed sender would otherwise be waited for until acse_timeout."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _TCP_CLOSE_WAIT
    except (OSError, AttributeError):
        return False



class Connection:
    """What the listener tracks of one TCP connection: its deadline, whether it associated,
    and its TLS layer (``tls``, once the handshake is done; ``sock`` stays the raw socket the
    watchdog shuts down)."""

    __slots__ = ("sock", "peer", "deadline", "waiting_for", "associated", "expired", "tls",
                 "subject")

    def __init__(self, sock: socket.socket, peer: str, deadline: float,
                 waiting_for: str) -> None:
        self.sock = sock
        self.peer = peer
        self.deadline = deadline
        self.waiting_for = waiting_for  # what the deadline is for, for the log line
        self.associated = False
        self.expired = ""  # why the listener cut it short
        self.tls: ssl.SSLSocket | None = None
        self.subject = ""  # the client certificate's CN=..., over TLS

    @property
    def live(self) -> socket.socket:
        """The socket to use: the TLS one once wrapped (wrapping detaches ``sock``, which
        stays only as the key of the listener's table)."""
        return self.tls if self.tls is not None else self.sock
