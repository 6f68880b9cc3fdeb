"""HL7 peers for the tests: python-hl7's own ``mllp_send`` program (the sender, a real
subprocess) and an MLLP receiver built on python-hl7's asyncio server (``hl7.mllp``) that
records every message and answers with the ACK code it is told (AA, AE...)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import hl7
from hl7.mllp import start_hl7_server
from peers import free_port

SB, EB, CR = b"\x0b", b"\x1c", b"\x0d"


def message(*segments: list[str]) -> str:
    """A message from segments given as lists of fields (index 0 is the segment name; for
    MSH, index 1 is MSH-2, the encoding characters: write fields from MSH-3 on)."""
    out = []
    for seg in segments:
        if seg[0] == "MSH":
            out.append("MSH|^~\\&|" + "|".join(seg[1:]))
        else:
            out.append("|".join(seg))
    return "\r".join(out) + "\r"


def fields(name: str, **by_number: str) -> list[str]:
    """A segment with the given fields by number: ``fields("OBR", f18="ACC")``."""
    numbers = {int(k[1:]): v for k, v in by_number.items()}
    top = max(numbers, default=0)
    if name == "MSH":  # MSH-1 is the field separator, MSH-2 the encoding characters
        return ["MSH", *[numbers.get(i, "") for i in range(3, top + 1)]]
    return [name, *[numbers.get(i, "") for i in range(1, top + 1)]]


def msh(message_type: str, control_id: str, app: str = "RIS", facility: str = "HOSP",
        version: str = "2.5.1") -> list[str]:
    return fields("MSH", f3=app, f4=facility, f5="ROUTER", f6="RAD", f7="20261207101500",
                  f9=message_type, f10=control_id, f11="P", f12=version)


def mllp_send(port: int, text: str | bytes, tmp: Path, name: str = "msg.hl7") -> str:
    """Send one message with python-hl7's ``mllp_send``; the ACK it printed."""
    exe = shutil.which("mllp_send")
    assert exe, "python-hl7's mllp_send is not installed"
    data = text.encode() if isinstance(text, str) else text
    path = tmp / name
    path.write_bytes(SB + data + EB + CR)
    r = subprocess.run([exe, "--file", str(path), "-p", str(port), "127.0.0.1"],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    return r.stdout.decode("utf-8", "replace").strip("\x0b\x1c\r\n ")


def msa(ack: str) -> tuple[str, str, str]:
    """(MSA-1, MSA-2, MSA-3) of an ACK."""
    parsed = hl7.parse(ack.replace("\n", "\r"))
    seg = parsed.segment("MSA")
    return tuple(str(seg[i]) if len(seg) > i else "" for i in (1, 2, 3))  # type: ignore[return-value]


class Hl7Receiver:
    """An MLLP receiver on 127.0.0.1 that records what it gets and answers ``code``."""

    def __init__(self, code: str = "AA", reason: str = "", tls: Any = None) -> None:
        self.port = free_port()
        self.tls = tls  # an ssl.SSLContext: MLLP over TLS
        self.code = code
        self.reason = reason
        self.messages: list[Any] = []  # hl7.Message
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: Any = None

    async def _client(self, reader: Any, writer: Any) -> None:
        try:
            while not reader.at_eof():
                msg = await reader.readmessage()
                self.messages.append(msg)
                ack = msg.create_ack(self.code, message_id=f"R{len(self.messages)}")
                text = str(ack)
                if self.reason:
                    text = text.rstrip("\r") + f"|{self.reason}"
                writer.writeblock(text.encode())
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    def __enter__(self) -> Hl7Receiver:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            start_hl7_server(self._client, "127.0.0.1", self.port, ssl=self.tls),
            self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            self._server.close()
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
