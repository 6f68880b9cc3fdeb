"""The state's SQL, shared by the SQLite (embedded default) and PostgreSQL backends, one module
per role: receptions (``sql_receive``), completion and routing (``sql_studies``), delivery jobs
and the ledger (``sql_delivery``), sources, commitments and nodes (``sql_sources``), reporting
(``sql_reporting``), priorities and held jobs (``sql_hold``), HL7 messages and orders
(``sql_hl7``), prior prefetch (``sql_prefetch``), the Q/R proxy's cache (``sql_proxy``),
corrections (``sql_iocm``), destination groups (``sql_groups``), pseudonymization
mappings (``sql_pseudonyms``, first: its ``purge`` wraps the delivery one), on the hooks of
``sql_base``.
See ``sql_base`` for what a backend provides.
"""

from __future__ import annotations

from .sql_delivery import DeliverySQL
from .sql_groups import GroupsSQL
from .sql_hl7 import Hl7SQL
from .sql_hold import HoldSQL
from .sql_iocm import IocmSQL
from .sql_mpps import ProcedureStepsSQL
from .sql_prefetch import PrefetchSQL
from .sql_processing import ProcessingSQL
from .sql_proxy import ProxySQL
from .sql_pseudonyms import PseudonymsSQL
from .sql_receive import ReceivingSQL
from .sql_remote import RemoteAwaitsSQL
from .sql_reporting import ReportingSQL
from .sql_sources import PeersSQL
from .sql_studies import StudiesSQL


# purge is extended by RemoteAwaitsSQL, GroupsSQL and PseudonymsSQL (each deletes its own rows,
# then super()): they come before DeliverySQL, which does the purge itself
class SQLState(RemoteAwaitsSQL, GroupsSQL, PseudonymsSQL, PrefetchSQL, ReceivingSQL, StudiesSQL,
               DeliverySQL, HoldSQL, PeersSQL, ReportingSQL, Hl7SQL, ProxySQL,
               ProcedureStepsSQL, IocmSQL, ProcessingSQL):
    """Everything the router asks of its state, in portable SQL."""


__all__ = ["SQLState"]
