"""The models of ``notifications:``: webhooks (and e-mail) the router sends on study and
delivery events. The templates are compiled here, in Jinja2's sandbox, so a syntax error is a
configuration error (``notifications[0].template: ...``), not a failure at the first event."""

from __future__ import annotations

import os
from typing import Annotated, Any

from pydantic import model_validator

from ..schema import (
    CHECK_SECRETS,
    Bool,
    Duration,
    Int,
    ReadableFile,
    Strict,
    Text,
    env_set,
    parsed,
    readable,
)
from .base import ConfigError, parse_str, show
from .hl7 import Hl7PeerModel
from .peers import RetryModel

#: the events a notification may subscribe to (docs: README "Notifications")
EVENTS = ("received", "completed", "routed", "delivered", "failed", "dead", "held",
          "incomplete")


def template_environment() -> Any:
    """The one Jinja2 environment of notification templates: sandboxed (a template cannot
    reach Python internals nor change what it is given), no HTML escaping (bodies are JSON or
    text), ``tojson`` for values inside a JSON body. Jinja2 is imported only by a
    configuration with templates (2 MB of an idle router without)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(autoescape=False, keep_trailing_newline=True)


def _check_template(text: str | None, key: str) -> None:
    if text is None:
        return
    from jinja2 import TemplateSyntaxError

    try:
        template_environment().parse(text)
    except TemplateSyntaxError as exc:
        raise ConfigError(key, f"template error on line {exc.lineno}: {exc.message}") from None


def _events(value: Any, key: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise ConfigError(key, f"expected a list of events ({', '.join(EVENTS)}), got "
                          f"{show(value)}")
    for item in items:
        if item not in EVENTS:
            raise ConfigError(key, f"unknown event {show(item)} (events: {', '.join(EVENTS)})")
    return tuple(dict.fromkeys(items))


def _verify(value: Any, key: str) -> bool | str:
    """``verify_tls``: true / false, or the path of a CA bundle."""
    return value if isinstance(value, bool) else parse_str(value, key)


def http_url(value: str, key: str, secret: bool = False) -> None:
    """An http:// or https:// URL (a secret one is not shown in the error)."""
    if not value.strip().startswith(("http://", "https://")):
        raise ConfigError(key, "expected an http:// or https:// URL" +
                          ("" if secret else f", got {show(value)}"))


def _names(value: Any, key: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) and i for i in items):
        raise ConfigError(key, f"expected a list of names, got {show(value)}")
    return tuple(items)


class HeaderModel(Strict):
    """One request header: its value written here (``value``), or a secret named by
    environment variable (``value_env``) or file (``value_file``)."""

    value: Text | None = None
    value_env: Text | None = None
    value_file: ReadableFile | None = None

    @model_validator(mode="after")
    def _one(self) -> HeaderModel:
        given = [k for k in ("value", "value_env", "value_file") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError("value", "give exactly one of value, value_env, value_file")
        env_set("value_env", self.value_env)
        readable(self.value_file, "value_file")
        return self


class SmtpModel(Strict):
    """``smtp:`` of an e-mail notification (the standard library's SMTP client)."""

    host: Text
    port: Int(1, 65535) = 25
    sender: Text  # the From address
    to: Annotated[tuple[str, ...], parsed(_names)]
    subject: Text = "dicomrouter: {{ event }} {{ study_instance_uid }}"
    starttls: Bool = False
    username: Text | None = None
    password_env: Text | None = None
    password_file: ReadableFile | None = None

    @model_validator(mode="after")
    def _checks(self) -> SmtpModel:
        _check_template(self.subject, "subject")
        if self.username and not (self.password_env or self.password_file):
            raise ConfigError("username", "needs password_env or password_file (a password "
                              "is never written in the configuration)")
        env_set("password_env", self.password_env)
        readable(self.password_file, "password_file")
        return self


class NotificationModel(Strict):
    """One entry of ``notifications:``: where (``url`` or ``smtp``), on which ``events``
    (optionally only for some ``routes`` or ``destinations``), what (``template``), and how
    hard it tries (``timeout``, ``retry``, ``queue_size``)."""

    name: Text | None = None  # in logs and metrics; default "notification N"
    url: Text | None = None  # HTTP(S) POST
    url_env: Text | None = None  # ... or a URL that is a secret (a chat webhook's)
    url_file: ReadableFile | None = None
    smtp: SmtpModel | None = None  # ... or e-mail
    hl7: Hl7PeerModel | None = None  # ... or an HL7 v2 message over MLLP (ORU^R01 / OMG^O19)
    events: Annotated[tuple[str, ...], parsed(_events)]
    routes: Annotated[tuple[str, ...], parsed(_names)] | None = None
    destinations: Annotated[tuple[str, ...], parsed(_names)] | None = None
    template: Text | None = None  # Jinja2; default: the event as JSON, without PHI
    template_file: ReadableFile | None = None
    content_type: Text = "application/json"
    headers: dict[str, HeaderModel] = {}
    verify_tls: Annotated[bool | str, parsed(_verify)] = True
    timeout: Duration = 10.0  # one attempt: connecting, and each wait for the answer
    retry: RetryModel = RetryModel()  # attempts with exponential backoff (not the global one)
    queue_size: Int(1, 1_000_000) = 1000  # waiting or retrying; more are dropped

    @model_validator(mode="before")
    @classmethod
    def _plain_headers(cls, data: Any) -> Any:
        """``headers: {X-Source: router}``: a plain string is the header's ``value``."""
        if isinstance(data, dict) and isinstance(data.get("headers"), dict):
            data = {**data, "headers": {k: {"value": v} if isinstance(v, str) else v
                                        for k, v in data["headers"].items()}}
        return data

    @model_validator(mode="after")
    def _checks(self) -> NotificationModel:
        urls = [k for k in ("url", "url_env", "url_file") if getattr(self, k) is not None]
        if len(urls) + (self.smtp is not None) + (self.hl7 is not None) != 1:
            raise ConfigError(urls[1] if len(urls) > 1 else "url", "give one of url, url_env, "
                              "url_file (a webhook), hl7 (MLLP) or smtp (e-mail)")
        if self.url is not None:
            http_url(self.url, "url")
        env_set("url_env", self.url_env)
        if self.url_env and CHECK_SECRETS.get():
            http_url(os.environ[self.url_env], "url_env", secret=True)
        readable(self.url_file, "url_file")
        if self.template is not None and self.template_file is not None:
            raise ConfigError("template_file", "give template or template_file, not both")
        if self.timeout <= 0:
            raise ConfigError("timeout", "must be more than 0")
        _check_template(self.template, "template")
        if self.template_file is not None:
            readable(self.template_file, "template_file")
            with open(self.template_file, encoding="utf-8") as f:
                _check_template(f.read(), "template_file")
        return self

    @property
    def policy(self) -> RetryModel:
        """``retry`` with every value filled in (defaults: 5 s doubling to 10 min, 10
        attempts; the global ``retry:`` is for deliveries and is not inherited)."""
        return self.retry.policy()
