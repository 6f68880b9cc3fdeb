"""Completion: when a received study is complete, and turning it into delivery jobs.

Owns the study tracker (stable ages, per-route stable ages, ``expect:``, ``count_query``,
``level: series``, ``force_complete_after``, delivery windows of routes, the sweep) and what
happens once a study is delivered (settling it, deleting its spool files, retention, quota and
spool housekeeping). It decides with ``routing`` and records in ``state``; it reads instances
through the ``spool``; it wakes delivery through a callback and never imports it, nor the
faces (``web``, ``cli``) or the composition root (``app``).
"""

from .housekeeping import Housekeeping
from .tracker import StudyTracker

__all__ = ["Housekeeping", "StudyTracker"]
