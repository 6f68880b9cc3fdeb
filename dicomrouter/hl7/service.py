"""What the router does with HL7 v2 messages: accept (check, store, ACK) and handle.

Accepting (``receive``, on the listener's store threads): decode, parse, check the sender
against ``allowed_senders``, the type against the supported ones and the fields a message
needs; store it in the state (committed and fsync'd) and only then answer AA. What cannot be
taken is answered AR (malformed, unsupported type, sender not allowed) or AE (a required field
missing, the state not writable) with the reason in MSA-3 and ERR; one log line per message.

Handling (one thread, in the order received): the message's order dict, the ``hl7_rules``
that match it (no rules: every message is recorded), their actions: ``record`` (the latest
order per accession, demographics per patient, the merge of ADT^A40, in one transaction with
the message marked handled) and ``prefetch`` (``OrderHub.publish``, before that transaction:
a crash in between hands the order over again at the next start, at least once, never lost).
A start-up handles every message a previous run stored but did not handle.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

from .. import metrics
from ..config import Config
from ..hl7wire import declared_encoding
from ..logsafe import escape
from ..rules import all_hold
from ..spool.faults import crash_point
from ..state import STATE_ERRORS, State, StateUnavailable
from .listener import Hl7Listener
from .message import (
    INTERNAL,
    REQUIRED_MISSING,
    SEGMENT_SEQUENCE,
    SUPPORTED,
    UNSUPPORTED_TYPE,
    Inbound,
    Malformed,
    ack,
    missing,
    order_of,
    parse,
    values,
)
from .orders import OrderHub

log = logging.getLogger("dicomrouter.hl7")

BATCH = 200  # unhandled messages read at once
PURGE_EVERY = 3600.0  # s between two deletions of messages older than keep_messages


class Hl7Service:
    """The ``hl7:`` listener and the handling of what it stores; ``orders`` is the hub the
    prior prefetch subscribes to."""

    def __init__(self, cfg: Config, state: State, sock: socket.socket | None) -> None:
        assert cfg.hl7 is not None
        self.cfg = cfg
        self.model = cfg.hl7
        self.state = state
        self.orders = OrderHub()
        self.listener = Hl7Listener(cfg.hl7, self.receive, sock, cfg.ae_title) \
            if sock is not None else None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._purged = 0.0  # monotonic time of the last purge

    def start(self) -> None:
        self._thread = threading.Thread(target=self._handle_loop, name="hl7-handler",
                                        daemon=True)
        self._thread.start()
        if self.listener is not None:
            self.listener.start()

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.stop()
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)

    # ---- accepting --------------------------------------------------------------------------

    def receive(self, block: bytes, peer: str) -> str:
        """One MLLP block → its ACK (never raises)."""
        app = self.cfg.ae_title
        encoding, named = self.model.encoding, "the configured encoding"
        declared = declared_encoding(block)  # MSH-18, when it names a set
        if declared is not None and declared[1]:
            encoding, named = declared[1], f"MSH-18 {declared[0]!r}"
        elif declared is not None:
            log.warning("HL7 message from %s names the character set %r in MSH-18, which the "
                        "router does not know: read as %s", peer, escape(declared[0]), encoding)
        try:
            text = block.decode(encoding)
        except UnicodeDecodeError as exc:
            return self._refuse(None, peer, "AR", f"not {encoding} text as {named} says "
                                f"({exc.reason} at byte {exc.start})", INTERNAL)
        try:
            inbound = parse(text)
        except Malformed as exc:
            return self._refuse(None, peer, "AR", f"malformed: {exc}", SEGMENT_SEQUENCE)
        if not self.model.allows(inbound.sending_application, inbound.sending_facility):
            return self._refuse(inbound, peer, "AR", f"sender {inbound.sending_application}/"
                                f"{inbound.sending_facility} is not in allowed_senders",
                                INTERNAL)
        if not inbound.kind:
            return self._refuse(inbound, peer, "AR", f"unsupported message type "
                                f"{inbound.message_type} (supported: "
                                f"{', '.join(SUPPORTED)})", UNSUPPORTED_TYPE)
        lacking = missing(inbound)
        if lacking:
            return self._refuse(inbound, peer, "AE", lacking, REQUIRED_MISSING)
        try:
            stored = self.state.store_hl7_message(
                inbound.raw, inbound.message_type, inbound.control_id,
                inbound.sending_application, inbound.sending_facility, peer)
        except (*STATE_ERRORS, StateUnavailable) as exc:
            return self._refuse(inbound, peer, "AE", f"not stored ({type(exc).__name__}: "
                                f"{exc}); send it again", INTERNAL)
        metrics.HL7_MESSAGES.labels(inbound.message_type, "AA").inc()
        log.info("HL7 %s %s from %s/%s (%s) stored as #%d: AA", escape(inbound.message_type),
                 escape(inbound.control_id), escape(inbound.sending_application),
                 escape(inbound.sending_facility), peer, stored)
        self._wake.set()
        return ack(inbound, "AA", application=app)

    def _refuse(self, inbound: Inbound | None, peer: str, code: str, reason: str,
                error: str) -> str:
        what = f"HL7 {escape(inbound.message_type)} {escape(inbound.control_id)} from " \
               f"{escape(inbound.sending_application)}/{escape(inbound.sending_facility)}" \
            if inbound is not None else "HL7 message"
        log.warning("%s (%s) refused (%s): %s", what, peer, code, escape(reason))
        kind = inbound.message_type if inbound is not None and inbound.kind else \
            "other" if inbound is not None else "unreadable"  # bounded label values
        metrics.HL7_MESSAGES.labels(kind, code).inc()
        return ack(inbound, code, reason, error, self.cfg.ae_title)

    # ---- handling ---------------------------------------------------------------------------

    def _handle_loop(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                # several routers on one state: one node handles (the others store and ACK)
                if self.cfg.cluster and not self.state.hold_lease("hl7-handler", 30.0):
                    self._wake.wait(2.0)
                    self._wake.clear()
                    continue
                rows = self.state.hl7_unhandled(BATCH)
                for row in rows:
                    if self._stop.is_set():
                        return
                    self.handle(row)
                if failing:
                    log.info("HL7: handling messages again")
                failing = False
                if len(rows) == BATCH:
                    continue
                self._purge()
            except (*STATE_ERRORS, StateUnavailable) as exc:
                if not failing:
                    log.warning("HL7: cannot handle stored messages now (%s: %s); will try "
                                "again", type(exc).__name__, exc)
                failing = True
            except Exception as exc:  # a bug: one line, the thread goes on
                log.error("HL7: handling stopped by an internal error %s: %s; will try again",
                          type(exc).__name__, escape(str(exc)))
                failing = True
            self._wake.wait(1.0 if failing else 2.0 if self.cfg.cluster else 5.0)
            self._wake.clear()

    def _purge(self) -> None:
        """Delete handled messages older than ``keep_messages`` (hourly; 0 keeps them)."""
        if not self.model.keep_messages or time.monotonic() - self._purged < PURGE_EVERY \
                and self._purged:
            return
        self._purged = time.monotonic()
        n = self.state.purge_hl7_messages(time.time() - self.model.keep_messages)
        if n:
            log.info("HL7: %d handled message(s) older than keep_messages deleted", n)

    def actions(self, inbound: Inbound, order: dict[str, str]) -> tuple[bool, bool, str]:
        """(record, prefetch, why) by ``hl7_rules``: every matching rule's actions; none
        configured: record, no prefetch."""
        rules = self.cfg.hl7_rules
        if not rules:
            return True, False, "no hl7_rules: recorded"
        record = prefetch = False
        matched = []
        for i, rule in enumerate(rules):
            held, _why = all_hold(rule.when, lambda key: values(inbound, order, key)) \
                if rule.when else (True, "")
            if held:
                matched.append(rule.name or f"hl7_rules[{i}]")
                record = record or rule.record
                prefetch = prefetch or rule.prefetch
        if not matched:
            return False, False, "no hl7_rules matched"
        return record, prefetch, f"hl7_rules {', '.join(matched)}"

    def handle(self, row: dict[str, Any]) -> str:
        """Handle one stored message (idempotent: its upserts take the latest); the outcome."""
        try:
            inbound = parse(row["raw"])
            order = order_of(inbound)
            record, prefetch, why = self.actions(inbound, order)
        except Exception as exc:  # stored, so it parsed once: a bug, recorded, not looped on
            outcome = f"not handled: {type(exc).__name__}: {exc}"
            log.error("HL7 #%d: %s", row["id"], escape(outcome))
            self.state.hl7_handled(row["id"], outcome)
            return outcome
        did = []
        if prefetch:
            total = self.orders.subscribers
            did.append(f"prefetch: {self.orders.publish(order)}/{total} subscriber(s)")
            crash_point("hl7-handed-on")  # the crash tests: handed on, not marked handled
        merge = None
        if record:
            if inbound.kind == "merge":
                merge = (inbound.field("MRG", 1), order["patient_id"])
                did.append(f"merged {merge[0]} into {merge[1]}")
            elif inbound.kind == "order":
                did.append(f"order for accession {order['accession']} recorded")
            else:
                did.append(f"demographics of {order['patient_id']} recorded")
        outcome = f"{why}: {', '.join(did) or 'nothing to do'}"
        self.state.hl7_handled(row["id"], outcome, order if record else None, merge)
        log.info("HL7 #%d %s %s handled: %s", row["id"], escape(inbound.message_type),
                 escape(inbound.control_id), escape(outcome))
        return outcome
