"""What the benchmark ran on: CPU, memory, OS and the versions of every program involved."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from .procs import find_dcmtk, find_orthanc, tool_version


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _mem_total_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / 1e9
    except (OSError, ValueError):
        pass
    return None


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


def _dcmtk_version(storescu: str | None) -> str:
    """``$dcmtk: storescu v3.6.7 2022-04-22 $`` → ``3.6.7``."""
    if storescu is None:
        return "not found"
    m = re.search(r"v(\d+(?:\.\d+)+)", tool_version([storescu]))
    return m.group(1) if m else "?"


def _orthanc_version(orthanc: str | None) -> str:
    """``/usr/sbin/Orthanc 1.10.1`` → ``1.10.1``."""
    if orthanc is None:
        return "not found"
    return tool_version([orthanc]).split()[-1]


def _revision() -> str:
    """``git describe --always --dirty`` of the checkout holding this dicomrouter, if any.

    ``$DICOMROUTER_REVISION`` names it for a tree that is not a git checkout (an export).
    """
    if os.environ.get("DICOMROUTER_REVISION"):
        return os.environ["DICOMROUTER_REVISION"]
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "?"


def machine_info() -> dict[str, Any]:
    """A JSON-friendly description of this machine and the software under test."""
    storescu = find_dcmtk("storescu")
    orthanc = find_orthanc()
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory_gb": _mem_total_gb(),
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "dicomrouter": _version("dicomrouter"),
        "revision": _revision(),
        "pynetdicom": _version("pynetdicom"),
        "pydicom": _version("pydicom"),
        "dcmtk": _dcmtk_version(storescu),
        "orthanc": _orthanc_version(orthanc),
    }


def describe(info: dict[str, Any]) -> str:
    """One line: ``2 × AMD EPYC, 24.1 GB RAM, Linux 6.1, Python 3.11.7, ...``."""
    mem = f"{info['memory_gb']:.1f} GB RAM" if info.get("memory_gb") else "RAM ?"
    return (f"{info['nproc']} × {info['cpu']}, {mem}, {info['os']}; dicomrouter "
            f"{info['revision']}, Python {info['python']}, "
            f"pynetdicom {info['pynetdicom']}, pydicom {info['pydicom']}, DCMTK {info['dcmtk']}, "
            f"Orthanc {info['orthanc']}")
