"""What a notification says: the event, its default payload (no PHI), the filter of a
notification, and the study's tags a template may ask for.

PHI: the default payload names the study by its Study Instance UID and carries AE titles,
route and destination names, counts, times and errors; never the patient's name, ID or birth
date, the accession number or the study's description. A template that wants those reads
``study.PatientID`` and the like: only then are they read from the state (``StudyTags``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from ..config.notifications import EVENTS

__all__ = ["EVENTS", "Event", "StudyTags", "default_payload", "wanted"]


@dataclasses.dataclass
class Event:
    """One event: its name, the study, when, and the facts of that kind of event
    (``destination``, ``destinations``, ``routes``, ``reason``, ``error``, counts...)."""

    name: str
    study_uid: str
    at: float = dataclasses.field(default_factory=time.time)
    facts: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def destinations(self) -> list[str]:
        """The destinations the event is about (one job's, or a routing's)."""
        one = self.facts.get("destination")
        return [one] if one else list(self.facts.get("destinations") or ())

    @property
    def routes(self) -> list[str]:
        return list(self.facts.get("routes") or ())


def iso(ts: float | None) -> str | None:
    """A Unix time as ISO 8601 in UTC (``2026-12-07T10:50:53.123Z``)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


def default_payload(event: Event, ae_title: str, node: str) -> dict[str, Any]:
    """The JSON body a notification without a template sends (and what a template sees as
    ``payload``): no PHI, see the module's docstring."""
    return {"event": event.name, "time": iso(event.at), "timestamp": round(event.at, 3),
            "router": {"ae_title": ae_title, "node": node},
            "study_instance_uid": event.study_uid, **event.facts}


def wanted(model: Any, event: Event) -> bool:
    """Whether the notification ``model`` subscribes to this event. With ``destinations`` (or
    ``routes``), only events that name one of them: a job's outcome for that destination, a
    routing that sends the study there (an event naming none, such as ``received``, is not
    sent)."""
    if event.name not in model.events:
        return False
    if model.destinations is not None and \
            not set(model.destinations).intersection(event.destinations):
        return False
    return model.routes is None or bool(set(model.routes).intersection(event.routes))


class StudyTags(Mapping[str, str]):
    """The study's indexed tags (PatientID, PatientName, PatientBirthDate, AccessionNumber,
    StudyDate, StudyDescription, ...), read from the state only when a template reads one."""

    def __init__(self, state: Any, study_uid: str) -> None:
        self._state = state
        self._study_uid = study_uid
        self._tags: dict[str, str] | None = None

    def _load(self) -> dict[str, str]:
        if self._tags is None:
            instances = self._state.instances(self._study_uid, present_only=False)
            self._tags = dict(instances[0].tags) if instances else {}
        return self._tags

    def __getitem__(self, key: str) -> str:
        return self._load()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())
