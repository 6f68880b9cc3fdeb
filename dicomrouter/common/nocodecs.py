"""Import pydicom in the router process without its pixel codecs.

``import pydicom`` imports every installed pixel-data plugin at once (GDCM, pylibjpeg with
openjpeg and libjpeg, CharLS, Pillow) and numpy, to record which decoders are available:
+45 MB of resident memory measured here, in a process that never decodes a pixel. The router
process only reads and writes datasets; every conversion runs in a separate process
(``conversion.py``), which imports pydicom normally, with its codecs, and whose crash on hostile
pixel data cannot take the router down.

So ``serve`` (and each extra receiver process) imports pydicom and pynetdicom first, through
:func:`import_pydicom_without_codecs`: for the length of that import these packages cannot be
found, pydicom records its decoders as unavailable, and nothing else changes. Afterwards they
are importable again (a DICOMweb client that needs numpy gets it when it is first used).
"""

from __future__ import annotations

import importlib
import importlib.abc
import pickle
import sys
from collections.abc import Sequence
from typing import Any

#: the top-level packages pydicom imports for pixel data (its plugins and numpy)
CODEC_PACKAGES = frozenset({"gdcm", "_gdcm", "pylibjpeg", "openjpeg", "libjpeg", "jpeg_ls",
                            "_CharLS", "PIL", "numpy"})


class _Hidden(importlib.abc.MetaPathFinder):
    """A finder that answers 'not installed' for the codec packages."""

    def find_spec(self, name: str, path: Sequence[str] | None, target: Any = None) -> None:
        if name.partition(".")[0] in CODEC_PACKAGES:
            raise ModuleNotFoundError(f"{name} is kept out of the router process", name=name)
        return None


def import_pydicom_without_codecs() -> bool:
    """Import pydicom and pynetdicom with the codec packages hidden. False (and nothing done)
    when pydicom or a codec package is already imported: the process is not a fresh one (a
    test, the benchmark), where this would change nothing."""
    if "pydicom" in sys.modules or any(name in sys.modules for name in CODEC_PACKAGES):
        return False
    hidden = _Hidden()
    sys.meta_path.insert(0, hidden)
    try:
        for module in ("pydicom", "pydicom.pixels", "pydicom.encaps", "pydicom.filewriter",
                       "pynetdicom"):
            importlib.import_module(module)
    finally:
        sys.meta_path.remove(hidden)
    return True


def codecs_loaded() -> list[str]:
    """The codec packages imported in this process (for a test and ``serve``'s debug log)."""
    return sorted(name for name in CODEC_PACKAGES if name in sys.modules)


def run_lean(target: str, payload: bytes) -> None:
    """The body of a spawned process that imports pydicom without its codecs first, then
    calls ``target`` ("package.module:function") with the pickled ``payload`` arguments.
    (Passing the function and a Config directly would unpickle them, and import pydicom with
    its codecs, before the child could run a line.)"""
    import_pydicom_without_codecs()
    module, _, function = target.partition(":")
    args = pickle.loads(payload)  # noqa: S301 - made by our own parent process
    getattr(importlib.import_module(module), function)(*args)
