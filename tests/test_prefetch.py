"""Prior prefetch without peers: the rules' configuration (errors name the key), the choice
of priors on candidates built to trip each filter, the routing keys, and the state's trigger
queue on both backends (SQLite and a real PostgreSQL)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from dicomrouter.config import ConfigError, from_dict
from dicomrouter.prefetch.priors import CHOSEN, Candidate, Series, choose, cutoff
from dicomrouter.routing import conditions_hold, route
from dicomrouter.state import Instance, State

BASE: dict[str, Any] = {
    "known_aes": {"PACS": {"host": "127.0.0.1", "port": 104}},
    "destinations": {"viewer": {"type": "folder", "path": "/tmp/viewer"},
                     "archive": {"type": "folder", "path": "/tmp/archive"}},
    "routes": [{"name": "others", "when": {"Prefetch": False}, "to": "archive"}],
}
RULE: dict[str, Any] = {"name": "ct-chest", "when": {"Modality": "CT"}, "from": "PACS",
                        "to": "viewer", "max_studies": 2, "max_age": "5y",
                        "modalities": ["ct"], "body_parts": ["Chest"]}


def config(*rules: dict[str, Any], **extra: Any) -> Any:
    return from_dict({**BASE, "prefetch": list(rules), **extra}, Path("/tmp"), "test")


def problem(*rules: dict[str, Any], **extra: Any) -> str:
    with pytest.raises(ConfigError) as exc:
        config(*rules, **extra)
    return str(exc.value)


def test_a_rule_is_validated_and_adds_its_route_in_front() -> None:
    cfg = config(RULE)
    rule = cfg.prefetch[0]
    assert rule.source == "PACS" and rule.to == ("viewer",) and rule.trigger == "study"
    assert rule.max_age == 5 * 365 * 86400 and rule.modalities == ("CT",)
    assert rule.body_parts == ("CHEST",) and rule.suppress_for == 3600
    assert [r.name for r in cfg.routes] == ["prefetch ct-chest", "others"]
    assert cfg.routes[0].to == ("viewer",) and cfg.prefetch_workers == 2
    assert config({**RULE, "max_age": "180d"}).prefetch[0].max_age == 180 * 86400
    assert config({**RULE, "max_age": "26w"}).prefetch[0].max_age == 26 * 7 * 86400


@pytest.mark.parametrize("change, expected", [
    ({"from": "NOPE"}, "prefetch[0].from: 'NOPE' is neither a known_aes entry"),
    ({"to": ["nowhere"]}, "prefetch[0].to: unknown destination 'nowhere'"),
    ({"max_age": "five years"}, "prefetch[0].max_age: expected an age like 5y"),
    ({"max_studies": 0}, "prefetch[0].max_studies"),
    ({"when": {"Modalty": "CT"}}, "prefetch[0].when.Modalty: not a DICOM keyword (did you "
                                  "mean 'Modality'?)"),
    ({"trigger": "order", "when": {"Modality": "CT"}},
     "prefetch[0].when.Modality: unknown key (one of message_type, patient_id"),
    ({"trigger": "hl7"}, "prefetch[0].trigger"),
    ({"form": "PACS"}, "prefetch[0].form: unknown key (did you mean 'from'?"),
    ({"timeout": 0}, "prefetch[0].timeout: must be more than 0"),
])
def test_a_wrong_rule_names_the_key(change: dict[str, Any], expected: str) -> None:
    assert expected in problem({**RULE, **change})


def test_a_route_on_prefetch_rule_names_a_rule() -> None:
    assert "routes[0].when.PrefetchRule: unknown prefetch rule 'ct'" in problem(
        RULE, routes=[{"when": {"PrefetchRule": "ct"}, "to": "archive"}])
    config(RULE, routes=[{"when": {"PrefetchRule": "ct-chest"}, "to": "archive"}])


def test_rule_names_are_unique_and_from_may_be_a_dicom_source() -> None:
    assert "prefetch[1].name: 'ct-chest' is used twice" in problem(RULE, RULE)
    cfg = config({**RULE, "from": "pacs"}, sources={"pacs": {
        "type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}})
    assert cfg.prefetch[0].source == "pacs"
    assert "neither a known_aes entry" in problem({**RULE, "from": "box"}, sources={"box": {
        "type": "orthanc", "url": "http://127.0.0.1:8042"}})


def test_an_order_rule_tests_the_orders_fields() -> None:
    rule = config({**RULE, "trigger": "order",
                   "when": {"modality": ["CT", "MR"], "sending_facility": "/^MAIN/"}}).prefetch[0]
    assert {c.key for c in rule.when} == {"modality", "sending_facility"}


def _inst(study: str, **tags: str) -> Instance:
    return Instance(f"{study}.1", study, f"{study}.s", "", "", f"data/{study}/x.dcm", 1, "PACS",
                    "DICOMROUTER", {"Modality": "CT", **tags})


def test_the_routing_keys_tell_a_prior_from_other_studies() -> None:
    cfg = config(RULE, routes=[{"name": "only priors", "when": {"Prefetch": True},
                                "to": "archive"}])
    prior = route(cfg.routes, [_inst("1.1", _PrefetchRule="ct-chest")])
    assert prior.destinations == ("viewer", "archive")
    other = route(cfg.routes, [_inst("1.2")])
    assert other.destinations == ()
    assert "PrefetchRule = ct-chest: fails (study has none)" in other.summary()


def test_a_study_rule_may_test_the_studys_hl7_order() -> None:
    """``when: {OrderPriority: S}`` on a ``trigger: study`` rule reads the study's HL7 order
    (the same Order* keys routes have; no order: no value)."""
    rule = config({**RULE, "when": {"Modality": "CT", "OrderPriority": "S"}}).prefetch[0]
    orders = {"ACC-S": {"priority": "S"}, "ACC-R": {"priority": "R"}}
    assert conditions_hold(rule.when, [_inst("1.1", AccessionNumber="ACC-S")],
                           orders=orders.get)[0]
    for acc in ("ACC-R", "ACC-NONE"):
        assert not conditions_hold(rule.when, [_inst("1.2", AccessionNumber=acc)],
                                   orders=orders.get)[0]


def cand(uid: str, date: str, mods: tuple[str, ...] = ("CT",), accession: str = "") -> Candidate:
    return Candidate(uid, date, "120000", mods, 4, accession)


def test_the_choice_of_priors_names_why_each_is_skipped() -> None:
    rule = config(RULE).prefetch[0]
    now = time.mktime(time.strptime("20261207", "%Y%m%d"))
    oldest = cutoff(rule, now)
    assert oldest == "20211208"
    series = {"head": [Series("s1", "CT", "HEAD")], "nomod": [Series("s1", "CT", "chest ")]}
    asked: list[str] = []

    def series_of(c: Candidate) -> list[Series]:
        asked.append(c.uid)
        return series.get(c.uid, [Series("s1", "CT", "CHEST"), Series("s2", "SR", "")])

    candidates = [cand("old", "20190101"), cand("trigger", "20261207"),
                  cand("mr", "20261130", ("MR",)), cand("head", "20261120"),
                  cand("nomod", "20261110", ()), cand("a", "20250101"),
                  cand("b", "20240101"), cand("nodate", ""), cand("ordered", "20261201",
                                                                 accession="ACC9")]
    verdicts = {c.uid: v for c, v in choose(rule, candidates, "trigger", "ACC9", oldest,
                                            series_of)}
    assert verdicts["trigger"] == "skipped: the triggering study itself"
    assert verdicts["ordered"].startswith("skipped: the ordered study itself")
    assert verdicts["mr"] == "skipped: filtered (modalities MR, not CT)"
    assert verdicts["head"] == "skipped: filtered (body part HEAD, not CHEST)"
    assert verdicts["nomod"] == CHOSEN  # no ModalitiesInStudy: the series said CT, "chest "
    assert verdicts["a"] == CHOSEN
    assert verdicts["b"].startswith("skipped: max_studies (2)")
    assert verdicts["old"].startswith("skipped: too old (StudyDate 20190101")
    assert verdicts["nodate"].startswith("skipped: too old (StudyDate none")
    assert "b" not in asked and "old" not in asked  # no series query when it cannot matter
    order = [c.uid for c, _ in choose(rule, candidates, "", "", "", series_of)]
    assert order[:3] == ["trigger", "ordered", "mr"]  # most recent first


def test_triggers_are_kept_suppressed_claimed_and_retried(state: State) -> None:
    t0 = 1_000_000.0
    assert state.prefetch_trigger("r", "1.1", "P1", "1.1", {"a": 1}, 3600, t0) == ("new", None)
    outcome, row = state.prefetch_trigger("r", "1.1", "P1", "1.1", {}, 3600, t0 + 5)
    assert outcome == "seen" and row is not None and row["detail"] == {"a": 1}
    outcome, row = state.prefetch_trigger("r", "1.2", "P1", "1.2", {}, 3600, t0 + 10)
    assert outcome == "suppressed" and row is not None and row["trigger_key"] == "1.1"
    assert state.prefetch_trigger("other", "1.2", "P1", "1.2", {}, 3600, t0 + 10)[0] == "new"
    assert state.prefetch_trigger("r", "1.3", "P2", "1.3", {}, 3600, t0 + 10)[0] == "new"
    assert state.prefetch_trigger("r", "1.4", "P1", "1.4", {}, 3600, t0 + 3700)[0] == "new"
    assert state.prefetch_runs("1.2")[0]["state"] == "suppressed"
    assert state.prefetch_claim(t0 - 1) is None
    row = state.prefetch_claim(t0 + 20)
    assert row is not None and row["trigger_key"] == "1.1" and row["state"] == "running"
    state.prefetch_finished("r", "1.1", "failed", "", "PACS down", t0 + 100, 1)
    assert [r["trigger_key"] for r in state.prefetch_queue()][:1] == ["1.1"]
    # due now: rule "other" for 1.2 and 1.3 (1.1 waits for its retry, 1.4 is not due yet)
    claimed = [state.prefetch_claim(t0 + 20) for _ in range(3)]
    assert {(r["rule"], r["trigger_key"]) for r in claimed[:2] if r} == {("other", "1.2"),
                                                                         ("r", "1.3")}
    assert claimed[2] is None
    assert state.prefetch_reset_running() == 2  # a restart: interrupted runs are due again
    due = state.prefetch_claim(t0 + 200)
    assert due is not None
    state.prefetch_mark_prior("9.9", "r", "1.1")
    state.prefetch_mark_prior("9.9", "other", "1.2")  # the first rule that brought it stays
    assert state.prefetch_prior("9.9")["rule"] == "r"  # type: ignore[index]
    state.record_instance({"StudyInstanceUID": "9.9", "SeriesInstanceUID": "9.9.1",
                           "SOPInstanceUID": "9.9.1.1", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
                           "PatientID": "P1", "Modality": "CT"}, "1.2.840.10008.1.2.1",
                          "data/9.9/9.9.1.1.dcm", 10, "PACS", "DICOMROUTER")
    assert [i.tags["_PrefetchRule"] for i in state.instances("9.9")] == ["r"]


def test_a_peer_that_is_down_is_retried_with_backoff_then_given_up(tmp_path: Path) -> None:
    from dicomrouter.prefetch import Prefetcher
    from dicomrouter.spool import spool_for
    from dicomrouter.state import state_for
    from dicomrouter_bench.procs import free_port

    cfg = from_dict({**BASE, "spool": str(tmp_path / "spool"), "web": {"enabled": False},
                     "known_aes": {"PACS": {"host": "127.0.0.1", "port": free_port()}},
                     "prefetch": [{**RULE, "trigger": "order", "when": {"modality": "CT"},
                                   "timeout": "5s",
                                   "retry": {"initial": "30s", "max_attempts": 2}}]},
                    tmp_path, "test")
    state = state_for(cfg)
    spool = spool_for(cfg, state)
    now = [1_000_000.0]
    prefetcher = Prefetcher(cfg, state, spool, clock=lambda: now[0])
    try:
        prefetcher.on_order({"patient_id": "P1", "modality": "CT", "control_id": "M1",
                             "study_uid": "1.2.3", "message_type": "OMI^O23"})
        row = state.prefetch_claim(now[0])
        assert row is not None
        prefetcher.run(row)  # nothing listens on the port
        (failed,) = state.prefetch_queue()
        assert failed["state"] == "failed" and failed["attempts"] == 1
        assert failed["next_attempt"] == now[0] + 30 and "cannot associate" in \
            failed["last_error"]
        assert state.prefetch_claim(now[0] + 29) is None  # its backoff
        now[0] += 30
        row = state.prefetch_claim(now[0])
        assert row is not None
        prefetcher.run(row)
        (dead,) = state.prefetch_queue()
        assert dead["state"] == "dead" and dead["attempts"] == 2
        history = [t for _ts, t in state.history("1.2.3")]
        assert any("attempt 1 failed: cannot associate" in t and "retried in 30 s" in t
                   for t in history), history
        assert any("failed 2 time(s), gave up" in t for t in history), history
    finally:
        prefetcher.stop()
        spool.stop()
        state.close()


def test_new_studies_trigger_once_and_priors_or_studies_without_patient_id_do_not(
        tmp_path: Path) -> None:
    from dicomrouter.prefetch import Prefetcher
    from dicomrouter.spool import spool_for
    from dicomrouter.state import state_for

    cfg = from_dict({**BASE, "spool": str(tmp_path / "spool"), "web": {"enabled": False},
                     "prefetch": [RULE]}, tmp_path, "test")
    state = state_for(cfg)
    spool = spool_for(cfg, state)
    prefetcher = Prefetcher(cfg, state, spool)

    def receive(study: str, **tags: str) -> None:
        state.record_instance({"StudyInstanceUID": study, "SeriesInstanceUID": f"{study}.1",
                               "SOPInstanceUID": f"{study}.1.1", "SOPClassUID":
                               "1.2.840.10008.5.1.4.1.1.2", "Modality": "CT", **tags},
                              "1.2.840.10008.1.2.1", f"data/{study}/{study}.1.1.dcm", 10,
                              "CT_SCANNER", "DICOMROUTER")
    try:
        receive("1.1", PatientID="P1")
        receive("1.2")  # no PatientID
        receive("1.3", PatientID="P2", Modality="MR")  # when: Modality CT fails
        state.prefetch_mark_prior("1.4", "ct-chest", "1.0")
        receive("1.4", PatientID="P3")  # a prior a prefetch brought
        prefetcher.look()
        prefetcher.look()  # seen already: nothing twice
        queued = state.prefetch_queue()
        assert [(r["trigger_key"], r["patient_id"]) for r in queued] == [("1.1", "P1")]
        assert any("no PatientID" in t for _ts, t in state.history("1.2"))
        assert not any("prefetch" in t for _ts, t in state.history("1.3"))
        assert state.prefetch_runs("1.4") == []
        fresh = Prefetcher(cfg, state, spool)  # a restart: the same studies, nothing new
        fresh.look()
        assert len(state.prefetch_queue()) == 1
        assert sum("triggered by new study" in t for _ts, t in state.history("1.1")) == 1
    finally:
        spool.stop()
        state.close()


def test_runs_of_an_order_without_a_study_uid_are_found_by_its_trigger_key(
        state: State) -> None:
    """An ORM without a Study Instance UID is stored with study_uid '': the study that arrives
    with its accession finds the run by the order's trigger key, never every UID-less order."""
    t0 = 1_000_000.0
    for key in ("order:C1", "order:C2"):
        assert state.prefetch_trigger("r", key, "P" + key, "", {}, 0, t0)[0] == "new"
    assert state.prefetch_trigger("r", "1.9", "P9", "1.9", {}, 0, t0)[0] == "new"
    assert [r["trigger_key"] for r in state.prefetch_runs("", ("order:C1",))] == ["order:C1"]
    assert state.prefetch_runs("") == []
    assert sorted(r["trigger_key"] for r in state.prefetch_runs("1.9", ("order:C2", ""))) \
        == ["1.9", "order:C2"]
    assert [r["trigger_key"] for r in state.prefetch_runs("1.8")] == []
