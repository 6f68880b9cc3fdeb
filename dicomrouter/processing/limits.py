"""``python -m dicomrouter.processing.limits CPU MEMORY -- PROGRAM ARGS...``: set the step's
resource limits in the child, then become the program (``exec``).

A wrapper rather than ``preexec_fn``: the router is multi-threaded, and running Python code
between ``fork`` and ``exec`` in a threaded process can deadlock (the subprocess docs say so).
``0`` means no limit; a limit the OS refuses is reported on stderr and the program runs
without it (the step's history shows the line)."""

from __future__ import annotations

import os
import resource
import sys


def _limit(which: int, value: int, label: str) -> None:
    if value <= 0:
        return
    try:
        resource.setrlimit(which, (value, value))
    except (ValueError, OSError) as exc:
        print(f"dicomrouter: cannot limit {label} to {value}: {exc}", file=sys.stderr)


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print("usage: limits CPU_SECONDS MEMORY_BYTES -- PROGRAM [ARGS...]", file=sys.stderr)
        return 2
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
