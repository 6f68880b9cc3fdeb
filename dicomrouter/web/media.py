"""DICOMweb media types for the QIDO-RS and WADO-RS answers (PS3.18 8.7): the ``Accept``
header read as a list of (media type, transfer syntax) wishes, the choice of what to send for a
stored instance or frame, and the multipart/related body written as a stream of parts.

Choices (docs/conformance.md): no ``Accept`` (or ``*/*``, or ``multipart/related`` without a
``type``) means "as stored"; ``type="application/dicom"`` without ``transfer-syntax`` means
Explicit VR Little Endian (the standard's default), ``transfer-syntax=*`` as stored. A syntax
other than the stored one is produced only by the router's lossless conversions
(``transcode.TARGETS``); anything else is 406. Frames are never decoded: they go out in the
stored syntax's own media type, or as application/octet-stream when that is what is stored
(or asked for with ``transfer-syntax=*`` or the stored syntax).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ..pixelframes import NATIVE, media_type
from ..transcode import TARGETS

EXPLICIT_LE = "1.2.840.10008.1.2.1"
ANY = frozenset({"", "*", "*/*"})
_TARGETS = frozenset(str(t) for t in TARGETS)


@dataclass(frozen=True)
class Wish:
    """One media range of an Accept header: the (inner) media type and its transfer syntax
    (None: not given, ``*``: any)."""

    media_type: str
    transfer_syntax: str | None


def _params(text: str) -> tuple[str, dict[str, str]]:
    head, *rest = _split(text, ";")
    params: dict[str, str] = {}
    for p in rest:
        key, _, value = p.partition("=")
        params[key.strip().lower()] = value.strip().strip('"').strip()
    return head.strip().lower(), params


def _split(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` outside double quotes."""
    out, part, quoted = [], [], False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            out.append("".join(part))
            part = []
        else:
            part.append(ch)
    out.append("".join(part))
    return out


def wishes(accept: str | None) -> list[Wish]:
    """The Accept header as wishes, in the order given (q-values are not weighed); no header:
    one wish for anything as stored."""
    if not accept or not accept.strip():
        return [Wish("*", "*")]
    out = []
    for item in _split(accept, ","):
        if not item.strip():
            continue
        kind, params = _params(item)
        ts = params.get("transfer-syntax") or None
        if kind == "multipart/related":
            inner = params.get("type", "").lower()
            out.append(Wish(inner or "*", ts if inner not in ANY else (ts or "*")))
        elif kind in ("*/*", "multipart/*"):
            out.append(Wish("*", "*"))
        else:
            out.append(Wish(kind, ts))
    return out


def instance_syntax(stored: str, wanted: Iterable[Wish]) -> str | None:
    """The syntax to send an instance stored in ``stored`` in (None: nothing wanted fits)."""
    for w in wanted:
        if w.media_type not in ANY and w.media_type not in ("application/dicom",
                                                            "application/*"):
            continue
        if w.transfer_syntax == "*" or (w.transfer_syntax is None and w.media_type in ANY):
            return stored
        target = w.transfer_syntax or EXPLICIT_LE
        if target == stored or target in _TARGETS:
            return target
    return None


def frame_type(stored: str, wanted: Iterable[Wish]) -> str | None:
    """The Content-Type of a frame stored in ``stored`` (None: nothing wanted fits);
    FrameError 406 for a syntax with no frame media type."""
    own = media_type(stored)
    native = stored in NATIVE
    syntax = EXPLICIT_LE if native else stored
    for w in wanted:
        ts = w.transfer_syntax
        if w.media_type in ANY or (w.media_type == "image/*" and not native):
            return f"{own}; transfer-syntax={syntax}"
        if w.media_type == own and ts in (None, "*", stored, syntax):
            return f"{own}; transfer-syntax={syntax}"
        if w.media_type == "application/octet-stream" and ts in ("*", stored):
            return f"application/octet-stream; transfer-syntax={syntax}"
    return None


def boundary() -> str:
    return f"dicomrouter-{secrets.token_hex(12)}"


def multipart(parts: Iterable[tuple[str, Iterable[bytes]]], mark: str) -> Iterator[bytes]:
    """A multipart/related body: each (Content-Type, chunks) a part, streamed."""
    for content_type, chunks in parts:
        yield f"--{mark}\r\nContent-Type: {content_type}\r\n\r\n".encode()
        yield from chunks
        yield b"\r\n"
    yield f"--{mark}--\r\n".encode()


def related(inner: str, mark: str) -> str:
    """The response's Content-Type for parts of ``inner``."""
    return f'multipart/related; type="{inner}"; boundary={mark}'
