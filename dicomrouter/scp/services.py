"""The non-storage services of the listener, registered in one place for the main process and
every extra receiver process (a peer's association may land on any of them)."""

from __future__ import annotations

from typing import Any

from ..commitment import CommitmentSCP
from ..config import Config
from ..proxy import QueryRetrieveProxy
from ..spool import Spool
from ..state import State
from .mpps import MppsSCP
from .qr import QueryRetrieveSCP


def register(scp: Any, cfg: Config, state: State, spool: Spool,
             proxy: QueryRetrieveProxy | None = None) -> None:
    """Query/Retrieve (``query_retrieve``, with the Q/R proxy ``proxy`` when
    ``query_retrieve_proxy`` is set: one is made if not given) and Storage Commitment
    (``commitment_scp``) on the listener ``scp`` (FastStorageSCP or StorageSCP), through
    pynetdicom's service classes."""
    if cfg.query_retrieve:
        if proxy is None and cfg.query_retrieve_proxy:
            proxy = QueryRetrieveProxy(cfg, state, spool)
        for syntax, event, handler in QueryRetrieveSCP(cfg, state, spool, proxy).services():
            scp.add_service(syntax, event, handler)
    if cfg.mpps:  # Modality Performed Procedure Step (N-CREATE / N-SET)
        for syntax, event, handler in MppsSCP(cfg, state).services():
            scp.add_service(syntax, event, handler)
    if cfg.commitment_scp:
        for syntax, event, handler in CommitmentSCP(cfg, state).services():
            scp.add_service(syntax, event, handler, roles=True)
