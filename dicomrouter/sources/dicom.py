"""The ``dicom`` source: C-FIND at STUDY level for the studies of the last ``lookback`` (or all),
then each study not pulled before is retrieved by C-MOVE to the router's own AE title (it
arrives through the listener like any push) or by C-GET on the same association.

What was pulled is remembered per Study Instance UID in the state database: a study is pulled
once, across restarts; one whose retrieve failed is tried again at the next poll.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt

from ..dimse import error_comment
from ..netutil import receive_c_store_into
from ..qrscu import PeerError, Remote, RetrieveResult, find, get, move
from ..scp import ingest
from ..spool import ReceiveFile
from ..tlsctx import client_context
from .base import PullError, Source

log = logging.getLogger("dicomrouter.sources")


class DicomSource(Source):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        o = self.cfg.options
        tls = client_context(o["tls"]) if o.get("tls") else None
        self.remote = Remote(o["ae_title"], o["host"], o["port"],
                             o["calling_ae_title"] or self.router.ae_title, o["timeout"], tls)
        self.target = o["move_destination"] or self.router.ae_title
        if o["retrieve"] == "get":
            receive_c_store_into(self.spool.new_receive_file)  # C-GET stores stream to slots

    def describe(self) -> str:
        o = self.cfg.options
        how = f"C-MOVE to {self.target}" if o["retrieve"] == "move" else "C-GET"
        window = f"studies of the last {o['lookback'] / 86400:g} day(s)" if o["lookback"] \
            else "all studies"
        return f"dicom {self.remote}: C-FIND {window}, retrieved by {how}"

    def _query(self) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = ""
        ds.PatientID = ""
        ds.StudyDate = ""
        ds.StudyTime = ""
        ds.NumberOfStudyRelatedInstances = ""
        lookback = self.cfg.options["lookback"]
        if lookback:
            since = dt.datetime.now() - dt.timedelta(seconds=lookback)
            ds.StudyDate = since.strftime("%Y%m%d") + "-"
        return ds

    def poll(self) -> int:
        try:
            answers = find(self.remote, self._query(), self.cfg.options["query_model"])
        except PeerError as exc:
            raise PullError(f"C-FIND: {exc}") from None
        uids = list(dict.fromkeys(str(a.get("StudyInstanceUID", "")) for a in answers))
        new = [u for u in uids if u and not self.state.source_seen(self.name, u)]
        pulled = 0
        errors: list[str] = []
        for uid in new:
            if self.stopping.is_set():
                break
            try:
                result = self._retrieve(uid)
            except PeerError as exc:
                raise PullError(f"retrieving study {uid}: {exc}") from None
            if not result.ok:
                errors.append(f"study {uid}: {result.describe()}")
                continue
            self.state.source_pulled(self.name, uid, uid, result.completed + result.warning,
                                     False)
            log.info("source %s: study %s pulled (%s)", self.name, uid, result.describe())
            pulled += 1
        if errors:
            raise PullError(f"{len(errors)} of {len(new)} new study(ies) not retrieved (tried "
                            f"again next poll); first: {errors[0]}")
        return pulled

    def _identifier(self, uid: str) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = uid
        return ds

    def _retrieve(self, uid: str) -> RetrieveResult:
        model = self.cfg.options["query_model"]
        if self.cfg.options["retrieve"] == "move":
            return move(self.remote, self._identifier(uid), self.target, model)
        return get(self.remote, self._identifier(uid), self._on_store, model=model)

    def _on_store(self, event: evt.Event) -> Any:
        """A C-STORE sub-operation of our C-GET: the same ingest as a push."""
        req = event.request
        rx = getattr(req, "_dataset_file", None)
        if not isinstance(rx, ReceiveFile):
            return 0xC000
        status, comment, accepted = ingest.accept(
            self.spool, rx, self.remote.ae_title, self.router.ae_title,
            (str(req.AffectedSOPClassUID), str(req.AffectedSOPInstanceUID)))
        if accepted is None:
            ds = Dataset()
            ds.Status = status
            ds.ErrorComment = error_comment(comment)
            return ds
        self.spool.place(accepted)
        return 0x0000
