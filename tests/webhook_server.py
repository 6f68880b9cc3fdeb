"""A real HTTP server for webhook notifications (``http.server`` in a thread, on a free port):
it records every request (path, headers, body, when) and answers as a test tells it to:
200, a failure status for the first N requests, or not at all (hangs until released)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from peers import free_port


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.time)

    def json(self) -> Any:
        return json.loads(self.body)


class WebhookServer:
    """``with WebhookServer(fail_first=2) as hook: ... hook.url ... hook.requests``."""

    def __init__(self, fail_first: int = 0, fail_status: int = 500, hang: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.hang = hang
        self.release = threading.Event()  # a hanging server answers once this is set
        self.requests: list[Request] = []  # every request that arrived, answered or not
        self.answered: list[Request] = []  # those answered 2xx
        self.hanging = 0  # requests being held right now
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON bodies answered 2xx (of one event)."""
        with self._lock:
            bodies = [r.json() for r in self.answered]
        return [b for b in bodies if name is None or b.get("event") == name]

    def __enter__(self) -> WebhookServer:
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                req = Request(self.path, dict(self.headers.items()), self.rfile.read(length))
                with hook._lock:
                    hook.requests.append(req)
                    n = len(hook.requests)
                if hook.hang:
                    with hook._lock:
                        hook.hanging += 1
                    hook.release.wait(600)
                    with hook._lock:
                        hook.hanging -= 1
                if n <= hook.fail_first:
                    self.send_response(hook.fail_status)
                    self.end_headers()
                    return
                with hook._lock:
                    hook.answered.append(req)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)
