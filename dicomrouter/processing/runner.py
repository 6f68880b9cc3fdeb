"""Run one processing step in its work folder and say what happened.

The contract a step's program sees (README "Processing steps (AI)"): ``input/`` holds the
study's instances (or the previous step's output), ``output/`` is empty and takes what it
writes (DICOM files re-enter the router; a ``result.json`` may pick the next route),
``task.json`` holds the study's main tags, the route and the step. The command line's
``{input}``, ``{output}``, ``{task}`` and ``{work}`` are replaced by those paths.

The program runs in a process group of its own: a timeout kills the whole group (a shell
script's children too). Its stdout and stderr are captured, only the first ``max_output``
bytes of each kept (the rest counted), for the study's history.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..config.processing import StepModel
from .container import NoEngine, container_command, container_name
from .workfolder import WorkFolder

RESULT_JSON = "result.json"


class StepError(Exception):
    """The step could not be started at all (no container engine, no such program)."""


@dataclass
class Outcome:
    """What a step did: exit code (None: killed by the timeout), how long, what it said, the
    DICOM files it wrote and its ``result.json`` (None: none or unreadable)."""

    exit_code: int | None
    duration: float
    timed_out: bool = False
    stdout: str = ""
    stderr: str = ""
    outputs: list[Path] = field(default_factory=list)
    result: dict[str, Any] | None = None
    result_error: str = ""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def summary(self) -> str:
        """One line for the study's history."""
        how = (f"killed after its timeout ({self.duration:.1f} s)" if self.timed_out else
               f"exit code {self.exit_code} after {self.duration:.1f} s")
        out = f", {len(self.outputs)} output file(s)" if self.ok else ""
        return how + out


def prepare(root: Path, task: dict[str, Any]) -> WorkFolder:
    """A fresh work folder: whatever an earlier, unfinished run left there (a crash, a
    failed attempt) is discarded, so its half-written output never counts."""
    if root.exists():
        shutil.rmtree(root)
    folder = WorkFolder(root)
    folder.input.mkdir(parents=True)
    folder.output.mkdir()
    folder.task.write_text(json.dumps(task, indent=2, sort_keys=True), encoding="utf-8")
    return folder


def fill_input(folder: WorkFolder,
               items: Iterable[tuple[str, Callable[[], BinaryIO]]]) -> int:
    """Copy instances into ``input/`` (name, opener: ``Spool.open`` of the instance)."""
    count = 0
    for name, opener in items:
        with opener() as src, open(folder.input / f"{name}.dcm", "wb") as dst:
            shutil.copyfileobj(src, dst)
        count += 1
    return count


def command_line(step: StepModel, folder: WorkFolder,
                 which: Callable[[str], str | None] = shutil.which) -> list[str]:
    """What runs: the command with its placeholders filled, through the limits wrapper
    (limits.py: rlimits, and the program dies with the router); or the container engine's
    command line (container.py)."""
    if step.container is not None:
        return container_command(step, folder, which)
    marks = folder.placeholders()
    argv = [_fill(a, marks) for a in step.command or ()]
    cpu = int(step.cpu_time or 0)
    memory = int(step.memory or 0)
    return [sys.executable, "-m", "dicomrouter.processing.limits", str(cpu), str(memory),
            "--", *argv]


def _fill(arg: str, marks: dict[str, str]) -> str:
    for mark, value in marks.items():
        arg = arg.replace(mark, value)
    return arg


class _Capture(threading.Thread):
    """Read a pipe to its end, keeping only the first ``limit`` bytes."""

    def __init__(self, pipe: BinaryIO, limit: int) -> None:
        super().__init__(daemon=True)
        self.pipe = pipe
        self.limit = limit
        self.kept = bytearray()
        self.dropped = 0

    def run(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            while chunk := self.pipe.read(65536):
                room = self.limit - len(self.kept)
                self.kept += chunk[:max(room, 0)]
                self.dropped += max(len(chunk) - max(room, 0), 0)

    def text(self) -> str:
        out = self.kept.decode("utf-8", "replace")
        return out + (f"\n[... {self.dropped} more byte(s) not kept]" if self.dropped else "")


def run(step: StepModel, folder: WorkFolder,
        which: Callable[[str], str | None] = shutil.which,
        env: dict[str, str] | None = None) -> Outcome:
    """Run the step to its end or its timeout; raises StepError when it cannot start."""
    try:
        argv = command_line(step, folder, which)
    except NoEngine as exc:
        raise StepError(str(exc)) from None
    start = time.monotonic()
    try:
        proc = subprocess.Popen(argv, cwd=folder.root, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, env=env)
    except OSError as exc:
        raise StepError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    assert proc.stdout is not None and proc.stderr is not None
    readers = [_Capture(proc.stdout, step.max_output), _Capture(proc.stderr, step.max_output)]
    for r in readers:
        r.start()
    timed_out = False
    try:
        code: int | None = proc.wait(timeout=step.timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        if step.container is not None:
            _kill_container(argv)
        _kill_group(proc)
        code = None
    finally:
        if proc.poll() is None:  # interrupted: never leave the group running
            _kill_group(proc)
    for r in readers:
        r.join(5.0)
    outcome = Outcome(code, time.monotonic() - start, timed_out, readers[0].text(),
                      readers[1].text())
    if outcome.ok:
        outcome.outputs = sorted(p for p in folder.output.rglob("*")
                                 if p.is_file() and p.name != RESULT_JSON)
        outcome.result, outcome.result_error = read_result(folder.output / RESULT_JSON)
    return outcome


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _kill_container(argv: list[str]) -> None:
    """``engine kill NAME``: the container is the engine's child, not ours."""
    name = container_name(argv)
    if name is None:
        return
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run([argv[0], "kill", name], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30,
                       check=False)


def read_result(path: Path) -> tuple[dict[str, Any] | None, str]:
    """A step's ``result.json`` (None if absent) and why it could not be read ('' if fine)."""
    if not path.exists():
        return None, ""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, f"{RESULT_JSON} unreadable: {exc}"
    if not isinstance(data, dict):
        return None, f"{RESULT_JSON} is not a JSON object"
    return data, ""
