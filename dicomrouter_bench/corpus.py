"""The benchmark corpora, written with :func:`dicomrouter.sample.generate`."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from pydicom.filereader import read_file_meta_info

from dicomrouter.sample import generate

BYTES_PER_MB = 1_000_000
LARGE_ROWS = LARGE_COLS = 512


@dataclass(frozen=True)
class Corpus:
    """A set of files of one study, all with the same SOP class and transfer syntax."""

    name: str
    files: tuple[Path, ...]
    size: int
    rows: int
    cols: int
    frames: int
    transfer_syntax: str

    @property
    def count(self) -> int:
        """Number of instances."""
        return len(self.files)

    @property
    def mb(self) -> float:
        """Total size in MB (10^6 bytes)."""
        return self.size / BYTES_PER_MB

    def describe(self) -> str:
        """E.g. ``1000 × 64×64 (9.5 MB)`` or ``1 × 954 frames 512×512 (500.2 MB)``."""
        frames = f"{self.frames} frames " if self.frames > 1 else ""
        return f"{self.count} × {frames}{self.rows}×{self.cols} ({self.mb:.1f} MB)"

    def parts(self, n: int) -> list[list[Path]]:
        """The files in ``n`` contiguous, nearly equal parts (empty parts dropped)."""
        per, extra = divmod(len(self.files), n)
        out: list[list[Path]] = []
        start = 0
        for i in range(n):
            end = start + per + (1 if i < extra else 0)
            if end > start:
                out.append(list(self.files[start:end]))
            start = end
        return out

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly description."""
        return {"instances": self.count, "bytes": self.size, "rows": self.rows,
                "cols": self.cols, "frames": self.frames, "transfer_syntax": self.transfer_syntax}


def _series_split(count: int) -> tuple[int, int]:
    """(series, instances per series): up to 10 series that divide ``count`` exactly."""
    for series in range(min(10, count), 0, -1):
        if count % series == 0:
            return series, count // series
    return 1, count


def _number_key(path: Path) -> tuple[int, ...]:
    """Sort key: the numbers in ``seriesN/instanceM.dcm``, so series 2 comes before series 10."""
    return tuple(int(n) for n in re.findall(r"\d+", f"{path.parent.name}/{path.stem}"))


def make_corpus(name: str, out_dir: Path, count: int, rows: int, cols: int, frames: int = 1,
                seed: int = 0) -> Corpus:
    """Generate ``count`` instances of one study (Explicit VR Little Endian) under ``out_dir``."""
    series, per_series = _series_split(count)
    modality = "CT" if frames == 1 else "OT"
    files = generate(out_dir / name, studies=1, series=series, instances=per_series,
                     modality=modality, rows=rows, cols=cols, frames=frames,
                     patient_id=f"BENCH{name.upper()}"[:16], seed=seed)
    files = sorted(files, key=_number_key)
    meta = read_file_meta_info(files[0])
    return Corpus(name=name, files=tuple(files), size=sum(f.stat().st_size for f in files),
                  rows=rows, cols=cols, frames=frames,
                  transfer_syntax=str(meta.TransferSyntaxUID))


def large_frames(megabytes: float, rows: int = LARGE_ROWS, cols: int = LARGE_COLS) -> int:
    """Frames of 16-bit ``rows``×``cols`` pixels needed for at least ``megabytes`` MB."""
    return max(1, math.ceil(megabytes * BYTES_PER_MB / (rows * cols * 2)))
