"""The routing table: which destinations a completed study goes to.

A condition ``Keyword: value(s)`` holds when *any* instance of the study has a matching value (so
``Modality: CT`` means "the study contains CT"); all conditions of a route must hold. Every matching
route fires; a destination named by several routes gets the study once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from .config import Matcher, RouteConfig
from .dicomfile import read_header, text
from .state import Instance

log = logging.getLogger("dicomrouter.routing")


@dataclass(frozen=True)
class Decision:
    routes: tuple[str, ...]
    destinations: tuple[str, ...]


class _StudyView:
    """Tag values of a study's instances, reading a file only for keywords not indexed: once
    per file, for every such keyword the routing table uses."""

    def __init__(self, instances: Sequence[Instance], keywords: set[str],
                 open_instance: Callable[[Instance], BinaryIO] | None,
                 sources: Mapping[str, str] | None = None) -> None:
        self.instances = instances
        self._sources = sources or {}
        self._open = open_instance
        self._keywords = keywords
        self._headers: dict[str, dict[str, str]] = {}

    def values(self, keyword: str, inst: Instance) -> list[str]:
        if keyword == "CallingAE":
            return [inst.calling_ae]
        if keyword == "CalledAE":
            return [inst.called_ae]
        if keyword == "Source":
            return [self._sources.get(inst.calling_ae, "")]
        if keyword == "Listener":  # the listener (port) it came in on
            return [inst.tags.get("_Listener", "")]
        raw = inst.tags[keyword] if keyword in inst.tags else self._read(inst, keyword)
        return raw.split("\\") if raw else [""]

    def _read(self, inst: Instance, keyword: str) -> str:
        cache = self._headers.get(inst.sop_uid)
        if cache is None:
            cache = self._headers[inst.sop_uid] = {}
            try:
                if self._open is not None:
                    with self._open(inst) as f:
                        ds = read_header(f)
                    cache.update({kw: text(ds.get(kw)) for kw in self._keywords})
            except FileNotFoundError:
                pass  # an earlier generation, delivered and deleted
            except Exception as exc:  # a file we stored and parsed once: log, don't crash
                log.warning("cannot read %s from %s: %s: %s", ", ".join(sorted(self._keywords)),
                            inst.key, type(exc).__name__, exc)
        return cache.get(keyword, "")

    def holds(self, m: Matcher) -> bool:
        return any(any(m.accepts(v) for v in self.values(m.keyword, i)) for i in self.instances)


def route(routes: Sequence[RouteConfig], instances: Sequence[Instance],
          open_instance: Callable[[Instance], BinaryIO] | None = None,
          sources: Mapping[str, str] | None = None) -> Decision:
    """Evaluate the routing table for one study; ``open_instance`` (``Spool.open``) reads the
    keywords the index does not hold; ``sources`` maps a calling AE title to the pull source
    it stands for (the ``Source`` key)."""
    view = _StudyView(instances, {m.keyword for r in routes for m in r.when}, open_instance,
                      sources)
    matched: list[str] = []
    dests: dict[str, None] = {}
    for r in routes:
        if all(view.holds(m) for m in r.when):
            matched.append(r.name)
            dests.update(dict.fromkeys(r.to))
    return Decision(tuple(matched), tuple(dests))

