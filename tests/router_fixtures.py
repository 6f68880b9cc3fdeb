"""``dicomrouter serve`` as a real subprocess, the way an operator runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from peers import wait_until
from pydicom import dcmread
from pynetdicom.dsutils import split_dataset

from dicomrouter.config import ConfigError, load
from dicomrouter.state import state_for
from dicomrouter_bench.procs import RouterServer

ROUTER_AE = "DICOMROUTER"


def dicomrouter(*args: str, cwd: Path | None = None, check: bool = False,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the ``dicomrouter`` CLI (the installed package, via ``python -m``)."""
    return subprocess.run([sys.executable, "-m", "dicomrouter", *args], cwd=cwd, check=check,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TCP_NODELAY": "1"})


class Router(RouterServer):
    """The benchmark's router peer, with the tests' defaults (stable age 1 s, DEBUG log, a
    16 MiB receive log: the default 256 MB, written once at creation, in every test's spool
    would fill the disk) and helpers; ``spool`` and ``port`` default to fresh ones."""

    def __init__(self, work_dir: Path, config: dict[str, Any] | None = None) -> None:
        super().__init__(work_dir, {"stable_age": "1s", "log_level": "DEBUG",
                                    "receive_log_size": "16MiB", **(config or {})})

    def kill(self) -> None:
        """SIGKILL: a crash, no chance to clean up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self.stop()

    def partial_receptions(self) -> list[Path]:
        """Non-empty receive slots: data written but not (yet) in the spool. Empty ones are the
        pre-created slot pool."""
        return [p for p in (self.spool / "tmp").iterdir() if p.stat().st_size]

    def status(self) -> dict[str, Any]:
        r = dicomrouter("status", "--json", "--config", str(self.config_path))
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def study_state(self, study_uid: str) -> str | None:
        """The study's state as ``status --all`` shows it, read in this process (a poll loop of
        ``dicomrouter status`` would keep one of the machine's two cores busy starting Python;
        ``status`` itself is tested on its own)."""
        try:
            state = state_for(load(self.config_path, secrets=False), readonly=True,
                              connect_timeout=5)
        except (ConfigError, OSError):
            return None  # no state database yet
        try:
            study = state.study(study_uid)
        except OSError:
            return None
        finally:
            state.close()
        return str(study.state) if study is not None else None

    def wait_state(self, study_uid: str, state: str, timeout: float = 90) -> None:
        wait_until(lambda: self.study_state(study_uid) == state, timeout=timeout, interval=0.3,
                   what=f"study {study_uid} to be {state} (log: {self.log_path})")


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a Part 10 file after its file meta information: the dataset as sent."""
    _meta, offset = split_dataset(path)
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read()


def tags_of(path: Path, *keywords: str) -> tuple[str, ...]:
    ds = dcmread(path, stop_before_pixels=True)
    return tuple(str(ds.get(k, "")) for k in keywords)
