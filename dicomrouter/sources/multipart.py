"""A streaming reader of ``multipart/related`` bodies (WADO-RS responses, STOW-RS requests),
part by part.

dicomweb-client decodes a whole part in memory before handing it over; a 2 GB multi-frame
instance would be held whole. This reader yields each part's body in chunks as they arrive,
keeping only a boundary's length back, so a pulled instance goes to disk with flat memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

#: a part's headers may take this many bytes (a body without a blank line is not held whole)
MAX_HEADERS = 64 << 10


class MultipartError(ValueError):
    """The body is not the multipart message its headers announced (truncated, no boundary)."""


def boundary_of(content_type: str) -> bytes:
    media, *params = (p.strip() for p in content_type.split(";"))
    if media.lower() != "multipart/related":
        raise MultipartError(f"expected multipart/related, got {media!r}")
    for p in params:
        key, _, value = p.partition("=")
        if key.strip().lower() == "boundary":
            return value.strip().strip('"').encode()
    raise MultipartError("multipart/related without a boundary")


class MultipartReader:
    """``next_part()`` returns an iterator over the next part's body (consume it whole before
    asking for the next one), or None after the closing boundary."""

    def __init__(self, chunks: Iterable[bytes], boundary: bytes) -> None:
        self._it = iter(chunks)
        self._buf = bytearray()
        self._marker = b"--" + boundary
        self._delim = b"\r\n" + self._marker
        self._started = False
        self._done = False
        #: the current part's headers (names in lower case)
        self.headers: dict[str, str] = {}

    def _fill(self) -> bool:
        for chunk in self._it:
            if chunk:
                self._buf += chunk
                return True
        return False

    def next_part(self) -> Iterator[bytes] | None:
        if self._done:
            return None
        if not self._started:  # skip the preamble up to the first boundary
            while (i := self._buf.find(self._marker)) < 0:
                if len(self._buf) > MAX_HEADERS:
                    raise MultipartError(f"no boundary in the first {MAX_HEADERS} bytes")
                if not self._fill():
                    raise MultipartError("no boundary in the body")
            del self._buf[:i + len(self._marker)]
            self._started = True
        while len(self._buf) < 2:
            if not self._fill():
                raise MultipartError("truncated after a boundary")
        if self._buf[:2] == b"--":  # the closing boundary
            self._done = True
            return None
        while (j := self._buf.find(b"\r\n\r\n")) < 0:  # the part's headers
            if len(self._buf) > MAX_HEADERS:
                raise MultipartError(f"part headers longer than {MAX_HEADERS} bytes")
            if not self._fill():
                raise MultipartError("truncated part headers")
        self.headers = {}
        for line in bytes(self._buf[:j]).decode("latin-1").split("\r\n"):
            name, sep, value = line.partition(":")
            if sep:
                self.headers[name.strip().lower()] = value.strip()
        del self._buf[:j + 4]
        return self._body()

    def _body(self) -> Iterator[bytes]:
        keep = len(self._delim)
        while True:
            k = self._buf.find(self._delim)
            if k >= 0:
                if k:
                    yield bytes(self._buf[:k])
                del self._buf[:k + len(self._delim)]
                return
            if len(self._buf) > keep:
                out = bytes(self._buf[:-keep])
                del self._buf[:-keep]
                yield out
            if not self._fill():
                raise MultipartError("truncated part body")
