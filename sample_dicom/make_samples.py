"""Regenerate the committed synthetic DICOM samples in this directory.

Run from anywhere: ``python sample_dicom/make_samples.py``. Pixel data and patient/study
attributes are fixed by the seeds; UIDs are fresh on every run (so the files change in git).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dicomrouter.sample import generate  # noqa: E402

# subdirectory -> generate() keyword arguments
SAMPLES: dict[str, dict[str, Any]] = {
    # One CT study, 2 series x 3 instances, Explicit VR Little Endian.
    "ct_explicit": dict(studies=1, series=2, instances=3, modality="CT", rows=32, cols=32,
                        transfer_syntax="explicit", patient_id="SAMPLE1", seed=1),
    # One MR instance, RLE Lossless (encapsulated pixel data).
    "mr_rle": dict(studies=1, series=1, instances=1, modality="MR", rows=32, cols=32,
                   transfer_syntax="rle", patient_id="SAMPLE2", seed=2),
    # One MR instance, Deflated Explicit VR Little Endian.
    "mr_deflated": dict(studies=1, series=1, instances=1, modality="MR", rows=32, cols=32,
                        transfer_syntax="deflated", patient_id="SAMPLE3", seed=3),
    # One 4-frame Multi-frame Grayscale Word Secondary Capture instance, Implicit VR LE.
    "ot_multiframe_implicit": dict(studies=1, series=1, instances=1, modality="OT", rows=32,
                                   cols=32, frames=4, transfer_syntax="implicit",
                                   patient_id="SAMPLE4", seed=4),
}


def main() -> None:
    """Delete and rewrite every sample subdirectory."""
    total = 0
    for name, kwargs in SAMPLES.items():
        out = HERE / name
        shutil.rmtree(out, ignore_errors=True)
        paths = generate(out, **kwargs)
        size = sum(p.stat().st_size for p in paths)
        total += size
        print(f"{name}: {len(paths)} file(s), {size} bytes")
    print(f"total {total} bytes")


if __name__ == "__main__":
    main()
