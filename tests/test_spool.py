"""Receive slots and their completion marker: what start-up adopts and what it drops."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from router_fixtures import dataset_bytes

from dicomrouter.sample import generate
from dicomrouter.spool import Spool
from dicomrouter.spool.slots import is_complete
from dicomrouter.state import open_state


def spool_at(root: Path) -> Spool:
    return Spool(root, open_state(root / "state.db"))


def test_marker_detects_truncation_and_corruption(tmp_path: Path) -> None:
    f = generate(tmp_path / "s", series=1, instances=1, rows=16, cols=16, seed=1)[0]
    spool = spool_at(tmp_path / "spool")
    rx = spool.new_receive_file()
    rx.write(f.read_bytes())
    rx.file.sync()
    rx.close()
    slot = Path(rx.name)
    assert is_complete(slot)
    data = slot.read_bytes()
    slot.write_bytes(data[:-10])
    assert not is_complete(slot)
    slot.write_bytes(data[:200] + bytes([data[200] ^ 1]) + data[201:])
    assert not is_complete(slot)
    slot.write_bytes(data)
    assert is_complete(slot)


def test_startup_adopts_complete_slots_and_drops_partial_ones(tmp_path: Path) -> None:
    a, b = generate(tmp_path / "s", series=1, instances=2, rows=16, cols=16, seed=2)
    root = tmp_path / "spool"
    spool = spool_at(root)
    done = spool.new_receive_file()  # fsync'd and marked, then the process died: acknowledged
    done.write(a.read_bytes())
    done.file.sync()
    done.close()
    cut = spool.new_receive_file()  # half received when the process died: never acknowledged
    cut.write(b.read_bytes()[:1000])
    cut.close()
    spare = spool.new_receive_file()  # an empty pre-created slot
    spare.close()
    spool.state.close()

    again = spool_at(root)
    assert again.recover_slots() == (1, 1)
    assert list((root / "tmp").iterdir()) == []
    ds = dcmread(a)
    placed = root / "data" / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert dataset_bytes(placed) == dataset_bytes(a)
    assert [i.sop_uid for i in again.state.instances(ds.StudyInstanceUID)] == [ds.SOPInstanceUID]
    assert again.used_bytes == placed.stat().st_size


def test_an_acknowledged_instance_not_yet_placed_is_adopted_at_startup(tmp_path: Path) -> None:
    """The receiver answers after ``accept`` and renames/records (``place``) afterwards: a crash
    in between must leave the instance where start-up finds it."""
    (a,) = generate(tmp_path / "s", series=1, instances=1, rows=16, cols=16, seed=3)
    root = tmp_path / "spool"
    spool = spool_at(root)
    rx = spool.new_receive_file()
    rx.write(a.read_bytes())
    accepted = spool.accept(rx, "MODALITY", "ROUTER")  # the point where success is answered
    rx.close()
    ds = dcmread(a)
    assert accepted.tags["SOPInstanceUID"] == ds.SOPInstanceUID
    assert spool.state.instances(ds.StudyInstanceUID) == []  # not recorded yet: "crash" here
    spool.state.close()

    again = spool_at(root)
    assert again.recover_slots() == (1, 0)
    placed = root / "data" / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert dataset_bytes(placed) == dataset_bytes(a)
    assert [i.sop_uid for i in again.state.instances(ds.StudyInstanceUID)] == [ds.SOPInstanceUID]


def test_sqlite_schema_versions_are_counted_and_applied_once(tmp_path: Path) -> None:
    """The SQLite state counts its migrations like PostgreSQL's schema_migrations: a new
    database is at the last version, and a spool from before versions were counted (user
    version 0, some columns there already, some not) is brought up to it."""
    import sqlite3

    from dicomrouter.state.sqlite import MIGRATIONS, SQLiteState

    db = tmp_path / "state.db"
    SQLiteState(db).close()
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA user_version").fetchone()[0] == MIGRATIONS[-1][0]
    con.executescript("ALTER TABLE ledger DROP COLUMN digest; PRAGMA user_version = 0;")
    con.close()
    state = SQLiteState(db)  # an old spool: every step runs, each adds only what is missing
    try:
        assert state.delivered_digests("1.2", "x") == {}  # the digest column is back
    finally:
        state.close()
    con = sqlite3.connect(db)
    assert "digest" in {r[1] for r in con.execute("PRAGMA table_info(ledger)")}
    assert con.execute("PRAGMA user_version").fetchone()[0] == MIGRATIONS[-1][0]
    con.close()
