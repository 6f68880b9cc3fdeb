"""Conversions (``transcode.py``) run in separate processes, never in the router's own.

Two reasons (issue 25): the pixel codecs (GDCM, pylibjpeg, CharLS, Pillow, numpy) cost an idle
router ~45 MB when imported, and a codec that crashes or loops on hostile pixel data must not
take the router, its associations and its deliveries down with it. So the router process
imports pydicom without them (``common/nocodecs.py``), and a conversion is a call into a pool of
``conversion_processes`` spawned processes (a fresh interpreter each, which imports the codecs):

* started at the first conversion, stopped after ``conversion_idle`` seconds without one (their
  memory goes back to the system between bursts);
* the result is written to a file named by the caller, not returned through a pipe, so a large
  instance is not held twice;
* a conversion running longer than ``conversion_timeout`` is stopped by killing the pool;
* a process that dies (a codec's segfault) fails that conversion (and any running beside it)
  with a :class:`~transcode.ConversionError` that is *not* permanent, so the delivery is retried
  like any transient failure, and the next conversion gets a fresh pool.

Built on ``concurrent.futures.ProcessPoolExecutor``; the one private access is killing its
processes on a timeout (Python 3.11 has no public call for it; 3.14's ``terminate_workers``).
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from . import transcode
from .transcode import ConversionError

log = logging.getLogger("dicomrouter.conversion")


class ConversionPool:
    """The processes conversions run in (see the module docstring)."""

    def __init__(self, processes: int = 1, timeout: float = 600.0, idle: float = 60.0) -> None:
        self.processes = processes
        self.timeout = timeout
        self.idle = idle
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None
        self._busy = 0
        self._idle_timer: threading.Timer | None = None
        # one caller per process at a time: the timeout then measures a conversion, not the
        # wait for a free process (a queued one timing out would kill a healthy neighbour)
        self._slots = threading.BoundedSemaphore(processes)

    def configure(self, processes: int, timeout: float, idle: float) -> None:
        """Apply the configuration (``conversion_processes``, ``conversion_timeout``,
        ``conversion_idle``), before the first conversion."""
        self.processes, self.timeout, self.idle = processes, timeout, idle
        self._slots = threading.BoundedSemaphore(processes)

    def to_file(self, source: str, source_ts: str, target_ts: str, out: str,
                part10: bool = True) -> None:
        """Write ``source`` converted to ``target_ts`` at ``out`` (a Part 10 file, or with
        ``part10=False`` only the dataset's bytes as they go into P-DATA)."""
        self.call(transcode.convert_to_file, source, source_ts, target_ts, out, part10)

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)`` in a conversion process (a module-level function)."""
        with self._slots:
            return self._call(function, *args)

    def _call(self, function: Callable[..., Any], *args: Any) -> Any:
        executor = self._acquire()
        try:
            future = executor.submit(function, *args)
            return future.result(timeout=self.timeout)
        except FutureTimeout:
            self._discard(executor, kill=True)
            log.error("a conversion ran longer than conversion_timeout (%g s): its process "
                      "was stopped", self.timeout)
            raise ConversionError(f"stopped after conversion_timeout ({self.timeout:g} s)",
                                  permanent=False) from None
        except BrokenProcessPool:
            self._discard(executor, kill=True)
            log.error("a conversion process died (a codec crashed?); the next conversion "
                      "starts a new one")
            raise ConversionError("the conversion process died while converting (a codec "
                                  "crash on this or a concurrent instance)",
                                  permanent=False) from None
        except (CancelledError, RuntimeError, AssertionError, OSError) as exc:
            # the pool was stopped or discarded meanwhile, or no process could be started
            raise ConversionError(f"no conversion process: {type(exc).__name__}: {exc}",
                                  permanent=False) from None
        finally:
            self._release()

    def close(self) -> None:
        """Stop the processes (the router is stopping): killed, not waited for, since a
        conversion that hangs is what they exist for."""
        with self._lock:
            executor = self._executor
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
        if executor is not None:
            self._discard(executor, kill=True)

    @property
    def running(self) -> bool:
        """Whether conversion processes exist now."""
        return self._executor is not None

    def _acquire(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
            if self._executor is None:
                self._executor = ProcessPoolExecutor(
                    max_workers=self.processes, initializer=_worker_signals,
                    mp_context=multiprocessing.get_context("spawn"))  # no inherited threads
            self._busy += 1
            return self._executor

    def _release(self) -> None:
        with self._lock:
            self._busy -= 1
            if self._busy == 0 and self._executor is not None:
                self._idle_timer = threading.Timer(self.idle, self._stop_if_idle)
                self._idle_timer.daemon = True
                self._idle_timer.start()

    def _stop_if_idle(self) -> None:
        with self._lock:
            if self._busy or self._executor is None:
                return
            executor, self._executor, self._idle_timer = self._executor, None, None
        executor.shutdown(wait=True)

    def _discard(self, executor: ProcessPoolExecutor, kill: bool) -> None:
        """Drop a pool that timed out or broke; the next call makes a new one."""
        with self._lock:
            if self._executor is executor:
                self._executor = None
        if kill:
            for process in list(getattr(executor, "_processes", {}).values()):
                if process.is_alive():
                    process.kill()
        executor.shutdown(wait=False, cancel_futures=True)


def _worker_signals() -> None:
    """A conversion process ignores Ctrl-C (sent to the whole process group): the router
    stops it, without a KeyboardInterrupt traceback on the operator's terminal."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


#: the router's pool (configured by ``app`` at start)
POOL = ConversionPool()
