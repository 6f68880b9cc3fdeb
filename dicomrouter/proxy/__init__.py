"""The Q/R proxy (``query_retrieve_proxy``, issue 28): the PACS behind the router, asked for
what the spool cannot answer. ``pacs.py`` talks to it (a ``known_aes`` entry over DIMSE:
C-FIND and C-GET; a ``dicomweb`` source: QIDO-RS and WADO-RS) and brings instances into the
spool through the same ingest as a C-STORE, marked ``Proxied``; ``service.py`` merges C-FIND
answers, streams a retrieve on as instances arrive, fetches studies for WADO-RS, and keeps the
fetched studies as a cache for ``query_retrieve_proxy_cache``. Policy layer: used by ``scp/``
(Q/R) and the composition root; may import ``sources`` (the WADO-RS reader), the ways out,
the spool, the state and the leaves.
"""

from .pacs import Listed, PacsError
from .service import QueryRetrieveProxy, StillFetching

__all__ = ["Listed", "PacsError", "QueryRetrieveProxy", "StillFetching"]
