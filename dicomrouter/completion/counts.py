"""``count_query``: asking a sender how many instances a study it sends has (one C-FIND), so the
study completes as soon as they are all in rather than after the stable age."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pydicom.dataset import Dataset

from ..config import Config
from ..qrscu import PeerError, Remote, find
from ..state import State

log = logging.getLogger("dicomrouter")

PER_TICK = 4  # studies asked about per tick: a slow sender does not hold up the tracker
QUERY_TIMEOUT = 10.0


def ask_counts(cfg: Config, state: State, counted: Sequence[str]) -> None:
    """Ask the senders in ``counted`` (AE titles with ``count_query``) about their new studies.
    A sender that cannot say leaves the stable age alone in charge."""
    for study_uid, calling in state.to_count(list(counted))[:PER_TICK]:
        known = cfg.known_aes[calling]
        remote = Remote(calling, known.host, known.port, known.calling_ae or cfg.ae_title,
                        QUERY_TIMEOUT)
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = study_uid
        q.NumberOfStudyRelatedInstances = ""
        try:
            answers = find(remote, q)
            count = int(answers[0].get("NumberOfStudyRelatedInstances") or 0) if answers else 0
        except (PeerError, ValueError, TypeError) as exc:
            state.set_expected(study_uid, 0, f"{calling} could not say how many instances the "
                               f"study has ({exc}); the stable age decides")
            continue
        if count > 0:
            state.set_expected(study_uid, count, f"{calling} announced {count} instance(s) "
                               "(C-FIND)")
            log.info("study %s: %s announced %d instance(s)", study_uid, calling, count)
        else:
            state.set_expected(study_uid, 0, f"{calling} did not announce an instance count; "
                               "the stable age decides")
