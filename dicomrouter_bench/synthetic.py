"""A large synthetic state for P8 (cost flat as the work grows): studies, their instances, one
delivered job per study, the ledger and the history, written straight into a state database the
router created (so the schema and its migrations are the router's own) by SQL that generates
the rows (no Python loop per row).

The rows look like a retained spool's after months of traffic: every study delivered (a few
still receiving), 2 studies per patient, study dates spread over ten years, 2 series per study,
instances of the CT Image Storage class. The spool files themselves are not written (a million
files is not what P8 measures; start-up's walk of the spool is proportional to the files there).
"""

from __future__ import annotations

import contextlib
import datetime
import sqlite3
import time
from pathlib import Path

from dicomrouter.state.postgres import PostgresState
from dicomrouter.state.sqlite import SQLiteState

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
ROOT = "2.25.8888"  # no real UID starts like this: the generated rows never meet a test's


def patient_id(i: int, studies: int) -> str:
    """The PatientID the i-th synthetic study carries (2 studies per patient)."""
    return f"PAT{i % max(1, studies // 2):07d}"


def study_date(i: int) -> str:
    """The StudyDate of the i-th synthetic study (spread over ten years from 2016-01-01)."""
    return (datetime.date(2016, 1, 1) + datetime.timedelta(days=i % 3650)).strftime("%Y%m%d")


def study_uid(i: int) -> str:
    return f"{ROOT}.{i}"


def build_sqlite(db_path: Path, studies: int, instances: int, receiving: int = 5) -> float:
    """Fill a (new) SQLite state with ``studies`` studies of ``instances`` instances in all;
    the last ``receiving`` studies are still receiving (the tracker looks at them every tick).
    Returns the seconds it took."""
    start = time.perf_counter()
    SQLiteState(db_path).close()  # the router's schema and migrations
    per = max(1, instances // studies)
    half = max(1, studies // 2)
    now = time.time()
    db = sqlite3.connect(db_path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=OFF")
        db.execute("BEGIN")
        db.execute(f"""
            WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < {studies})
            INSERT INTO studies(study_uid, patient_id, patient_name, study_date, accession,
                                description, calling_ae, called_ae, state, generation,
                                first_received, last_received, completed_at, delivered_at,
                                in_spool)
            SELECT '{ROOT}.' || i, printf('PAT%07d', i % {half}), printf('DOE^P%07d', i % {half}),
                   strftime('%Y%m%d', '2016-01-01', '+' || (i % 3650) || ' days'),
                   printf('ACC%08d', i), 'SYNTHETIC', 'MODALITY', 'DICOMROUTER',
                   CASE WHEN i >= {studies - receiving} THEN 'receiving' ELSE 'delivered' END,
                   1, {now} - ({studies} - i) * 60.0, {now} - ({studies} - i) * 60.0 + 30,
                   {now} - ({studies} - i) * 60.0 + 31, {now} - ({studies} - i) * 60.0 + 40, 1
            FROM n""")
        db.execute(f"""
            WITH RECURSIVE n(j) AS (SELECT 0 UNION ALL SELECT j + 1 FROM n
                                    WHERE j + 1 < {studies * per})
            INSERT INTO instances(sop_uid, study_uid, series_uid, sop_class, transfer_syntax,
                                  path, size, received_at, generation, calling_ae, called_ae,
                                  tags, present)
            SELECT s || '.' || (j % {per}), s, s || '.' || ((j % {per}) * 2 / {per}), '{CT}',
                   '{EXPLICIT}', 'data/' || s || '/' || s || '.' || (j % {per}) || '.dcm',
                   526000, {now} - ({studies} - j / {per}) * 60.0, 1, 'MODALITY', 'DICOMROUTER',
                   json_object('PatientID', printf('PAT%07d', (j / {per}) % {half}),
                               'PatientName', printf('DOE^P%07d', (j / {per}) % {half}),
                               'StudyInstanceUID', s,
                               'StudyDate', strftime('%Y%m%d', '2016-01-01',
                                                     '+' || ((j / {per}) % 3650) || ' days'),
                               'AccessionNumber', printf('ACC%08d', j / {per}),
                               'Modality', 'CT',
                               'SeriesInstanceUID', s || '.' || ((j % {per}) * 2 / {per}),
                               'SeriesNumber', CAST((j % {per}) * 2 / {per} + 1 AS TEXT),
                               'SOPInstanceUID', s || '.' || (j % {per}),
                               'SOPClassUID', '{CT}',
                               'InstanceNumber', CAST(j % {per} + 1 AS TEXT)), 1
            FROM (SELECT j, '{ROOT}.' || (j / {per}) AS s FROM n)""")
        db.execute(f"""
            INSERT INTO jobs(study_uid, destination, state, attempts, next_attempt, generation,
                             routes, created, updated)
            SELECT study_uid, 'archive', 'delivered', 1, 0, 1, '["all"]', completed_at,
                   delivered_at FROM studies WHERE state = 'delivered' AND study_uid LIKE
                   '{ROOT}.%'""")
        db.execute(f"""
            INSERT INTO ledger(sop_uid, destination, study_uid, sends, delivered_at)
            SELECT i.sop_uid, 'archive', i.study_uid, 1, s.delivered_at FROM instances i
            JOIN studies s ON s.study_uid = i.study_uid
            WHERE s.state = 'delivered' AND s.study_uid LIKE '{ROOT}.%'""")
        for event, at in (("received from MODALITY", "first_received"),
                          ("complete: routes: all; destinations: archive", "completed_at"),
                          ("delivered to archive", "delivered_at")):
            db.execute(f"INSERT INTO events(study_uid, ts, event) SELECT study_uid, {at}, "
                       f"'{event}' FROM studies WHERE {at} IS NOT NULL AND study_uid LIKE "
                       f"'{ROOT}.%'")
        db.execute("COMMIT")
        db.execute("ANALYZE")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    return time.perf_counter() - start


def build_postgres(dsn: str, studies: int, instances: int, receiving: int = 5) -> float:
    """The same rows in a (new) PostgreSQL state; returns the seconds it took. The totals'
    trigger is off during the load and the totals set once after (a million row triggers would
    each rewrite a study row)."""
    import psycopg  # the cluster extra: only P8's PostgreSQL half needs it

    start = time.perf_counter()
    PostgresState(dsn, "bench-builder").close()  # the router's schema and migrations
    per = max(1, instances // studies)
    half = max(1, studies // 2)
    now = time.time()

    def pid(n: str) -> str:
        return f"'PAT' || lpad((({n}) % {half})::text, 7, '0')"

    def name(n: str) -> str:
        return f"'DOE^P' || lpad((({n}) % {half})::text, 7, '0')"

    def date(n: str) -> str:
        return f"to_char(date '2016-01-01' + (({n}) % 3650)::int, 'YYYYMMDD')"

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = off")
        with conn.transaction():
            conn.execute("ALTER TABLE instances DISABLE TRIGGER instances_totals")
            conn.execute(f"""
                INSERT INTO studies(study_uid, patient_id, patient_name, study_date, accession,
                                    description, calling_ae, called_ae, state, generation,
                                    first_received, last_received, completed_at, delivered_at,
                                    in_spool)
                SELECT '{ROOT}.' || i, {pid('i')}, {name('i')}, {date('i')},
                       'ACC' || lpad(i::text, 8, '0'), 'SYNTHETIC', 'MODALITY', 'DICOMROUTER',
                       CASE WHEN i >= {studies - receiving} THEN 'receiving' ELSE 'delivered'
                       END, 1, {now} - ({studies} - i) * 60.0, {now} - ({studies} - i) * 60.0
                       + 30, {now} - ({studies} - i) * 60.0 + 31,
                       {now} - ({studies} - i) * 60.0 + 40, 1
                FROM generate_series(0, {studies - 1}) AS i""")
            conn.execute(f"""
                INSERT INTO instances(sop_uid, study_uid, series_uid, sop_class,
                                      transfer_syntax, path, size, received_at, generation,
                                      calling_ae, called_ae, tags, present)
                SELECT s || '.' || (j % {per}), s, s || '.' || ((j % {per}) * 2 / {per}), '{CT}',
                       '{EXPLICIT}', 'data/' || s || '/' || s || '.' || (j % {per}) || '.dcm',
                       526000, {now} - ({studies} - j / {per}) * 60.0, 1, 'MODALITY',
                       'DICOMROUTER',
                       json_build_object(
                           'PatientID', {pid(f'j / {per}')},
                           'PatientName', {name(f'j / {per}')},
                           'StudyInstanceUID', s, 'StudyDate', {date(f'j / {per}')},
                           'AccessionNumber', 'ACC' || lpad((j / {per})::text, 8, '0'),
                           'Modality', 'CT',
                           'SeriesInstanceUID', s || '.' || ((j % {per}) * 2 / {per}),
                           'SeriesNumber', ((j % {per}) * 2 / {per} + 1)::text,
                           'SOPInstanceUID', s || '.' || (j % {per}), 'SOPClassUID', '{CT}',
                           'InstanceNumber', (j % {per} + 1)::text)::text, 1
                FROM (SELECT j, '{ROOT}.' || (j / {per}) AS s
                      FROM generate_series(0, {studies * per - 1}) AS j) AS n""")
            conn.execute("UPDATE studies SET bytes_present = t.b, instances_present = t.n FROM"
                         " (SELECT study_uid, SUM(size * present) AS b, SUM(present) AS n FROM"
                         " instances GROUP BY study_uid) t WHERE t.study_uid = studies.study_uid")
            conn.execute("ALTER TABLE instances ENABLE TRIGGER instances_totals")
            conn.execute("""
                INSERT INTO jobs(study_uid, destination, state, attempts, next_attempt,
                                 generation, routes, created, updated)
                SELECT study_uid, 'archive', 'delivered', 1, 0, 1, '["all"]', completed_at,
                       delivered_at FROM studies WHERE state = 'delivered'""")
            conn.execute("""
                INSERT INTO ledger(sop_uid, destination, study_uid, sends, delivered_at)
                SELECT i.sop_uid, 'archive', i.study_uid, 1, s.delivered_at FROM instances i
                JOIN studies s ON s.study_uid = i.study_uid WHERE s.state = 'delivered'""")
            for event, at in (("received from MODALITY", "first_received"),
                              ("complete: routes: all; destinations: archive", "completed_at"),
                              ("delivered to archive", "delivered_at")):
                conn.execute(f"INSERT INTO events(study_uid, ts, event) SELECT study_uid, {at},"
                             f" '{event}' FROM studies WHERE {at} IS NOT NULL")
        conn.execute("VACUUM ANALYZE")
        with contextlib.suppress(psycopg.Error):  # written out now, not during the measurement
            conn.execute("CHECKPOINT")
    return time.perf_counter() - start
