"""Results back where they belong (issue 29, item 2).

A step's output files re-enter the router through the one ingest contract (checks,
durability) as instances tagged with the route that produced them (``_ResultOf``) and the
route a ``result.json`` picked (``_ResultRoute``); the tags live in the state's index with
the instance (result → origin study, route). When a study's newest generation is made only
of results, the tracker hands it here instead of to the routing table, so results never loop
back into a processing step, even when they match the route that produced them."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..config import Config
from ..config.processing import PROCESS_PREFIX, process_destination, return_destination
from ..logsafe import escape
from ..scp.ingest import store_file
from ..spool import Spool
from ..state import Instance, State
from ..transforms import Op, TransformError, transform_file
from ..values import RESULT_TAG

log = logging.getLogger("dicomrouter.processing")

PICKED_TAG = "_ResultRoute"  # the route a step's result.json picked for it ('' none)


def ingest_result(spool: Spool, path: Path, route: str, picked: str, calling: str,
                  called: str) -> str:
    """One output file into the spool as a result of ``route``; its SOP Instance UID, or
    raises ValueError with the ingest's refusal (a file that is not DICOM...)."""

    def chunks() -> Iterator[bytes]:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                yield chunk

    status, comment, tags = store_file(spool, chunks(), calling, called,
                                       {RESULT_TAG: route, PICKED_TAG: picked},
                                       "processing result")
    if tags is None:
        raise ValueError(f"0x{status:04X} {comment}")
    return tags.get("SOPInstanceUID", "")


def route_key(route: Any) -> Any:
    """The pseudonym key of a route that de-identifies reversibly (its results are
    re-identified before they enter the router), or None."""
    return next((op.key for op in (route.transforms if route is not None else ())
                 if getattr(op, "kind", "") == "deidentify" and op.key is not None), None)


REIDENTIFIED = ".reidentified"  # the re-identified copy of an output file, beside it


def reidentified_copy(path: Path, key: Any, state: State, route: str) -> Path:
    """A re-identified copy of an output file, beside it (its UIDs, references and patient
    attributes restored from the route's pseudonymization mapping, its own new UIDs kept);
    the file stays as the step wrote it. ValueError when that cannot be done: a pseudonymized
    result is never taken as it is.

    A copy, not the file rewritten in place: re-identifying a file a second time finds no
    mapping for its (now original) study, so a crash between the rewrite and the ingest would
    have had the retry refuse the result."""
    op = Op("reidentify", 0, key=key, state=state, scope=route)
    copy = path.with_name(path.name + REIDENTIFIED)
    try:
        with open(path, "rb") as src:
            transform_file(src, [op], str(copy))
    except TransformError as exc:
        with contextlib.suppress(OSError):
            copy.unlink()
        raise ValueError(f"not re-identified ({exc}): a pseudonymized result is not taken"
                         ) from None
    return copy


def reidentify_file(path: Path, key: Any, state: State, route: str) -> None:
    """Re-identify an output file in place (see ``reidentified_copy``; for a file that a
    retry does not read again)."""
    os.replace(reidentified_copy(path, key, state, route), path)


def is_result(inst: Instance) -> bool:
    return bool(inst.tags.get(RESULT_TAG))


class ResultRouter:
    """Routes a generation of results by the ``results:`` rules of the route that made it."""

    def __init__(self, cfg: Config, state: State,
                 notify: Callable[[Sequence[str]], None]) -> None:
        self.cfg = cfg
        self.state = state
        self.notify = notify
        self.routes = {r.name: r for r in cfg.routes}

    def handle(self, study_uid: str, seen: object, instances: Sequence[Instance]) -> bool:
        """True when the newest generation is results only, and so routed here."""
        generation = getattr(seen, "generation", 0)
        new = [i for i in instances if i.generation == generation]
        if not new or not all(is_result(i) for i in new):
            return False
        origin = next((i for i in instances if not is_result(i)), None)
        sender = origin.calling_ae if origin is not None else ""
        series: dict[str, set[str]] = {}
        why: list[str] = []
        for (route, picked), insts in _by_producer(new).items():
            dests, said = self.targets(route, picked, sender)
            why.append(f"{len(insts)} result(s) of route {route!r}: {said}")
            for d in dests:
                series.setdefault(d, set()).update(i.series_uid for i in insts)
        text = "processing results: " + "; ".join(why)
        if not self.state.route_results(study_uid, seen,  # type: ignore[arg-type]
                                        {d: sorted(s) for d, s in series.items()}, text):
            return True  # an instance arrived meanwhile: completes later
        log.info("study %s: %s", study_uid, escape(text))
        if series:
            self.notify(list(series))
        else:
            self.state.settle_study(study_uid)
        return True

    def targets(self, route: str, picked: str, sender: str) -> tuple[list[str], str]:
        """Where results of ``route`` go (never a processing step), and why, for the history.
        A route a ``result.json`` picked replaces the ``results:`` rules by its ``to``."""
        if picked:
            chosen = self.routes.get(picked)
            if chosen is None:
                return [], f"result.json picked route {picked!r}, not defined: sent nowhere"
            dests = [d for d in chosen.to or () if not d.startswith(PROCESS_PREFIX)]
            return dests, f"result.json picked route {picked!r} → {', '.join(dests) or 'nowhere'}"
        r = self.routes.get(route)
        if r is None:
            return [], f"route {route!r} is no longer defined: sent nowhere"
        dests: list[str] = []
        notes: list[str] = []
        for target in r.results:
            if target == "return_to_sender":
                if sender in self.cfg.known_aes:
                    dests.append(return_destination(sender))
                else:
                    notes.append(f"not returned to {sender or '?'}: not in known_aes")
            elif target == "origin_destinations":
                dests += [d for d in r.to or () if d != process_destination(route)]
            else:
                dests.append(target)
        dests = list(dict.fromkeys(dests))
        return dests, (", ".join(dests) or "nowhere") + "".join(f" ({n})" for n in notes)


def _by_producer(insts: Iterable[Instance]) -> dict[tuple[str, str], list[Instance]]:
    out: dict[tuple[str, str], list[Instance]] = {}
    for i in insts:
        out.setdefault((i.tags[RESULT_TAG], i.tags.get(PICKED_TAG, "")), []).append(i)
    return out
