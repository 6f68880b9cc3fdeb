"""Receive slots and their completion marker: what start-up adopts and what it drops."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from router_fixtures import dataset_bytes

from dicomrouter.sample import generate
from dicomrouter.scp.ingest import store_file
from dicomrouter.spool import Spool, note
from dicomrouter.spool.kept_tags import Kept, write_kept
from dicomrouter.spool.receive import ReceiveFile
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


def _received(spool: Spool, source: Path) -> ReceiveFile:
    rx = spool.new_receive_file()
    rx.write(source.read_bytes())
    return rx


OWN_TAGS = {"_ResultOf": "ai", "_Picked": "CT1"}


def test_the_routers_own_tags_survive_a_crash_before_the_record(tmp_path: Path) -> None:
    """A processing result (or a proxied or pulled instance) carries tags of the router's own,
    kept in the index only. A crash after its durable accept, before its record: start-up
    adopted it from its slot with the file's tags only (a result became a late arrival of its
    origin study). Now the tags are kept on disk until the record."""
    a, b = generate(tmp_path / "s", series=1, instances=2, rows=16, cols=16, seed=4)
    root = tmp_path / "spool"
    spool = spool_at(root)
    rx = _received(spool, a)  # crash between accept and the rename: the slot is adopted
    assert spool.keep_tags(rx, OWN_TAGS, "ROUTER", "ROUTER") == dcmread(a).SOPInstanceUID
    spool.accept(rx, "ROUTER", "ROUTER")
    rx.close()
    rx = _received(spool, b)  # crash between the rename and the record: an orphan is adopted
    spool.keep_tags(rx, OWN_TAGS)
    accepted = spool.accept(rx, "", "ROUTER")
    rx.close()
    spool._rename(accepted.path, accepted.tags)
    spool.state.close()

    again = spool_at(root)
    assert again.recover_slots() == (1, 0)
    assert again.adopt_orphans() == 1
    again.forget_kept_tags()
    for f in (a, b):
        inst = again.state.instance(dcmread(f).SOPInstanceUID)
        assert inst is not None and {k: inst.tags.get(k) for k in OWN_TAGS} == OWN_TAGS
    assert list((root / "tmp").iterdir()) == []


def test_kept_tags_are_removed_once_recorded_refused_or_left_over(tmp_path: Path) -> None:
    a, b = generate(tmp_path / "s", series=1, instances=2, rows=16, cols=16, seed=5)
    root = tmp_path / "spool"
    spool = spool_at(root)
    status, _, tags = store_file(spool, [a.read_bytes()], "SRC", "ROUTER", OWN_TAGS)
    assert status == 0 and tags is not None and tags["_ResultOf"] == "ai"
    garbage = a.read_bytes()[:600] + b"\xff" * 64  # SOP UID readable, dataset cut: refused
    status, _, tags = store_file(spool, [garbage], "SRC", "ROUTER", OWN_TAGS)
    assert status != 0 and tags is None
    assert list((root / "tmp").glob("*.tags")) == [], "recorded or refused: nothing kept"

    # kept, recorded, and the process died before removing them: the next start drops them,
    # and a later reception of that instance does not take them
    b_sop = dcmread(b).SOPInstanceUID
    write_kept(root / "tmp", b_sop, Kept(OWN_TAGS, "ROUTER"))
    (root / "tmp" / f"{'0' * 32}.tags").write_bytes(b'{"SOPInstanceUID": "1.2"')  # cut short
    spool.state.close()
    again = spool_at(root)
    again.recover_slots()
    again.adopt_orphans()
    again.forget_kept_tags()
    assert list((root / "tmp").glob("*.tags")) == []
    rx = _received(again, b)
    again.place(again.accept(rx, "CT1", "ROUTER"))
    rx.close()
    inst = again.state.instance(b_sop)
    assert inst is not None and "_ResultOf" not in inst.tags


KEYS = {"_Listener": "ct-scanners", "_SourceHost": "10.20.30.40"}


def test_a_receptions_routing_keys_come_back_with_an_adopted_instance(tmp_path: Path) -> None:
    """The routing keys of the association (listener, sender's address, called AE) go in the
    file's preamble as it is received (spool/note.py): an instance adopted at start-up from its
    slot, or as an orphan, comes back with them; no reader of the spool ever sees them."""
    a, b = generate(tmp_path / "s", series=1, instances=2, rows=16, cols=16, seed=6)
    root = tmp_path / "spool"
    spool = spool_at(root)
    noted = note.pack("CT1", "ROUTER_B", KEYS)
    assert noted and len(noted) <= 128 - 24
    for f in (a, b):  # received in two pieces, split inside the note's bytes
        data = f.read_bytes()
        rx = spool.new_receive_file()
        rx.write(note.overlay(data[:60], 0, noted))
        rx.write(note.overlay(data[60:], 60, noted))
        accepted = spool.accept(rx, "CT1", "ROUTER_B")
        rx.close()
        if f == b:  # renamed, not recorded: an orphan
            spool._rename(accepted.path, accepted.tags)
    spool.state.close()

    again = spool_at(root)
    assert again.recover_slots() == (1, 0)
    assert again.adopt_orphans() == 1
    for f in (a, b):
        inst = again.state.instance(dcmread(f).SOPInstanceUID)
        assert inst is not None
        assert {k: inst.tags.get(k) for k in KEYS} == KEYS
        assert (inst.calling_ae, inst.called_ae) == ("CT1", "ROUTER_B")
        with again.open(inst) as reader:
            head = reader.read(132)
        assert head == b"\0" * 128 + b"DICM", "the preamble is read as zeros"
        assert dataset_bytes(again.path(inst.key)) == dataset_bytes(f)


def test_the_note_is_left_out_when_it_does_not_fit_and_ignored_when_damaged() -> None:
    assert note.pack("CT1", "ROUTER", {"_Listener": "x" * 100}) == b""
    assert note.pack("CT\x1f1", "ROUTER", KEYS) == b"", "a separator in a value: no note"
    longest = note.pack("A" * 16, "B" * 16, {"_Listener": "main", "_SourceHost": "f" * 39})
    assert longest, "AE titles at their longest and an IPv6 address fit"
    noted = note.pack("CT1", "ROUTER", KEYS)
    head = note.overlay(bytes(132), 0, noted)
    assert note.read(head) == (KEYS, "CT1", "ROUTER")
    assert note.read(bytes(132)) == ({}, "", "")
    damaged = bytearray(head)
    damaged[28] = 200  # a length past the room
    assert note.read(damaged) == ({}, "", "")
    assert note.overlay(b"abc", 200, noted) == b"abc"


def test_tags_that_cannot_be_kept_refuse_the_ingest_and_leave_nothing(tmp_path: Path) -> None:
    """A disk too full for the kept tags: the ingest is refused (0xA700) as ``accept`` refuses
    on a full disk, and no receive slot is left behind."""
    (a,) = generate(tmp_path / "s", series=1, instances=1, rows=16, cols=16, seed=7)
    root = tmp_path / "spool"
    spool = spool_at(root)

    def full(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    spool.keep_tags = full  # type: ignore[method-assign]
    before = set((root / "tmp").iterdir())
    status, comment, tags = store_file(spool, [a.read_bytes()], "SRC", "ROUTER", OWN_TAGS)
    assert (status, tags) == (0xA700, None) and "No space left" in comment
    assert set((root / "tmp").iterdir()) <= before
    assert spool.state.instance(dcmread(a).SOPInstanceUID) is None


def test_a_pulls_own_tags_go_in_its_note_without_a_sync(tmp_path: Path) -> None:
    """Tags a reception note holds (a pull's _SourceHost, a proxied instance's _Proxied) go in
    the file's preamble: no kept-tags file, no extra sync; a result's tags cannot, and are
    kept beside it (the test above)."""
    (a,) = generate(tmp_path / "s", series=1, instances=1, rows=16, cols=16, seed=8)
    spool = spool_at(tmp_path / "spool")

    def no_sync(*_args: object) -> None:
        raise AssertionError("kept beside the file: two syncs a note would have spared")

    spool.keep_tags = no_sync  # type: ignore[method-assign]
    pulled = {"_SourceHost": "10.1.1.1", "_Proxied": "1"}
    status, _, tags = store_file(spool, [a.read_bytes()], "ORTHANC", "ROUTER", pulled)
    assert status == 0 and tags is not None
    inst = spool.state.instance(dcmread(a).SOPInstanceUID)
    assert inst is not None and {k: inst.tags.get(k) for k in pulled} == pulled
    assert note.read_file(spool.path(inst.key)) == (pulled, "ORTHANC", "ROUTER")
