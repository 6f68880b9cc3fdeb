"""HL7 v2 in (issue 27): the MLLP listener (``listener.py``), the inbound message and its ACK
(``message.py``), the handling of what is stored (``service.py``: ``hl7_rules``, the state's
latest orders, merges) and the hub prefetch subscribes to (``orders.py``).

Every accepted message is stored in the state before its ACK; it is handled after, once (a
start-up handles what a crash left unhandled). Policy layer, like ``scp/``: imports the
state, config, ``hl7wire`` and the leaves; never the faces.
"""

from __future__ import annotations

from .orders import OrderHub
from .service import Hl7Service

__all__ = ["Hl7Service", "OrderHub"]
