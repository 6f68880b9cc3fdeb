"""The streaming multipart/related reader (WADO-RS pulls), against bodies split every way."""

from __future__ import annotations

import random

import pytest

from dicomrouter.sources.multipart import MultipartError, MultipartReader, boundary_of


def body(parts: list[bytes], boundary: bytes = b"b0undary") -> bytes:
    out = b"preamble ignored\r\n"
    for p in parts:
        out += b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


def read_all(raw: bytes, chunk: int, boundary: bytes = b"b0undary") -> list[bytes]:
    chunks = [raw[i:i + chunk] for i in range(0, len(raw), chunk)]
    reader = MultipartReader(chunks, boundary)
    out = []
    while (part := reader.next_part()) is not None:
        out.append(b"".join(part))
    return out


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1000, 1 << 20])
def test_parts_come_back_byte_exact_whatever_the_chunking(chunk: int) -> None:
    rng = random.Random(chunk)
    parts = [bytes(rng.randrange(256) for _ in range(n)) for n in (0, 1, 300, 5000)]
    parts.append(b"\r\n--b0undar not quite a boundary \r\n-b0undary \r\n--b0: " * 3)
    assert read_all(body(parts), chunk) == parts


def test_memory_stays_bounded_by_the_chunk_size() -> None:
    big = b"x" * (4 << 20)
    reader = MultipartReader([body([big])[i:i + 65536] for i in range(0, len(big) + 200, 65536)],
                             b"b0undary")
    part = reader.next_part()
    assert part is not None
    sizes = [len(c) for c in part]
    assert sum(sizes) == len(big) and max(sizes) <= 65536 + 64


def test_truncated_bodies_are_errors_not_short_parts() -> None:
    raw = body([b"a" * 100])
    for cut in (5, 40, 90, len(raw) - 20):
        with pytest.raises(MultipartError):
            read_all(raw[:cut], 16)


def test_boundary_from_content_type() -> None:
    assert boundary_of('multipart/related; type="application/dicom"; boundary="abc"') == b"abc"
    with pytest.raises(MultipartError):
        boundary_of("application/dicom")
