"""The hub HL7 orders are handed to (the prior prefetch subscribes: ``Prefetcher.on_order``).

An order is a plain dict (``message.ORDER_KEYS``: message_type, patient_id, issuer,
patient_name, birth_date, sex, accession, requested_procedure_id, modality, scheduled (ISO
8601 or ""), study_uid, sending_application, sending_facility, control_id). A subscriber that
raises is logged (one line) and does not keep the others from their order.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from ..logsafe import escape

log = logging.getLogger("dicomrouter.hl7")

Subscriber = Callable[[dict[str, Any]], None]


class OrderHub:
    """``subscribe(callback)``; ``publish(order)`` calls each subscriber in turn."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._lock = threading.Lock()

    def subscribe(self, callback: Subscriber) -> None:
        with self._lock:
            self._subscribers.append(callback)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def publish(self, order: dict[str, Any]) -> int:
        """Hand ``order`` (a copy each) to every subscriber; how many took it."""
        with self._lock:
            subscribers = list(self._subscribers)
        taken = 0
        for callback in subscribers:
            try:
                callback(dict(order))
                taken += 1
            except Exception as exc:
                log.error("HL7 order %s (accession %s): subscriber %s failed: %s: %s",
                          escape(order.get("control_id", "")),
                          escape(order.get("accession", "")),
                          getattr(callback, "__qualname__", callback), type(exc).__name__,
                          escape(str(exc)))
        return taken
