"""The state database in SQLite (WAL): studies, instances, delivery jobs, the ledger, study history.

Every write is one short transaction under one lock. ``synchronous=NORMAL`` (in WAL mode): a
committed transaction survives any crash of the process, and a power cut can lose only the last
transactions. That is safe because the spool files, fsync'd before an instance is acknowledged,
are the source of truth: at start-up ``Spool.adopt_orphans`` records every spool file that has no
row (see docs/architecture.md). A lost ledger update means at most a re-send. Readers in other
processes (``dicomrouter status``) see a consistent snapshot thanks to WAL.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..query import fold
from .base import StateUnavailable
from .locks import StudyLock
from .qr import generated_columns
from .sql import SQLState
from .sql_groups import GROUP_TABLES
from .sql_iocm import IOCM_INDEX, IOCM_INSTANCE_COLUMNS, IOCM_LEDGER_COLUMNS
from .sql_mpps import SQLITE_SCHEMA as MPPS_SCHEMA
from .sql_prefetch import PREFETCH_TABLES
from .sql_proxy import PROXY_CACHE
from .sql_pseudonyms import PSEUDONYM_TABLES
from .sql_remote import REMOTE_TABLES
from .sql_sources import SOURCE_DELTAS

SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid      TEXT PRIMARY KEY,
    patient_id     TEXT, patient_name TEXT, study_date TEXT, accession TEXT, description TEXT,
    calling_ae     TEXT, called_ae TEXT,
    state          TEXT NOT NULL,  -- receiving|routed|delivered|unrouted|failed|held|moved|purged
    generation     INTEGER NOT NULL DEFAULT 1,
    first_received REAL, last_received REAL, completed_at REAL, delivered_at REAL,
    in_spool       INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS studies_state ON studies(state, last_received);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid     TEXT PRIMARY KEY,
    study_uid   TEXT NOT NULL,
    series_uid  TEXT, sop_class TEXT, transfer_syntax TEXT,
    path        TEXT, size INTEGER NOT NULL DEFAULT 0,  -- spool-relative: data/<study>/<sop>.dcm
    received_at REAL, generation INTEGER NOT NULL DEFAULT 1,
    calling_ae  TEXT, called_ae TEXT,
    tags        TEXT,                        -- JSON of dicomfile.INDEX_KEYWORDS
    present     INTEGER NOT NULL DEFAULT 1   -- 0 once the spool file was deleted
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid);
CREATE TABLE IF NOT EXISTS jobs (
    id           INTEGER PRIMARY KEY,
    study_uid    TEXT NOT NULL,
    destination  TEXT NOT NULL,
    state        TEXT NOT NULL,              -- pending | running | delivered | failed | dead
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    last_error   TEXT,
    generation   INTEGER NOT NULL DEFAULT 1,
    requeue      INTEGER NOT NULL DEFAULT 0, -- new instances arrived while it was running
    routes       TEXT,                       -- JSON list of the routes that matched
    created      REAL, updated REAL,
    UNIQUE (study_uid, destination)
);
CREATE INDEX IF NOT EXISTS jobs_claim ON jobs(destination, state, next_attempt, created);
CREATE TABLE IF NOT EXISTS ledger (
    sop_uid      TEXT NOT NULL,
    destination  TEXT NOT NULL,
    study_uid    TEXT NOT NULL,
    sends        INTEGER NOT NULL DEFAULT 0, -- times put on the wire (re-sends show here)
    delivered_at REAL,
    PRIMARY KEY (sop_uid, destination)
);
CREATE INDEX IF NOT EXISTS ledger_study ON ledger(study_uid, destination);
CREATE TABLE IF NOT EXISTS events (
    id        INTEGER PRIMARY KEY,
    study_uid TEXT NOT NULL,
    ts        REAL NOT NULL,
    event     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_study ON events(study_uid, id);
CREATE TABLE IF NOT EXISTS sources (
    name            TEXT PRIMARY KEY,
    cursor          TEXT,                  -- where the next poll starts (Orthanc: change index)
    last_poll       REAL, last_success REAL, last_error TEXT,
    studies_pulled  INTEGER NOT NULL DEFAULT 0,
    instances_pulled INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS series_routed (  -- series routed on their own (level: series)
    study_uid TEXT NOT NULL, series_uid TEXT NOT NULL, route TEXT NOT NULL,
    generation INTEGER NOT NULL,
    PRIMARY KEY (study_uid, series_uid, route, generation)
);
CREATE TABLE IF NOT EXISTS commitments (     -- storage commitment transactions we asked for
    transaction_uid TEXT PRIMARY KEY,
    peer        TEXT,
    requested   REAL,
    reported    REAL,                      -- when the N-EVENT-REPORT came (NULL: not yet)
    committed   TEXT,                      -- JSON list of SOP Instance UIDs
    failed      TEXT                       -- JSON object: SOP Instance UID → Failure Reason
);
CREATE TABLE IF NOT EXISTS nodes (          -- the routers on this state (one, embedded)
    node_id   TEXT PRIMARY KEY,
    started   REAL, heartbeat REAL,
    info      TEXT                         -- JSON: host, pid, version, listeners
);
CREATE TABLE IF NOT EXISTS moves (          -- SOP Instance UIDs received under another study
    id           INTEGER PRIMARY KEY,
    sop_uid      TEXT NOT NULL,
    from_study   TEXT NOT NULL, to_study TEXT NOT NULL,
    moved_at     REAL NOT NULL,
    from_patient TEXT, to_patient TEXT,
    delivered_to TEXT                       -- JSON list: destinations that had it before
);
CREATE INDEX IF NOT EXISTS moves_from ON moves(from_study);
CREATE INDEX IF NOT EXISTS moves_to ON moves(to_study);
CREATE TABLE IF NOT EXISTS source_studies (  -- what each source already pulled
    source      TEXT NOT NULL,
    study_key   TEXT NOT NULL,             -- the source's id of the study (UID, Orthanc id)
    study_uid   TEXT,
    pulled_at   REAL,
    delete_after INTEGER NOT NULL DEFAULT 0, -- move semantics: delete there once delivered
    deleted_at  REAL,
    PRIMARY KEY (source, study_key)
);
"""


@contextmanager
def unavailable_on_error(path: Path) -> Iterator[None]:
    """SQLite's errors for a locked, full, unreadable or broken database raised as the one
    backend-neutral ``StateUnavailable`` (PostgreSQL's backend does the same); errors that are
    bugs (integrity, programming) go through unchanged."""
    try:
        yield
    except (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError):
        raise
    except sqlite3.Error as exc:
        raise StateUnavailable(f"SQLite state {path}: {type(exc).__name__}: {exc}") from exc


def qr_columns(db: sqlite3.Connection) -> None:
    """Add the generated query columns and their indexes (in the caller's transaction)."""
    have = {r[1] for r in db.execute("PRAGMA table_xinfo(instances)")}
    generated, indexed = generated_columns()
    for kw in generated:
        if f"kw_{kw}" not in have:
            db.execute(f"ALTER TABLE instances ADD COLUMN kw_{kw} TEXT GENERATED ALWAYS AS"
                       f" (json_extract(tags, '$.{kw}')) VIRTUAL")
    for kw in indexed:
        db.execute(f"CREATE INDEX IF NOT EXISTS instances_{kw} ON instances(kw_{kw})")


def _fold(value: object) -> object:
    return fold(value) if isinstance(value, str) else value


def register_functions(db: sqlite3.Connection) -> None:
    """The SQL functions the Q/R SELECTs call, on one SQLite connection."""
    db.create_function("dicom_fold", 1, _fold, deterministic=True)



def _add_columns(db: sqlite3.Connection, table: str, *columns: str) -> None:
    """``ALTER TABLE ... ADD COLUMN`` for each ``"name TYPE ..."`` the table lacks (a spool
    from before versions were counted may have some already)."""
    have = {r[1] for r in db.execute(f"PRAGMA table_xinfo({table})")}
    for column in columns:
        if column.split()[0] not in have:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")


def _relative_keys(db: sqlite3.Connection) -> int:
    """Spools written before keys were spool-relative stored absolute paths: make them keys
    (the spool's layout makes every key ``data/<study>/<sop>.dcm``), so a spool moved to
    another folder is the same spool."""
    return int(db.execute("UPDATE instances SET path='data/'||study_uid||'/'||sop_uid||'.dcm'"
                          " WHERE path LIKE '/%'").rowcount)


def _source_deltas(db: sqlite3.Connection) -> None:
    if "source_instances" not in {r[1] for r in db.execute("PRAGMA table_info(source_studies)")}:
        for statement in SOURCE_DELTAS:
            db.execute(statement)


HL7_TABLES = """
CREATE TABLE IF NOT EXISTS hl7_messages (   -- HL7 v2 messages accepted (stored before the ACK)
    id INTEGER PRIMARY KEY, received_at REAL NOT NULL, control_id TEXT, message_type TEXT,
    sending_application TEXT, sending_facility TEXT, peer TEXT, raw TEXT NOT NULL,
    handled_at REAL, outcome TEXT              -- NULL: to handle (again, after a restart)
);
CREATE INDEX IF NOT EXISTS hl7_messages_unhandled ON hl7_messages(handled_at, id);
CREATE TABLE IF NOT EXISTS hl7_orders (     -- the latest order by accession, ADT by patient
    kind TEXT NOT NULL, okey TEXT NOT NULL,    -- accession | patient, its value
    message_id INTEGER, updated REAL, fields TEXT,  -- JSON of the order dict
    PRIMARY KEY (kind, okey)
);
CREATE TABLE IF NOT EXISTS hl7_merges (     -- ADT^A40: old PatientID → new
    old_patient_id TEXT PRIMARY KEY, new_patient_id TEXT NOT NULL, message_id INTEGER,
    merged_at REAL
);
"""


STUDY_TOTALS_TRIGGERS = """
CREATE TRIGGER IF NOT EXISTS instances_totals_insert AFTER INSERT ON instances BEGIN
    UPDATE studies SET bytes_present = bytes_present + NEW.size * NEW.present,
        instances_present = instances_present + NEW.present
    WHERE study_uid = NEW.study_uid;
END;
CREATE TRIGGER IF NOT EXISTS instances_totals_update
AFTER UPDATE OF size, present, study_uid ON instances BEGIN
    UPDATE studies SET bytes_present = bytes_present - OLD.size * OLD.present,
        instances_present = instances_present - OLD.present
    WHERE study_uid = OLD.study_uid;
    UPDATE studies SET bytes_present = bytes_present + NEW.size * NEW.present,
        instances_present = instances_present + NEW.present
    WHERE study_uid = NEW.study_uid;
END;
CREATE TRIGGER IF NOT EXISTS instances_totals_delete AFTER DELETE ON instances BEGIN
    UPDATE studies SET bytes_present = bytes_present - OLD.size * OLD.present,
        instances_present = instances_present - OLD.present
    WHERE study_uid = OLD.study_uid;
END;
"""


def _study_totals(db: sqlite3.Connection) -> int:
    """Each study's bytes and instances in the spool kept on its row by triggers, so the
    spool's totals (every /metrics scrape, every ``status``) sum 20,000 study rows, not a
    million instance rows."""
    _add_columns(db, "studies", "bytes_present INTEGER NOT NULL DEFAULT 0",
                 "instances_present INTEGER NOT NULL DEFAULT 0")
    db.execute("UPDATE studies SET bytes_present = (SELECT COALESCE(SUM(size * present), 0)"
               " FROM instances i WHERE i.study_uid = studies.study_uid), instances_present ="
               " (SELECT COALESCE(SUM(present), 0) FROM instances i"
               " WHERE i.study_uid = studies.study_uid)")
    for statement in STUDY_TOTALS_TRIGGERS.split("END;"):
        if statement.strip():
            db.execute(statement + "END;")
    return 0


def _mpps_tables(db: sqlite3.Connection) -> None:
    for statement in MPPS_SCHEMA:
        db.execute(statement)
    _add_columns(db, "studies", "incomplete TEXT")


#: (version, step): append, never edit one that has shipped. The steps check what they add,
#: since a spool from before the versions were counted (user_version 0) has some of it.
MIGRATIONS: list[tuple[int, Callable[[sqlite3.Connection], int | None]]] = [
    (1, _relative_keys),
    (2, lambda db: _add_columns(db, "jobs", "routes TEXT", "series_only TEXT")),
    (3, qr_columns),
    (4, lambda db: _add_columns(db, "studies", "await_until REAL",
                                "expected_instances INTEGER", "receiving_since REAL")),
    (5, lambda db: _add_columns(db, "ledger", "sent_uid TEXT", "digest TEXT")),
    (6, lambda db: (_add_columns(db, "instances", "node TEXT",
                                 "shared INTEGER NOT NULL DEFAULT 1"),
                    _add_columns(db, "jobs", "node TEXT", "lease_until REAL",
                                 "missing INTEGER NOT NULL DEFAULT 0"))[0]),
    (7, _source_deltas),
    (8, _study_totals),
    # issue 26: a job's priority (0 stat ... 3 low; claims take the most urgent first)
    (9, lambda db: _add_columns(db, "jobs", "priority INTEGER NOT NULL DEFAULT 2")),
    # when an operator released the job's held generation (a later route does not hold it
    # again; a new generation clears it)
    (10, lambda db: _add_columns(db, "jobs", "released REAL")),
    # issue 28 (the Q/R proxy): when each study fetched from the PACS was last used
    (13, lambda db: db.execute(PROXY_CACHE.format(real="REAL")) and None),
    # issue 27, HL7 v2: messages stored before their ACK, the latest orders, patient merges
    (14, lambda db: [db.execute(x) for x in HL7_TABLES.split(";") if x.strip()] and 0),
    # issue 27 item 4, MPPS: the procedure steps, their studies, the DIMSE outbox (forwarded
    # MPPS, Instance Availability Notifications) and a study's incomplete flag
    (15, _mpps_tables),
    # issue 27, item 3 (prior prefetch): the trigger queue and the priors it fetched
    (16, lambda db: [db.execute(statement) for statement in PREFETCH_TABLES] and 0),
    # issue 29, item 4 (destination groups): the member each study of a group goes to
    (19, lambda db: [db.execute(statement) for statement in GROUP_TABLES] and 0),
    # issue 29, item 5 (corrections follow the ledger): rejected instances, where a rejection
    # note may go, which notes were examined; cancelled sends and earlier deliveries
    (20, lambda db: (_add_columns(db, "instances", *IOCM_INSTANCE_COLUMNS),
                     _add_columns(db, "ledger", *IOCM_LEDGER_COLUMNS),
                     db.execute(IOCM_INDEX))[0]),
    # issue 29, item 3 (reversible pseudonymization): the sealed mappings
    (21, lambda db: [db.execute(statement) for statement in PSEUDONYM_TABLES] and 0),
    # issue 29, item 1 (remote processing steps): what each step sent, the results it got
    (22, lambda db: [db.execute(statement) for statement in REMOTE_TABLES] and 0),
]


class SQLiteState(SQLState):
    """The state database of one spool in SQLite (WAL); thread-safe."""

    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = path
        self.write_transactions = 0
        self._lock = threading.RLock()
        # Per-study exclusion: 64 stripes, each a thread lock and then the same stripe as a
        # byte-range lock on <spool>/locks, so receiver processes and `purge` exclude each
        # other too (the stripe is a stable hash: it must agree across processes).
        self._study_locks = [threading.Lock() for _ in range(64)]
        self._lock_fd = -1
        with unavailable_on_error(path):
            self._open(path, readonly)

    def _open(self, path: Path, readonly: bool) -> None:
        if readonly:
            uri = f"file:{path}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, isolation_level=None,
                                       check_same_thread=False, timeout=30)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), isolation_level=None,
                                       check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            self._migrate()
            self._lock_fd = os.open(path.parent / "locks", os.O_RDWR | os.O_CREAT, 0o644)
        self._db.row_factory = sqlite3.Row
        register_functions(self._db)  # Q/R matching (Person Names folded with Unicode rules)
        self._db.execute("PRAGMA busy_timeout=30000")

    def _migrate(self) -> None:
        """Bring the schema to the last version of ``MIGRATIONS`` (``PRAGMA user_version``
        counts them, like PostgreSQL's ``schema_migrations``), in one transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            current = self._db.execute("PRAGMA user_version").fetchone()[0]
            n = 0
            for version, step in MIGRATIONS:
                if version > current:
                    n += step(self._db) or 0
            self._db.execute(f"PRAGMA user_version = {MIGRATIONS[-1][0]}")
            self._db.execute("COMMIT")
        self.migrated = n

    def schema_version(self) -> int:
        """``PRAGMA user_version``: the last migration applied (0: from before they were
        counted)."""
        with self._lock, unavailable_on_error(self.path):
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def schema_behind(self) -> bool:
        return self.schema_version() < MIGRATIONS[-1][0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def study_lock(self, study_uid: str) -> StudyLock:
        i = zlib.crc32(study_uid.encode()) % len(self._study_locks)
        return StudyLock(self._study_locks[i], self._lock_fd, i)

    @contextmanager
    def _tx(self, study: str | None = None) -> Iterator[sqlite3.Connection]:
        with self._lock, unavailable_on_error(self.path):
            self.write_transactions += 1  # counted: idle workers must not write (tests)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def _durable_tx(self) -> Iterator[sqlite3.Connection]:
        """A transaction on disk once committed: the WAL is fsync'd at this commit
        (synchronous=FULL for it; NORMAL's commits survive a crash of the process, not a
        power cut), for what is acknowledged on the strength of it (an HL7 ACK, an MPPS
        response)."""
        with self._lock, unavailable_on_error(self.path):
            self._db.execute("PRAGMA synchronous=FULL")
            try:
                with self._tx() as db:
                    yield db
            finally:
                self._db.execute("PRAGMA synchronous=NORMAL")

    def hold_lease(self, name: str, ttl: float) -> bool:
        return True  # one node per SQLite state: no write for it

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock, unavailable_on_error(self.path):
            return self._db.execute(sql, args).fetchall()
