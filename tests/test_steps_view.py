"""The step-by-step view of a study's processing (issue 29: "shown step by step"), read from
history lists built to break it: two routes interleaved, a retry after a failure and after a
crash, a remark between a step's lines, a remote step waiting, a step name holding ``) ``
and both quotes, a route name holding ``) ``, a route no longer configured, the results
ingested without a step running again (a crash after the chain finished)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dicomrouter.config import from_dict
from dicomrouter.processing.steps_view import StepView, parse, steps_of

CMD = ["python3", "x.py", "{input}", "{output}"]
WEIRD = "seg) done: 'it's \"x\""  # a step name that looks like the end of a line


def _routes(tmp_path: Path, *routes: dict[str, Any]) -> Any:
    cfg = from_dict({"destinations": {"pacs": {"type": "folder", "path": str(tmp_path / "p")}},
                     "routes": list(routes)}, tmp_path, "test")
    return cfg.routes


def _step(name: str, route: str, rest: str) -> str:
    return f"processing step {name!r} ({route}) {rest}" if not rest.startswith(":") else \
        f"processing step {name!r} ({route}){rest}"


def _h(*lines: str) -> list[tuple[float, str]]:
    return [(1000.0 + i, text) for i, text in enumerate(lines)]


def _by(steps: list[StepView]) -> dict[tuple[str, str], StepView]:
    return {(s.route, s.name): s for s in steps}


def test_parse_reads_quoted_names_and_routes_with_parentheses() -> None:
    assert parse(_step(WEIRD, "ai", "running")) == ("ai", WEIRD, "running", "")
    assert parse(_step(WEIRD, "ai", "done: exit code 0 after 1.0 s")) == \
        ("ai", WEIRD, "done", "exit code 0 after 1.0 s")
    # a configured route name holding ") " is tried first
    line = _step("a", "x) failed: y", "failed: exit code 2 after 0.1 s")
    assert parse(line, ["x) failed: y"]) == ("x) failed: y", "a", "failed",
                                             "exit code 2 after 0.1 s")
    assert parse(_step("a", "ai", ": result.json unreadable: bad")) == \
        ("ai", "a", None, "result.json unreadable: bad")
    assert parse("processing (ai): 2 result instance(s) ingested") == \
        ("ai", "", None, "2 result instance(s) ingested")
    assert parse("processing results: 1 result(s) of route 'ai': return:CT1") is None
    assert parse("processing step no quote (ai) running") is None
    assert parse("processing step 'unterminated (ai) running") is None
    assert parse("routed to pacs") is None


def test_a_retry_after_a_failure_is_a_new_run(tmp_path: Path) -> None:
    routes = _routes(tmp_path, {"name": "ai", "to": ["pacs"], "process": [
        {"name": "prepare", "command": CMD}, {"name": "report", "command": CMD}]})
    history = _h(_step("prepare", "ai", "running"),
                 _step("prepare", "ai", "done: exit code 0 after 0.1 s, 2 output file(s)"),
                 _step("report", "ai", "running"),
                 _step("report", "ai", "failed: exit code 1 after 0.2 s; stderr: boom"),
                 "job process:ai failed (attempt 1): ...",
                 _step("prepare", "ai", "running"))
    steps = steps_of(history, routes)
    assert [(s.name, s.state, s.attempts, s.kind) for s in steps] == [
        ("prepare", "running", 2, "command"), ("report", "pending", 1, "command")]
    assert steps[0].since == history[5][0] and steps[0].summary == ""
    assert steps[1].since is None and steps[1].summary == ""
    # then the first step fails: the second is pending in this run, not its old "failed"
    history.append((2000.0, _step("prepare", "ai", "failed: killed after its timeout (60.0 s)")))
    steps = steps_of(history, routes)
    assert [(s.name, s.state) for s in steps] == [("prepare", "failed"), ("report", "pending")]
    assert steps[0].summary == "killed after its timeout (60.0 s)"
    # third run: both done, then the results in
    history += [(3000.0, _step("prepare", "ai", "running")),
                (3001.0, _step("prepare", "ai", "done: exit code 0 after 0.1 s")),
                (3002.0, _step("report", "ai", "running")),
                (3003.0, _step("report", "ai", "done: exit code 0 after 0.3 s, 1 output file(s)")),
                (3004.0, "processing (ai): 1 result instance(s) ingested")]
    steps = steps_of(history, routes)
    assert [(s.name, s.state, s.attempts, s.since) for s in steps] == [
        ("prepare", "done", 3, 3001.0), ("report", "done", 2, 3003.0)]
    assert steps[1].line() == ("ai / report (command): done — exit code 0 after 0.3 s, "
                               "1 output file(s) [attempt 2]")


def test_a_crash_mid_step_restarts_the_run(tmp_path: Path) -> None:
    routes = _routes(tmp_path, {"name": "ai", "to": ["pacs"], "process": [
        {"command": CMD}, {"command": CMD}]})
    history = _h(_step("step 1", "ai", "running"), _step("step 1", "ai", "done: exit code 0"),
                 _step("step 2", "ai", "running"),  # kill -9 here: no end line
                 "started: discarded the unfinished processing",
                 _step("step 1", "ai", "running"))
    steps = steps_of(history, routes)
    assert [(s.name, s.state, s.attempts) for s in steps] == [
        ("step 1", "running", 2), ("step 2", "pending", 1)]


def test_results_ingested_after_a_crash_end_the_run(tmp_path: Path) -> None:
    routes = _routes(tmp_path, {"name": "ai", "to": ["pacs"], "process": [{"command": CMD}]})
    history = _h(_step("step 1", "ai", "running"), _step("step 1", "ai", "done: exit code 0"),
                 # the router died before ingesting; the retry ingests what done/ holds
                 "processing (ai): 1 result instance(s) ingested; result.json picked route 'p'",
                 # a reroute later runs the chain again: a new run
                 _step("step 1", "ai", "running"))
    (step,) = steps_of(history[:3], routes)
    assert (step.state, step.attempts) == ("done", 1)
    (step,) = steps_of(history, routes)
    assert (step.state, step.attempts) == ("running", 2)


def test_two_routes_interleaved_a_remark_and_a_remote_step_waiting(tmp_path: Path) -> None:
    routes = _routes(
        tmp_path,
        {"name": "first", "to": ["pacs"], "process": [{"name": WEIRD, "command": CMD}]},
        {"name": "x) running", "to": ["pacs"], "process": [
            {"name": "local", "command": CMD},
            {"name": "ai node", "container": {"image": "example/ai:1"}}]})
    history = _h(_step("local", "x) running", "running"),
                 _step(WEIRD, "first", "running"),
                 _step("local", "x) running", "done: exit code 0 after 1.0 s"),
                 _step("local", "x) running", ": result.json unreadable: Expecting value"),
                 _step(WEIRD, "first", "done: exit code 0 after 2.0 s; stdout: (a) done: b"),
                 _step("ai node", "x) running", "running"),
                 _step("ai node", "x) running", "waiting: sent 4 instance(s) to ai; results "
                       "by 2026-12-07 18:00:00 UTC"),
                 "processing (first): 1 result instance(s) ingested")
    got = _by(steps_of(history, routes))
    assert list(got) == [("first", WEIRD), ("x) running", "local"), ("x) running", "ai node")]
    assert got["first", WEIRD].state == "done"
    assert got["first", WEIRD].summary == "exit code 0 after 2.0 s; stdout: (a) done: b"
    local = got["x) running", "local"]
    assert (local.state, local.since, local.remark) == \
        ("done", history[2][0], "result.json unreadable: Expecting value")
    node = got["x) running", "ai node"]
    assert (node.state, node.kind, node.attempts) == ("waiting", "container", 1)
    assert node.summary.startswith("sent 4 instance(s) to ai; results by 2026-12-07")
    # the remote step's answer, or its timeout
    done = history + [(5000.0, _step("ai node", "x) running",
                                     "done: 3 result instance(s) from ai after 12.0 s"))]
    assert _by(steps_of(done, routes))["x) running", "ai node"].state == "done"
    late = history + [(5000.0, _step("ai node", "x) running", "failed: no result from ai "
                                     "within its timeout (600 s)"))]
    node = _by(steps_of(late, routes))["x) running", "ai node"]
    assert (node.state, node.since) == ("failed", 5000.0)


def test_a_route_no_longer_configured_and_a_routed_one_not_started(tmp_path: Path) -> None:
    routes = _routes(tmp_path, {"name": "new", "to": ["pacs"], "process": [
        {"name": "a", "command": CMD}, {"name": "b", "command": CMD}]})
    history = _h(_step("old step", "gone", "running"),
                 _step("old step", "gone", "could not start: container engine 'docker' is "
                       "not installed"))
    steps = steps_of(history, routes, routed=["new"])
    assert [(s.route, s.name, s.kind, s.state, s.attempts) for s in steps] == [
        ("new", "a", "command", "pending", 0), ("new", "b", "command", "pending", 0),
        ("gone", "old step", None, "could not start", 1)]
    assert steps[2].line().startswith("gone / old step (?): could not start — container")
    # a route the study never went through is not listed
    assert steps_of(history, routes) == steps[2:]


def test_unnamed_routes_and_steps_get_their_default_names(tmp_path: Path) -> None:
    routes = _routes(tmp_path, {"to": ["pacs"]},
                     {"to": ["pacs"], "process": [{"command": CMD}]})
    history = _h(_step("step 1", "route 2", "running"))
    (step,) = steps_of(history, routes)
    assert (step.route, step.name, step.kind, step.state) == \
        ("route 2", "step 1", "command", "running")


def test_a_long_summary_is_cut(tmp_path: Path) -> None:
    text = "x" * 5000
    routes = _routes(tmp_path, {"name": "ai", "to": ["pacs"], "process": [{"command": CMD}]})
    (step,) = steps_of(_h(_step("step 1", "ai", "running"),
                          _step("step 1", "ai", f"failed: {text}")), routes)
    assert len(step.summary) <= 240
