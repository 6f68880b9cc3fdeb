"""A route's steps run one after the other (``process: [a, b]``): ``b``'s input is ``a``'s
output. The first step that fails ends the chain (the whole chain is retried, from a fresh
work folder per step: an unfinished step's output is discarded). A step's ``result.json``
with ``{"route": NAME}`` picks the route its results take; the last one said wins.

What it needs from the router is passed in (the instances and how to open them, a line for
the study's history), so it runs the same under the delivery workers and in tests."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..config.processing import StepModel, step_name
from ..logsafe import escape
from ..state import Instance
from .runner import Outcome, StepError, fill_input, prepare, run
from .workfolder import WorkFolder

#: the study's tags a step's task.json carries (what the index holds of them)
MAIN_TAGS = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
             "StudyDate", "StudyTime", "StudyDescription", "AccessionNumber",
             "ReferringPhysicianName", "ModalitiesInStudy")


class ChainFailed(Exception):
    """A step failed (exit code, timeout, could not start): the chain is retried later."""

    def __init__(self, step: str, why: str, outcome: Outcome | None = None,
                 cannot_start: bool = False) -> None:
        super().__init__(f"processing step {step!r} failed: {why}")
        self.step = step
        self.why = why
        self.outcome = outcome
        #: the step could not even start (no container engine): waiting will not help
        self.cannot_start = cannot_start


@dataclass
class ChainResult:
    """The finished chain: each step's outcome, the last step's output files, the route a
    ``result.json`` picked ('' when none did)."""

    outcomes: list[tuple[str, Outcome]] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)
    route: str = ""


def task_for(instances: Sequence[Instance], route: str, step: StepModel,
             name: str) -> dict[str, Any]:
    """``task.json``: the study's main tags (from the index), the route, the step."""
    first = instances[0].tags if instances else {}
    study = {k: first.get(k, "") for k in MAIN_TAGS if k != "ModalitiesInStudy"}
    if instances:
        study["StudyInstanceUID"] = instances[0].study_uid
    study["ModalitiesInStudy"] = sorted({i.tags.get("Modality", "") for i in instances} - {""})
    return {"study": study, "route": route, "step": {"name": name, "kind": step.kind},
            "calling_ae": instances[0].calling_ae if instances else "",
            "instances": [{"SOPInstanceUID": i.sop_uid, "SeriesInstanceUID": i.series_uid,
                           "SOPClassUID": i.sop_class} for i in instances]}


def run_chain(steps: Sequence[StepModel], root: Path, route: str,
              instances: Sequence[Instance], open_instance: Callable[[Instance], BinaryIO],
              note: Callable[[str], None],
              which: Callable[[str], str | None] = shutil.which,
              remote: Callable[[StepModel, str, WorkFolder], Outcome] | None = None
              ) -> ChainResult:
    """Run every step under ``root/<n>``; ChainFailed at the first that fails. ``note``
    gets one history line per step start and end (with its bounded stdout/stderr).
    ``remote`` runs a ``remote`` step (remote.RemoteStep: send, then wait for results)."""
    result = ChainResult()
    previous: Path | None = None
    for n, step in enumerate(steps):
        name = step_name(step, n)
        folder = prepare(root / str(n + 1), task_for(instances, route, step, name))
        if previous is None:
            fill_input(folder, [(i.sop_uid, lambda i=i: open_instance(i)) for i in instances])
        else:
            for src in previous.rglob("*"):
                if src.is_file() and src.name != "result.json":
                    shutil.copyfile(src, folder.input / src.relative_to(previous).as_posix()
                                    .replace("/", "_"))
        note(f"processing step {name!r} ({route}) running")
        try:
            if step.remote is not None:
                if remote is None:
                    raise StepError("remote steps run only under the router")
                outcome = remote(step, name, folder)
            else:
                outcome = run(step, folder, which)
        except StepError as exc:
            note(f"processing step {name!r} ({route}) could not start: {exc}")
            raise ChainFailed(name, str(exc), cannot_start=True) from None
        said = "".join(f"; {label}: {escape(text.strip())}" for label, text in
                       (("stdout", outcome.stdout), ("stderr", outcome.stderr)) if text.strip())
        note(f"processing step {name!r} ({route}) {'done' if outcome.ok else 'failed'}: "
             f"{outcome.summary()}{said}")
        result.outcomes.append((name, outcome))
        if not outcome.ok:
            raise ChainFailed(name, outcome.summary(), outcome)
        if outcome.result_error:
            note(f"processing step {name!r} ({route}): {outcome.result_error}")
        if outcome.result and isinstance(outcome.result.get("route"), str):
            result.route = outcome.result["route"]
        previous = folder.output
        result.outputs = outcome.outputs
    return result
