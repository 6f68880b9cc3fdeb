"""Prior prefetch (issue 27, item 3): ``prefetch:`` rules fetch a patient's earlier studies
when a new study (or an HL7 order) arrives, and the priors are routed like any study (the
``Prefetch`` / ``PrefetchRule`` routing keys). ``worker.Prefetcher`` watches, queues (in the
state) and runs; ``priors.py`` chooses; ``dicom.py`` queries and retrieves. Policy: may import
the spool, the state, the ways out (``qrscu``), routing, sources (their names) and the leaves.
"""

from __future__ import annotations

from .worker import Prefetcher, PrefetchError

__all__ = ["PrefetchError", "Prefetcher"]
