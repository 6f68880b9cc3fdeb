"""A study's processing steps, step by step, read back from its history (issue 29: "shown
step by step in ``status --study`` and on the web page").

The steps write their progress into the study's history (chain.py, and the remote kind),
one line per event::

    processing step 'NAME' (ROUTE) running | waiting: ... | done: ... | failed: ...
    processing step 'NAME' (ROUTE) could not start: ...
    processing step 'NAME' (ROUTE): REMARK            (not a change of state)
    processing (ROUTE): N result instance(s) ingested  (the chain finished)

so the view needs no table of its own: the history is already durable, shared by every node
and kept with the study's retention. NAME is Python repr-quoted (it may hold quotes, ``) ``
or anything else a configuration allows), so it is read back as a string literal, not by a
pattern. A run of a route's chain starts with a step's ``running`` once the previous run
ended (a failure, the results ingested) or when that step already ran in it (a retry after a
crash); only the latest run gives the state, every ``running`` counts as an attempt.

Pure: plain values in (the history, the configured routes, the routes that have a
``process:<route>`` job), plain values out."""

from __future__ import annotations

import ast
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config.processing import PROCESS_PREFIX, step_name

#: the states a step can be in
PENDING, RUNNING, WAITING, DONE, FAILED, CANNOT_START = (
    "pending", "running", "waiting", "done", "failed", "could not start")
#: a step's summary is cut there (its whole stdout/stderr is in the history)
SUMMARY_MAX = 240

_STEP = "processing step "
_CHAIN = "processing ("
#: what follows ``(ROUTE)`` on a step's line → its state (None: a remark)
_MARKS: tuple[tuple[str, str | None], ...] = (
    (" running", RUNNING), (" waiting: ", WAITING), (" done: ", DONE), (" failed: ", FAILED),
    (" could not start: ", CANNOT_START), (": ", None))
_INGESTED = " result instance(s) ingested"


@dataclass
class StepView:
    """One step of one processing route of a study, as its latest run left it. ``kind`` is
    None when the route (or the step) is no longer in the configuration; ``since`` is the
    time of its last change of state (None: pending); ``summary`` what its last line said
    (cut to SUMMARY_MAX); ``remark`` a remark after it (``result.json`` unreadable)."""

    route: str
    name: str
    kind: str | None
    state: str = PENDING
    since: float | None = None
    summary: str = ""
    attempts: int = 0
    remark: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"route": self.route, "name": self.name, "kind": self.kind,
                "state": self.state, "since": self.since, "summary": self.summary,
                "attempts": self.attempts, "remark": self.remark}

    def line(self) -> str:
        """``ROUTE / NAME (KIND): STATE — SUMMARY`` (the attempts when more than one)."""
        text = f"{self.route} / {self.name} ({self.kind or '?'}): {self.state}"
        if self.summary:
            text += f" — {self.summary}"
        if self.remark:
            text += f" ({self.remark})"
        if self.attempts > 1:
            text += f" [attempt {self.attempts}]"
        return text


@dataclass
class _Route:
    """What the history says of one route's chain: the latest run's steps and the rest."""

    attempts: dict[str, int] = field(default_factory=dict)
    seen: list[str] = field(default_factory=list)  # step names, in the order first seen
    run: dict[str, StepView] = field(default_factory=dict)  # the latest run's steps
    ended: bool = False  # the latest run failed or had its results ingested


def parse(line: str, routes: Sequence[str] = ()) -> tuple[str, str, str | None, str] | None:
    """A processing line → (route, step name, state or None for a remark, text after it);
    the chain's ``processing (ROUTE): ...`` line gives step name ''. None: not one.
    ``routes`` (the configured names) are tried first, longest first, so a route name
    holding ``) `` reads right."""
    if line.startswith(_STEP):
        name, rest = _literal(line[len(_STEP):])
        if name is None or not rest.startswith(" ("):
            return None
        found = _route_and_tail(rest[2:], routes, _marks_of)
        if found is None:
            return None
        route, tail = found
        mark, state = next((m, s) for m, s in _MARKS if tail.startswith(m))
        return route, name, state, tail[len(mark):] if state != RUNNING else ""
    if line.startswith(_CHAIN):
        found = _route_and_tail(line[len(_CHAIN):], routes,
                                lambda tail: tail.startswith(": "))
        if found is None:
            return None
        return found[0], "", None, found[1][2:]
    return None


def _marks_of(tail: str) -> bool:
    return tail == " running" or any(tail.startswith(m) for m, s in _MARKS if s != RUNNING)


def _route_and_tail(text: str, routes: Sequence[str], fits: Any) -> tuple[str, str] | None:
    """``ROUTE)TAIL`` → (ROUTE, TAIL) where TAIL is what ``fits`` accepts."""
    for route in sorted(routes, key=len, reverse=True):
        if text.startswith(route + ")") and fits(text[len(route) + 1:]):
            return route, text[len(route) + 1:]
    at = text.find(")")
    while at >= 0:
        if fits(text[at + 1:]):
            return text[:at], text[at + 1:]
        at = text.find(")", at + 1)
    return None


def _literal(text: str) -> tuple[str | None, str]:
    """The Python string literal ``text`` starts with (a ``repr``) and what follows it."""
    if not text or text[0] not in "'\"":
        return None, text
    quote, i = text[0], 1
    while i < len(text) and text[i] != quote:
        i += 2 if text[i] == "\\" else 1
    if i >= len(text):
        return None, text
    try:
        value = ast.literal_eval(text[:i + 1])
    except (ValueError, SyntaxError):
        return None, text
    return (value, text[i + 1:]) if isinstance(value, str) else (None, text)


def _cut(text: str) -> str:
    return text if len(text) <= SUMMARY_MAX else text[:SUMMARY_MAX - 1] + "…"


def steps_of(history: Iterable[tuple[float, str]], routes: Sequence[Any],
             routed: Iterable[str] = ()) -> list[StepView]:
    """Every step of the study's processing routes, route by route (the configuration's
    order, then routes no longer configured in the order the history names them), each
    route's steps in their configured order (then steps only the history knows).

    ``routes``: the configuration's routes (``cfg.routes``); ``routed``: the routes the
    study has a ``process:<route>`` job for (their steps are listed, pending, before any
    of them ran)."""
    configured: dict[str, list[tuple[str, str]]] = {}
    for i, r in enumerate(routes):
        if r.process:
            configured[r.name or f"route {i + 1}"] = [
                (step_name(s, n), s.kind) for n, s in enumerate(r.process)]
    chains: dict[str, _Route] = {route: _Route() for route in routed}
    for ts, text in history:
        got = parse(text, tuple(configured))
        if got is None:
            continue
        route, name, state, said = got
        chain = chains.setdefault(route, _Route())
        if not name:  # the chain's own line: the results are in, the run is over
            if said.split(";")[0].endswith(_INGESTED):
                chain.ended = True
            continue
        if name not in chain.seen:
            chain.seen.append(name)
        if state == RUNNING:
            if chain.ended or name in chain.run:
                chain.run, chain.ended = {}, False
            chain.attempts[name] = chain.attempts.get(name, 0) + 1
        step = chain.run.setdefault(name, StepView(route, name, None))
        if state is None:
            step.remark = _cut(said)
            continue
        step.state, step.since, step.summary, step.remark = state, ts, _cut(said), ""
        if state in (FAILED, CANNOT_START):
            chain.ended = True
    order = [r for r in configured if r in chains] + [r for r in chains if r not in configured]
    out = []
    for route in order:
        chain = chains[route]
        kinds = dict(configured.get(route, ()))
        names = list(kinds) + [n for n in chain.seen if n not in kinds]
        for name in names:
            step = chain.run.get(name) or StepView(route, name, None)
            step.kind = kinds.get(name)
            step.attempts = chain.attempts.get(name, 0)
            out.append(step)
    return out


def study_steps(history: Iterable[tuple[float, str]], routes: Sequence[Any],
                jobs: Iterable[dict[str, Any]]) -> list[StepView]:
    """``steps_of`` for a study with its delivery jobs (``state.jobs``): the routes of its
    ``process:<route>`` jobs are listed even before a step of theirs started."""
    routed = [j["destination"][len(PROCESS_PREFIX):] for j in jobs
              if j["destination"].startswith(PROCESS_PREFIX)]
    return steps_of(history, routes, routed)
