"""The routing table: which destinations a completed study goes to, and why.

Conditions (``rules.py``) hold when *any* instance of the study has a matching value (so
``Modality: CT`` means "the study contains CT"); all conditions of a route must hold. Every
matching route fires (all-match), unless a matching route says ``stop: true`` (first-match from
there on); ``fallback: true`` routes fire only when no other route matched. A destination named
by several routes gets the study once. ``Decision.explanation`` says, route by route, what
decided.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from pydicom.dataset import Dataset

from .config import RouteConfig
from .dicomfile import read_header, text
from .rules import AGGREGATES, ORDER_KEYS, STEP, TAG, all_hold, keys_of
from .state import Instance
from .values import AE_PSEUDO_KEYS, PROXIED_TAG

log = logging.getLogger("dicomrouter.routing")

Orders = Callable[[str], Mapping[str, str] | None]  # accession → the latest HL7 order


@dataclass(frozen=True)
class RouteResult:
    name: str
    to: tuple[str, ...]
    matched: bool
    why: str
    stop: bool = False
    fallback: bool = False
    skipped: str = ""  # why it was not evaluated (an earlier stop, other routes matched)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "to": list(self.to), "matched": self.matched,
                "why": self.why, "stop": self.stop, "fallback": self.fallback,
                "skipped": self.skipped}


@dataclass(frozen=True)
class Decision:
    routes: tuple[str, ...]
    destinations: tuple[str, ...]
    explanation: tuple[RouteResult, ...] = ()

    def summary(self) -> str:
        """One line for the study's history."""
        parts = []
        for r in self.explanation:
            if r.skipped:
                continue
            parts.append(f"{r.name!r} {'matched' if r.matched else 'not matched'} ({r.why})")
        return "; ".join(parts) or "no routes"


def resolve(ds: Dataset, path: str) -> list[str]:
    """The values at a keyword, ``(gggg,eeee)`` tag or sequence path (``A[0].B[*].C``)."""
    current = [ds]
    steps = path.split(".")
    for n, step in enumerate(steps):
        m = STEP.match(step)
        if m is None:
            return []
        name, index = m.group("name"), m.group("index")
        tm = TAG.match(name)
        tag: Any = (int(tm.group(1), 16) << 16 | int(tm.group(2), 16)) if tm else name
        nxt: list[Any] = []
        for item in current:
            try:
                elem = item[tag] if tm else item.data_element(name)
            except (KeyError, TypeError):
                continue
            if elem is None:
                continue
            if n == len(steps) - 1:
                if elem.VR == "SQ":
                    continue
                nxt.append(text(elem.value))
                continue
            if elem.VR != "SQ":
                continue
            items = list(elem.value or [])
            if index is None or index == "*":
                nxt.extend(items)
            elif int(index) < len(items):
                nxt.append(items[int(index)])
        current = nxt
    return [v for value in current for v in str(value).split("\\")]


class _StudyView:
    """Tag values of a study's instances, reading a file only for keys not indexed: once per
    file, for every such key the routing table uses."""

    def __init__(self, instances: Sequence[Instance], keys: set[str],
                 open_instance: Callable[[Instance], BinaryIO] | None,
                 sources: Mapping[str, str] | None = None,
                 headers: dict[str, dict[str, list[str]]] | None = None,
                 orders: Orders | None = None) -> None:
        self.instances = instances
        self._orders = orders
        self._order_of: dict[str, Mapping[str, str]] = {}
        self._open = open_instance
        self._keys = keys
        self._sources = sources or {}
        self._headers: dict[str, dict[str, list[str]]] = {} if headers is None else headers
        self._unreadable: set[str] = set()  # this evaluation only

    def study_values(self, key: str) -> list[str]:
        """Every value the study has for ``key`` (aggregates computed over the instances)."""
        insts = self.instances
        if key == "NumberOfStudyRelatedInstances":
            return [str(len(insts))]
        if key == "NumberOfStudyRelatedSeries":
            return [str(len({i.series_uid for i in insts}))]
        if key == "ModalitiesInStudy":
            return sorted({v for i in insts for v in self.values("Modality", i)} - {""})
        if key == "SeriesDescriptions":
            return sorted({v for i in insts for v in self.values("SeriesDescription", i)} - {""})
        if key == "Proxied":  # one value per study: true once the Q/R proxy fetched any of it
            return ["true" if any(i.tags.get(PROXIED_TAG) for i in insts) else "false"]
        return [v for i in insts for v in self.values(key, i)]

    def values(self, key: str, inst: Instance) -> list[str]:
        if key == "CallingAE":
            return [inst.calling_ae]
        if key == "CalledAE":
            return [inst.called_ae]
        if key == "Source":
            return [self._sources.get(inst.calling_ae, "")]
        if key == "Listener":  # the listener (port) it came in on
            return [inst.tags.get("_Listener", "")]
        if key == "SourceHost":  # the sender's IP address
            return [inst.tags.get("_SourceHost", "")]
        if key in ORDER_KEYS:
            return [self._order(inst.tags.get("AccessionNumber", "")).get(ORDER_KEYS[key], "")]
        if key == "Prefetch":  # a prior a prefetch rule brought (state: prefetch_studies)
            return ["true" if inst.tags.get("_PrefetchRule") else "false"]
        if key == "PrefetchRule":
            return [inst.tags.get("_PrefetchRule", "")]
        if key == "Endpoint":  # the DICOMweb endpoint it was posted to (STOW-RS)
            return [inst.tags.get("_Endpoint", "")]
        if key == "Proxied":  # fetched from the PACS by the Q/R proxy (a cache)
            return ["true" if inst.tags.get(PROXIED_TAG) else "false"]
        if key in inst.tags:
            raw = inst.tags[key]
            return raw.split("\\") if raw else [""]
        return self._read(inst, key)

    def _order(self, accession: str) -> Mapping[str, str]:
        """The latest HL7 order for an accession (read once per evaluation; none: {})."""
        accession = accession.strip()
        if not accession or self._orders is None:
            return {}
        if accession not in self._order_of:
            try:
                self._order_of[accession] = self._orders(accession) or {}
            except Exception as exc:  # the state out of reach: routed as without an order
                log.warning("cannot read the HL7 order of accession %s: %s: %s", accession,
                            type(exc).__name__, exc)
                self._order_of[accession] = {}
        return self._order_of[accession]

    def _read(self, inst: Instance, key: str) -> list[str]:
        cache = self._headers.get(inst.sop_uid)
        if cache is None:
            if inst.sop_uid in self._unreadable:
                return [""]
            try:
                if self._open is None:
                    return [""]
                with self._open(inst) as f:
                    ds = read_header(f)
                wanted = self._keys - set(AGGREGATES) - set(ORDER_KEYS) - set(AE_PSEUDO_KEYS)
                # only what was read is kept (``headers`` may outlive this evaluation: a file
                # not readable now, e.g. not yet in a cluster's shared store, is read again)
                cache = self._headers[inst.sop_uid] = {k: resolve(ds, k) for k in wanted}
            except FileNotFoundError:
                self._unreadable.add(inst.sop_uid)  # an earlier generation, delivered, deleted
                return [""]
            except Exception as exc:  # a file we stored and parsed once: log, don't crash
                self._unreadable.add(inst.sop_uid)
                log.warning("cannot read %s from %s: %s: %s", ", ".join(sorted(self._keys)),
                            inst.key, type(exc).__name__, exc)
                return [""]
        return cache.get(key) or [""]


def conditions_hold(when: Sequence[Any], instances: Sequence[Instance],
                    open_instance: Callable[[Instance], BinaryIO] | None = None,
                    sources: Mapping[str, str] | None = None,
                    orders: Orders | None = None) -> tuple[bool, str]:
    """Whether a ``when`` (of a prefetch rule) holds for these instances, and why: the same
    evaluation as a route's (``orders``: the ``Order*`` keys, as in ``route``)."""
    if not when:
        return True, "no conditions"
    keys = keys_of(when)
    if "ModalitiesInStudy" in keys:
        keys.add("Modality")
    view = _StudyView(instances, keys, open_instance, sources, orders=orders)
    return all_hold(when, view.study_values)


def cache_fill(instances: Sequence[Instance]) -> bool:
    """The study's newest generation came from the Q/R proxy only (every instance of it is
    marked Proxied): a cache fill, which only routes naming ``Proxied`` see. An instance pushed
    into a cached study (C-STORE, STOW-RS: an AI result in the study it read) starts a
    generation of its own that every route sees."""
    newest = max((i.generation for i in instances), default=0)
    return bool(instances) and all(i.tags.get(PROXIED_TAG) for i in instances
                                   if i.generation == newest)


def route(routes: Sequence[RouteConfig], instances: Sequence[Instance],
          open_instance: Callable[[Instance], BinaryIO] | None = None,
          sources: Mapping[str, str] | None = None,
          headers: dict[str, dict[str, list[str]]] | None = None,
          orders: Orders | None = None) -> Decision:
    """Evaluate the routing table for one study; ``open_instance`` (``Spool.open``) reads the
    keys the index does not hold; ``sources`` maps a calling AE title to the pull source it
    stands for (the ``Source`` key); ``headers``, kept by the caller between evaluations of
    a growing study, holds what was read from each file (each is read once); ``orders``
    (``State.hl7_order``) gives the latest HL7 order of an accession (the ``Order*`` keys)."""
    keys = set().union(*(keys_of(r.when) for r in routes)) if routes else set()
    if "ModalitiesInStudy" in keys:
        keys.add("Modality")
    if "SeriesDescriptions" in keys:
        keys.add("SeriesDescription")
    view = _StudyView(instances, keys, open_instance, sources, headers, orders)
    matched: list[str] = []
    dests: dict[str, None] = {}
    results: list[RouteResult] = []
    stopped = ""
    # a study the Q/R proxy fetched is a cache, not a new arrival: only routes that name
    # Proxied see it (README "Q/R proxy"); instances pushed into it later are seen by all
    proxied = cache_fill(instances)
    for r in routes:
        if proxied and "Proxied" not in keys_of(r.when):
            results.append(RouteResult(r.name, r.to, False, "", r.stop, r.fallback,
                                       "fetched by the Q/R proxy (only routes naming "
                                       "Proxied see it)"))
            continue
        if r.fallback:
            continue
        if stopped:
            results.append(RouteResult(r.name, r.to, False, "", r.stop, False,
                                       f"route {stopped!r} matched with stop: true"))
            continue
        held, why = all_hold(r.when, view.study_values) if r.when else (True, "no conditions")
        results.append(RouteResult(r.name, r.to, held, why, r.stop))
        if held:
            matched.append(r.name)
            dests.update(dict.fromkeys(r.to))
            if r.stop:
                stopped = r.name
    for r in routes:
        if not r.fallback or (proxied and "Proxied" not in keys_of(r.when)):
            continue
        if matched:
            results.append(RouteResult(r.name, r.to, False, "", False, True,
                                       "another route matched"))
            continue
        results.append(RouteResult(r.name, r.to, True, "no other route matched", False, True))
        dests.update(dict.fromkeys(r.to))
    fallback_used = [r.name for r in routes if r.fallback and not matched
                     and not (proxied and "Proxied" not in keys_of(r.when))]
    return Decision(tuple(matched + fallback_used), tuple(dests), tuple(results))
