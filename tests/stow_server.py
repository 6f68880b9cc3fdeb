"""A small STOW-RS / QIDO-RS server of the tests' own, for the failures a real server cannot be
made to produce on demand: a 503 on the Nth request, a request that hangs until released, a
success answer for an instance it then does not keep.

It parses each multipart/related request into its DICOM parts (pydicom), records every part it
received, and answers with a PS3.18 response that references what it "stored". It counts the
requests in flight (``max_in_flight``); with ``gate=N`` each request waits (up to a minute)
until N are in flight at once, so a test sees N concurrent requests or times out.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pydicom import dcmread

# what the server does with its n-th POST (1-based): "ok", "503", "hang", "drop:<uid>"
Plan = Callable[[int], str]


class StowServer:
    def __init__(self, plan: Plan | None = None, gate: int = 0, port: int = 0) -> None:
        self.plan: Plan = plan or (lambda n: "ok")
        self.received: list[str] = []  # SOP Instance UIDs of every part, in order (re-sends too)
        self.stored: dict[str, str] = {}  # SOP Instance UID → Study Instance UID (QIDO lists)
        self.parts: dict[str, bytes] = {}  # SOP Instance UID → the part's bytes, as stored
        self.in_flight = 0  # POSTs being handled now
        self.max_in_flight = 0
        self.gate = gate
        self._gate_open = gate <= 1
        self._flight = threading.Condition()
        self.posts = 0
        self.release = threading.Event()  # a "hang" request answers once this is set
        self.hanging = threading.Event()  # set while a request hangs
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                server._enter()
                try:
                    server._post(self)
                finally:
                    with server._flight:
                        server.in_flight -= 1

            def do_GET(self) -> None:  # noqa: N802
                server._get(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/dicom-web"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> StowServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def _enter(self) -> None:
        """Count a request in flight; with a gate, wait until ``gate`` are in flight at once
        (then the gate stays open)."""
        with self._flight:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            if self.in_flight >= self.gate:
                self._gate_open = True
            self._flight.notify_all()
            self._flight.wait_for(lambda: self._gate_open, timeout=60)

    @staticmethod
    def _parts(body: bytes, content_type: str) -> list[bytes]:
        boundary = content_type.split("boundary=", 1)[1].split(";")[0].strip('"')
        out = []
        for chunk in body.split(b"--" + boundary.encode())[1:]:
            if chunk.startswith(b"--"):
                break
            _headers, _, payload = chunk.partition(b"\r\n\r\n")
            out.append(payload[:-2] if payload.endswith(b"\r\n") else payload)
        return out

    def _post(self, h: BaseHTTPRequestHandler) -> None:
        body = h.rfile.read(int(h.headers.get("Content-Length", "0")))
        parts = self._parts(body, h.headers["Content-Type"])
        datasets = [dcmread(io.BytesIO(p)) for p in parts]
        with self._lock:
            self.posts += 1
            n = self.posts
            self.received += [str(ds.SOPInstanceUID) for ds in datasets]
        action = self.plan(n)
        if action == "hang":
            self.hanging.set()
            self.release.wait(120)
            action = "503"
        if action == "503":
            h.send_response(503, "Service Unavailable")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        dropped = action[5:] if action.startswith("drop:") else ""
        refs = []
        for ds, part in zip(datasets, parts, strict=True):
            uid = str(ds.SOPInstanceUID)
            if uid != dropped:
                self.stored[uid] = str(ds.StudyInstanceUID)
                self.parts[uid] = part
            refs.append({"00081150": {"vr": "UI", "Value": [str(ds.SOPClassUID)]},
                         "00081155": {"vr": "UI", "Value": [uid]}})
        payload = json.dumps({"00081199": {"vr": "SQ", "Value": refs}}).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/dicom+json")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)

    def _get(self, h: BaseHTTPRequestHandler) -> None:
        """QIDO-RS /studies/{uid}/instances: what it really stored."""
        parts = h.path.split("?")[0].split("/")
        study = parts[parts.index("studies") + 1] if "studies" in parts else ""
        rows = [{"00080018": {"vr": "UI", "Value": [uid]},
                 "0020000D": {"vr": "UI", "Value": [st]}}
                for uid, st in self.stored.items() if st == study]
        if not rows:
            h.send_response(204)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        payload = json.dumps(rows).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/dicom+json")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)
