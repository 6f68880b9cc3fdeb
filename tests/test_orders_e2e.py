"""Issue 27 where its parts meet: HL7 orders in (python-hl7's ``mllp_send`` as the HIS), prior
prefetch (Orthanc as the PACS holding priors), reconciliation (``coerce`` from the HL7 store) and
routes on the order's pseudo-keys, with DCMTK storescu as the modality and storescp as the
destination. Every part is tested alone in its own file; here one router runs them together.

1. an ORM^O01 → ACK AA → the ``trigger: order`` rule (``when`` on the order's modality)
   retrieves the chosen priors; the same message again (same control id) retrieves nothing;
2. an ORM's demographics correct a study carrying its accession with a wrong PatientID / name
   (the spool copy unchanged, the history before → after); after an ADT^A40 a study under the
   old PatientID goes out with the new one;
3. ``OrderPriority`` / ``OrderModality`` pick the destination; a study without an order goes the
   fallback way;
4. kill -9 right after the ORM's ACK, the PACS down: after the restart the priors arrive once.
"""

from __future__ import annotations

import hashlib
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from dated_studies import dated_study, uid
from hl7_peer import fields, message, mllp_send, msa, msh
from peers import Orthanc, StoreSCP, run_storescu, sop_uids, wait_until
from pydicom import dcmread
from router_fixtures import Router, dataset_bytes, dicomrouter, tags_of

from dicomrouter.config import load
from dicomrouter.state import State, state_for
from dicomrouter_bench.procs import free_port, router_env

PATIENT = "E2E-0001"
study = partial(dated_study, patient=PATIENT)
FAST_RETRY = {"initial": "1s", "max_delay": "2s", "max_attempts": 100}

pytestmark = pytest.mark.usefixtures("dcmtk_available")


# ---- the HIS's messages ------------------------------------------------------------------------

def pid(patient: str = PATIENT, name: str = "SYNTHETIC^ORDERED", birth: str = "19650412",
        sex: str = "F") -> list[str]:
    return fields("PID", f1="1", f3=f"{patient}^^^HOSP", f5=name, f7=birth, f8=sex)


def orm(control: str, accession: str, modality: str = "CT", priority: str = "R",
        patient: str = PATIENT, name: str = "SYNTHETIC^ORDERED") -> str:
    """An ORM^O01 as a RIS sends it without a Study Instance UID (no ZDS): accession OBR-18,
    requested procedure OBR-19, modality OBR-24, priority in ORC-7.6 / OBR-27.6."""
    return message(msh("ORM^O01", control, version="2.3.1"), pid(patient, name),
                   fields("ORC", f1="NW", f2="PL" + control, f3="FL" + control,
                          f7=f"^^^20261208093000^^{priority}", f21="Main Radiology"),
                   fields("OBR", f1="1", f2="PL" + control, f3="FL" + control,
                          f4=f"{modality}CHEST^{modality} Chest", f18=accession,
                          f19="RP" + control, f24=modality,
                          f27=f"^^^20261208093000^^{priority}"))


def a40(control: str, new: str, old: str, name: str) -> str:
    """ADT^A40: the patient ``old`` (MRG-1) merged into ``new`` (PID-3)."""
    return message(msh("ADT^A40", control), fields("EVN", f1="A40"), pid(new, name),
                   fields("MRG", f1=f"{old}^^^HOSP"))


def send(router: Router, text: str, tmp: Path, name: str) -> None:
    code, control, reason = msa(mllp_send(router.config["hl7"]["port"], text, tmp, name))
    assert code == "AA", (code, control, reason)


# ---- studies -----------------------------------------------------------------------------------

def priors(root: Path) -> dict[str, list[Path]]:
    """The patient's studies at the PACS: two CT chest priors the rule chooses, and what it
    must not take (another modality, another body part, too old, one more than max_studies)."""
    return {
        "mr-chest-10d": study(root, "mr-chest-10d", "MR", 10),  # filtered: modality
        "ct-head-20d": study(root, "ct-head-20d", "CT", 20, "HEAD"),  # filtered: body part
        "ct-chest-30d": study(root, "ct-chest-30d", "CT", 30),  # chosen
        "ct-chest-400d": study(root, "ct-chest-400d", "CT", 400),  # chosen
        "ct-chest-3y": study(root, "ct-chest-3y", "CT", 3 * 365),  # max_studies
        "ct-chest-6y": study(root, "ct-chest-6y", "CT", 6 * 365),  # too old
        "other-patient": study(root, "other-patient", "CT", 5, patient="E2E-9999"),
    }


CHOSEN = ("ct-chest-30d", "ct-chest-400d")


# ---- the router --------------------------------------------------------------------------------

def router_config(tmp: Path, port: int, pacs: Orthanc | None, viewer: StoreSCP,
                  **extra: Any) -> dict[str, Any]:
    """HL7 listener + hl7_rules handing CT orders to the prefetch + an order-triggered prefetch
    rule + the viewer (storescp) and an archive folder for what is not a prior."""
    cfg: dict[str, Any] = {
        "port": port,
        "hl7": {"bind": "127.0.0.1", "port": free_port()},
        "hl7_rules": [{"name": "orders", "when": {"MessageType": {"regex": "^(ORM|OMI)"}},
                       "prefetch": True},
                      {"name": "adt", "when": {"MessageType": {"regex": "^ADT"}}}],
        "destinations": {
            "viewer": {"type": "dicom", "ae_title": viewer.aet, "host": "127.0.0.1",
                       "port": viewer.port},
            "archive": {"type": "folder", "path": str(tmp / "archive")}},
        "routes": [{"name": "not priors", "when": {"Prefetch": False}, "to": "archive"}],
        "prefetch": [{"name": "ordered-ct", "trigger": "order",
                      "when": {"modality": "CT", "sending_facility": "HOSP"},
                      "from": "PACS", "max_studies": 2, "max_age": "5y",
                      "modalities": ["CT"], "body_parts": ["CHEST"], "to": ["viewer"],
                      "suppress_for": "0s",  # only the control id keeps a resent order out
                      "retry": FAST_RETRY}],
    }
    if pacs is not None:
        cfg["known_aes"] = {"PACS": {"host": "127.0.0.1", "port": pacs.dicom_port}}
    cfg.update(extra)
    return cfg


def read(router: Router, fn: Any) -> Any:
    state: State = state_for(load(router.config_path, secrets=False), readonly=True)
    try:
        return fn(state)
    finally:
        state.close()


def handled(router: Router, n: int) -> bool:
    rows = read(router, lambda s: s.hl7_messages(1000))
    return len(rows) == n and all(r["handled_at"] for r in rows)


def explain(router: Router, study_uid: str) -> str:
    r = dicomrouter("explain", "--study", study_uid, "--config", str(router.config_path))
    assert r.returncode == 0, r.stderr
    return r.stdout


def runs(router: Router) -> list[dict[str, Any]]:
    return read(router, lambda s: s.prefetch_queue())


# ---- 1. HL7 order → prefetch -------------------------------------------------------------------

def test_an_hl7_order_prefetches_the_chosen_priors_once(tmp_path: Path, orthanc,
                                                        storescp: StoreSCP) -> None:
    port = free_port()
    pacs: Orthanc = orthanc(aet="PACS", modalities={"router": ["DICOMROUTER", "127.0.0.1",
                                                               port]})
    old = priors(tmp_path / "priors")
    for files in old.values():
        pacs.upload(files)
    want = sop_uids(old["ct-chest-30d"]) | sop_uids(old["ct-chest-400d"])
    with Router(tmp_path / "router", router_config(tmp_path, port, pacs, storescp)) as router:
        # an MR order of the patient: hl7_rules hand it on, the rule's when refuses it
        send(router, orm("MR-1", "ACC-MR-1", modality="MR"), tmp_path, "mr.hl7")
        send(router, orm("CT-1", "ACC-CT-1"), tmp_path, "ct.hl7")
        wait_until(lambda: storescp.sop_uids() >= want, timeout=120,
                   what="the two chosen priors at the viewer")
        for name in CHOSEN:
            router.wait_state(uid(old[name]), "delivered")
        wait_until(lambda: [r["state"] for r in read(
            router, lambda s: s.prefetch_runs("", ("order:CT-1",)))] == ["done"], timeout=60,
            what="the prefetch run done")
        assert storescp.sop_uids() == want
        got = {tags_of(f, "StudyDescription", "PatientID") for f in storescp.files()}
        assert got == {("ct-chest-30d", PATIENT), ("ct-chest-400d", PATIENT)}
        assert read(router, lambda s: s.prefetch_runs("", ("order:MR-1",))) == []

        # each prior's explain names the rule and the order that brought it
        for name in CHOSEN:
            text = explain(router, uid(old[name]))
            assert "a prior, brought by rule 'ordered-ct' for order:CT-1" in text, text
            assert "route 'prefetch ordered-ct' → viewer: MATCHED" in text
            assert "route 'not priors' → archive: not matched" in text

        # the same order again (the HIS did not see the ACK): ACKed, nothing retrieved
        before = len(storescp.files())
        send(router, orm("CT-1", "ACC-CT-1"), tmp_path, "ct-again.hl7")
        wait_until(lambda: handled(router, 3), timeout=30, what="the resent order handled")
        assert [r["trigger_key"] for r in read(
            router, lambda s: s.prefetch_runs("", ("order:CT-1",)))] == ["order:CT-1"]
        assert router.log(5000).count("prefetch rule ordered-ct for order:CT-1") == 1

        # the ordered study arrives: its explain tells what its order prefetched and why
        ordered = study(tmp_path, "ordered", accession="ACC-CT-1")
        assert run_storescu([tmp_path / "ordered"], port).returncode == 0
        router.wait_state(uid(ordered), "delivered")
        text = explain(router, uid(ordered))
        assert "expected by HL7 order CT-1" in text, text
        assert "prefetch rule 'ordered-ct' triggered: done" in text, text
        assert "triggered by order CT-1 (ORM^O01" in text
        assert "too old" in text and "filtered (modalities MR, not CT)" in text
        assert "filtered (body part HEAD, not CHEST)" in text
        assert "max_studies (2) more recent priors already chosen" in text
        for name in CHOSEN:
            assert f"prior {uid(old[name])}: retrieved 4 instance(s)" in text, text
        st = dicomrouter("status", "--study", uid(ordered), "--config", str(router.config_path))
        assert st.returncode == 0, st.stderr
        assert "expected by HL7 order CT-1" in st.stdout
        assert "prefetch rule 'ordered-ct': triggered by order CT-1" in st.stdout, st.stdout
        assert len(storescp.files()) == before
        assert router.status()["ledger"]["resent"] == 0
        assert "Traceback" not in router.log(5000)
    assert sop_uids(storescp.files()) == want
    assert sop_uids((tmp_path / "archive").rglob("*.dcm")) == sop_uids(ordered)


# ---- 2. HL7 → coerce ---------------------------------------------------------------------------

def spool_files(router: Router, study_uid: str) -> list[Path]:
    keys = read(router, lambda s: [i.key for i in s.instances(study_uid)])
    return [router.spool / k for k in keys]


def same_bytes(spooled: list[Path], sent: list[Path]) -> bool:
    """The spool's files hold the datasets the modality sent, byte for byte."""
    def digests(paths: list[Path]) -> set[str]:
        return {hashlib.sha256(dataset_bytes(p)).hexdigest() for p in paths}
    return len(spooled) == len(sent) and digests(spooled) == digests(sent)


def test_hl7_demographics_and_merge_correct_what_goes_out(tmp_path: Path,
                                                          storescp: StoreSCP) -> None:
    port = free_port()
    config = router_config(tmp_path, port, None, storescp, prefetch=[],
                           keep_after_delivery=True, routes=[
        {"name": "reconciled", "to": "viewer",
         "coerce": {"mode": "overwrite", "sources": ["hl7"]}}])
    with Router(tmp_path / "router", config) as router:
        send(router, orm("O-1", "ACC-777", patient="H123456", name="MÜLLER^JÜRGEN"),
             tmp_path, "orm.hl7")
        wait_until(lambda: handled(router, 1), timeout=30, what="the order handled")
        wrong = study(tmp_path, "wrong", accession="ACC-777", patient="TMP-77",
                      patient_name="UNKNOWN^PATIENT", series=1, instances=3)
        assert run_storescu([tmp_path / "wrong"], port).returncode == 0
        router.wait_state(uid(wrong), "delivered")
        out = [f for f in storescp.files() if tags_of(f, "StudyInstanceUID")[0] == uid(wrong)]
        assert len(out) == 3
        for f in out:
            ds = dcmread(f, stop_before_pixels=True)
            assert (ds.PatientID, str(ds.PatientName), ds.IssuerOfPatientID,
                    ds.PatientBirthDate, ds.PatientSex, ds.AccessionNumber) == (
                "H123456", "MÜLLER^JÜRGEN", "HOSP", "19650412", "F", "ACC-777")
        spooled = spool_files(router, uid(wrong))
        assert same_bytes(spooled, wrong)  # the spool keeps what the modality sent
        for f in spooled:
            assert tags_of(f, "PatientID", "PatientName") == ("TMP-77", "UNKNOWN^PATIENT")
        history = [t for _ts, t in read(router, lambda s: s.history(uid(wrong)))]
        coerced = [t for t in history if t.startswith("coerce for viewer")]
        assert len(coerced) == 1, history
        assert "hl7 by AccessionNumber 'ACC-777'" in coerced[0]
        assert "PatientID 'TMP-77' → 'H123456'" in coerced[0]
        assert "PatientName 'UNKNOWN^PATIENT' → 'MÜLLER^JÜRGEN'" in coerced[0]

        # the patient is merged into H999999; a study under the old id, its accession unknown
        send(router, a40("M-1", "H999999", "H123456", "MÜLLER^JÜRGEN^K"), tmp_path,
             "a40.hl7")
        wait_until(lambda: handled(router, 2), timeout=30, what="the merge handled")
        later = study(tmp_path, "later", accession="ACC-NONE", patient="H123456",
                      patient_name="MÜLLER^JÜRGEN", series=1, instances=2)
        assert run_storescu([tmp_path / "later"], port).returncode == 0
        router.wait_state(uid(later), "delivered")
        out = [f for f in storescp.files() if tags_of(f, "StudyInstanceUID")[0] == uid(later)]
        assert len(out) == 2
        for f in out:
            assert tags_of(f, "PatientID", "PatientName", "AccessionNumber") == (
                "H999999", "MÜLLER^JÜRGEN^K", "ACC-NONE")
        assert same_bytes(spool_files(router, uid(later)), later)
        history = [t for _ts, t in read(router, lambda s: s.history(uid(later)))]
        assert any("PatientID 'H123456' → 'H999999'" in t for t in history), history
        assert "Traceback" not in router.log(5000)


# ---- 3. routes on the order --------------------------------------------------------------------

def test_order_pseudo_keys_pick_the_destination(tmp_path: Path, storescp: StoreSCP) -> None:
    port = free_port()
    config = router_config(tmp_path, port, None, storescp, prefetch=[], destinations={
        "reading": {"type": "dicom", "ae_title": storescp.aet, "host": "127.0.0.1",
                    "port": storescp.port},
        "mr": {"type": "folder", "path": str(tmp_path / "mr")},
        "routine": {"type": "folder", "path": str(tmp_path / "routine")}}, routes=[
        {"name": "stat ct", "when": {"OrderPriority": "S", "OrderModality": "CT"},
         "to": "reading"},
        {"name": "mr orders at once", "when": {"OrderModality": "MR"}, "to": "mr",
         "forward": "immediate"},
        {"name": "the rest", "to": "routine", "fallback": True}])
    with Router(tmp_path / "router", config) as router:
        send(router, orm("S-1", "ACC-STAT", priority="S"), tmp_path, "stat.hl7")
        send(router, orm("R-1", "ACC-ROUTINE", priority="R"), tmp_path, "routine.hl7")
        send(router, orm("M-1", "ACC-MR", modality="MR", priority="S"), tmp_path, "mr.hl7")
        wait_until(lambda: handled(router, 3), timeout=30, what="the orders handled")
        stat = study(tmp_path, "stat", accession="ACC-STAT")
        routine = study(tmp_path, "routine", accession="ACC-ROUTINE")
        mr = study(tmp_path, "mr-study", "MR", accession="ACC-MR")
        # a STAT-looking study without an order: no order, no value, the fallback
        unordered = study(tmp_path, "unordered", accession="ACC-NO-ORDER")
        for name in ("stat", "routine", "mr-study", "unordered"):
            assert run_storescu([tmp_path / name], port).returncode == 0
        for files in (stat, routine, mr, unordered):
            router.wait_state(uid(files), "delivered")
        assert sop_uids(storescp.files()) == sop_uids(stat)
        assert sop_uids((tmp_path / "mr").rglob("*.dcm")) == sop_uids(mr)
        assert sop_uids((tmp_path / "routine").rglob("*.dcm")) == \
            sop_uids(routine) | sop_uids(unordered)
        text = explain(router, uid(stat))
        assert "route 'stat ct' → reading: MATCHED" in text, text
        assert "OrderPriority" in text and "expected by HL7 order S-1" in text
        text = explain(router, uid(unordered))
        assert "route 'stat ct' → reading: not matched" in text, text
        assert "route 'the rest' [fallback] → routine: MATCHED" in text
        # the immediate route forwarded while the MR study was still arriving: its log says so
        assert "route 'mr orders at once' matched while receiving" in router.log(5000)


# ---- 4. kill -9 after the ACK ------------------------------------------------------------------

def test_priors_arrive_once_after_a_kill_right_after_the_ack(tmp_path: Path, orthanc,
                                                             storescp: StoreSCP) -> None:
    port = free_port()
    pacs: Orthanc = orthanc(aet="PACS", modalities={"router": ["DICOMROUTER", "127.0.0.1",
                                                               port]})
    old = priors(tmp_path / "priors")
    for name in CHOSEN:
        pacs.upload(old[name])
    pacs.stop()  # the PACS is down while the order arrives: the prefetch cannot have run
    want = sop_uids(old["ct-chest-30d"]) | sop_uids(old["ct-chest-400d"])
    config = router_config(tmp_path, port, pacs, storescp)
    router = Router(tmp_path / "router", config)
    router.start()
    try:
        send(router, orm("K-1", "ACC-K-1"), tmp_path, "k.hl7")
        router.kill()  # right after the ACK: handled, handed on, run or none of these yet
    finally:
        router.kill()
    assert read(router, lambda s: [r["control_id"] for r in s.hl7_messages()]) == ["K-1"]
    assert storescp.files() == []
    pacs.start()
    with Router(tmp_path / "router", config) as router:
        wait_until(lambda: storescp.sop_uids() >= want, timeout=120,
                   what="both priors at the viewer after the restart")
        for name in CHOSEN:
            router.wait_state(uid(old[name]), "delivered")
        wait_until(lambda: [r["state"] for r in read(
            router, lambda s: s.prefetch_runs("", ("order:K-1",)))] == ["done"], timeout=60,
            what="the prefetch run done")
        # the same order again after the restart: nothing more
        send(router, orm("K-1", "ACC-K-1"), tmp_path, "k-again.hl7")
        wait_until(lambda: handled(router, 2), timeout=30, what="the resent order handled")
        assert router.status()["ledger"]["resent"] == 0
    received = [tags_of(f, "SOPInstanceUID")[0] for f in storescp.files()]
    assert sorted(received) == sorted(want)  # each once


class CrashingRouter(Router):
    """Dies (SIGKILL) right after handing its first order to the prefetch, before the message
    is marked handled: the next start hands the same order over again."""

    def env(self) -> dict[str, str]:
        return {**router_env(), "DICOMROUTER_CRASH_AT": "hl7-handed-on"}


def test_an_order_handed_on_twice_by_a_crash_prefetches_once(tmp_path: Path, orthanc,
                                                             storescp: StoreSCP) -> None:
    """The HL7 handler hands the order on before it marks the message handled (at least
    once); a kill -9 in between makes the restart hand it on again: the prefetch's trigger
    row (by control id) makes it once."""
    port = free_port()
    pacs: Orthanc = orthanc(aet="PACS", modalities={"router": ["DICOMROUTER", "127.0.0.1",
                                                               port]})
    old = priors(tmp_path / "priors")
    for name in CHOSEN:
        pacs.upload(old[name])
    want = sop_uids(old["ct-chest-30d"]) | sop_uids(old["ct-chest-400d"])
    config = router_config(tmp_path, port, pacs, storescp)
    crashing = CrashingRouter(tmp_path / "router", config)
    crashing.start()
    try:
        hl7_port = config["hl7"]["port"]
        # the ACK leaves before the handler's crash (the store answers first); should the kill
        # win the race, the RIS sends the message again after the restart, as a RIS does
        acked = True
        try:
            acked = msa(mllp_send(hl7_port, orm("H-1", "ACC-H-1"), tmp_path, "h.hl7"))[0] \
                == "AA"
        except Exception:  # noqa: BLE001 - no ACK (mllp_send failed, or printed nothing)
            acked = False
        wait_until(lambda: crashing.proc is not None and crashing.proc.poll() is not None,
                   timeout=60, what="the router killed after handing the order on")
    finally:
        crashing.kill()
    rows = read(crashing, lambda s: s.hl7_messages())
    assert [(r["control_id"], r["handled_at"]) for r in rows] == [("H-1", None)]
    with Router(tmp_path / "router", config) as router:
        if not acked:
            send(router, orm("H-1", "ACC-H-1"), tmp_path, "h-again.hl7")
        wait_until(lambda: storescp.sop_uids() >= want, timeout=120,
                   what="both priors at the viewer after the restart")
        for name in CHOSEN:
            router.wait_state(uid(old[name]), "delivered")
        wait_until(lambda: [r["state"] for r in read(
            router, lambda s: s.prefetch_runs("", ("order:H-1",)))] == ["done"], timeout=60,
            what="the prefetch run done")
        assert all(r["handled_at"] for r in read(router, lambda s: s.hl7_messages()))
        assert router.status()["ledger"]["resent"] == 0
        assert router.log(5000).count("prefetch rule ordered-ct for order:H-1") == 1
    received = [tags_of(f, "SOPInstanceUID")[0] for f in storescp.files()]
    assert sorted(received) == sorted(want)  # each once


def test_an_order_rule_nothing_hands_orders_to_is_said_at_start(tmp_path: Path,
                                                                 storescp: StoreSCP) -> None:
    """hl7_rules that record but never hand on (no ``prefetch: true``): the order rule would
    wait forever in silence; the start says so, and an order queues nothing."""
    port = free_port()
    config = router_config(tmp_path, port, None, storescp,
                           known_aes={"PACS": {"host": "127.0.0.1", "port": free_port()}},
                           hl7_rules=[{"name": "record only",
                                       "when": {"MessageType": "ORM^O01"}}])
    with Router(tmp_path / "router", config) as router:
        wait_until(lambda: "no HL7 order reaches them" in router.log(400), timeout=30,
                   what="the warning")
        assert "prefetch rule(s) ordered-ct: trigger: order, but no hl7_rules rule has " \
               "prefetch: true" in router.log(400)
        send(router, orm("N-1", "ACC-N-1"), tmp_path, "n.hl7")
        wait_until(lambda: handled(router, 1), timeout=30, what="the order handled")
        assert read(router, lambda s: s.prefetch_runs("", ("order:N-1",))) == []
