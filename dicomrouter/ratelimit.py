"""Bandwidth caps (``max_rate`` of a destination): the rate's parser and one token bucket per
destination, shared by every association, request and thread that sends its bytes.

The bucket paces by reservation (a virtual clock that each ``take`` moves forward by
``n / rate``): callers wait outside the lock, in the order they asked, so N associations
together get the rate, not N times it, and no caller starves. A burst of at most
``BURST_SECONDS`` of traffic is allowed after an idle spell (what a real link buffers anyway).
A leaf: no I/O but the sleep.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO

from .values import ConfigError, show

BURST_SECONDS = 0.05  # credit an idle bucket may build up, in seconds of traffic
MIN_RATE = 1000.0  # bytes per second; below this a single PDV would block for minutes
CHUNK = 256 * 1024  # a throttled reader's largest read: pauses stay short

_RATE = re.compile(r"^(\d+(?:\.\d+)?)\s*([A-Za-z]*?)\s*(/\s*s|ps)$")
# unit → bytes/s; ``B`` is bytes, ``bit`` bits (and ``b`` before ``ps``: 100Mbps)
_UNITS: dict[str, float] = {"B": 1.0, "bit": 1 / 8}
for _prefix, _factor in (("k", 1e3), ("K", 1e3), ("M", 1e6), ("G", 1e9), ("T", 1e12),
                         ("Ki", 2.0**10), ("ki", 2.0**10), ("Mi", 2.0**20), ("Gi", 2.0**30),
                         ("Ti", 2.0**40)):
    _UNITS[f"{_prefix}B"] = _factor
    _UNITS[f"{_prefix}bit"] = _factor / 8
EXAMPLES = "5MB/s, 500kB/s, 2MiB/s or 100Mbit/s"


def parse_rate(value: Any, key: str) -> float:
    """``5MB/s``, ``500kB/s``, ``2MiB/s``, ``100Mbit/s`` (``100Mbps``), or a number of bytes
    per second → bytes per second. ``B`` is bytes, ``bit`` bits; k/K/M/G are powers of 1000,
    Ki/Mi/Gi powers of 1024."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a rate like {EXAMPLES}, got {show(value)}")
    if isinstance(value, int | float):
        rate = float(value)
    else:
        m = _RATE.match(value.strip()) if isinstance(value, str) else None
        if m is None:
            raise ConfigError(key, f"expected a rate like {EXAMPLES}, got {show(value)}")
        number, unit, per = m.groups()
        if per == "ps" and unit.endswith("b"):  # 100Mbps: bits
            unit = unit[:-1] + "bit"
        if unit.endswith("b") and unit[:-1] + "B" in _UNITS:
            raise ConfigError(key, f"{value!r} is ambiguous: write {number}{unit[:-1]}B/s "
                              f"(bytes) or {number}{unit[:-1]}bit/s (bits)")
        if unit not in _UNITS:
            raise ConfigError(key, f"unknown unit {unit or '(none)'!r} in {value!r}: expected a "
                              f"rate like {EXAMPLES}")
        rate = float(number) * _UNITS[unit]
    if not rate == rate or rate == float("inf") or rate < MIN_RATE:  # NaN, infinite, too low
        raise ConfigError(key, f"must be at least 1kB/s, got {show(value)}")
    return rate


def describe_rate(rate: float) -> str:
    """``5 MB/s`` for the logs and ``describe``."""
    for factor, unit in ((1e9, "GB/s"), (1e6, "MB/s"), (1e3, "kB/s")):
        if rate >= factor:
            return f"{rate / factor:.3g} {unit}"
    return f"{rate:.0f} B/s"


class TokenBucket:
    """``rate`` bytes per second across every thread that calls :meth:`take`.

    A wait can be cut short by :meth:`interrupt` (the delivery workers' stop): from then on
    nothing waits, so a shutdown finishes the instance on the wire at full speed instead of
    keeping the process for minutes of pacing."""

    def __init__(self, rate: float, burst: float = BURST_SECONDS,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] | None = None) -> None:
        self.rate = rate
        self.burst = burst  # seconds of credit
        self._clock = clock
        self._interrupted = threading.Event()
        self._sleep = sleep or self._interrupted.wait
        self._lock = threading.Lock()
        self._next = 0.0  # when the bytes reserved so far will have gone out at the rate
        self.taken = 0  # bytes paced so far (tests, status)

    def reserve(self, n: int) -> float:
        """Reserve ``n`` bytes; returns the seconds to :meth:`wait` before they may go."""
        if n <= 0 or self._interrupted.is_set():
            return 0.0
        with self._lock:
            now = self._clock()
            start = max(self._next, now - self.burst)
            self._next = start + n / self.rate
            self.taken += n
            return max(0.0, start - now)

    def wait(self, seconds: float) -> None:
        """Wait what :meth:`reserve` said (at once after :meth:`interrupt`)."""
        if seconds > 0 and not self._interrupted.is_set():
            self._sleep(seconds)

    def take(self, n: int) -> float:
        """Wait until ``n`` more bytes may go; returns the seconds waited."""
        wait = self.reserve(n)
        self.wait(wait)
        return wait

    def interrupt(self) -> None:
        """Stop pacing: every wait, current and future, ends now (at shutdown)."""
        self._interrupted.set()


class ThrottledReader:
    """A binary file read through a bucket (a copied file): each read waits for the bytes it
    read before handing them on; reads are cut to ``CHUNK`` so pauses stay short."""

    def __init__(self, f: BinaryIO, bucket: TokenBucket) -> None:
        self._f = f
        self._bucket = bucket

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            out = bytearray()
            while chunk := self.read(CHUNK):
                out += chunk
            return bytes(out)
        data = self._f.read(min(n, CHUNK))
        self._bucket.take(len(data))  # what was read, handed on once the bucket allows it
        return data

    def readinto(self, buf: Any) -> int:
        n = self._f.readinto(memoryview(buf)[:CHUNK])  # type: ignore[attr-defined]
        self._bucket.take(n or 0)
        return n

    def __getattr__(self, name: str) -> Any:  # seek, tell, fileno, name, close...
        return getattr(self._f, name)


def throttled(f: BinaryIO, bucket: TokenBucket | None) -> BinaryIO:
    """``f`` read through ``bucket`` (``f`` itself without a cap)."""
    return f if bucket is None else ThrottledReader(f, bucket)  # type: ignore[return-value]
