"""Prior prefetch (issue 27, item 3) against real peers: Orthanc holds a patient's studies
(different modalities, dates, body parts, one older than max_age), DCMTK storescp or a second
Orthanc (answering C-FIND, already holding one prior) is the destination; a new study sent by
DCMTK storescu triggers. Also ``Prefetcher.on_order`` (the HL7 listener's entry) with C-GET."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

from dated_studies import dated_study, uid
from peers import Orthanc, StoreSCP, run_storescu, sop_uids, wait_until
from router_fixtures import Router, dicomrouter, tags_of

from dicomrouter.config import from_dict
from dicomrouter.prefetch import Prefetcher
from dicomrouter.spool import spool_for
from dicomrouter.state import state_for
from dicomrouter_bench.procs import free_port, router_env

PATIENT = "PF-0001"
study = partial(dated_study, patient=PATIENT)


def priors(root: Path) -> dict[str, list[Path]]:
    return {
        "mr-chest-10d": study(root, "mr-chest-10d", "MR", 10, "CHEST"),  # filtered: modality
        "ct-head-20d": study(root, "ct-head-20d", "CT", 20, "HEAD"),  # filtered: body part
        "ct-chest-30d": study(root, "ct-chest-30d", "CT", 30, "CHEST"),  # chosen
        "ct-chest-400d": study(root, "ct-chest-400d", "CT", 400, "CHEST"),  # chosen
        "ct-chest-3y": study(root, "ct-chest-3y", "CT", 3 * 365, "CHEST"),  # max_studies
        "ct-chest-6y": study(root, "ct-chest-6y", "CT", 6 * 365, "CHEST"),  # too old
    }


RULE = {"name": "ct-chest", "when": {"Modality": "CT"}, "from": "PACS", "max_studies": 2,
        "max_age": "5y", "modalities": ["CT"], "body_parts": ["CHEST"], "to": ["viewer"]}


def router_config(tmp: Path, pacs: Orthanc, port: int, viewer: dict[str, Any],
                  **rule: Any) -> dict[str, Any]:
    return {
        "port": port,
        "known_aes": {"PACS": {"host": "127.0.0.1", "port": pacs.dicom_port}},
        "destinations": {"viewer": viewer,
                         "archive": {"type": "folder", "path": str(tmp / "archive")}},
        "routes": [{"name": "not priors", "when": {"Prefetch": False}, "to": "archive"}],
        "prefetch": [{**RULE, **rule}],
    }


def explain(router: Router, study_uid: str) -> str:
    r = dicomrouter("explain", "--study", study_uid, "--config", str(router.config_path))
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_new_study_prefetches_the_chosen_priors_once(tmp_path: Path, orthanc,
                                                     storescp: StoreSCP) -> None:
    port = free_port()
    pacs: Orthanc = orthanc(aet="PACS", modalities={"router": ["DICOMROUTER", "127.0.0.1",
                                                               port]})
    old = priors(tmp_path / "priors")
    trigger = study(tmp_path, "ct-chest-today", "CT", 0, "CHEST")
    for files in old.values():
        pacs.upload(files)
    pacs.upload(trigger)  # the triggering study is at the PACS too: never its own prior
    viewer = {"type": "dicom", "ae_title": storescp.aet, "host": "127.0.0.1",
              "port": storescp.port}
    want = sop_uids(old["ct-chest-30d"]) | sop_uids(old["ct-chest-400d"])
    with Router(tmp_path / "router", router_config(tmp_path, pacs, port, viewer)) as router:
        assert run_storescu([tmp_path / "ct-chest-today"], port).returncode == 0
        wait_until(lambda: storescp.sop_uids() >= want, timeout=120,
                   what="the two chosen priors at the viewer")
        for name in ("ct-chest-30d", "ct-chest-400d"):
            router.wait_state(uid(old[name]), "delivered")
        router.wait_state(uid(trigger), "delivered")
        # the trigger went to the archive (Prefetch: false), not to the viewer
        assert sop_uids((tmp_path / "archive").rglob("*.dcm")) == sop_uids(trigger)
        assert storescp.sop_uids() == want
        got = {tags_of(f, "StudyDescription", "BodyPartExamined", "Modality")
               for f in storescp.files()}
        assert got == {("ct-chest-30d", "CHEST", "CT"), ("ct-chest-400d", "CHEST", "CT")}

        text = explain(router, uid(trigger))
        assert "prefetch rule 'ct-chest' triggered: done" in text, text
        assert "triggered by new study" in text
        assert f"prior {uid(trigger)}" in text and "the triggering study itself" in text
        assert f"prior {uid(old['ct-chest-6y'])}" in text and "too old" in text
        assert "filtered (modalities MR, not CT)" in text
        assert "filtered (body part HEAD, not CHEST)" in text
        assert "max_studies (2) more recent priors already chosen" in text
        for name in ("ct-chest-30d", "ct-chest-400d"):
            assert f"prior {uid(old[name])}: retrieved 4 instance(s)" in text, text
            prior_text = explain(router, uid(old[name]))
            assert "a prior, brought by rule 'ct-chest'" in prior_text, prior_text
            assert "route 'prefetch ct-chest' → viewer: MATCHED" in prior_text
            assert "route 'not priors' → archive: not matched" in prior_text

        # a second study of the patient inside suppress_for: suppressed, nothing retrieved
        second = study(tmp_path, "ct-chest-again", "CT", 0, "CHEST")
        assert run_storescu([tmp_path / "ct-chest-again"], port).returncode == 0
        router.wait_state(uid(second), "delivered")
        text = explain(router, uid(second))
        assert "prefetch rule 'ct-chest': suppressed" in text, text
        assert f"{uid(trigger)} triggered it" in text
        assert "retrieved" not in text
        assert router.log(5000).count("prefetch rule ct-chest for") == 1
        assert router.status()["ledger"]["resent"] == 0
    assert storescp.sop_uids() == want


class CrashingRouter(Router):
    """Dies (SIGKILL) right after its first prior's retrieve, before the run ends."""

    def env(self) -> dict[str, str]:
        return {**router_env(), "DICOMROUTER_CRASH_AT": "prefetch-retrieved"}


def test_a_kill_during_the_prefetch_still_delivers_each_prior_once(
        tmp_path: Path, orthanc, storescp: StoreSCP) -> None:
    port = free_port()
    pacs: Orthanc = orthanc(aet="PACS", modalities={"router": ["DICOMROUTER", "127.0.0.1",
                                                               port]})
    old = priors(tmp_path / "priors")
    for name in ("ct-chest-30d", "ct-chest-400d"):
        pacs.upload(old[name])
    trigger = study(tmp_path, "ct-chest-today", "CT", 0, "CHEST")
    viewer = {"type": "dicom", "ae_title": storescp.aet, "host": "127.0.0.1",
              "port": storescp.port}
    config = router_config(tmp_path, pacs, port, viewer)
    crashing = CrashingRouter(tmp_path / "router", config)
    crashing.start()
    try:
        assert run_storescu([tmp_path / "ct-chest-today"], port).returncode == 0
        wait_until(lambda: crashing.proc is not None and crashing.proc.poll() is not None,
                   timeout=120, what="the router killed after the first retrieve")
    finally:
        crashing.kill()
    want = sop_uids(old["ct-chest-30d"]) | sop_uids(old["ct-chest-400d"])
    with Router(tmp_path / "router", config) as router:
        wait_until(lambda: storescp.sop_uids() >= want, timeout=120,
                   what="both priors at the viewer after the restart")
        for name in ("ct-chest-30d", "ct-chest-400d"):
            router.wait_state(uid(old[name]), "delivered")
        assert router.status()["ledger"]["resent"] == 0
        text = explain(router, uid(trigger))
        assert "prefetch rule 'ct-chest' triggered: done" in text, text
    received = [tags_of(f, "SOPInstanceUID")[0] for f in storescp.files()]
    assert sorted(received) == sorted(want)  # each once


def test_a_prior_the_destination_holds_is_skipped(tmp_path: Path, orthanc) -> None:
    port = free_port()
    modalities = {"router": ["DICOMROUTER", "127.0.0.1", port]}
    pacs: Orthanc = orthanc(aet="PACS", modalities=modalities)
    dest: Orthanc = orthanc(aet="VIEWER", modalities=modalities)
    old = priors(tmp_path / "priors")
    for name in ("ct-chest-30d", "ct-chest-400d"):
        pacs.upload(old[name])
    dest.upload(old["ct-chest-30d"])  # the viewer holds this one whole
    trigger = study(tmp_path, "ct-chest-today", "CT", 0, "CHEST")
    viewer = {"type": "dicom", "ae_title": "VIEWER", "host": "127.0.0.1",
              "port": dest.dicom_port}
    with Router(tmp_path / "router", router_config(tmp_path, pacs, port, viewer)) as router:
        assert run_storescu([tmp_path / "ct-chest-today"], port).returncode == 0
        held = uid(old["ct-chest-400d"])
        wait_until(lambda: held in {s["MainDicomTags"]["StudyInstanceUID"]
                                    for s in dest.get("/studies?expand")},
                   timeout=120, what="the prior the viewer lacked there")
        router.wait_state(held, "delivered")
        text = explain(router, uid(trigger))
        assert f"prior {uid(old['ct-chest-30d'])}: skipped: held by viewer (4 ≥ 4" in text, text
        assert f"prior {held}: retrieved 4 instance(s)" in text
        assert router.study_state(uid(old["ct-chest-30d"])) is None  # never fetched


def test_on_order_triggers_a_c_get_of_the_priors(tmp_path: Path, orthanc) -> None:
    pacs: Orthanc = orthanc(aet="PACS", modalities={"router": ["DICOMROUTER", "127.0.0.1",
                                                               free_port()]})
    old = priors(tmp_path / "priors")
    for files in old.values():
        pacs.upload(files)
    raw = router_config(tmp_path, pacs, free_port(), {"type": "folder",
                                                       "path": str(tmp_path / "viewer")},
                        name="orders", trigger="order", when={"modality": "CT"}, retrieve="get")
    raw.update({"spool": str(tmp_path / "spool"), "web": {"enabled": False}})
    cfg = from_dict(raw, tmp_path, "test")
    state = state_for(cfg)
    spool = spool_for(cfg, state)
    prefetcher = Prefetcher(cfg, state, spool)
    order = {"message_type": "ORM^O01", "patient_id": PATIENT, "issuer": "", "patient_name":
             "SYNTHETIC^X", "birth_date": "19700101", "sex": "O", "accession": "ACC-NEW",
             "requested_procedure_id": "RP1", "modality": "CT", "scheduled": "20261207120000",
             "study_uid": "1.2.826.0.1.3680043.8.498.424242", "sending_application": "RIS",
             "sending_facility": "H", "control_id": "MSG-1"}
    try:
        prefetcher.on_order({**order, "modality": "MR", "control_id": "MSG-0"})  # no match
        assert state.prefetch_queue() == []
        prefetcher.on_order(order)
        prefetcher.on_order(order)  # the same message again: nothing new
        prefetcher.on_order({**order, "control_id": "MSG-2", "accession": "ACC-2"})
        queued = state.prefetch_queue()
        assert [r["trigger_key"] for r in queued] == ["order:MSG-1"], queued
        row = state.prefetch_claim()
        assert row is not None
        started = time.time()
        prefetcher.run(row)
        assert time.time() - started < 120
        for name in ("ct-chest-30d", "ct-chest-400d"):
            got = state.instances(uid(old[name]))
            assert {i.sop_uid for i in got} == sop_uids(old[name])
            assert {i.tags["_PrefetchRule"] for i in got} == {"orders"}
        for name in ("mr-chest-10d", "ct-head-20d", "ct-chest-3y", "ct-chest-6y"):
            assert state.instances(uid(old[name])) == []
        history = [t for _ts, t in state.history(order["study_uid"])]
        assert any("triggered by order MSG-1 (ORM^O01" in t for t in history), history
        assert any("suppressed: order MSG-2" in t for t in history), history
        assert state.prefetch_runs(order["study_uid"])[0]["state"] == "done"
    finally:
        prefetcher.stop()
        spool.stop()
        state.close()


def test_priors_from_a_dicomweb_source_that_is_not_polled(tmp_path: Path, orthanc,
                                                          storescp: StoreSCP) -> None:
    pacs: Orthanc = orthanc(aet="PACS", dicomweb=True)
    old = priors(tmp_path / "priors")
    for files in old.values():
        pacs.upload(files)
    trigger = study(tmp_path, "ct-chest-today", "CT", 0, "CHEST")
    pacs.upload(trigger)  # a polled source would pull this one (and the priors) by itself
    port = free_port()
    viewer = {"type": "dicom", "ae_title": storescp.aet, "host": "127.0.0.1",
              "port": storescp.port}
    config = router_config(tmp_path, pacs, port, viewer, **{"from": "web"})
    config["sources"] = {"web": {"type": "dicomweb", "url": f"{pacs.url}/dicom-web",
                                 "poll": False, "lookback": "all", "interval": "1s"}}
    want = sop_uids(old["ct-chest-30d"]) | sop_uids(old["ct-chest-400d"])
    with Router(tmp_path / "router", config) as router:
        assert run_storescu([tmp_path / "ct-chest-today"], port).returncode == 0
        wait_until(lambda: storescp.sop_uids() >= want, timeout=120,
                   what="the two chosen priors at the viewer, over WADO-RS")
        for name in ("ct-chest-30d", "ct-chest-400d"):
            router.wait_state(uid(old[name]), "delivered")
        router.wait_state(uid(trigger), "delivered")
        text = explain(router, uid(trigger))
        assert "(QIDO-RS, WADO-RS)" in text, text
        assert "filtered (body part HEAD, not CHEST)" in text
        assert "too old" in text and "the triggering study itself" in text
        assert router.status()["sources"] == [] or all(
            not s.get("last_poll") for s in router.status()["sources"])
    assert storescp.sop_uids() == want
    assert sop_uids((tmp_path / "archive").rglob("*.dcm")) == sop_uids(trigger)
