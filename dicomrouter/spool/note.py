"""The reception note: what an association knew about an instance, in the file's own preamble.

A C-STORE's routing keys (``_Listener``, ``_SourceHost``, the AE titles), a STOW-RS
request's (``_Endpoint``, ``_SourceHost``) and the Q/R proxy's mark on what its C-GET brought
(``_Proxied``) are not in the dataset: they were added to its index tags after ``accept``, in
memory. An instance that start-up adopts (from its receive slot, its receive log record, or as
an orphan file) came back with the file's tags only, and a route on ``Listener``,
``SourceHost``, ``CalledAE`` or ``Endpoint`` no longer saw them.

The 128-byte Part 10 preamble is the implementation's to use; its first 24 bytes hold the
completion marker (``slots.py``). The receiver writes the note right after it, in the bytes it
writes anyway, so the marker's CRC covers it and the one sync that makes the instance durable
makes the note durable too: ``DRN1``, one length byte, then the calling and called AE titles
and the tags, separated by US. A note that does not fit (very long listener or endpoint names)
is left out. Every reader of a spool file sees the whole preamble as zeros (``SpoolReader``):
the sender's address never leaves the router in a file it delivers.

The marker's CRC and length are also the instance's digest (``SpoolReader.digest``: an
identical re-send is not delivered again). It already covered the calling AE (the file meta
the receiver writes); it now covers the note too, so a re-send of the same instance through
another listener or from another address counts as changed and is delivered again.
"""

from __future__ import annotations

from pathlib import Path

from ..dicomfile import source_ae
from .slots import MARKER_SIZE

PREAMBLE = 128
MAGIC = b"DRN1"
_ROOM = PREAMBLE - MARKER_SIZE - len(MAGIC) - 1
#: what a note holds, in this order, separated by US (0x1F): the calling and called AE titles,
#: then index tags
TAGS = ("_Listener", "_SourceHost", "_Endpoint", "_Proxied")
_SEP = "\x1f"


def pack(calling_ae: str, called_ae: str, tags: dict[str, str]) -> bytes:
    """The note for a reception (b"" when it does not fit in the preamble)."""
    values = [calling_ae, called_ae, *(tags.get(k, "") for k in TAGS)]
    if any(_SEP in v for v in values):
        return b""
    payload = _SEP.join(values).encode("utf-8")
    if len(payload) > _ROOM:
        return b""
    return MAGIC + bytes([len(payload)]) + payload


def overlay(chunk: bytes | bytearray | memoryview, offset: int, note: bytes
            ) -> bytes | bytearray | memoryview:
    """``chunk`` (written at ``offset`` of the file) with the note in place where they meet."""
    start, end = MARKER_SIZE, MARKER_SIZE + len(note)
    if not note or offset >= end or offset + len(chunk) <= start:
        return chunk
    out = bytearray(chunk)
    lo, hi = max(start, offset), min(end, offset + len(out))
    out[lo - offset:hi - offset] = note[lo - start:hi - start]
    return out


def read(head: bytes | bytearray | memoryview) -> tuple[dict[str, str], str, str]:
    """(tags, calling AE, called AE) of the note in a file's first bytes; ({}, "", "") if it
    has none."""
    at = MARKER_SIZE + len(MAGIC)
    if len(head) < at + 1 or bytes(head[MARKER_SIZE:at]) != MAGIC:
        return {}, "", ""
    n = head[at]
    try:
        values = bytes(head[at + 1:at + 1 + n]).decode("utf-8").split(_SEP)
    except UnicodeDecodeError:
        return {}, "", ""
    if len(values) != 2 + len(TAGS) or n > _ROOM:
        return {}, "", ""
    return {k: v for k, v in zip(TAGS, values[2:], strict=True) if v}, values[0], values[1]


def read_file(path: str | Path) -> tuple[dict[str, str], str, str]:
    try:
        with open(path, "rb") as f:
            return read(f.read(PREAMBLE))
    except OSError:
        return {}, "", ""


def recorded_as(path: str | Path, tags: dict[str, str],
            head: bytes | bytearray | None = None) -> tuple[dict[str, str], str, str]:
    """What start-up records for an instance it adopts (slot, log record, orphan, shared
    object): the file's ``tags`` with its note's, the calling AE (the note's, else the file
    meta's Source AE Title) and the called AE. ``head``: the file's first bytes, if at hand."""
    noted, calling, called = read(head) if head is not None else read_file(path)
    return {**tags, **noted}, calling or source_ae(path), called
