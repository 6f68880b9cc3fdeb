"""WADO-RS of a study the spool does not hold asks the Q/R proxy (issue 28, item 3) when the
router has one: ``router_view.proxy_fetcher.fetch(study, series_uid=..., timeout=...)``, then
answers from the spool. The real fetcher is another piece; here a fake one that records the
instance in a real SQLite state the way a fetch would, and says whether it did."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi import HTTPException

from dicomrouter.state.sqlite import SQLiteState
from dicomrouter.web import wado

STUDY, SERIES, SOP = "1.2.3.1", "1.2.3.1.1", "1.2.3.1.1.1"


class FakeFetcher:
    def __init__(self, state: SQLiteState, finds: bool) -> None:
        self.state, self.finds = state, finds
        self.calls: list[tuple[str, Any, Any]] = []

    def fetch(self, study_uid: str, series_uid: str | None = None,
              timeout: float | None = None) -> bool:
        self.calls.append((study_uid, series_uid, timeout))
        if self.finds:
            self.state.record_instance(
                {"StudyInstanceUID": study_uid, "SeriesInstanceUID": SERIES,
                 "SOPInstanceUID": SOP, "SOPClassUID": "1.2.840.10008.5.1.4.1.1.7",
                 "PatientID": "P"}, "1.2.840.10008.1.2.1", f"data/{study_uid}/{SOP}.dcm", 10,
                "PACS", "DICOMROUTER")
        return self.finds


def view(tmp_path: Path, fetcher: FakeFetcher | None) -> Any:
    state = fetcher.state if fetcher else SQLiteState(tmp_path / "state.db")
    return SimpleNamespace(cfg=SimpleNamespace(wado_proxy_timeout=12.5), state=state,
                           proxy_fetcher=fetcher)


def test_a_missing_study_is_fetched_through_the_proxy(tmp_path: Path) -> None:
    fetcher = FakeFetcher(SQLiteState(tmp_path / "state.db"), finds=True)
    found = wado.select(view(tmp_path, fetcher), STUDY)
    assert [i.sop_uid for i in found] == [SOP]
    assert fetcher.calls == [(STUDY, None, 12.5)]
    # now in the spool: the proxy is not asked again
    assert [i.sop_uid for i in wado.select(view(tmp_path, fetcher), STUDY, SERIES, SOP)] == \
        [SOP]
    assert len(fetcher.calls) == 1


def test_the_series_is_passed_and_a_failed_fetch_is_404(tmp_path: Path) -> None:
    fetcher = FakeFetcher(SQLiteState(tmp_path / "state.db"), finds=False)
    with pytest.raises(HTTPException) as err:
        wado.select(view(tmp_path, fetcher), STUDY, SERIES)
    assert err.value.status_code == 404
    assert fetcher.calls == [(STUDY, SERIES, 12.5)]


def test_without_a_proxy_a_missing_study_is_404(tmp_path: Path) -> None:
    with pytest.raises(HTTPException) as err:
        wado.select(view(tmp_path, None), STUDY)
    assert err.value.status_code == 404
    with pytest.raises(HTTPException) as err:
        wado.select(view(tmp_path, None), "1.2.x")
    assert err.value.status_code == 400
