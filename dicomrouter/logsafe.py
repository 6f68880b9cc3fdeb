"""Log lines that a peer cannot forge: control characters in messages are escaped.

AE titles, patient IDs, error comments and file names come from the wire and end up in log
lines. A ``\\n`` in a PatientID would start a fake log line, an ANSI escape would repaint the
operator's terminal. The filter is installed on the router's log handlers, so every message (ours
and pynetdicom's) is escaped once, after formatting its arguments; tracebacks (``exc_info``)
are formatted later by the handler and keep their lines.
"""

from __future__ import annotations

import logging
import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape(text: str) -> str:
    """``\\n`` → ``\\\\n``, ESC → ``\\\\x1b``...: the text stays on one line and inert."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1] if m.group() in "\n\r\t"
                        else f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                        else f"\\u{ord(m.group()):04x}", text)


#: Libraries that log while parsing what a peer sent: their tracebacks become one line
HTTP_LIBRARIES = ("botocore", "boto3", "s3transfer", "urllib3", "requests")
LIBRARIES = ("pynetdicom", "pydicom", "py.warnings", *HTTP_LIBRARIES)


class EscapeControlCharacters(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and record.name.startswith(LIBRARIES):
            exc = record.exc_info[1]
            message = f"{message} ({type(exc).__name__}: {exc})"
            record.msg, record.args, record.exc_info, record.exc_text = message, None, None, None
        if _CONTROL.search(message):
            record.msg, record.args = escape(message), None
        return True


def install(handler: logging.Handler | None = None) -> None:
    """Escape every message of ``handler`` (default: every handler of the root logger).

    Also sends Python warnings (pydicom warns about every odd value a peer sends) to the log as
    one line each, and stops pydicom from validating values it reads: the router checks what it
    relies on itself and forwards the rest as received.
    """
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.captureWarnings(True)
    handlers = [handler] if handler is not None else logging.getLogger().handlers
    for h in handlers:
        if not any(isinstance(f, EscapeControlCharacters) for f in h.filters):
            h.addFilter(EscapeControlCharacters())
