"""MPPS-driven completion (issue 27 item 4): a COMPLETED Modality Performed Procedure Step
lists the instances the modality made, so the study is complete once they are all in, without
waiting for the stable age; and an Instance Availability Notification once a study completes.

Every tick, the steps COMPLETED or DISCONTINUED and not decided yet (``State.mpps_open``):

* COMPLETED, every listed instance arrived: each receiving study it names (or that holds its
  instances) completes now (``StudyTracker.complete`` with the reason), unless another step of
  that study is still IN PROGRESS. The history says "MPPS 1.2.3 COMPLETED: 12/12 instances".
  It does not matter whether the MPPS came before or after the images.
* COMPLETED, instances missing ``mpps_timeout`` seconds after the N-SET: the studies are
  flagged incomplete (status, web page, ``dicomrouter_studies_incomplete_total``, the
  ``incomplete`` notification); the stable age routes them as usual. Should the missing ones
  arrive later (within a day), the flag goes and the late generation completes at once.
* DISCONTINUED: the studies' history says so (and how many of the listed instances arrived);
  the stable age routes them as usual.
* A COMPLETED step that lists nothing changes nothing: the stable age decides.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from .. import metrics
from ..config import Config
from ..mpps_data import DISCONTINUED, IAN_SOP_CLASS, IN_PROGRESS, ian_dataset, new_uid, to_text
from ..state import Instance, Mpps, State, StudyState

log = logging.getLogger("dicomrouter")

EVERY = 1.0  # the open steps are looked at this often (seconds)
LATE = 86400.0  # instances of a step flagged incomplete may still come this long after it


class MppsCompletion:
    """Decides the open steps (see the module) and queues the IAN of completed studies."""

    def __init__(self, cfg: Config, state: State, complete: Callable[[str, str], None],
                 events: Callable[..., None], clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.state = state
        self.complete = complete  # StudyTracker.complete(study, why it is complete)
        self.events = events
        self.clock = clock
        self._last = 0.0

    def tick(self) -> None:
        if not self.cfg.mpps or time.monotonic() - self._last < EVERY:
            return
        self._last = time.monotonic()
        steps = self.state.mpps_open(incomplete_since=self.clock() - LATE)
        if not steps or not self.state.hold_lease("mpps-completion", 10.0):
            return  # nothing to decide, or another node decides (several routers)
        for step in steps:
            try:
                self._decide(step)
            except Exception as exc:  # one step's problem: the others go on
                if isinstance(exc, OSError):
                    raise
                log.error("MPPS %s: deciding its studies failed (%s: %s)", step.uid,
                          type(exc).__name__, exc)

    def _studies(self, step: Mpps, arrived: dict[str, str]) -> list[str]:
        return list(dict.fromkeys([*step.study_uids, *arrived.values()]))

    def _decide(self, step: Mpps) -> None:
        arrived = self.state.arrived_in(step.listed)
        studies = self._studies(step, arrived)
        have, want = len(arrived), len(step.listed)
        if step.status == DISCONTINUED:
            why = (f"MPPS {step.uid} DISCONTINUED: {have}/{want} listed instance(s) arrived; "
                   "the stable age completes the study")
            self.state.mpps_resolve(step.uid, "discontinued", dict.fromkeys(studies, why))
            log.info("study %s: %s", ", ".join(studies) or "(none named)", why)
            return
        if not want:
            self.state.mpps_resolve(step.uid, "complete", dict.fromkeys(
                studies, f"MPPS {step.uid} COMPLETED without listing instances: the stable "
                "age completes the study"))
            return
        if step.outcome == "incomplete":
            if have >= want:  # the missing ones came after all: the flag goes
                why = f"MPPS {step.uid} COMPLETED: {have}/{want} instances, the last ones late"
                for uid in studies:
                    self.state.flag_incomplete(uid, why, clear=True)
                log.info("study %s no longer incomplete: %s", ", ".join(studies), why)
                self._complete(step, studies, why)
            return
        if have >= want:
            self._complete(step, studies, f"MPPS {step.uid} COMPLETED: {have}/{want} instances")
        elif self.clock() - step.updated >= self.cfg.mpps_timeout:
            self._incomplete(step, studies, have, [u for u in step.listed if u not in arrived])

    def _complete(self, step: Mpps, studies: Sequence[str], why: str) -> None:
        waiting = False
        notes: dict[str, str] = {}
        for uid in studies:
            study = self.state.study(uid)
            if study is None or study.state != StudyState.RECEIVING:
                notes[uid] = why
                continue
            others = [m.uid for m in self.state.mpps_for_study(uid)
                      if m.status == IN_PROGRESS and m.uid != step.uid]
            if others:
                waiting = True  # another step of the study is still being performed
                continue
            self.complete(uid, why)
            after = self.state.study(uid)
            if after is not None and after.state == StudyState.RECEIVING:
                waiting = True  # an instance arrived meanwhile: next tick
                continue
            notes[uid] = f"{why}: completed without waiting for the stable age"
            log.info("study %s complete by %s", uid, why)
        if not waiting:
            self.state.mpps_resolve(step.uid, "complete", notes)

    def _incomplete(self, step: Mpps, studies: Sequence[str], have: int,
                    missing: list[str]) -> None:
        want = len(step.listed)
        why = (f"MPPS {step.uid} COMPLETED: {have}/{want} instances {self.cfg.mpps_timeout:g} s "
               f"after it; missing {', '.join(missing[:3])}"
               + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
        for uid in studies:
            self.state.flag_incomplete(uid, why)
            metrics.INCOMPLETE.inc()
            self.events("incomplete", uid, mpps=step.uid, listed=want, arrived=have,
                        missing=len(missing), reason=why)
            log.warning("study %s flagged incomplete: %s; the stable age routes it", uid, why)
        self.state.mpps_resolve(step.uid, "incomplete", {})

    def completed(self, study_uid: str, instances: Sequence[Instance]) -> None:
        """The study completed: queue its Instance Availability Notification (``ian``)."""
        if not self.cfg.ian:
            return
        held = [(i.series_uid, i.sop_class, i.sop_uid) for i in instances]
        steps = [m.uid for m in self.state.mpps_for_study(study_uid)]
        ds: Any = ian_dataset(study_uid, held, self.cfg.ae_title, steps)
        self.state.outbox_add(self.cfg.ian, "N-CREATE", IAN_SOP_CLASS, new_uid(), to_text(ds),
                              f"IAN of study {study_uid} ({len(held)} instance(s))", study_uid)
