"""The ``dicom`` source: C-FIND at STUDY level for the studies of the last ``lookback`` (or all),
then each study whose instance count there differs from what the router pulled is retrieved by
C-MOVE to the router's own AE title (it arrives through the listener like any push) or by C-GET
on the same association, once that count has been stable for ``source_stable_age``.

Only what the router lacks is retrieved: a study it holds nothing of by one STUDY-level
retrieve; otherwise the series it lacks whole at SERIES level and the missing instances of the
others at IMAGE level (a list of SOP Instance UIDs), found with SERIES- and IMAGE-level C-FINDs.
So instances stored at the PACS after a pull, and the rest of a retrieve cut short (a kill -9),
are fetched, and nothing the router holds is fetched again. A PACS that does not return
NumberOfStudyRelatedInstances has its studies counted by those same queries at every poll.

A PACS that caps its C-FIND answers (0xFE00, a warning or 0xA700 after N matches) does not
block the source: the answers received are kept and the query is narrowed (the date window
halved down to single days, then StudyTime down to single seconds, then ModalitiesInStudy)
until every part answers in full.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt

from ..config.peers import DicomSourceModel
from ..destinations.base import Context
from ..netutil import receive_c_store_into
from ..qrscu import Finder, FindTruncated, PeerError, Remote, RetrieveResult, get, move
from ..scp import ingest
from ..tlsctx import client_context
from .base import PullError, Source, describe_pull
from .registry import implements

log = logging.getLogger("dicomrouter.sources")

#: C-FINDs one poll may spend narrowing a capped query (a PACS answering every part capped)
MAX_QUERIES = 2000
#: SOP Instance UIDs per IMAGE-level retrieve
UIDS_PER_RETRIEVE = 200
#: the last resort of narrowing: one query per modality (PS3.3 C.7.3.1.1.1 defined terms
#: and the retired ones still seen)
MODALITIES = (
    "AR", "ASMT", "AU", "BDUS", "BI", "BMD", "CR", "CT", "CTPROTOCOL", "DG", "DOC", "DX", "ECG",
    "EPS", "ES", "FID", "GM", "HC", "HD", "IO", "IOL", "IVOCT", "IVUS", "KER", "KO", "LEN",
    "LS", "MG", "MR", "M3D", "NM", "OAM", "OCT", "OP", "OPM", "OPT", "OPTBSV", "OPTENF", "OPV",
    "OSS", "OT", "PLAN", "POS", "PR", "PT", "PX", "REG", "RESP", "RF", "RG", "RTDOSE",
    "RTIMAGE", "RTINTENT", "RTPLAN", "RTRAD", "RTRECORD", "RTSEGANN", "RTSTRUCT", "RWV", "SEG",
    "SM", "SMR", "SR", "SRF", "STAIN", "TEXTUREMAP", "TG", "US", "VA", "XA", "XC", "CD", "CF",
    "DD", "DF", "DM", "DS", "EC", "FA", "FS", "LP", "MA", "MS", "OPR", "ST", "VF",
)
_FLOOR = dt.date(1900, 1, 1)  # open date windows are split here (before: by modality)


def _date(d: dt.date) -> str:
    return d.strftime("%Y%m%d")


def _hms(s: int) -> str:
    return f"{s // 3600:02d}{s // 60 % 60:02d}{s % 60:02d}"


@dataclass(frozen=True)
class Window:
    """One part of the study query: a StudyDate range (``None``: open at that end; both open:
    no date key at all), within one day a StudyTime range in seconds, or one modality."""

    lo: dt.date | None
    hi: dt.date | None
    seconds: tuple[int, int] | None = None
    modality: str | None = None

    def apply(self, ds: Dataset) -> None:
        if self.lo is not None or self.hi is not None:
            lo = _date(self.lo) if self.lo else ""
            hi = _date(self.hi) if self.hi else ""
            ds.StudyDate = lo if lo == hi else f"{lo}-{hi}"
        if self.seconds is not None:
            ds.StudyTime = f"{_hms(self.seconds[0])}-{_hms(self.seconds[1])}"
        if self.modality is not None:
            ds.ModalitiesInStudy = self.modality

    def describe(self) -> str:
        parts = []
        if self.lo is not None or self.hi is not None:
            parts.append(f"StudyDate {_date(self.lo) if self.lo else ''}-"
                         f"{_date(self.hi) if self.hi else ''}")
        if self.seconds is not None:
            parts.append(f"StudyTime {_hms(self.seconds[0])}-{_hms(self.seconds[1])}")
        if self.modality is not None:
            parts.append(f"ModalitiesInStudy {self.modality}")
        return ", ".join(parts) or "every study"

    def split(self, today: dt.date) -> list[Window]:
        """Narrower queries that together match what this one matches (nothing left: it cannot
        be narrowed any more). Studies without StudyDate (or StudyTime) match no range: only
        the unnarrowed query finds them."""
        lo, hi = self.lo, self.hi
        if self.modality is not None:
            return []
        if self.seconds is not None or (lo is not None and lo == hi):
            a, b = self.seconds or (0, 86399)
            if b > a:
                mid = (a + b) // 2
                return [replace(self, seconds=(a, mid)), replace(self, seconds=(mid + 1, b))]
            return [replace(self, modality=m) for m in MODALITIES]
        day = dt.timedelta(days=1)
        if lo is None and hi is None:
            return [Window(None, today), Window(today + day, None)]
        if lo is None:
            assert hi is not None
            if hi < _FLOOR:
                return [replace(self, modality=m) for m in MODALITIES]
            return [Window(None, _FLOOR - day), Window(_FLOOR, hi)]
        if hi is None:  # up to today, then the future a year at a time
            end = today if lo <= today else lo + dt.timedelta(days=365)
            return [Window(lo, end), Window(end + day, None)]
        mid = lo + (hi - lo) // 2
        return [Window(lo, mid), Window(mid + day, hi)]


def _count(value: Any) -> int | None:
    """A count from an answer (IS): None when the PACS did not give one."""
    try:
        text = str(value if value is not None else "").strip()
        return int(text) if text else None
    except ValueError:
        return None


@implements(DicomSourceModel)
class DicomSource(Source):
    def __init__(self, cfg: DicomSourceModel, ctx: Context) -> None:
        super().__init__(cfg, ctx)
        o = self.cfg
        tls = client_context(o.tls) if o.tls else None
        self.remote = Remote(o.ae_title, o.host, o.port,
                             o.calling_ae_title or self.router.ae_title, o.timeout, tls)
        self.target = o.move_destination or self.router.ae_title
        self.model = o.query_model
        self._capped_logged = False
        if o.retrieve == "get":
            receive_c_store_into(self.spool.new_receive_file)  # C-GET stores stream to slots

    def describe(self) -> str:
        o = self.cfg
        how = f"C-MOVE to {self.target}" if o.retrieve == "move" else "C-GET"
        window = f"studies of the last {o.lookback / 86400:g} day(s)" if o.lookback \
            else "all studies"
        return (f"dicom {self.remote}: C-FIND {window}, retrieved by {how} once their count "
                f"is stable for {o.source_stable_age:g} s")

    # ---- finding the studies ------------------------------------------------------------------

    def _top(self) -> Window:
        lookback = self.cfg.lookback
        if not lookback:
            return Window(None, None)
        since = dt.datetime.now() - dt.timedelta(seconds=lookback)
        return Window(since.date(), None)

    def _query(self, window: Window) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = ""
        ds.PatientID = ""
        ds.StudyDate = ""
        ds.StudyTime = ""
        ds.NumberOfStudyRelatedInstances = ""
        window.apply(ds)
        return ds

    def _studies(self, finder: Finder) -> tuple[dict[str, Dataset], list[str]]:
        """Every study of the window (UID → its answer), and the parts of the query that could
        not be covered (a capped answer that cannot be narrowed further, a failed query)."""
        today = dt.date.today()
        todo = [self._top()]
        found: dict[str, Dataset] = {}
        uncovered: list[str] = []
        while todo:
            window = todo.pop(0)
            if finder.queries >= MAX_QUERIES:
                uncovered += [f"{w.describe()}: not asked (over {MAX_QUERIES} C-FINDs this "
                              "poll)" for w in [window, *todo]]
                break
            try:
                answers = finder.find(self._query(window))
            except FindTruncated as exc:
                answers = exc.answers
                parts = window.split(today)
                if not self._capped_logged:
                    log.info("source %s: the PACS capped the C-FIND answers (%s); narrowing "
                             "the query", self.name, exc)
                    self._capped_logged = True
                if parts:
                    todo += parts
                else:
                    uncovered.append(f"{window.describe()}: still capped at {len(answers)} "
                                     "answer(s)")
            except PeerError as exc:
                if not found and not todo:
                    raise PullError(f"C-FIND: {exc}") from None
                uncovered.append(f"{window.describe()}: {exc}")
                answers = []
            for a in answers:
                uid = str(a.get("StudyInstanceUID", "") or "")
                if uid:
                    found.setdefault(uid, a)
        return found, uncovered

    # ---- one poll -----------------------------------------------------------------------------

    def poll(self) -> int:
        now = time.time()
        pulled = 0
        errors: list[str] = []
        with Finder(self.remote, self.model) as finder:
            try:
                found, uncovered = self._studies(finder)
            except PeerError as exc:
                raise PullError(f"C-FIND: {exc}") from None
            rows = self.state.source_studies(self.name, list(found))
            due: list[tuple[str, int, Dataset, dict[str, set[str]] | None]] = []
            for uid, answer in found.items():
                count = _count(answer.get("NumberOfStudyRelatedInstances"))
                listing = None
                if count is None:  # the PACS does not count: list the study's instances
                    try:
                        listing = self._listing(finder, uid, answer)
                    except PeerError as exc:
                        errors.append(f"study {uid}: listing its instances: {exc}")
                        continue
                    count = sum(len(s) for s in listing.values())
                if self.due(rows.get(uid), uid, count, now):
                    due.append((uid, count, answer, listing))
            self.stability.keep_only(found)
            finder.close()
            for uid, count, answer, listing in due:
                if self.stopping.is_set():
                    break
                try:
                    if self._pull(finder, uid, count, answer, listing):
                        pulled += 1
                except _Incomplete as exc:
                    errors.append(f"study {uid}: {exc}")
                except PeerError as exc:
                    raise PullError(f"retrieving study {uid}: {exc}") from None
        self.wake_at = self.stability.next_ready()
        if uncovered:
            errors.append(f"the PACS caps its C-FIND answers and {len(uncovered)} part(s) of "
                          f"the query could not be covered (studies there may be missed), "
                          f"first: {uncovered[0]}")
        if len(errors) > 1:
            raise PullError(f"{len(errors)} problems (tried again next poll), the first: "
                            f"{errors[0]}")
        if errors:
            raise PullError(f"{errors[0]} (tried again next poll)")
        return pulled

    # ---- what the router lacks ----------------------------------------------------------------

    def _ident(self, level: str, answer: Dataset, study: str, series: str | None = None,
               sops: list[str] | None = None) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = level
        if self.model == "patient":  # patient root: the unique keys of every level above
            ds.PatientID = str(answer.get("PatientID", "") or "")
        ds.StudyInstanceUID = study
        if series is not None:
            ds.SeriesInstanceUID = series
        if sops is not None:
            ds.SOPInstanceUID = sops if len(sops) > 1 else sops[0]
        return ds

    def _series(self, finder: Finder, study: str, answer: Dataset) -> dict[str, int | None]:
        """Series Instance UID → its count at the PACS (None: not given)."""
        q = self._ident("SERIES", answer, study)
        q.SeriesInstanceUID = ""
        q.NumberOfSeriesRelatedInstances = ""
        return {str(a.SeriesInstanceUID): _count(a.get("NumberOfSeriesRelatedInstances"))
                for a in finder.find(q) if str(a.get("SeriesInstanceUID", "") or "")}

    def _images(self, finder: Finder, study: str, series: str, answer: Dataset) -> set[str]:
        q = self._ident("IMAGE", answer, study, series)
        q.SOPInstanceUID = ""
        return {str(a.SOPInstanceUID) for a in finder.find(q)
                if str(a.get("SOPInstanceUID", "") or "")}

    def _listing(self, finder: Finder, study: str, answer: Dataset) -> dict[str, set[str]]:
        """Every instance of the study at the PACS, by series (a capped answer: PeerError)."""
        return {s: self._images(finder, study, s, answer)
                for s in self._series(finder, study, answer)}

    def _plan(self, finder: Finder, study: str, answer: Dataset, held: dict[str, str],
              listing: dict[str, set[str]] | None) -> tuple[list[Dataset], int]:
        """The retrieves that bring what the router lacks of the study: whole series it holds
        nothing of, the missing instances of the others; and how many instances that is (a
        series retrieved whole counts as its count there)."""
        by_series: dict[str, set[str]] = {}
        for sop, series in held.items():
            by_series.setdefault(series, set()).add(sop)
        if listing is not None:
            counts: dict[str, int | None] = {s: len(v) for s, v in listing.items()}
        else:
            try:
                counts = self._series(finder, study, answer)
            except FindTruncated as exc:
                log.warning("source %s: study %s: the PACS capped its series (%s); the whole "
                            "study is retrieved", self.name, study, exc)
                return [self._ident("STUDY", answer, study)], -1  # counted by the caller
        plan: list[Dataset] = []
        missing = 0
        for series, n in counts.items():
            have = by_series.get(series, set())
            if not have:
                plan.append(self._ident("SERIES", answer, study, series))
                missing += n if n is not None else 0
                continue
            if n is not None and len(have) >= n and listing is None:
                continue
            try:
                sops = listing[series] if listing is not None else \
                    self._images(finder, study, series, answer)
            except FindTruncated as exc:
                log.warning("source %s: study %s: the PACS capped the instances of series %s "
                            "(%s); the whole series is retrieved", self.name, study, series,
                            exc)
                plan.append(self._ident("SERIES", answer, study, series))
                missing += max(0, (n or 0) - len(have))
                continue
            lacking = sorted(sops - set(held))
            missing += len(lacking)
            for i in range(0, len(lacking), UIDS_PER_RETRIEVE):
                plan.append(self._ident("IMAGE", answer, study, series,
                                        lacking[i:i + UIDS_PER_RETRIEVE]))
        return plan, missing

    def _pull(self, finder: Finder, study: str, count: int, answer: Dataset,
              listing: dict[str, set[str]] | None) -> bool:
        """Retrieve what the router lacks of the study; True if anything came."""
        held = self.state.source_held(study)
        if held:
            plan, missing = self._plan(finder, study, answer, held, listing)
            finder.close()  # the PACS's association is not held through the retrieves
            if missing < 0:
                missing = max(0, count - len(held))
        else:
            plan, missing = [self._ident("STUDY", answer, study)], count
        with self.pulling(study, study) as pull:
            results: list[RetrieveResult] = []
            for ident in plan:
                if self.stopping.is_set():
                    raise PullError("stopping")
                results.append(self._retrieve(ident))
            done = sum(r.completed + r.warning for r in results)
            if plan and self.cfg.retrieve == "move":
                self._await_placement(study, min(count, len(held) + done))
            bad = [r for r in results if not r.ok]
            if not bad:
                pull.source_instances = count
        sub = sum(r.completed + r.warning + r.failed for r in results)
        if plan:
            log.info("source %s: study %s pulled (%s; %d retrieve(s), %d sub-operation(s))",
                     self.name, study, describe_pull(pull, missing, count), len(plan), sub)
        else:
            log.info("source %s: study %s: nothing missing (%d instance(s) there)", self.name,
                     study, count)
        if bad:
            raise _Incomplete(f"{len(bad)} of {len(plan)} retrieve(s) failed, first: "
                              f"{bad[0].describe()}")
        return pull.brought > 0

    def _await_placement(self, study: str, target: int) -> None:
        """C-MOVE sub-operations are answered before the router records them: wait (a little)
        until they are, so the pull counts them."""
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and not self.stopping.is_set():
            if len(self.state.source_held(study)) >= target:
                return
            time.sleep(0.05)

    def _retrieve(self, ident: Dataset) -> RetrieveResult:
        if self.cfg.retrieve == "move":
            return move(self.remote, ident, self.target, self.model)
        return get(self.remote, ident, self._on_store, model=self.model,
                   called=self.router.ae_title)

    def _on_store(self, event: evt.Event) -> Any:
        """A C-STORE sub-operation of our C-GET: the same ingest as a push."""
        return ingest.store_retrieved(self.spool, event, self.remote.ae_title,
                                      self.router.ae_title)


class _Incomplete(Exception):
    """Some retrieves of a study failed: the study is pulled again at the next poll."""
