"""Hand a TLS association to pynetdicom after its A-ASSOCIATE-RQ was read.

Over plain TCP the listener peeks at the RQ (MSG_PEEK) and pynetdicom reads it again; a TLS
socket cannot peek. So the RQ is read, and ``ReplaySocket`` gives pynetdicom those bytes first,
then the TLS socket's. pynetdicom asks ``select`` whether data is ready and, only for an
``ssl.SSLSocket``, also ``pending()`` (bytes decrypted but not read); this wrapper passes that
``isinstance`` check and counts the replayed bytes as pending, so pynetdicom reads them at once.
"""

from __future__ import annotations

import ssl
from typing import Any


class ReplaySocket:
    def __init__(self, sock: ssl.SSLSocket, head: bytes) -> None:
        self._sock = sock
        self._head = bytearray(head)

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # noqa: D105 - pynetdicom: isinstance(sock, ssl.SSLSocket)
        return ssl.SSLSocket

    def recv(self, n: int, *args: Any) -> bytes:
        if self._head:
            out = bytes(self._head[:n])
            del self._head[:n]
            return out
        return self._sock.recv(n, *args)

    def pending(self) -> int:
        return len(self._head) + self._sock.pending()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)
