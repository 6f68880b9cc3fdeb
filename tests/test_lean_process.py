"""What the router process and the state commands load (issue 25, P4's idle memory).

A router that is not configured for HL7, pseudonymization or mail must not carry their
libraries, and no router process carries the pixel codecs (common/nocodecs.py). Checked on a
real ``serve`` process through the shared libraries mapped into it (/proc/PID/maps), with a
router that is configured for HL7 as the control that the check can see them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from peers import free_port, run_storescu
from pydicom import dcmread
from router_fixtures import Router

from dicomrouter.sample import generate

#: shared libraries whose presence shows a package was imported
CODECS = ("_multiarray_umath", "openjpeg", "_gdcm", "libjpeg", "_CharLS", "PIL/_imaging")
UNCONFIGURED = ("cryptography/hazmat/bindings/_rust", "_asyncio.cpython")


def mapped(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_an_idle_router_loads_no_codec_and_nothing_it_is_not_configured_for(
        tmp_path: Path) -> None:
    with Router(tmp_path / "plain") as router:
        assert router.proc is not None
        maps = mapped(router.proc.pid)
    loaded = [lib for lib in CODECS + UNCONFIGURED if lib in maps]
    assert not loaded, f"the idle router process loaded {loaded}"

    # the control: HL7 configured, its listener's asyncio is there
    with Router(tmp_path / "hl7", {"hl7": {"bind": "127.0.0.1", "port": free_port()}}) as router:
        assert router.proc is not None
        maps = mapped(router.proc.pid)
    assert "_asyncio.cpython" in maps
    assert not [lib for lib in CODECS if lib in maps]


#: runs the CLI like ``python -m dicomrouter`` and prints, at exit, the modules it imported
MODULES_AT_EXIT = ("import atexit, runpy, sys\n"
                   "atexit.register(lambda: print('MODULES', *sorted(sys.modules), "
                   "file=sys.stderr))\n"
                   "sys.argv = ['dicomrouter', *sys.argv[1:]]\n"
                   "runpy.run_module('dicomrouter', run_name='__main__')\n")


def test_state_commands_import_no_codec(tmp_path: Path) -> None:
    with Router(tmp_path / "router") as router:
        for command in ("status", "audit"):
            r = subprocess.run([sys.executable, "-c", MODULES_AT_EXIT, command, "--config",
                                str(router.config_path)],
                               capture_output=True, text=True, timeout=120, env={**os.environ})
            assert r.returncode == 0, r.stderr[-2000:]
            line = next(x for x in r.stderr.splitlines() if x.startswith("MODULES "))
            imported = {name.partition(".")[0] for name in line.split()[1:]}
            assert "pydicom" in imported  # the check sees imports at all
            codecs = imported & {"numpy", "PIL", "gdcm", "pylibjpeg", "openjpeg"}
            assert not codecs, f"{command} imported {sorted(codecs)}"


def test_a_router_sending_stow_rs_loads_no_codec(tmp_path: Path) -> None:
    """The dicomweb destination's HTTP session is a plain requests one: importing
    dicomweb_client for it brought numpy and Pillow into the router (P4: +19 MB)."""
    files = generate(tmp_path / "study", series=1, instances=3, rows=16, cols=16,
                     patient_id="LEAN1")
    study = str(dcmread(files[0]).StudyInstanceUID)
    web_port = free_port()
    with Router(tmp_path / "b", {
            "web": {"port": web_port},
            "destinations": {"out": {"type": "folder", "path": str(tmp_path / "out")}},
            "routes": [{"to": "out"}]}) as b, \
        Router(tmp_path / "a", {
            "destinations": {"b": {"type": "dicomweb",
                                   "url": f"http://127.0.0.1:{web_port}/dicom-web"}},
            "routes": [{"to": "b"}]}) as a:
        assert run_storescu(files, a.port).returncode == 0
        a.wait_state(study, "delivered")
        b.wait_state(study, "delivered")
        assert a.proc is not None
        maps = mapped(a.proc.pid)
    assert len(list((tmp_path / "out").rglob("*.dcm"))) == 3
    loaded = [lib for lib in CODECS if lib in maps]
    assert not loaded, f"the router sending STOW-RS loaded {loaded}"
