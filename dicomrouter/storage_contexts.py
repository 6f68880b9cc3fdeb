"""What the Storage SCP accepts: every storage SOP class and transfer syntax, in which order."""

from __future__ import annotations

from pydicom.uid import (
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AllStoragePresentationContexts, build_context
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification

_UNCOMPRESSED = (ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
                 ImplicitVRLittleEndian)
# pynetdicom accepts, per context, the first syntax of *this* list that the requestor proposed.
# Compressed syntaxes come first so a compressed file is never forced through decompression, and
# Implicit VR comes last so a sender offering several uncompressed syntaxes keeps its explicit one:
# the data stay as the sender stored them.
ACCEPTED_SYNTAXES = [ts for ts in AllTransferSyntaxes if ts not in _UNCOMPRESSED] + \
    list(_UNCOMPRESSED)

STORAGE_SOP_CLASSES = frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)


def supported_contexts() -> list[PresentationContext]:
    """Verification plus every storage SOP class with ACCEPTED_SYNTAXES, as acceptor contexts."""
    contexts = [build_context(Verification)]
    contexts += [build_context(sop, ACCEPTED_SYNTAXES) for sop in sorted(STORAGE_SOP_CLASSES)]
    return contexts
