"""The DIMSE outbox (issue 27 item 4): MPPS N-CREATE / N-SET forwarded to ``forward_mpps`` and
Instance Availability Notifications to ``ian``, sent from the state's ``dimse_outbox`` in the
order they were queued, one peer after another, through pynetdicom.

A message was queued in the transaction that recorded what it is about (the MPPS before its
response; the IAN when the study completed), so a stop or a crash loses none. Per peer the
oldest pending message goes first and the others wait behind it: a peer that is down gets them
all later, in order (backoff of the global ``retry``: ``initial``, ``max_delay``; never dead-
lettered, since a later N-SET means nothing without its N-CREATE). A peer's success or warning
status sends the message; 0x0111 (duplicate) to an N-CREATE too (it has it: a resend after a
crash); 0x0213 and 0xA7xx are retried; another failure status is final ("refused", logged and
shown in status) and the next message goes.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from pynetdicom import build_context

from .config import Config
from .mpps_data import IAN_SOP_CLASS, MPPS_SOP_CLASS, from_text
from .qrscu import PeerError, Remote, associate
from .state import Outgoing, State
from .tlsctx import client_context

log = logging.getLogger("dicomrouter.outbox")

POLL = 0.5  # seconds between looks at the outbox
RETRIED = {0x0213}  # resource limitation (and 0xA7xx: out of resources)


def remote_for(cfg: Config, name: str) -> Remote:
    """A ``known_aes`` AE title or a ``dicom`` destination as a peer to associate with."""
    known = cfg.known_aes.get(name)
    if known is not None:
        return Remote(name, known.host, known.port, known.calling_ae or cfg.ae_title,
                      cfg.limits.dimse_timeout)
    d: Any = cfg.destinations[name]
    return Remote(d.ae_title, d.host, d.port, d.calling_ae_title or cfg.ae_title, d.timeout,
                  client_context(d.tls) if d.tls else None)


class Outbox:
    """One thread (on one node of a cluster: a lease) that drains the outbox."""

    def __init__(self, cfg: Config, state: State) -> None:
        self.cfg = cfg
        self.state = state
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if not (self.cfg.forward_mpps or self.cfg.ian):
            return
        self._thread = threading.Thread(target=self._run, name="dimse-outbox", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(POLL):
            try:
                due = self.state.outbox_destinations(time.time())
                if not due or not self.state.hold_lease("dimse-outbox", 10.0):
                    continue  # nothing due, or another node sends (several routers)
                for dest in due:
                    if self._stop.is_set():
                        return
                    self.drain(dest)
            except OSError as exc:  # the state is away: next poll
                log.error("DIMSE outbox: %s: %s (will try again)", type(exc).__name__, exc)
            except Exception as exc:
                log.error("DIMSE outbox: %s: %s", type(exc).__name__, exc)

    def drain(self, dest: str) -> None:
        """Send the destination's pending messages in order, on one association."""
        if dest not in self.cfg.known_aes and dest not in self.cfg.destinations:
            return  # no longer configured: its messages wait for it to come back
        remote = remote_for(self.cfg, dest)
        msg = self.state.outbox_next(dest)
        if msg is None:
            return
        contexts = [build_context(MPPS_SOP_CLASS), build_context(IAN_SOP_CLASS)]
        try:
            with associate(remote, contexts) as assoc:
                while msg is not None and not self._stop.is_set():
                    if not self._send(assoc, remote, msg):
                        return
                    msg = self.state.outbox_next(dest)
        except PeerError as exc:
            if msg is not None:
                self._retry(msg, str(exc))
        except Exception as exc:  # the peer aborted mid-message, or an answer pynetdicom refused
            if msg is not None:
                self._retry(msg, f"{type(exc).__name__}: {exc}")

    def _retry(self, msg: Outgoing, error: str) -> None:
        delay = self.cfg.retry.delay(msg.attempts + 1)
        self.state.outbox_retry(msg.id, error, time.time() + delay)
        log.warning("%s to %s not sent (attempt %d): %s; again in %.0f s (the messages after "
                    "it wait)", msg.what, msg.destination, msg.attempts + 1, error, delay)

    def _send(self, assoc: Any, remote: Remote, msg: Outgoing) -> bool:
        """One message; False when the association cannot go on (retry later)."""
        if not any(cx.abstract_syntax == msg.sop_class for cx in assoc.accepted_contexts):
            self.state.outbox_done(msg.id, "refused", f"{remote} does not accept the SOP class "
                                   f"{msg.sop_class}")
            log.warning("%s to %s refused: %s does not accept the SOP class %s", msg.what,
                        msg.destination, remote, msg.sop_class)
            return True
        ds = from_text(msg.dataset)
        if msg.operation == "N-CREATE":
            status, _ = assoc.send_n_create(ds, msg.sop_class, msg.sop_uid)
        else:
            status, _ = assoc.send_n_set(ds, msg.sop_class, msg.sop_uid)
        code = int(status.Status) if status is not None and "Status" in status else None
        if code is None:
            self._retry(msg, f"no {msg.operation} response from {remote}")
            return False
        ok = code == 0x0000 or code == 0x0001 or (code >> 12) == 0xB or \
            (msg.operation == "N-CREATE" and code == 0x0111)
        if ok:
            self.state.outbox_done(msg.id, "sent")
            log.info("%s sent to %s (0x%04X)", msg.what, msg.destination, code)
            return True
        comment = str(status.get("ErrorComment", "") or "")
        error = f"{remote} answered 0x{code:04X}" + (f" ({comment})" if comment else "")
        if code in RETRIED or (code >> 8) == 0xA7:
            self._retry(msg, error)
            return False
        self.state.outbox_done(msg.id, "refused", error)
        log.warning("%s to %s refused: %s; not sent again", msg.what, msg.destination, error)
        return True
