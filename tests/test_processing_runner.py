"""Processing steps (issue 29, items 1 and 2): the step runner with real programs (work
folder, placeholders, exit codes, timeouts that kill the whole process group, limits, bounded
output), the container command line (no engine on this machine) and the config checks."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from dicomrouter.config import ConfigError, from_dict
from dicomrouter.config.processing import StepModel
from dicomrouter.processing.chain import ChainFailed, run_chain
from dicomrouter.processing.runner import StepError, command_line, fill_input, prepare, run
from dicomrouter.state import Instance

TASK = {"study": {"StudyInstanceUID": "1.2.3"}, "route": "ai", "step": "seg"}


def _step(tmp_path: Path, body: str, **keys: Any) -> StepModel:
    prog = tmp_path / "prog.py"
    prog.write_text(textwrap.dedent(body))
    return StepModel.model_validate({"command": [sys.executable, str(prog), "{input}",
                                                 "{output}", "{task}"], **keys})


def test_command_step_sees_its_work_folder_and_writes_outputs(tmp_path: Path) -> None:
    step = _step(tmp_path, """
        import json, os, sys
        inp, out, task = sys.argv[1:4]
        names = sorted(os.listdir(inp))
        t = json.load(open(task))
        for n in names:
            data = open(os.path.join(inp, n), "rb").read()
            open(os.path.join(out, "r-" + n), "wb").write(data)
        result = {"route": "positive", "seen": names, "task": t}
        json.dump(result, open(os.path.join(out, "result.json"), "w"))
        print("done with", len(names))
    """)
    folder = prepare(tmp_path / "work", TASK)
    me = Path(__file__)
    fill_input(folder, [("a", lambda: me.open("rb")), ("b", lambda: me.open("rb"))])
    outcome = run(step, folder)
    assert outcome.ok and outcome.exit_code == 0, outcome.stderr
    assert [p.name for p in outcome.outputs] == ["r-a.dcm", "r-b.dcm"]
    assert outcome.outputs[0].read_bytes() == Path(__file__).read_bytes()
    assert outcome.result is not None and outcome.result["route"] == "positive"
    assert outcome.result["seen"] == ["a.dcm", "b.dcm"]
    assert outcome.result["task"] == TASK
    assert outcome.stdout.strip() == "done with 2"
    assert "exit code 0" in outcome.summary() and "2 output file(s)" in outcome.summary()


def test_exit_code_fails_the_step_and_stderr_is_kept(tmp_path: Path) -> None:
    step = _step(tmp_path, """
        import os, sys
        open(os.path.join(sys.argv[2], "half.dcm"), "w").write("x")
        sys.stderr.write("model crashed\\n")
        sys.exit(3)
    """)
    outcome = run(step, prepare(tmp_path / "work", TASK))
    assert not outcome.ok and outcome.exit_code == 3
    assert "model crashed" in outcome.stderr
    assert outcome.outputs == []  # a failed step's output never counts


def test_prepare_discards_what_an_unfinished_run_left(tmp_path: Path) -> None:
    folder = prepare(tmp_path / "work", TASK)
    (folder.output / "stale.dcm").write_text("from a crashed run")
    (folder.input / "old.dcm").write_text("x")
    again = prepare(tmp_path / "work", TASK)
    assert list(again.output.iterdir()) == [] and list(again.input.iterdir()) == []
    assert json.loads(again.task.read_text()) == TASK


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    step = _step(tmp_path, f"""
        import os, subprocess, time
        child = subprocess.Popen(["sleep", "300"])
        open({str(pids)!r}, "w").write(f"{{os.getpid()}} {{child.pid}}")
        time.sleep(300)
    """, timeout="1s")
    start = time.monotonic()
    outcome = run(step, prepare(tmp_path / "work", TASK))
    assert outcome.timed_out and outcome.exit_code is None and not outcome.ok
    assert time.monotonic() - start < 30
    assert "timeout" in outcome.summary()
    deadline = time.monotonic() + 20
    parent, child = (int(p) for p in pids.read_text().split())
    while (_alive(child) or _alive(parent)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(parent) and not _alive(child)  # the grandchild too


def test_output_is_bounded(tmp_path: Path) -> None:
    step = _step(tmp_path, """
        import sys
        sys.stdout.write("x" * 1_000_000)
    """, max_output="2KiB")
    outcome = run(step, prepare(tmp_path / "work", TASK))
    assert outcome.ok
    assert outcome.stdout.startswith("x" * 2048)
    assert outcome.stdout.count("x") == 2048
    assert f"{1_000_000 - 2048} more byte(s) not kept" in outcome.stdout


def test_memory_limit_applies_in_the_child(tmp_path: Path) -> None:
    step = _step(tmp_path, """
        block = bytearray(600 * 1024 * 1024)
        print("allocated", len(block))
    """, memory="300MB", cpu_time="30s")
    assert command_line(step, prepare(tmp_path / "w1", TASK))[1:5] == [
        "-m", "dicomrouter.processing.limits", "30", "300000000"]
    outcome = run(step, prepare(tmp_path / "work", TASK))
    assert outcome.exit_code != 0 and "MemoryError" in outcome.stderr
    free = _step(tmp_path, """
        block = bytearray(600 * 1024 * 1024)
        print("allocated", len(block))
    """)
    assert run(free, prepare(tmp_path / "work", TASK)).ok  # the same without the limit


def test_cpu_limit_stops_a_spinning_program(tmp_path: Path) -> None:
    step = _step(tmp_path, """
        while True:
            pass
    """, cpu_time="1s", timeout="60s")
    outcome = run(step, prepare(tmp_path / "work", TASK))
    assert not outcome.ok and not outcome.timed_out and outcome.duration < 30


def test_a_missing_program_fails_the_step_with_why(tmp_path: Path) -> None:
    step = StepModel.model_validate({"command": ["/nonexistent/seg", "{input}"]})
    outcome = run(step, prepare(tmp_path / "work", TASK))
    assert outcome.exit_code == 127 and not outcome.ok
    assert "cannot run /nonexistent/seg: No such file or directory" in outcome.stderr


def test_container_command_line(tmp_path: Path) -> None:
    step = StepModel.model_validate({
        "container": {"image": "ghcr.io/example/seg:1", "engine": "podman",
                      "args": ["--in", "{input}", "--out", "{output}", "--task", "{task}"]},
        "memory": "2GB", "cpu_time": "10m"})
    folder = prepare(tmp_path / "work", TASK)
    argv = command_line(step, folder, which=lambda e: f"/usr/bin/{e}")
    assert argv[:3] == ["/usr/bin/podman", "run", "--rm"]
    assert argv[argv.index("--network") + 1] == "none"
    assert argv[argv.index("--name") + 1].startswith("dicomrouter-")
    assert f"{folder.input}:/work/input:ro" in argv
    assert f"{folder.output}:/work/output" in argv
    assert f"{folder.task}:/work/task.json:ro" in argv
    assert argv[argv.index("--memory") + 1] == "2000000000"
    assert argv[argv.index("--ulimit") + 1] == "cpu=600:600"
    assert argv[argv.index("--user") + 1] == f"{os.getuid()}:{os.getgid()}"
    image = argv.index("ghcr.io/example/seg:1")
    assert argv[image + 1:] == ["--in", "/work/input", "--out", "/work/output",
                                "--task", "/work/task.json"]
    net = StepModel.model_validate({"container": {"image": "x", "network": "bridge"}})
    other = command_line(net, folder, which=lambda e: e)
    assert other[other.index("--network") + 1] == "bridge"
    assert other[other.index("--name") + 1] != argv[argv.index("--name") + 1]  # one per run


def test_no_container_engine_is_a_clear_error(tmp_path: Path) -> None:
    step = StepModel.model_validate({"container": {"image": "seg:1"}})
    with pytest.raises(StepError, match="container engine 'docker' is not installed"):
        run(step, prepare(tmp_path / "work", TASK), which=lambda e: None)


def _cfg(route: dict[str, Any], **top: Any) -> Any:
    raw = {"destinations": {"pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1",
                                     "port": 104}},
           "routes": [{"name": "ai", "to": ["pacs"], **route}], **top}
    return from_dict(raw, Path("."), "test")


def test_config_accepts_a_processing_route() -> None:
    cfg = _cfg({"process": [{"command": ["python3", "seg.py", "{input}", "{output}"],
                             "timeout": "10m"}], "results": ["return_to_sender", "pacs"]},
               known_aes={"CT1": {"host": "127.0.0.1", "port": 105}})
    step = cfg.routes[0].process[0]
    assert step.timeout == 600 and step.kind == "command"
    assert cfg.routes[0].results == ("return_to_sender", "pacs")
    # the step is a job of its own destination; the sender gets one to return results to
    assert cfg.routes[0].to == ("pacs", "process:ai")
    assert cfg.destinations["process:ai"].route == "ai"
    back = cfg.destinations["return:CT1"]
    assert (back.type, back.ae_title, back.port, back.name) == ("dicom", "CT1", 105,
                                                                "return:CT1")


@pytest.mark.parametrize(("route", "top", "message"), [
    ({"process": [{"remote": {"to": "ai1"}}]}, {}, "remote.to: unknown key"),
    ({"process": [{"remote": {"destination": "ai1"}}]}, {},
     "routes\\[0\\].process\\[0\\].remote.destination: unknown destination 'ai1'"),
    ({"process": [{"remote": {"destination": "pacs", "match": "uid"}}]}, {}, "match"),
    ({"process": [{"command": ["a"], "container": {"image": "x"}}]}, {}, "exactly one of "
     "command, container or remote"),
    ({"process": [{"command": ["a"], "remote": {"destination": "pacs"}}]}, {},
     "got command and remote"),
    ({"process": [{}]}, {}, "exactly one of command, container or remote"),
    ({"process": [{"command": []}]}, {}, "empty command line"),
    ({"process": [{"container": {"image": "x", "engine": "lxc"}}]}, {}, "engine"),
    ({"process": [{"command": ["a"]}], "results": ["nowhere"]}, {},
     "routes\\[0\\].results\\[0\\]: unknown destination 'nowhere'"),
    ({"process": [{"command": ["a"]}], "results": ["return_to_sender"]}, {},
     "return_to_sender needs known_aes"),
    ({"results": ["pacs"]}, {}, "results: goes with process:"),
    ({"process": [{"command": ["a"]}], "forward": "immediate"}, {},
     "routes\\[0\\].process: not with forward: immediate"),
    ({"process": [{"command": ["a"]}], "level": "series"}, {}, "not with level: series"),
    ({"process": [{"name": "s", "command": ["a"]}, {"name": "s", "command": ["b"]}]}, {},
     "'s' twice"),
])
def test_config_refuses(route: dict[str, Any], top: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _cfg(route, **top)


def _instances(tmp_path: Path, n: int) -> tuple[list[Instance], Any]:
    files = {}
    insts = []
    for k in range(n):
        uid = f"1.2.3.4.{k + 1}"
        files[uid] = tmp_path / f"{uid}.bin"
        files[uid].write_bytes(f"instance {k}".encode())
        insts.append(Instance(uid, "1.2.3", "1.2.3.4", "1.2.840.10008.5.1.4.1.1.2", "1.2.840"
                              "10008.1.2.1", uid, 10, "CT1", "ROUTER",
                              {"PatientID": "P1", "Modality": "CT", "AccessionNumber": "A7"}))
    return insts, lambda i: files[i.sop_uid].open("rb")


def test_chain_feeds_each_step_the_previous_output(tmp_path: Path) -> None:
    first = _step(tmp_path, """
        import os, sys
        inp, out = sys.argv[1:3]
        for n in os.listdir(inp):
            data = open(os.path.join(inp, n), "rb").read()
            open(os.path.join(out, "seg-" + n), "wb").write(data.upper())
    """)
    prog2 = tmp_path / "second.py"
    prog2.write_text(textwrap.dedent("""
        import json, os, sys
        inp, out, task = sys.argv[1:4]
        names = sorted(os.listdir(inp))
        t = json.load(open(task))
        open(os.path.join(out, "report.dcm"), "w").write(",".join(names))
        positive = all(open(os.path.join(inp, n)).read().startswith("INSTANCE") for n in names)
        json.dump({"route": "positive" if positive else "negative",
                   "patient": t["study"]["PatientID"]}, open(os.path.join(out, "result.json"), "w"))
    """))
    second = StepModel.model_validate({"name": "report", "command": [
        sys.executable, str(prog2), "{input}", "{output}", "{task}"]})
    insts, opener = _instances(tmp_path, 2)
    notes: list[str] = []
    result = run_chain([first, second], tmp_path / "work", "ai", insts, opener, notes.append)
    assert [p.name for p in result.outputs] == ["report.dcm"]
    assert result.outputs[0].read_text() == "seg-1.2.3.4.1.dcm,seg-1.2.3.4.2.dcm"
    assert result.route == "positive"
    assert [n for n, _o in result.outcomes] == ["step 1", "report"]
    task = json.loads((tmp_path / "work" / "2" / "task.json").read_text())
    assert task["study"]["StudyInstanceUID"] == "1.2.3" and task["route"] == "ai"
    assert task["study"]["ModalitiesInStudy"] == ["CT"] and task["calling_ae"] == "CT1"
    assert [i["SOPInstanceUID"] for i in task["instances"]] == ["1.2.3.4.1", "1.2.3.4.2"]
    assert notes[0] == "processing step 'step 1' (ai) running"
    assert any("'report' (ai) done: exit code 0" in n for n in notes)


def test_chain_stops_at_the_failing_step_with_its_stderr_in_the_history(tmp_path: Path) -> None:
    bad = _step(tmp_path, """
        import sys
        sys.stderr.write("no GPU\\x1b[31m\\n")
        sys.exit(1)
    """)
    never = StepModel.model_validate({"command": ["/nonexistent"]})
    insts, opener = _instances(tmp_path, 1)
    notes: list[str] = []
    with pytest.raises(ChainFailed, match="'step 1' failed: exit code 1") as err:
        run_chain([bad, never], tmp_path / "work", "ai", insts, opener, notes.append)
    assert err.value.outcome is not None and err.value.outcome.exit_code == 1
    assert len(notes) == 2 and "stderr: no GPU" in notes[1]
    assert "\x1b" not in notes[1]  # the program's bytes are escaped in the history
    assert not (tmp_path / "work" / "2").exists()  # the next step never ran


def test_a_container_over_its_timeout_is_killed_through_the_engine(tmp_path: Path) -> None:
    """A stand-in engine (this machine has none) records its command lines: the timeout
    kills the container by its name, not only the engine's client."""
    calls = tmp_path / "calls"
    engine = tmp_path / "docker"
    engine.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n"
                      f"[ \"$1\" = run ] && exec sleep 300\nexit 0\n")
    engine.chmod(0o755)
    step = StepModel.model_validate({"container": {"image": "seg:1"}, "timeout": "1s"})
    outcome = run(step, prepare(tmp_path / "work", TASK), which=lambda e: str(engine))
    assert outcome.timed_out
    ran, killed = calls.read_text().splitlines()
    name = ran.split("--name ")[1].split()[0]
    assert killed == f"kill {name}"
