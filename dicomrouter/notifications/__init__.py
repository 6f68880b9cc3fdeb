"""Notifications (``notifications:``): webhooks and e-mail on study and delivery events.

The router's parts report events through ``Notifier.emit`` (a queue put: it never waits for a
receiver nor reads the state); a dispatcher thread adds what the event's payload needs from the
state, and one worker thread per configured notification renders and sends it, retried with
exponential backoff. A receiver that is down or hangs holds up only its own notification's
queue, never receiving, routing or delivery; a full queue drops (one log line, a metric).
Nothing is persisted: what is still queued at a stop or a crash is not sent (at most once).

Operations layer: imports ``config``, ``state`` (reads), ``metrics``, ``common`` and the leaves.
"""

from __future__ import annotations

from .events import EVENTS, Event, default_payload
from .hub import Notifier

__all__ = ["EVENTS", "Event", "Notifier", "default_payload"]
