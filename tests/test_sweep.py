"""The sweep: a routing table changed after a study arrived reaches it, without re-sending it
where it already went."""

from __future__ import annotations

from pathlib import Path

import pytest
from peers import run_storescu, wait_until
from router_fixtures import Router, dicomrouter, tags_of

from dicomrouter.config import ConfigError, from_dict
from dicomrouter.sample import generate


def files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.dcm")) if folder.exists() else []


def test_a_new_route_reaches_stored_studies_at_the_sweep(tmp_path: Path) -> None:
    study = generate(tmp_path / "study", series=1, instances=3, rows=8, cols=8, seed=141)
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    dests = {"a": {"type": "folder", "path": str(tmp_path / "a")},
             "b": {"type": "folder", "path": str(tmp_path / "b")}}
    spool = str(tmp_path / "spool")
    with Router(tmp_path / "r1", {"spool": spool, "keep_after_delivery": True,
                                  "destinations": dests,
                                  "routes": [{"name": "A", "to": "a"}]}) as router:
        assert run_storescu(study, router.port).returncode == 0
        router.wait_state(uid, "delivered")
    assert len(files(tmp_path / "a")) == 3 and not files(tmp_path / "b")
    with Router(tmp_path / "r2", {"spool": spool, "keep_after_delivery": True,
                                  "destinations": dests, "sweep": {"every": "1s"},
                                  "routes": [{"name": "A", "to": "a"},
                                             {"name": "B", "when": {"Modality": "CT"},
                                              "to": "b"}]}) as router:
        wait_until(lambda: len(files(tmp_path / "b")) == 3, timeout=90,
                   what="the study swept to b")
        router.wait_state(uid, "delivered")
        assert router.status()["ledger"]["resent"] == 0  # a was not sent again
        r = dicomrouter("status", "--study", uid, "--config", str(router.config_path))
        assert "sweep: now also to b (routes: A, B)" in r.stdout, r.stdout
        assert "Traceback" not in router.log(5000)
    assert len(files(tmp_path / "a")) == 3


@pytest.mark.parametrize(("raw", "message"), [
    ({"every": "0s"}, "sweep.every: at least 1s"),
    ({"at": "25:00"}, "sweep.at: expected HH:MM"),
    ({"daily": True}, "sweep: expected {at"),
])
def test_sweep_config_errors(tmp_path: Path, raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict({"sweep": raw}, tmp_path, "t")
    assert str(err.value).startswith(message), str(err.value)


def test_per_route_stable_ages_fire_in_their_order(tmp_path: Path) -> None:
    """A quick route (1 s) delivers first; the archive route (its own 6 s) only later, from
    the same completion; the study's history says when each fired."""
    study = generate(tmp_path / "study", series=1, instances=2, rows=8, cols=8, seed=142)
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    with Router(tmp_path / "r", {
        "stable_age": "1s",
        "destinations": {"quick": {"type": "folder", "path": str(tmp_path / "quick")},
                         "slow": {"type": "folder", "path": str(tmp_path / "slow")}},
        "routes": [{"name": "slow", "to": "slow", "stable_age": "6s"},
                   {"name": "quick", "to": "quick"}]}) as router:
        assert run_storescu(study, router.port).returncode == 0
        wait_until(lambda: len(files(tmp_path / "quick")) == 2, timeout=60,
                   what="the quick route's delivery")
        assert not files(tmp_path / "slow")  # its stable age is not over yet
        wait_until(lambda: len(files(tmp_path / "slow")) == 2, timeout=60,
                   what="the slow route's delivery")
        router.wait_state(uid, "delivered")
        r = dicomrouter("status", "--study", uid, "--config", str(router.config_path))
        history = r.stdout
        assert history.index("destinations: quick") < history.index("now also to slow"), history
        assert "route 'slow' waits for its stable age (6 s)" in history, history


@pytest.mark.parametrize("mode", ["route", "hold"])
def test_a_study_that_never_stops_receiving_is_forced(tmp_path: Path, mode: str) -> None:
    study = generate(tmp_path / "study", series=1, instances=8, rows=8, cols=8, seed=143)
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    with Router(tmp_path / "r", {
        "stable_age": "1h", "force_complete_after": "2s", "force_complete": mode,
        "destinations": {"tree": {"type": "folder", "path": str(tmp_path / "tree")}},
        "routes": [{"to": "tree"}]}) as router:

        def forced() -> bool:
            text = dicomrouter("status", "--study", uid, "--config",
                               str(router.config_path)).stdout
            return "force_complete_after (2 s) reached" in text

        for f in study:  # one instance at a time, never a pause of an hour
            assert run_storescu([f], router.port).returncode == 0
            if forced():
                break
        wait_until(forced, timeout=60, what="the forced completion")
        if mode == "route":
            wait_until(lambda: list((tmp_path / "tree").rglob("*.dcm")), timeout=60,
                       what="what had arrived, delivered")
        else:  # held (an instance sent after the hold reopens it, receiving again)
            text = dicomrouter("status", "--study", uid, "--config",
                               str(router.config_path)).stdout
            assert "held (force_complete: hold)" in text, text
            assert not list((tmp_path / "tree").rglob("*.dcm"))


def test_explain_a_spooled_study_with_a_candidate_table(tmp_path: Path) -> None:
    import yaml

    study = generate(tmp_path / "study", series=1, instances=2, rows=8, cols=8, seed=144)
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    with Router(tmp_path / "r", {
        "keep_after_delivery": True,
        "destinations": {"a": {"type": "folder", "path": str(tmp_path / "a")}},
        "routes": [{"name": "CT to a", "when": {"Modality": "CT"}, "to": "a"}]}) as router:
        assert run_storescu(study, router.port).returncode == 0
        router.wait_state(uid, "delivered")
        live = dicomrouter("explain", "--study", uid, "--config", str(router.config_path))
        assert live.returncode == 0, live.stderr
        assert "route 'CT to a' → a: MATCHED" in live.stdout, live.stdout
        candidate = tmp_path / "candidate.yml"
        candidate.write_text(yaml.safe_dump({
            "destinations": {"a": {"type": "folder", "path": "a"},
                             "mr": {"type": "folder", "path": "mr"}},
            "routes": [{"name": "MR only", "when": {"Modality": "MR"}, "to": "mr"}]}))
        shadow = dicomrouter("explain", "--study", uid, "--config", str(candidate),
                             "--spool", str(router.spool))
        assert shadow.returncode == 0, shadow.stderr
        assert "route 'MR only' → mr: not matched" in shadow.stdout, shadow.stdout
        assert "Modality = MR: fails (study has CT)" in shadow.stdout, shadow.stdout
        assert "destinations: none (kept as unrouted)" in shadow.stdout
        text = dicomrouter("status", "--study", uid, "--config", str(router.config_path)).stdout
        assert "routing: 'CT to a' matched (Modality = CT: holds (study has CT))" in text, text


def test_source_host_is_a_routing_key(tmp_path: Path) -> None:
    study = generate(tmp_path / "study", series=1, instances=1, rows=8, cols=8, seed=145)
    uid = tags_of(study[0], "StudyInstanceUID")[0]
    with Router(tmp_path / "r", {
        "destinations": {"local": {"type": "folder", "path": str(tmp_path / "local")},
                         "remote": {"type": "folder", "path": str(tmp_path / "remote")}},
        "routes": [{"when": {"SourceHost": "127.0.0.1"}, "to": "local"},
                   {"when": {"SourceHost": {"glob": "10.*"}}, "to": "remote"}]}) as router:
        assert run_storescu(study, router.port).returncode == 0
        router.wait_state(uid, "delivered")
    assert files(tmp_path / "local") and not files(tmp_path / "remote")
