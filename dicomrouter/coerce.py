"""Reconciliation before delivery (``coerce:`` on a route or a destination): patient and order
attributes filled in (``mode: fill``) or corrected (``overwrite``) from lookup sources tried
in order (``lookups.py``), on the copy that goes out, never on the spool's file.

It runs as the first operation of the delivery's transform (``transforms.transform_file``),
before any other transform of the route or the destination: a ``deidentify`` after it sees
the coerced values and removes them like any other, while a coercion after de-identification
would put the real patient back. Per job run, each distinct identity of the study's instances
(AccessionNumber, PatientID, IssuerOfPatientID, StudyDate, a table's keys) is looked up once
(one C-FIND per study, not per instance); before the session opens, ``Coercer.prepare`` looks
up the study (so an unreachable source fails the run before anything is sent) and records in
the study's history, once, what changes: ``before → after`` per attribute.

The answer: each attribute from the first source, in order, that gives it. A source with
several disagreeing entries is not guessed from: the study is sent unchanged and the history
says why. A source that cannot be asked: ``on_unavailable``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from pydicom import dcmread
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset

from . import metrics
from .config import Config
from .config.coerce import CoerceModel
from .destinations import DeliveryError
from .destinations.base import PermanentFailure
from .dicomfile import text
from .logsafe import escape
from .lookups import KEY_KEYWORDS, Answer, Lookups, Unavailable
from .state import Instance, Job

log = logging.getLogger("dicomrouter.coerce")

UTF8 = "ISO_IR 192"


class SourceUnavailable(DeliveryError):
    """``on_unavailable: hold``: the job waits (retried with the destination's backoff)."""


def _show(value: str) -> str:
    return repr(escape(value))


def _encodable(ds: Dataset, value: str) -> bool:
    """``value`` can be written in the dataset's character set as it is."""
    charset = ds.get("SpecificCharacterSet") or ""
    if isinstance(charset, str):
        charset = [charset]
    if not any(c.strip() for c in charset) or [c.strip() for c in charset] == ["ISO_IR 6"]:
        return value.isascii()  # the default repertoire (pydicom would write Latin-1)
    try:
        codecs = convert_encodings(list(charset))
        value.encode(codecs[0] if len(codecs) == 1 else "ascii")
    except (LookupError, UnicodeEncodeError, ValueError):
        return False
    return True


def assign(ds: Dataset, keyword: str, value: str) -> None:
    """Set ``keyword`` to ``value`` (text, a backslash separating values). A value the
    dataset's Specific Character Set cannot hold (a worklist's ``Müller`` in an ASCII dataset)
    switches the dataset to UTF-8: every text element is decoded with the old set first, so
    pydicom writes them all again in the new one."""
    if not _encodable(ds, value):
        ds.decode()
        ds.SpecificCharacterSet = UTF8
    tag = tag_for_keyword(keyword)
    vr = ds[keyword].VR if keyword in ds else dictionary_VR(tag)
    ds.add_new(tag, vr, value.split("\\") if "\\" in value else value)


class CoerceRun:
    """One ``coerce`` during one job run: the answers per identity, applied to each copy (a
    transform operation: ``kind`` and ``describe`` like ``transforms.Op``)."""

    kind = "coerce"

    def __init__(self, spec: CoerceModel, where: str, lookups: Lookups, state: Any,
                 study_uid: str, destination: str) -> None:
        self.spec = spec
        self.where = where  # "route 'x'" or "destination 'y'"
        self.lookups = lookups
        self.state = state
        self.study_uid = study_uid
        self.destination = destination
        self.keys = tuple(dict.fromkeys((*KEY_KEYWORDS, *(
            k for s in spec.sources if s.table for k in s.table.keywords()[0]))))
        self._answers: dict[tuple[str, ...], dict[str, str]] = {}
        self._lock = threading.Lock()

    def describe(self) -> str:
        return self.spec.describe()

    def apply(self, ds: Dataset) -> None:
        values = self.values_for(ds)
        for kw, value in values.items():
            old = text(ds.get(kw))
            if old == value or (self.spec.mode == "fill" and old):
                continue
            assign(ds, kw, value)

    def values_for(self, ds: Dataset) -> dict[str, str]:
        """The looked-up values for this instance's identity (asked once per identity and
        run; the first time, the history records what changes)."""
        current = {kw: text(ds.get(kw)) for kw in (*self.keys, *self.spec.attributes)}
        key = tuple(current[k] for k in self.keys)
        with self._lock:  # the sessions of one run share it: one lookup per identity
            if key not in self._answers:
                self._answers[key] = self._resolve(current)
            return self._answers[key]

    def _resolve(self, current: dict[str, str]) -> dict[str, str]:
        merged: dict[str, str] = {}
        hows: list[str] = []
        for source in self.spec.sources:
            if all(a in merged for a in self.spec.attributes):
                break
            try:
                answer: Answer | None = self.lookups.ask(source, current, self.spec.attributes)
            except Unavailable as exc:
                metrics.COERCIONS.labels(self.destination, "unavailable").inc()
                return self._unavailable(str(exc))
            if answer is None:
                hows.append(f"{source.describe()}: no match")
                continue
            if answer.several:
                metrics.COERCIONS.labels(self.destination, "ambiguous").inc()
                self._record(f"{answer.how}: {answer.several} different entries; not guessed, "
                             "sent unchanged", warn=True)
                return {}
            hows.append(answer.how)
            for kw, value in answer.values.items():
                merged.setdefault(kw, value)
        changes = [(kw, current.get(kw, ""), v) for kw, v in merged.items()
                   if current.get(kw, "") != v and
                   (self.spec.mode == "overwrite" or not current.get(kw, ""))]
        metrics.COERCIONS.labels(self.destination, "no_match" if not merged else
                                 "changed" if changes else "unchanged").inc()
        if not merged:
            asked = ", ".join(f"{k} {_show(current[k])}" for k in self.keys if current[k])
            self._record(f"no match for {asked or 'an instance without identifiers'} "
                         f"({'; '.join(hows)}): sent unchanged", warn=True)
        elif not changes:
            self._record(f"{'; '.join(hows)}: nothing to change ({self.spec.mode})")
        else:
            self._record(f"{'; '.join(hows)} ({self.spec.mode}): " + "; ".join(
                f"{kw} {_show(old)} → {_show(new)}" for kw, old, new in changes))
        return merged

    def _unavailable(self, reason: str) -> dict[str, str]:
        policy = self.spec.on_unavailable
        if policy == "send":
            self._record(f"{reason}; sent unchanged (on_unavailable: send)", warn=True)
            return {}
        if policy == "fail":
            raise PermanentFailure(f"coerce: {reason}", "bring the lookup source back (or fix "
                                   "its known_aes entry), then 'dicomrouter retry --dead'")
        raise SourceUnavailable(f"coerce: {reason} (on_unavailable: hold: the study waits "
                                "and is retried)")

    def _record(self, what: str, warn: bool = False) -> None:
        """One event in the study's history (not again when a retry finds the same), and one
        log line."""
        line = f"coerce for {self.destination} ({self.where}): {escape(what)}"
        try:
            if not any(event == line for _ts, event in self.state.history(self.study_uid)):
                self.state.note(self.study_uid, line)
        except OSError as exc:  # the delivery goes on; the log still has it
            log.warning("study %s: cannot record the coercion in its history: %s",
                        self.study_uid, exc)
        (log.warning if warn else log.info)("study %s: %s", self.study_uid, line)


def specs(cfg: Config, routes: tuple[str, ...] | list[str],
          destination: str) -> list[tuple[str, CoerceModel]]:
    """The ``coerce`` of the routes that sent the study to ``destination``, then the
    destination's own (where each is configured, and the block)."""
    out = [(f"route {r.name!r}", r.coerce) for r in cfg.routes
           if r.coerce is not None and r.name in routes and destination in r.to]
    own = cfg.destinations[destination].coerce
    return out + ([(f"destination {destination!r}", own)] if own is not None else [])


class Coercer:
    """Builds each job run's coercions (DeliveryWorkers)."""

    def __init__(self, cfg: Config, state: Any) -> None:
        self.cfg = cfg
        self.state = state
        self.lookups = Lookups(cfg, state)

    def prepare(self, job: Job, destination: str, todo: list[Instance],
                opener: Callable[[Instance], Any]) -> tuple[CoerceRun, ...]:
        """This run's coercions, with the study's identities looked up already (one
        instance's header read per identity the index shows). Raises DeliveryError when a
        source is unavailable and ``on_unavailable`` is hold (transient) or fail
        (permanent)."""
        runs = tuple(CoerceRun(spec, where, self.lookups, self.state, job.study_uid,
                               destination) for where, spec in specs(self.cfg, job.routes,
                                                                      destination))
        if not runs:
            return ()
        seen: set[tuple[str, ...]] = set()
        for inst in todo:
            key = tuple(inst.tags.get(k, "") for k in KEY_KEYWORDS)
            if key in seen:
                continue
            seen.add(key)
            try:
                with opener(inst) as f:
                    ds = dcmread(f, stop_before_pixels=True)
            except Exception as exc:  # noqa: BLE001 - the send refuses it with the reason
                log.debug("coerce: cannot read %s ahead: %s", inst.sop_uid, exc)
                continue
            for run in runs:  # in order, on one copy: the next sees what the first changed
                run.apply(ds)
        return runs
