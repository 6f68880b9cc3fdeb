"""The state's role for remote processing steps (issue 29, item 1; ``roles.State``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

from .base import Study


class RemoteAwaits(ABC):
    """A remote step sent a study to an AI node and waits for its results: one row per
    (origin study, route, step), kept across restarts so a retry does not send again."""

    @abstractmethod
    def route_results(self, study_uid: str, seen: Study,
                      series_by_dest: Mapping[str, Sequence[str]], why: str) -> bool:
        """Mark the study routed, each destination a job for the result series only (False:
        an instance arrived since ``seen``)."""

    @abstractmethod
    def remote_await(self, origin_uid: str, route: str, step: str) -> dict[str, Any] | None:
        """The await of one step (state sending | waiting | expired | done, sent_study, sent_series,
        sent_sops, destination, match, results_from, sent_at, deadline, results), or None."""

    @abstractmethod
    def remote_await_open(self, origin_uid: str, route: str, step: str,
                          facts: Mapping[str, Any]) -> None:
        """Start (or start again) a step's await in state ``sending``, no results yet."""

    @abstractmethod
    def remote_await_sent(self, origin_uid: str, route: str, step: str, sent_at: float,
                          deadline: float, why: str) -> None:
        """The study is at the AI node: results are awaited until ``deadline``."""

    @abstractmethod
    def remote_await_expire(self, origin_uid: str, route: str, step: str, why: str) -> None:
        """No result by the deadline: the next attempt sends again (late results still count)."""

    @abstractmethod
    def remote_awaits_open(self, now: float | None = None) -> list[dict[str, Any]]:
        """Every await that results may still arrive for: sending (a node may answer before
        the send is recorded), waiting, expired, and done until its deadline (results sent
        in several associations); unfinished ones first."""

    @abstractmethod
    def remote_claim(self, await_row: Mapping[str, Any], study_uid: str, seen: Study,
                     sop_uids: Sequence[str], tags: Mapping[str, str], why: str,
                     mark_routed: bool = True) -> bool:
        """Take these instances of ``study_uid`` (its generation ``seen``) as the await's
        results, in one transaction: their index tags get ``tags``, the await lists them,
        and (``mark_routed``) the study is marked routed without a job. False when an
        instance arrived since ``seen`` (it completes later)."""

    @abstractmethod
    def remote_await_done(self, origin_uid: str, route: str) -> None:
        """The route's chain finished: its awaits turn ``done`` (results that still come
        before their deadline are late results); done awaits past their deadline are
        deleted (any study's), and a study's purge deletes its own."""
