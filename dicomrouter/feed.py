"""The instances of one ``forward: immediate`` delivery run, shared by its sessions.

A run of a study that is still receiving starts with what the ledger shows undelivered and
keeps its associations open for what arrives next: each session takes instances one at a time
from this feed, so every instance goes over exactly one of them. When the queue is empty the
feed looks in the state for new arrivals (at most every ``REFRESH`` seconds, whoever asks) and
ends once nothing arrived for ``keep_open`` seconds, the study stopped receiving, another job of
the destination is due (its worker must not be held up), or the workers stop. Only instances of
the (SOP class, syntax) pairs negotiated at the start are taken; others wait for the job's next
run, which the tracker has already queued.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence

from .state import Instance, State
from .values import PROXIED_TAG

REFRESH = 0.05  # seconds between two looks for new arrivals


class ForwardFeed:
    def __init__(self, state: State, study_uid: str, destination: str,
                 todo: Sequence[Instance], keep_open: float, stop: threading.Event,
                 wait: Callable[[float], None]) -> None:
        self.state = state
        self.study_uid = study_uid
        self.destination = destination
        self.keep_open = keep_open
        self.stop = stop
        self.wait = wait  # sleeps until woken (an arrival) or the timeout
        self.pairs = {(i.sop_class, i.transfer_syntax) for i in todo}
        self._queue: deque[Instance] = deque(todo)
        self._taken = {i.sop_uid for i in todo}
        self._lock = threading.Lock()
        self._deadline = time.monotonic() + keep_open
        self._looked = 0.0
        self._over = False

    def instances(self, before_wait: Callable[[], None]) -> Iterator[Instance]:
        """This session's share, until the feed is over; ``before_wait`` runs before the
        session waits for arrivals (it records the last delivery in the ledger)."""
        while True:
            inst = self._take()
            if inst is not None:
                yield inst
                continue
            if self._over:
                return
            before_wait()
            self.wait(min(0.2, max(0.0, self._deadline - time.monotonic())))

    def _take(self) -> Instance | None:
        with self._lock:
            if self._queue:
                return self._queue.popleft()
            if self._over:
                return None
            if self.stop.is_set() or time.monotonic() >= self._deadline:
                self._over = True
                return None
            if time.monotonic() - self._looked < REFRESH:
                return None
            self._looked = time.monotonic()
            # not what the Q/R proxy fetches meanwhile: that is a cache fill, which only a
            # route naming Proxied sends, once it is routed (delivery._without_cached)
            new = [i for i in self.state.undelivered(self.study_uid, self.destination)
                   if i.sop_uid not in self._taken and not i.tags.get(PROXIED_TAG) and
                   (i.sop_class, i.transfer_syntax) in self.pairs]
            if new:
                self._taken.update(i.sop_uid for i in new)
                self._queue.extend(new)
                self._deadline = time.monotonic() + self.keep_open
                return self._queue.popleft()
            study = self.state.study(self.study_uid)
            due = self.state.next_due(self.destination)
            if study is None or study.state != "receiving" or (
                    due is not None and due <= time.time()):
                self._over = True
            return None
