"""One configured notification: its bounded queue, its worker thread, the rendering of its
template and its transport (HTTP POST or SMTP), attempts retried with exponential backoff.

The queue counts what waits and what waits for a retry: a receiver that is down fills it, and
what comes then is dropped (one log line when dropping starts, one when it stops; the
``dicomrouter_notifications_dropped_total`` metric counts each). Attempts run on this
notification's own thread with the notification's ``timeout``: a receiver that hangs holds up
only its own notifications. Retried ones may arrive after newer ones; each carries its time.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import json
import logging
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import requests

from .. import hl7wire, metrics
from ..common.http import request_failure
from ..common.secrets import SecretUnavailable, secret
from ..config.notifications import NotificationModel, template_environment
from ..tlsctx import client_context
from .events import Event

log = logging.getLogger("dicomrouter.notifications")


class Refused(Exception):
    """The receiver refused the notification for good (an HTTP 4xx, an SMTP 5xx): the same
    request would be refused again, so it is not retried."""


class Transient(OSError):
    """The receiver failed in a way that may heal (HTTP 5xx, 408, 425, 429): retried."""


@dataclasses.dataclass
class Pending:
    """A notification on its way: the event, its payload, its rendered body once rendered."""

    event: Event
    payload: dict[str, Any]
    study: Any  # events.StudyTags: read only if the template asks
    attempt: int = 0
    body: str | None = None
    subject: str = ""


class Target:
    """A notification's queue and worker (see the module docstring)."""

    def __init__(self, model: NotificationModel, name: str) -> None:
        self.model = model
        self.name = name
        self.policy = model.policy
        env = template_environment() if model.hl7 is None else hl7wire.environment()
        text = model.template
        if model.template_file is not None:
            with open(model.template_file, encoding="utf-8") as f:
                text = f.read()
        if model.hl7 is not None and text is None:  # an HL7 message needs one: built in
            text = hl7wire.DEFAULT_TEMPLATE
        self._hl7_tls = client_context(model.hl7.tls) if model.hl7 and model.hl7.tls else None
        self._template = env.from_string(text) if text is not None else None
        self._subject = env.from_string(model.smtp.subject) if model.smtp is not None else None
        self._heap: list[tuple[float, int, Pending]] = []
        self._count = 0  # queued + waiting for a retry (+ the one being attempted)
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stop = False
        self._dropping = 0  # dropped since the queue filled (0: not dropping)
        self._failing = False  # the last attempt failed (logged once per streak)
        self._thread: threading.Thread | None = None
        self._session: requests.Session | None = None

    @property
    def where(self) -> str:
        if self.model.hl7 is not None:
            return f"mllp://{self.model.hl7.host}:{self.model.hl7.port}"
        if self.model.smtp is not None:
            return f"smtp://{self.model.smtp.host}:{self.model.smtp.port}"
        try:
            url = self.model.url or secret(self.model, "url") or ""
        except SecretUnavailable:
            url = ""
        parts = urlsplit(url.strip())  # the path may hold a secret (chat webhooks): not logged
        if not parts.scheme or not parts.netloc:
            return f"the URL of {self.model.url_env or self.model.url_file}"
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"

    # ---- queue ------------------------------------------------------------------------------

    def offer(self, item: Pending) -> None:
        """Queue a notification, or drop it when the queue is full. Never waits."""
        with self._cond:
            if self._count >= self.model.queue_size:
                self._drop()
                return
            if self._dropping:
                log.warning("notification %s: queueing again; %d notification(s) were dropped",
                            self.name, self._dropping)
                self._dropping = 0
            self._count += 1
            heapq.heappush(self._heap, (time.monotonic(), next(self._seq), item))
            self._cond.notify()

    def offer_dropped(self) -> None:
        """A notification this one wanted was dropped before it got here."""
        with self._cond:
            self._drop()

    def _drop(self) -> None:
        metrics.NOTIFICATIONS_DROPPED.labels(self.name).inc()
        if not self._dropping:
            log.warning("notification %s: queue full (%d waiting or retrying for %s); "
                        "dropping notifications until it drains", self.name, self._count,
                        self.where)
        self._dropping += 1

    @property
    def queued(self) -> int:
        return self._count

    def start(self) -> None:
        metrics.NOTIFICATIONS_QUEUED.labels(self.name).set_function(lambda: self._count)
        self._thread = threading.Thread(target=self._run, name=f"notify-{self.name}",
                                        daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """No attempt after the one under way."""
        with self._cond:
            self._stop = True
            self._cond.notify()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop after the attempt under way (waiting at most ``timeout``); what is still
        queued is dropped (nothing is persisted)."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)
        left = self._count
        if left:
            metrics.NOTIFICATIONS_DROPPED.labels(self.name).inc(left)
            log.warning("notification %s: %d notification(s) not sent at stop (they are not "
                        "kept across a restart)", self.name, left)

    def _next(self) -> Pending | None:
        with self._cond:
            while not self._stop:
                now = time.monotonic()
                if self._heap and self._heap[0][0] <= now:
                    return heapq.heappop(self._heap)[2]
                self._cond.wait(self._heap[0][0] - now if self._heap else None)
            return None

    def _run(self) -> None:
        while (item := self._next()) is not None:
            retry_in: float | None = None
            try:
                retry_in = self._attempt(item)
            except Exception as exc:  # a bug: one line, the thread goes on
                log.error("notification %s: %s event %s: internal error %s: %s", self.name,
                          item.event.name, item.event.study_uid, type(exc).__name__, exc)
                metrics.NOTIFICATIONS_FAILED.labels(self.name, item.event.name).inc()
            with self._cond:
                if retry_in is None:
                    self._count -= 1
                else:
                    heapq.heappush(self._heap, (time.monotonic() + retry_in, next(self._seq),
                                                item))

    # ---- one attempt ------------------------------------------------------------------------

    def _attempt(self, item: Pending) -> float | None:
        """Send once; the delay before the next attempt, or None (sent, or given up)."""
        event = item.event
        if item.body is None:
            try:
                item.body, item.subject = self.render(item)
            except Exception as exc:  # a template error on this event's values: not retried
                log.warning("notification %s: %s event of study %s not sent: template error "
                            "(%s: %s)", self.name, event.name, event.study_uid,
                            type(exc).__name__, exc)
                metrics.NOTIFICATIONS_FAILED.labels(self.name, event.name).inc()
                return None
        item.attempt += 1
        try:
            if self.model.smtp is not None:
                self._mail(item)
            elif self.model.hl7 is not None:
                self._hl7(item)
            else:
                self._post(item)
        except Refused as exc:
            log.warning("notification %s: %s event of study %s refused by %s, not retried: %s",
                        self.name, event.name, event.study_uid, self.where, exc)
            metrics.NOTIFICATIONS_FAILED.labels(self.name, event.name).inc()
            return None
        except (OSError, requests.RequestException) as exc:  # SMTPException is an OSError
            why = request_failure(exc, self.where) if isinstance(
                exc, requests.RequestException) else str(exc) if isinstance(
                exc, Transient) else f"{type(exc).__name__}: {exc}"
            if item.attempt >= self.policy.max_attempts:
                log.warning("notification %s: %s event of study %s given up after %d "
                            "attempt(s): %s", self.name, event.name, event.study_uid,
                            item.attempt, why)
                metrics.NOTIFICATIONS_FAILED.labels(self.name, event.name).inc()
                self._failing = True
                return None
            delay = self.policy.delay(item.attempt)
            level = logging.DEBUG if self._failing else logging.WARNING
            log.log(level, "notification %s: %s event of study %s, attempt %d/%d failed, "
                    "retry in %.1f s: %s%s", self.name, event.name, event.study_uid,
                    item.attempt, self.policy.max_attempts, delay, why,
                    "" if self._failing else " (further failures are logged at debug level "
                    "until one succeeds)")
            self._failing = True
            return delay
        if self._failing:
            log.info("notification %s: %s accepts notifications again", self.name, self.where)
            self._failing = False
        metrics.NOTIFICATIONS_SENT.labels(self.name, event.name).inc()
        log.debug("notification %s: %s event of study %s sent (attempt %d)", self.name,
                  event.name, event.study_uid, item.attempt)
        return None

    def render(self, item: Pending) -> tuple[str, str]:
        """The body and (e-mail) subject: the template with the payload's fields, ``payload``
        and ``study`` (the tags, PHI: read only if the template uses them); without a template
        the payload as JSON."""
        context = {**item.payload, "payload": item.payload, "study": item.study}
        if self.model.hl7 is not None:
            context = {**hl7_context(self.model.hl7, item), **context}
            return hl7wire.segments(self._template.render(context)), ""
        body = self._template.render(context) if self._template is not None else \
            json.dumps(item.payload, indent=None if self.model.smtp is None else 2)
        subject = self._subject.render(context) if self._subject is not None else ""
        return body, " ".join(subject.split())  # a subject is one line

    def _headers(self) -> dict[str, str]:
        out = {"Content-Type": self.model.content_type,
               "User-Agent": "dicomrouter-notifications"}
        for name, header in self.model.headers.items():
            out[name] = header.value if header.value is not None else (
                secret(header, "value") or "")
        return out

    def _post(self, item: Pending) -> None:
        if self._session is None:
            self._session = requests.Session()
            self._session.verify = self.model.verify_tls
        try:
            headers = self._headers()
            url = self.model.url or (secret(self.model, "url") or "").strip()
        except SecretUnavailable as exc:
            raise Transient(str(exc)) from None  # may be set later: retried
        if not url.startswith(("http://", "https://")):
            raise Refused(f"the URL read from {self.model.url_env or self.model.url_file} is "
                          "not an http:// or https:// URL")
        r = self._session.post(url, data=(item.body or "").encode("utf-8"),
                               headers=headers, timeout=self.model.timeout)
        r.close()
        if 200 <= r.status_code < 300:
            return
        if r.status_code in (408, 425, 429) or r.status_code >= 500:
            raise Transient(f"HTTP {r.status_code} {r.reason or ''}".strip())
        raise Refused(f"HTTP {r.status_code} {r.reason or ''}".strip())

    def _hl7(self, item: Pending) -> None:
        """One MLLP exchange; AR (or CR) is refused for good, AE (CE) retried."""
        peer = self.model.hl7
        assert peer is not None
        try:
            hl7wire.exchange(peer.host, peer.port, item.body or "", self.model.timeout,
                             self._hl7_tls, peer.encoding)
        except hl7wire.Hl7Refused as exc:
            if exc.code in ("AR", "CR"):
                raise Refused(f"answered {exc}") from None
            raise Transient(f"answered {exc}") from None

    def _mail(self, item: Pending) -> None:
        import smtplib  # here: email and smtplib cost memory in routers that send no mail
        from email.message import EmailMessage

        smtp = self.model.smtp
        assert smtp is not None
        msg = EmailMessage()
        msg["From"] = smtp.sender
        msg["To"] = ", ".join(smtp.to)
        msg["Subject"] = item.subject or f"dicomrouter: {item.event.name}"
        msg.set_content(item.body or "")
        try:
            password = secret(smtp, "password") if smtp.username else None
        except SecretUnavailable as exc:
            raise Transient(str(exc)) from None
        try:
            with smtplib.SMTP(smtp.host, smtp.port, timeout=self.model.timeout) as client:
                if smtp.starttls:
                    client.starttls()
                if smtp.username:
                    client.login(smtp.username, password or "")
                client.send_message(msg)
        except smtplib.SMTPResponseException as exc:
            if exc.smtp_code >= 500:
                raise Refused(f"SMTP {exc.smtp_code} {exc.smtp_error!r}") from None
            raise
        except smtplib.SMTPRecipientsRefused as exc:
            raise Refused(f"every recipient refused: {exc.recipients}") from None


def hl7_context(peer: Any, item: Pending) -> dict[str, Any]:
    """What the HL7 template sees besides the payload: the MSH values, the destinations and
    the instance count under the names the built-in template uses."""
    facts = item.payload
    return {"message_type": peer.message_type, "control_id": hl7wire.control_id(),
            "now": hl7wire.timestamp(item.event.at),
            "sending_application": peer.sending_application,
            "sending_facility": peer.sending_facility or "",
            "receiving_application": peer.receiving_application or "",
            "receiving_facility": peer.receiving_facility or "",
            "destinations": item.event.destinations,
            "instances": facts.get("instances", ""),
            "router_ae": facts.get("router", {}).get("ae_title", "")}


def build_targets(models: tuple[NotificationModel, ...]) -> list[Target]:
    """One Target per configured notification, named by ``name`` or its position (``#1``)."""
    return [Target(m, m.name or f"#{i + 1}") for i, m in enumerate(models)]
