"""The state's role for reversible pseudonymization (issue 29, item 3; ``roles.State``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any


class Pseudonyms(ABC):
    """Reversible pseudonymization (issue 29, item 3): sealed mappings (pseudonym.py seals)."""

    @abstractmethod
    def pseudonym_save(self, route: str, study_uid: str, pseudo_study_tag: str, sealed: str,
                       uids: Mapping[str, str], key_check: str) -> None:
        """Keep one instance's part of the mapping (the first identity written stays)."""

    @abstractmethod
    def pseudonym_find(self, pseudo_study_tag: str) -> dict[str, Any] | None:
        """route, study_uid, sealed identity and uids (keyed hash of each new UID → sealed
        pair), or None."""

    @abstractmethod
    def pseudonym_key_checks(self) -> set[str]:
        """The fingerprints of the keys the mappings kept were sealed with."""

    @abstractmethod
    def pseudonym_purge(self, study_uid: str, why: str) -> int:
        """Forget the mappings of an original study."""

    @abstractmethod
    def pseudonym_studies_before(self, cutoff: float) -> list[str]:
        """Original studies with a mapping, delivered or purged by ``cutoff``."""
