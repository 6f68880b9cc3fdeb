"""P3's STOW-RS ingest: a client posting a corpus to the router's DICOMweb server in one
multipart/related request, the files read in 1 MB pieces and sent chunked as they are read (the
way a streaming client sends a study: nothing held whole on either side)."""

from __future__ import annotations

import http.client
import json
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from .procs import BenchError

PIECE = 1 << 20


def body(files: Sequence[Path], boundary: bytes) -> Iterator[bytes]:
    for f in files:
        yield b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n"
        with open(f, "rb") as src:
            while piece := src.read(PIECE):
                yield piece
        yield b"\r\n"
    yield b"--" + boundary + b"--"


def post_corpus(host: str, port: int, files: Sequence[Path], timeout: float) -> float:
    """POST ``files`` to ``/dicom-web/studies``; wall seconds until the response. Raises
    BenchError unless every instance is listed as stored (HTTP 200)."""
    boundary = uuid.uuid4().hex.encode()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    started = time.perf_counter()
    try:
        conn.request("POST", "/dicom-web/studies", body=body(files, boundary),
                     encode_chunked=True, headers={
                         "Content-Type": 'multipart/related; type="application/dicom"; '
                                         f"boundary={boundary.decode()}",
                         "Accept": "application/dicom+json"})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    seconds = time.perf_counter() - started
    if resp.status != 200:
        raise BenchError(f"STOW-RS answered {resp.status}: {raw[:300]!r}")
    stored = json.loads(raw).get("00081199", {}).get("Value", [])
    if len(stored) != len(files):
        raise BenchError(f"STOW-RS stored {len(stored)} of {len(files)} instance(s)")
    return seconds
