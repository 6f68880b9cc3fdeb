"""The command line of a ``container`` step: the same contract as a ``command`` step (the work
folder's ``input/``, ``output/`` and ``task.json``), through Docker or Podman.

Mounts: ``input/`` and ``task.json`` read-only, ``output/`` writable, at ``/work/...`` inside
the container; ``{input}``, ``{output}``, ``{task}``, ``{work}`` in ``args`` name those
container paths. No network unless ``network`` says otherwise; ``memory`` and ``cpu_time``
become ``--memory`` and ``--ulimit cpu``; the container runs as the router's user so its
output files are the router's to read and delete; ``--rm`` leaves nothing behind."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable

from ..config.processing import StepModel
from .workfolder import WorkFolder

INSIDE = "/work"


class NoEngine(Exception):
    """The container engine the step names is not installed here."""


def container_command(step: StepModel, folder: WorkFolder,
                      which: Callable[[str], str | None]) -> list[str]:
    """``docker run ...`` (or podman) for this step and work folder; NoEngine when the engine
    is not on the PATH."""
    c = step.container
    assert c is not None
    engine = which(c.engine)
    if engine is None:
        raise NoEngine(f"container engine {c.engine!r} is not installed (not on the PATH): "
                       f"install it, or make the step a command")
    inside = {"{input}": f"{INSIDE}/input", "{output}": f"{INSIDE}/output",
              "{task}": f"{INSIDE}/task.json", "{work}": INSIDE}
    # a name of its own: a timeout stops the container itself (``engine kill NAME``), not
    # only the engine's client, which the container would outlive
    argv = [engine, "run", "--rm", "--name", f"dicomrouter-{uuid.uuid4().hex[:16]}",
            "--network", c.network,
            "--user", f"{os.getuid()}:{os.getgid()}",
            "-v", f"{folder.input}:{INSIDE}/input:ro",
            "-v", f"{folder.output}:{INSIDE}/output",
            "-v", f"{folder.task}:{INSIDE}/task.json:ro",
            "-e", f"DICOMROUTER_INPUT={INSIDE}/input",
            "-e", f"DICOMROUTER_OUTPUT={INSIDE}/output",
            "-e", f"DICOMROUTER_TASK={INSIDE}/task.json"]
    if step.memory:
        argv += ["--memory", str(int(step.memory))]
    if step.cpu_time:
        cpu = int(step.cpu_time)
        argv += ["--ulimit", f"cpu={cpu}:{cpu}"]
    argv.append(c.image)
    for a in c.args:
        for mark, value in inside.items():
            a = a.replace(mark, value)
        argv.append(a)
    return argv


def container_name(argv: list[str]) -> str | None:
    """The ``--name`` of a container command line (None: not one)."""
    if len(argv) > 3 and argv[1] == "run" and "--name" in argv:
        return argv[argv.index("--name") + 1]
    return None
