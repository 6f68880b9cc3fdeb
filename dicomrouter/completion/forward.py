"""``forward: immediate``: routes that send instances while the study is still arriving.

The stable age guesses when a study is complete; a route whose conditions need only what each
instance says (``Modality: CT``, ``CalledAE: AI``; config validation refuses aggregates such as
``NumberOfStudyRelatedInstances``) need not wait for it. Every tick the receiving studies whose
last arrival changed are evaluated with the whole routing table on what they hold so far; each
``forward: immediate`` route that matches has its destinations' jobs (re)queued
(``State.forward_now``), and a delivery run sends what the ledger does not show as delivered
there, over associations that stay open for the next arrivals (``feed.py``).

The study still completes by its stable age (or count, or force) as before: its jobs are then
queued once more, and the ledger makes that run send only what is left (nothing, usually).
Late arrivals start a new generation, forwarded the same way; retries and dead letters work
as for any job. Once a route matched a study (this generation) it keeps sending it: a later
instance matching a ``stop: true`` route does not take back what was sent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from ..config import Config
from ..priority import route_priority
from ..routing import route
from ..spool import Spool
from ..state import STATE_ERRORS, State

log = logging.getLogger("dicomrouter")


class ImmediateForwarder:
    """Keeps, per receiving study, the arrival it last looked at, the routes that matched it
    and the header values read for the routing table (each file read once)."""

    def __init__(self, cfg: Config, state: State, spool: Spool,
                 notify: Callable[[Sequence[str]], None], sources: Mapping[str, str]) -> None:
        self.cfg = cfg
        self.state = state
        self.spool = spool
        self.notify = notify
        self.sources = sources
        self.routes = [r for r in cfg.routes if r.forward == "immediate"]
        self._seen: dict[str, tuple[int, float]] = {}  # study → (generation, last arrival)
        self._matched: dict[str, tuple[int, set[str]]] = {}  # study → (generation, routes)
        self._headers: dict[str, dict[str, dict[str, list[str]]]] = {}

    def tick(self) -> None:
        """Forward what arrived since the last tick."""
        receiving = self.state.receiving_studies()
        for study_uid, generation, last in receiving:
            if self._seen.get(study_uid) == (generation, last):
                continue
            try:
                self._forward(study_uid, generation)
            except STATE_ERRORS as exc:  # the state is away: every study waits, next tick
                log.error("forwarding while receiving: %s: %s (will try again)",
                          type(exc).__name__, exc)
                return
            except Exception as exc:  # one study's problem: the others go on
                log.error("study %s: forwarding while receiving failed (%s: %s); it is "
                          "delivered when complete", study_uid, type(exc).__name__, exc)
            self._seen[study_uid] = (generation, last)
        live = {uid for uid, _g, _l in receiving}
        for memo in (self._seen, self._matched, self._headers):
            for uid in [u for u in memo if u not in live]:
                del memo[uid]

    def _forward(self, study_uid: str, generation: int) -> None:
        gen, matched = self._matched.get(study_uid, (generation, set()))
        if gen != generation:
            matched = set()
        unmatched = [r for r in self.routes if r.name not in matched]
        if unmatched:
            instances = self.state.instances(study_uid, present_only=False)
            decision = route(self.cfg.routes, instances, self.spool.open, self.sources,
                             self._headers.setdefault(study_uid, {}),
                             orders=self.state.hl7_order)  # Order* keys, as the tracker
            for r in unmatched:
                if r.name in decision.routes:
                    matched.add(r.name)
                    why = next((x.why for x in decision.explanation if x.name == r.name), "")
                    log.info("study %s: route %r matched while receiving (%s): forwarding "
                             "to %s as instances arrive", study_uid, r.name, why,
                             ", ".join(r.to))
        self._matched[study_uid] = (generation, matched)
        due: list[str] = []
        for r in self.routes:
            if r.name in matched:
                due += self.state.forward_now(
                    study_uid, generation, r.name, r.to,
                    f"route {r.name!r} (forward: immediate) sends the study to "
                    "{dest} as its instances arrive", route_priority(r))
        if due:
            self.notify(list(dict.fromkeys(due)))
