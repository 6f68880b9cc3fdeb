"""Real DICOM/S3 peers on loopback for tests: DCMTK storescp/storescu, Orthanc, moto S3.

No mocks. The peer classes are the benchmark's (``dicomrouter_bench.procs``: one harness for
both); this module adds what only tests need: skip-or-fail when a peer is missing, a
``wait_until`` that fails the test, storescu runs with generated proposals, and moto S3.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

# The same helpers the benchmark uses: one place knows how to find the real DCMTK and Orthanc.
from dicomrouter_bench import procs
from dicomrouter_bench.procs import (  # noqa: F401 - re-exported for the tests
    STORESCU_PROPOSAL_FLAGS,
    BenchError,
    find_dcmtk,
    find_dicomweb_plugin,
    find_orthanc,
    free_port,
    is_elf,
    log_tail,
    peer_env,
    tcp_accepts,
)
from dicomrouter_bench.procs import wait_until as _wait_until

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DIR = REPO_ROOT / "sample_dicom"
"""The committed synthetic samples (see sample_dicom/make_samples.py)."""
REQUIRE_PEERS_ENV = "DICOMROUTER_REQUIRE_PEERS"


# --------------------------------------------------------------------------- generic helpers


def dcmtk(tool: str) -> str:
    """Path of the real DCMTK ``tool``. A test that needs one is gated here, where it uses it:
    skipped without DCMTK, failed under ``DICOMROUTER_REQUIRE_PEERS=1``."""
    path = find_dcmtk(tool)
    require_peer(f"DCMTK {tool}", path is not None, "dcmtk (apt-get install dcmtk)")
    assert path is not None
    return path


def require_peer(name: str, found: bool, install_hint: str) -> None:
    """Skip the test if a peer is missing, or fail when ``DICOMROUTER_REQUIRE_PEERS=1``."""
    if found:
        return
    message = f"{name} not available; install {install_hint}"
    if os.environ.get(REQUIRE_PEERS_ENV) == "1":
        pytest.fail(f"{message} ({REQUIRE_PEERS_ENV}=1)", pytrace=False)
    pytest.skip(message)


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 60,
    interval: float = 0.1,
    what: str = "",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """The benchmark's poll loop, failing the test (AssertionError) on timeout.

    Returns the predicate's first truthy value; exceptions in ``ignore`` count as "not yet",
    and so does a DICOM file a peer is still writing (a predicate reading a storescp's files
    may meet one half-written: InvalidDicomError, EOFError).
    """
    from pydicom.errors import InvalidDicomError

    ignore = (*ignore, InvalidDicomError, EOFError)
    try:
        return _wait_until(predicate, timeout, interval, what or str(predicate), ignore)
    except BenchError as exc:
        raise AssertionError(str(exc)) from None


PeerProcess = procs.Peer


class StoreSCP(procs.StoreSCP):
    """The benchmark's storescp, verbose (the tests read its log)."""

    def __init__(self, work_dir: Path | None = None, aet: str = "STORESCP",
                 port: int | None = None, accept_all: bool = True,
                 extra: Sequence[str] = ()) -> None:
        dcmtk("storescp")  # gate the test on DCMTK
        dcmtk("echoscu")
        super().__init__(work_dir, aet=aet, extra=extra, port=port, accept_all=accept_all,
                         verbose=True)

    def sop_uids(self) -> set[str]:
        """SOP Instance UIDs of the received files."""
        return sop_uids(self.files())


class DcmQrScp(procs.Peer):
    """DCMTK ``dcmqrscp``: a small PACS (storage, C-FIND, C-MOVE) with one storage area, AE
    title ARCHIVE. It rejects associations to any other called AE title (rejected-permanent,
    called AE title not recognised). ``ignore``: answer C-STORE with success but keep nothing
    (``--ignore``), a peer whose success means nothing."""

    name = "dcmqrscp"

    def __init__(self, work_dir: Path, ignore: bool = False) -> None:
        dcmtk("dcmqrscp")  # gate the test on DCMTK
        super().__init__(work_dir)
        self.port = procs.free_port()
        self.db = self.work_dir / "db"
        self.ignore = ignore

    def prepare(self) -> None:
        self.db.mkdir(parents=True, exist_ok=True)
        (self.work_dir / "dcmqrscp.cfg").write_text(
            f"NetworkTCPPort = {self.port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n"
            "HostTable BEGIN\nHostTable END\nVendorTable BEGIN\nVendorTable END\n"
            f"AETable BEGIN\nARCHIVE {self.db} RW (100, 1024mb) ANY\nAETable END\n")

    def command(self) -> list[str]:
        return [dcmtk("dcmqrscp"), "-v", *(["--ignore"] if self.ignore else []), "-c",
                str(self.work_dir / "dcmqrscp.cfg")]

    def ready(self) -> bool:
        return procs.tcp_accepts(self.port)


class Orthanc(procs.Orthanc):
    """The benchmark's Orthanc, verbose, with more threads for the REST-heavy tests."""

    def __init__(self, work_dir: Path | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("verbose", True)
        super().__init__(work_dir, **kwargs)

    def upload(self, files: Iterable[Path]) -> None:
        """Store DICOM files in Orthanc over its REST API (not through the router)."""
        for f in files:
            self.post("/instances", f.read_bytes())

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg.update({"ConcurrentJobs": 2, "HttpThreadsCount": 10, "DicomThreadsCount": 4})
        cfg.update(self.extra_config)
        return cfg


def sop_uids(paths: Iterable[Path]) -> set[str]:
    """SOP Instance UIDs of DICOM files (pixel data not read)."""
    from pydicom import dcmread

    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


UNCOMPRESSED_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired)
)
_PROPOSAL_OPTIONS = {
    "-x=", "-xe", "-xb", "-xi", "-xs", "-xy", "-xx", "-xv", "-xw", "-xt", "-xu", "-xm", "-xh",
    "-xn", "-xl", "-x2", "-x3", "-xo", "-x4", "-x5", "-xr", "-xd", "-xf", "--config-file",
}


def _dicom_files(paths: Iterable[str]) -> list[Path]:
    """Files named directly plus every file below named directories."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        else:
            found.append(p)
    return found


def _presentation_needs(files: Iterable[Path]) -> set[tuple[str, str]]:
    """(SOP class UID, transfer syntax UID) pairs of the readable DICOM files."""
    from pydicom.filereader import read_file_meta_info

    needs: set[tuple[str, str]] = set()
    for f in files:
        try:
            meta = read_file_meta_info(f)
            needs.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
        except Exception:  # noqa: BLE001 - not DICOM: storescu reports it itself
            continue
    return needs


def storescu_config(needs: Iterable[tuple[str, str]], path: Path) -> Path:
    """Write a DCMTK association profile ``Default`` proposing exactly ``needs``.

    Per SOP class: one presentation context for each stored transfer syntax other than Explicit
    VR Little Endian, plus one proposing all uncompressed syntaxes, so every file goes out in its
    own transfer syntax in one association.
    """
    syntaxes = sorted({ts for _, ts in needs} - {UNCOMPRESSED_SYNTAXES[0]})
    lines = ["[[TransferSyntaxes]]", "", "[Uncompressed]"]
    lines += [f"TransferSyntax{i} = {ts}" for i, ts in enumerate(UNCOMPRESSED_SYNTAXES, 1)]
    for n, ts in enumerate(syntaxes):
        lines += ["", f"[TS{n}]", f"TransferSyntax1 = {ts}"]
    lines += ["", "[[PresentationContexts]]", "", "[Needed]"]
    contexts: list[str] = []
    for sop_class in sorted({sc for sc, _ in needs}):
        contexts += [f"{sop_class}\\TS{syntaxes.index(ts)}" for sc, ts in sorted(needs)
                     if sc == sop_class and ts in syntaxes]
        contexts.append(f"{sop_class}\\Uncompressed")
    if len(contexts) > 128:
        raise ValueError(f"{len(contexts)} presentation contexts needed; DICOM allows 128")
    lines += [f"PresentationContext{i} = {c}" for i, c in enumerate(contexts, 1)]
    lines += ["", "[[Profiles]]", "", "[Default]", "PresentationContexts = Needed", ""]
    path.write_text("\n".join(lines))
    return path


def run_storescu(
    files_or_dirs: Iterable[Path | str],
    port: int,
    aet: str = "DICOMROUTER",
    calling: str = "STORESCU",
    host: str = "127.0.0.1",
    extra: Sequence[str] = (),
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Send files/directories with DCMTK ``storescu`` in one association; return the process.

    Unless ``extra`` already chooses a proposal (``-x*``/``-xf``), it is derived from the files so
    that each goes out as stored: with one transfer syntax, ``-R`` (only the SOP classes present)
    plus that syntax's flag (``-xr``, ``-xd``, ``-xi``, ...); with several, a generated
    ``-xf <cfg> Default`` profile (see :func:`storescu_config`). ``+sd +r`` is added for
    directories and ``-v`` lists every C-STORE. Does not raise on failure: check ``returncode``.
    """
    paths = [str(p) for p in files_or_dirs]
    if not paths:
        raise ValueError("nothing to send")
    cmd = [dcmtk("storescu"), "-v", "-aet", calling, "-aec", aet]
    if any(Path(p).is_dir() for p in paths):
        cmd += ["+sd", "+r"]
    tmp_dir: tempfile.TemporaryDirectory[str] | None = None
    try:
        if not _PROPOSAL_OPTIONS.intersection(extra):
            needs = _presentation_needs(_dicom_files(paths))
            syntaxes = {ts for _, ts in needs}
            if len(syntaxes) > 1 or not syntaxes <= STORESCU_PROPOSAL_FLAGS.keys():
                tmp_dir = tempfile.TemporaryDirectory(prefix="storescu-cfg-")
                cfg = storescu_config(needs, Path(tmp_dir.name) / "storescu.cfg")
                cmd += ["-xf", str(cfg), "Default"]
            else:
                cmd += ["-R", *(STORESCU_PROPOSAL_FLAGS[ts] for ts in syntaxes)]
        cmd += [*extra, host, str(port), *paths]
        return subprocess.run(cmd, capture_output=True, text=True, env=peer_env(),
                              timeout=timeout, check=False)
    finally:
        if tmp_dir is not None:
            tmp_dir.cleanup()


# --------------------------------------------------------------------------- S3 (moto)


def moto_available() -> bool:
    """True if moto's server mode (Flask) and boto3 are importable."""
    try:
        import boto3  # noqa: F401
        import flask  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError:
        return False
    return True


class MotoS3(procs.Peer):
    """A moto S3 server (``python -m moto.server``) on a free loopback port."""

    name = "moto"
    access_key = "testing"
    secret_key = "testing"
    region = "us-east-1"

    def __init__(self, work_dir: Path | None = None) -> None:
        super().__init__(work_dir)
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint_url + "/moto-api/data.json", timeout=5):
                return True
        except urllib.error.HTTPError:
            return True  # any HTTP answer means the server is up
        except (OSError, urllib.error.URLError):
            return False

    def client_kwargs(self) -> dict[str, str]:
        """Keyword arguments for ``boto3.client("s3", **kwargs)`` pointing at this server."""
        return {
            "endpoint_url": self.endpoint_url,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": self.region,
        }

    def client(self) -> Any:
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client("s3", **self.client_kwargs())


__all__ = [
    "REPO_ROOT",
    "REQUIRE_PEERS_ENV",
    "SAMPLE_DIR",
    "MotoS3",
    "Orthanc",
    "PeerProcess",
    "StoreSCP",
    "dcmtk",
    "find_dcmtk",
    "find_dicomweb_plugin",
    "find_orthanc",
    "free_port",
    "log_tail",
    "moto_available",
    "peer_env",
    "require_peer",
    "run_storescu",
    "sop_uids",
    "storescu_config",
    "tcp_accepts",
    "wait_until",
]
