"""Destination groups (issue 29, item 4), against real peers: three DCMTK storescp as the
members (and a pynetdicom member that acknowledges part of a study, then goes away).

A study goes whole to one member: every study's instances arrive at exactly one member. A member
whose circuit breaker opens gets nothing new, and its undelivered study moves to another member:
the whole study is sent there (an AI node must receive the study whole), the old member's
partial copy is in the history, and no member ever gets an instance twice (the ledger is kept
per member; the member that comes back is not sent the moved study again). The choice is in
the state: a restart keeps it.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from peers import StoreSCP, free_port, run_storescu, sop_uids, wait_until
from pydicom import dcmread
from pynetdicom import AE, AllStoragePresentationContexts, VerificationPresentationContexts, evt
from router_fixtures import Router, dicomrouter

from dicomrouter.config import ConfigError, from_dict
from dicomrouter.sample import generate
from dicomrouter.state import State

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
RETRY = {"initial": "1s", "max_delay": "1s", "max_attempts": 50}


def _dicom(aet: str, port: int, **extra: Any) -> dict[str, Any]:
    return {"type": "dicom", "ae_title": aet, "host": "127.0.0.1", "port": port,
            "timeout": "10s", "retry": RETRY, **extra}


def _by_study(files: list[Path]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        out.setdefault(str(ds.StudyInstanceUID), set()).add(str(ds.SOPInstanceUID))
    return out


def _where(studies: dict[str, set[str]], members: dict[str, Any]) -> dict[str, list[str]]:
    """Study → the members holding any of its instances."""
    held = {name: sop_uids(m.files()) for name, m in members.items()}
    return {s: sorted(n for n, got in held.items() if got & uids)
            for s, uids in studies.items()}


def _history(router: Router, study: str) -> list[str]:
    r = dicomrouter("status", "--json", "--study", study, "--config", str(router.config_path))
    assert r.returncode == 0, r.stderr
    return [event for _ts, event in json.loads(r.stdout)["history"]]


class Recorder:
    """A pynetdicom storage SCP that counts every C-STORE it acknowledges (per SOP Instance
    UID, so a duplicate shows) and, with ``die_after``, shuts down (aborting the association)
    after acknowledging that many."""

    def __init__(self, port: int, die_after: int = 0) -> None:
        self.port = port
        self.die_after = die_after
        self.received: Counter[str] = Counter()
        self._server: Any = None
        self.dead = threading.Event()

    def _store(self, event: Any) -> int:
        if self.dead.is_set():
            return 0xA700
        self.received[str(event.request.AffectedSOPInstanceUID)] += 1
        if self.die_after and sum(self.received.values()) >= self.die_after:
            self.dead.set()
            threading.Thread(target=self.stop, daemon=True).start()
        return 0x0000

    def start(self) -> Recorder:
        ae = AE(ae_title="AI1")
        ae.supported_contexts = AllStoragePresentationContexts + VerificationPresentationContexts
        self.dead.clear()
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._store)])
        return self

    def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            server.shutdown()


@pytest.fixture
def members(tmp_path: Path) -> Any:
    scps = {f"ai{i}": StoreSCP(tmp_path / f"ai{i}", aet=f"AI{i}") for i in (1, 2, 3)}
    for scp in scps.values():
        scp.start()
    try:
        yield scps
    finally:
        for scp in scps.values():
            scp.stop()


def _group_config(members: dict[str, StoreSCP], **group: Any) -> dict[str, Any]:
    dests: dict[str, Any] = {n: _dicom(m.aet, m.port) for n, m in members.items()}
    dests["ai"] = {"type": "group", "members": list(members), "retry": RETRY, **group}
    return {"destinations": dests, "routes": [{"name": "ai", "to": ["ai"]}]}


def test_round_robin_sends_each_study_whole_to_one_member(tmp_path: Path,
                                                           members: dict[str, StoreSCP]) -> None:
    files = generate(tmp_path / "in", studies=6, series=2, instances=3, rows=16, cols=16,
                     seed=2901)
    studies = _by_study(files)
    web = free_port()
    with Router(tmp_path / "router", {**_group_config(members, strategy="round_robin"),
                                      "web": {"port": web}}) as router:
        assert run_storescu(files, router.port, aet=router.aet).returncode == 0
        for study in studies:
            router.wait_state(study, "delivered")
        where = _where(studies, members)
        assert all(len(at) == 1 for at in where.values()), where  # whole, at one member
        for study, (member,) in where.items():  # and all of it there
            assert studies[study] <= sop_uids(members[member].files())
        spread = Counter(at[0] for at in where.values())
        assert spread == {"ai1": 2, "ai2": 2, "ai3": 2}, spread
        assert sum(len(m.files()) for m in members.values()) == len(files)
        # the history names the member; status, the API, the page and /metrics show the spread
        study, (member,) = next(iter(where.items()))
        assert f"group ai → {member} (round_robin)" in _history(router, study)
        status = router.status()
        assert status["groups"]["ai"]["studies"] == {"ai1": 2, "ai2": 2, "ai3": 2}
        text = dicomrouter("status", "--config", str(router.config_path)).stdout
        assert re.search(r"ai\s+ai1 2, ai2 2, ai3 2", text), text
        with urllib.request.urlopen(f"http://127.0.0.1:{web}/api/destinations",
                                    timeout=10) as rsp:
            rows = {d["name"]: d for d in json.loads(rsp.read())["destinations"]}
        assert rows["ai"]["group"]["studies"] == {"ai1": 2, "ai2": 2, "ai3": 2}
        with urllib.request.urlopen(f"http://127.0.0.1:{web}/", timeout=10) as rsp:
            assert "ai1 2, ai2 2, ai3 2" in rsp.read().decode()
        with urllib.request.urlopen(f"http://127.0.0.1:{web}/metrics", timeout=10) as rsp:
            metrics = rsp.read().decode()
        for m in ("ai1", "ai2", "ai3"):
            assert f'dicomrouter_group_studies_total{{group="ai",member="{m}"}} 2.0' in metrics


def test_least_loaded_prefers_the_member_with_fewer_queued(tmp_path: Path,
                                                           members: dict[str, StoreSCP]) -> None:
    busy = generate(tmp_path / "busy", studies=2, series=1, instances=2, rows=16, cols=16,
                    patient_id="BUSY", seed=2902)
    ai = generate(tmp_path / "ai", studies=3, series=1, instances=2, rows=16, cols=16,
                  patient_id="AI", seed=2903)
    two = {n: members[n] for n in ("ai1", "ai2")}
    cfg = _group_config(two, strategy="least_loaded")
    # ai1 has a queue of its own: two studies held for it by another route
    cfg["routes"] = [{"name": "busy", "when": {"PatientID": "BUSY"}, "to": ["ai1"],
                      "hold": True},
                     {"name": "ai", "when": {"PatientID": "AI"}, "to": ["ai"]}]
    with Router(tmp_path / "router", cfg) as router:
        assert run_storescu(busy, router.port, aet=router.aet).returncode == 0
        held = _by_study(busy)
        wait_until(lambda: router.log(50000).count("held for ai1") == len(held), timeout=90,
                   what="ai1's two studies held")
        assert len(router.status()["held"]) == len(held)
        studies = _by_study(ai)
        assert run_storescu(ai, router.port, aet=router.aet).returncode == 0
        for study in studies:
            router.wait_state(study, "delivered")
        where = _where(studies, two)
        # 2 queued at ai1: ai2 takes them while it has fewer (0, then at most 1 queued)
        assert [at for at in where.values()].count(["ai2"]) >= 2, where
        assert all(len(at) == 1 for at in where.values()), where
        assert not sop_uids(members["ai1"].files()) & sop_uids(busy)  # still held


def test_failover_moves_an_undelivered_study_whole_and_never_twice(
        tmp_path: Path, members: dict[str, StoreSCP]) -> None:
    big = generate(tmp_path / "big", studies=1, series=2, instances=5, rows=16, cols=16,
                   patient_id="P1", seed=2904)
    later = generate(tmp_path / "later", studies=1, series=1, instances=3, rows=16, cols=16,
                     patient_id="P2", seed=2905)
    port = free_port()
    ai1 = Recorder(port, die_after=4).start()  # acknowledges 4 of 10, then goes away
    dests = {"ai1": _dicom("AI1", port, breaker_failures=2, probe_every="2s"),
             "ai2": _dicom("AI2", members["ai2"].port),
             "ai3": _dicom("AI3", members["ai3"].port),
             "ai": {"type": "group", "members": ["ai1", "ai2", "ai3"], "strategy": "failover",
                    "retry": RETRY}}
    try:
        with Router(tmp_path / "router", {"destinations": dests,
                                          "routes": [{"name": "ai", "to": ["ai"]}]}) as router:
            assert run_storescu(big, router.port, aet=router.aet).returncode == 0
            (study,) = _by_study(big)
            router.wait_state(study, "delivered", timeout=120)
            assert sum(ai1.received.values()) == 4  # its partial copy
            # the whole study at ai2 (also the 4 ai1 had), nothing at ai3
            assert sop_uids(members["ai2"].files()) == sop_uids(big)
            assert not members["ai3"].files()
            history = _history(router, study)
            assert "group ai → ai1 (failover)" in history, history
            moved = [e for e in history if "moved from ai1" in e]
            assert len(moved) == 1 and "ai1 had acknowledged 4 instance(s)" in moved[0], history
            assert "group ai → ai2 (failover), moved from ai1" in moved[0]
            # a study arriving while ai1 is down goes straight to ai2
            assert run_storescu(later, router.port, aet=router.aet).returncode == 0
            (study2,) = _by_study(later)
            router.wait_state(study2, "delivered")
            assert sop_uids(later) <= sop_uids(members["ai2"].files())
            assert "group ai → ai2 (failover)" in _history(router, study2)
            # ai1 comes back: its breaker closes; the moved study is not sent to it again
            ai1.die_after = 0  # healthy from now on
            ai1.start()
            wait_until(lambda: "destination ai1: circuit breaker closed" in router.log(50000),
                       timeout=30, what="ai1's breaker to close")
            third = generate(tmp_path / "third", studies=1, series=1, instances=2, rows=16,
                             cols=16, patient_id="P3", seed=2906)
            assert run_storescu(third, router.port, aet=router.aet).returncode == 0
            (study3,) = _by_study(third)
            router.wait_state(study3, "delivered")
            assert set(ai1.received) - sop_uids(third) <= sop_uids(big)
            assert sop_uids(third) <= set(ai1.received)  # failover: the first healthy again
            assert max(ai1.received.values()) == 1, ai1.received  # nothing twice at ai1
            status = router.status()
            assert status["ledger"]["resent"] == 0, status["ledger"]  # nothing twice anywhere
            assert status["groups"]["ai"]["moved"] == 1
            assert len(members["ai2"].files()) == len(big) + len(later)
    finally:
        ai1.stop()


def test_patient_affinity_and_a_restart_keep_the_member(tmp_path: Path,
                                                       members: dict[str, StoreSCP]) -> None:
    p1 = generate(tmp_path / "p1", studies=2, series=1, instances=2, rows=16, cols=16,
                  patient_id="P1", seed=2907)
    p2 = generate(tmp_path / "p2", studies=1, series=1, instances=2, rows=16, cols=16,
                  patient_id="P2", seed=2908)
    p1_studies = list(_by_study(p1).items())
    router = Router(tmp_path / "router", _group_config(members, strategy="round_robin",
                                                       affinity="patient"))
    with router:
        first = [f for f in p1 if str(dcmread(f).StudyInstanceUID) == p1_studies[0][0]]
        assert run_storescu(first, router.port, aet=router.aet).returncode == 0
        router.wait_state(p1_studies[0][0], "delivered")
        assert run_storescu(p2, router.port, aet=router.aet).returncode == 0
        (s2,) = _by_study(p2)
        router.wait_state(s2, "delivered")
    # a restart: the state keeps what went where
    with router:
        second = [f for f in p1 if str(dcmread(f).StudyInstanceUID) == p1_studies[1][0]]
        assert run_storescu(second, router.port, aet=router.aet).returncode == 0
        router.wait_state(p1_studies[1][0], "delivered")
        where = _where({**dict(p1_studies), s2: sop_uids(p2)}, members)
        assert where[p1_studies[0][0]] == ["ai1"] and where[s2] == ["ai2"], where
        # round robin alone would give ai3: the same patient goes to the same member
        assert where[p1_studies[1][0]] == ["ai1"], where
        assert "group ai → ai1 (round_robin, same patient)" in _history(router,
                                                                        p1_studies[1][0])
        # a late arrival of the first study goes to its member (only the new instance)
        late = dcmread(first[0])
        late.SOPInstanceUID = late.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.29.99"
        late.save_as(tmp_path / "late.dcm")
        before = len(members["ai1"].files())
        assert run_storescu([tmp_path / "late.dcm"], router.port,
                            aet=router.aet).returncode == 0
        wait_until(lambda: "1.2.826.0.1.29.99" in sop_uids(members["ai1"].files()),
                   timeout=60, what="the late arrival at ai1")
        router.wait_state(p1_studies[0][0], "delivered")
        assert len(members["ai1"].files()) == before + 1
        assert not any(m.files() for m in (members["ai3"],))


def test_a_restart_keeps_an_undelivered_study_at_its_member(tmp_path: Path,
                                                           members: dict[str, StoreSCP]) -> None:
    files = generate(tmp_path / "in", studies=2, series=1, instances=3, rows=16, cols=16,
                     seed=2909)
    studies = list(_by_study(files))
    down = free_port()
    cfg = _group_config(members, strategy="round_robin")
    cfg["destinations"]["ai2"] = _dicom("AI2", down, breaker_failures=0)  # fails, stays chosen
    router = Router(tmp_path / "router", cfg)
    router.start()
    try:
        for study in studies:
            part = [f for f in files if str(dcmread(f).StudyInstanceUID) == study]
            assert run_storescu(part, router.port, aet=router.aet).returncode == 0
            if study == studies[0]:
                router.wait_state(study, "delivered")
        wait_until(lambda: "→ ai2: attempt 2/" in router.log(50000), timeout=60,
                   what="the second study failing at ai2")
        router.kill()  # a crash: the assignment is in the state
        with StoreSCP(tmp_path / "ai2b", aet="AI2", port=down) as ai2:
            router.start()
            router.wait_state(studies[1], "delivered")
            assert sop_uids(ai2.files()) == _by_study(files)[studies[1]]
        assert not (_by_study(files)[studies[1]] & (sop_uids(members["ai1"].files())
                                                    | sop_uids(members["ai3"].files())))
        assert [e for e in _history(router, studies[1]) if e.startswith("group ai")] == \
            ["group ai → ai2 (round_robin)"]
    finally:
        router.stop()


@pytest.mark.parametrize(("group", "key", "problem"), [
    ({"members": ["ai1"]}, "destinations.ai.members", "at least 2 members"),
    ({"members": ["ai1", "nope"]}, "destinations.ai.members", "unknown destination 'nope'"),
    ({"members": ["ai1", "ai1"]}, "destinations.ai.members", "listed twice"),
    ({"members": ["ai1", "sub"]}, "destinations.ai.members", "groups do not nest"),
    ({"members": ["ai1", "ai"]}, "destinations.ai.members", "the group itself"),
    ({"members": ["ai1", "ai2"], "strategy": "random"}, "destinations.ai.strategy",
     "round_robin, least_loaded, failover"),
    ({"members": ["ai1", "ai2"], "affinity": "series"}, "destinations.ai.affinity",
     "study, patient"),
    ({"members": ["ai1", "ai2"], "breaker_failures": 3}, "destinations.ai.breaker_failures",
     "not for a group"),
    ({}, "destinations.ai.members", "required"),
])
def test_config_errors_name_the_key(group: dict[str, Any], key: str, problem: str) -> None:
    data = {"destinations": {"ai1": _dicom("A1", 104), "ai2": _dicom("A2", 105),
                             "sub": {"type": "group", "members": ["ai1", "ai2"]},
                             "ai": {"type": "group", **group}},
            "routes": [{"to": ["ai"]}]}
    with pytest.raises(ConfigError) as err:
        from_dict(data, Path("."), "test")
    assert err.value.key == key and problem in err.value.problem, (err.value.key,
                                                                   err.value.problem)


def test_a_group_takes_no_forwarding_while_receiving() -> None:
    with pytest.raises(ConfigError) as err:
        from_dict({"destinations": {"ai1": _dicom("A1", 104), "ai2": _dicom("A2", 105),
                                    "ai": {"type": "group", "members": ["ai1", "ai2"]}},
                   "routes": [{"to": ["ai"], "forward": "immediate"}]}, Path("."), "test")
    assert err.value.key == "routes[0].forward" and "whole" in err.value.problem


def _study(state: State, study: str, patient: str) -> None:
    state.record_instance({"StudyInstanceUID": study, "SeriesInstanceUID": f"{study}.1",
                           "SOPInstanceUID": f"{study}.1.1", "SOPClassUID": CT,
                           "PatientID": patient, "Modality": "CT"}, EXPLICIT,
                          f"data/{study}/{study}.1.1.dcm", 100, "MOD", "DICOMROUTER")
    seen = state.study(study)
    assert seen is not None and state.route_study(study, ["ai"], ["r"], seen)


def test_group_assignments_on_both_backends(state: State) -> None:
    _study(state, "1.29.1", "P1")
    _study(state, "1.29.2", "P2")
    assert state.group_member("ai", "1.29.1") is None
    assert state.group_assign("ai", "1.29.1", "ai1", "round_robin", "P1") == "ai1"
    # another process decided first: its member stays, nothing written
    assert state.group_assign("ai", "1.29.1", "ai2", "round_robin", "P1") == "ai1"
    time.sleep(0.01)
    assert state.group_assign("ai", "1.29.2", "ai2", "round_robin", "P2") == "ai2"
    assert state.group_last_member("ai") == "ai2"
    assert state.group_patient_member("ai", "P1") == "ai1"
    assert state.group_load("ai", ["ai1", "ai2", "ai3"]) == {"ai1": 1, "ai2": 1, "ai3": 0}
    # a move: only from the member it has
    assert state.group_assign("ai", "1.29.1", "ai3", "failover", "P1", replaces="ai1",
                              note="ai1 down") == "ai3"
    assert state.group_assign("ai", "1.29.1", "ai2", "failover", "P1", replaces="ai1") == "ai3"
    assert state.group_last_member("ai") == "ai2"  # a move is no new study for round_robin
    spread = state.group_spread("ai")
    assert spread["studies"] == {"ai2": 1, "ai3": 1} and spread["moved"] == 1
    assert {(p["study_uid"], p["member"]) for p in spread["pending"]} == {
        ("1.29.1", "ai3"), ("1.29.2", "ai2")}
    assert list(state.group_spreads()) == ["ai"]
    events = [e for _ts, e in state.history("1.29.1")]
    assert "group ai → ai1 (round_robin)" in events
    assert "group ai → ai3 (failover), moved from ai1: ai1 down" in events
    # a delivered job is no load
    job = state.claim_job("ai")
    assert job is not None and state.finish_job(job, None, 3, 1.0) == "delivered"
    assert sum(state.group_load("ai", ["ai1", "ai2", "ai3"]).values()) == 1
    # purging a study forgets its assignment (the spread does not grow for ever)
    state.purge("1.29.2")
    assert state.group_member("ai", "1.29.2") is None
    assert state.group_member("ai", "1.29.1") == "ai3"
    assert state.group_spread("ai")["studies"] == {"ai3": 1}
