"""``python -m dicomrouter.processing.limits CPU MEMORY -- PROGRAM ARGS...``: set the step's
resource limits in the child, then become the program (``exec``). On Linux it also asks the
kernel to kill the program when the router dies (``PR_SET_PDEATHSIG``): a kill -9 of the
router leaves no step running on (its restart runs the step again).

A wrapper rather than ``preexec_fn``: the router is multi-threaded, and running Python code
between ``fork`` and ``exec`` in a threaded process can deadlock (the subprocess docs say so).
``0`` means no limit; a limit the OS refuses is reported on stderr and the program runs
without it (the step's history shows the line)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import signal
import sys

PR_SET_PDEATHSIG = 1


def _limit(which: int, value: int, label: str) -> None:
    if value <= 0:
        return
    try:
        resource.setrlimit(which, (value, value))
    except (ValueError, OSError) as exc:
        print(f"dicomrouter: cannot limit {label} to {value}: {exc}", file=sys.stderr)


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the router died before the request: do not run orphaned
        sys.exit(137)


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print("usage: limits CPU_SECONDS MEMORY_BYTES -- PROGRAM [ARGS...]", file=sys.stderr)
        return 2
    _die_with_parent()
    _limit(resource.RLIMIT_CPU, int(argv[0]), "CPU time (s)")
    _limit(resource.RLIMIT_AS, int(argv[1]), "memory (bytes)")
    program = argv[3:]
    try:
        os.execvp(program[0], program)
    except OSError as exc:
        print(f"dicomrouter: cannot run {program[0]}: {exc.strerror or exc}", file=sys.stderr)
        return 127
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
