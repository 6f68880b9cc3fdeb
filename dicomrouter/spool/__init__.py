"""The spool: received files, the source of truth, behind one interface (``Spool``): ``accept``
(durable before the answer), ``place``, ``open`` (a reader hiding the receive marker),
``delete``; ``describe``, ``health`` and ``housekeeping`` for the router. Keys are
spool-relative (object keys in cluster mode): no other module opens spool files by path.
``local.py`` is a spool on this machine's disk (receive slots in ``slots.py``, the receive
log in ``recvlog.py`` and ``logged.py``, what a reception is written into in ``receive.py``);
``cluster.py`` puts a node's local spool in front of a shared S3 store. May import the state,
config and the leaves; never a destination, the policy or the faces.
"""

from __future__ import annotations

from typing import Any

from ..state import State
from .cluster import ClusterSpool, SharedStore, SharedStoreUnavailable
from .local import Spool, SpoolReader
from .receive import Accepted, DatasetMismatch, Expected, LogReceiveFile, ReceiveFile, SpoolFull


def spool_for(cfg: Any, state: State, receiver_process: bool = False) -> Spool:
    """The spool a configuration names: local, or local in front of the shared store."""
    kwargs: dict[str, Any] = {"max_depth": cfg.limits.max_sequence_depth,
                              "min_free": cfg.limits.min_free_disk}
    if cfg.shared_spool:
        return ClusterSpool(cfg.spool, state, SharedStore(cfg.shared_spool), cfg.ack_after,
                            cfg.node_id, max_bytes=cfg.max_spool_size, **kwargs)
    return Spool(cfg.spool, state, cfg.max_spool_size, shared=receiver_process,
                 receive_log=cfg.receive_log, log_size=cfg.receive_log_size,
                 log_max_record=cfg.receive_log_max_record, log_wait=cfg.receive_log_wait,
                 **kwargs)


__all__ = ["Accepted", "ClusterSpool", "DatasetMismatch", "Expected", "LogReceiveFile",
           "ReceiveFile", "SharedStore", "SharedStoreUnavailable", "Spool", "SpoolFull",
           "SpoolReader", "spool_for"]
