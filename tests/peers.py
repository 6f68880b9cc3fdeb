"""Real DICOM/S3 peers on loopback for tests: DCMTK storescp/storescu, Orthanc, moto S3.

No mocks. Every process writes stdout/stderr to a log file in its work directory and is stopped
(terminate, then kill) when its context manager exits, even if the test failed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import pytest

# The same helpers the benchmark uses: one place knows how to find the real DCMTK and Orthanc.
from dicomrouter.benchmark.procs import (  # noqa: F401 - re-exported for the tests
    BenchError,
    find_dcmtk,
    find_orthanc,
    free_port,
    is_elf,
    log_tail,
    orthanc_config,
    peer_env,
    tcp_accepts,
)
from dicomrouter.benchmark.procs import wait_until as _wait_until

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DIR = REPO_ROOT / "sample_dicom"
"""The committed synthetic samples (see sample_dicom/make_samples.py)."""
REQUIRE_PEERS_ENV = "DICOMROUTER_REQUIRE_PEERS"
ORTHANC_BINARY = "/usr/sbin/Orthanc"
ORTHANC_PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins")
DICOMWEB_PLUGIN = "libOrthancDicomWeb.so"
START_TIMEOUT = 90.0
STOP_TIMEOUT = 30.0


# --------------------------------------------------------------------------- generic helpers


def dcmtk(tool: str) -> str:
    """Path of the real DCMTK ``tool``; raises FileNotFoundError if it is not installed."""
    path = find_dcmtk(tool)
    if path is None:
        raise FileNotFoundError(f"DCMTK binary {tool!r} not found (set DCMTK_BIN or install dcmtk)")
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

    Returns the predicate's first truthy value; exceptions in ``ignore`` count as "not yet".
    """
    try:
        return _wait_until(predicate, timeout, interval, what or str(predicate), ignore)
    except BenchError as exc:
        raise AssertionError(str(exc)) from None


class PeerProcess:
    """Base class: one subprocess with a log file in a work dir, stopped on context exit."""

    name = "peer"

    def __init__(self, work_dir: Path | None = None) -> None:
        self._own_dir = work_dir is None
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix=f"dicomrouter-{self.name}-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.work_dir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_fh: Any = None

    # subclasses implement these
    def command(self) -> list[str]:
        """The argv to run."""
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        """Environment for the process."""
        return peer_env()

    def ready(self) -> bool:
        """True once the peer serves requests."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Write config files etc. before the process starts."""

    # lifecycle
    def start(self) -> Self:
        """Start the process and wait until :meth:`ready`; stop it again if that fails."""
        self.prepare()
        self._log_fh = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=self._log_fh,
                stderr=subprocess.STDOUT,
                cwd=self.work_dir,
                env=self.env(),
            )
            wait_until(self._ready_or_died, timeout=START_TIMEOUT, interval=0.1,
                       what=f"{self.name} to become ready (log: {self.log_path})")
        except BaseException:
            self.stop()
            raise
        return self

    def _ready_or_died(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with code {self.proc.returncode} during startup; "
                f"log {self.log_path}:\n{log_tail(self.log_path, 80)}"
            )
        return self.ready()

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Terminate (then kill) the process and close the log."""
        proc, self.proc = self.proc, None
        try:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=STOP_TIMEOUT)
        finally:
            if self._log_fh is not None:
                self._log_fh.close()
                self._log_fh = None

    def log(self, lines: int = 200) -> str:
        """Tail of this peer's log."""
        return log_tail(self.log_path, lines)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        # A temp dir we created ourselves is removed only on success, so logs survive failures.
        if self._own_dir and exc_type is None:
            shutil.rmtree(self.work_dir, ignore_errors=True)


# --------------------------------------------------------------------------- DCMTK


class StoreSCP(PeerProcess):
    """DCMTK ``storescp`` writing received instances to ``out_dir/<MOD>.<SOPInstanceUID>.dcm``.

    Accepts all transfer syntaxes DCMTK supports (``+xa``) so compressed/deflated instances are
    stored as sent. Single-process: concurrent associations queue in the listen backlog.
    """

    name = "storescp"

    def __init__(
        self,
        work_dir: Path | None = None,
        aet: str = "STORESCP",
        port: int | None = None,
        accept_all: bool = True,
        extra: Sequence[str] = (),
    ) -> None:
        super().__init__(work_dir)
        self.aet = aet
        self.port = port or free_port()
        self.out_dir = self.work_dir / "received"
        self.accept_all = accept_all
        self.extra = list(extra)

    def prepare(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        cmd = [dcmtk("storescp"), "-v", "--aetitle", self.aet, "-od", str(self.out_dir),
               "-uf", "-fe", ".dcm"]
        if self.accept_all:
            cmd.append("+xa")
        return [*cmd, *self.extra, str(self.port)]

    def ready(self) -> bool:
        echoscu = find_dcmtk("echoscu")
        if echoscu is None or "--refuse" in self.extra:
            return tcp_accepts(self.port)
        result = subprocess.run(
            [echoscu, "-to", "5", "-aec", self.aet, "-aet", "READYCHECK", "127.0.0.1",
             str(self.port)],
            capture_output=True, env=peer_env(), timeout=30, check=False,
        )
        return result.returncode == 0

    def files(self) -> list[Path]:
        """Received files, sorted by name."""
        return sorted(p for p in self.out_dir.glob("*.dcm") if p.is_file())

    def sop_uids(self) -> set[str]:
        """SOP Instance UIDs of the received files."""
        return sop_uids(self.files())


def sop_uids(paths: Iterable[Path]) -> set[str]:
    """SOP Instance UIDs of DICOM files (pixel data not read)."""
    from pydicom import dcmread

    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


UNCOMPRESSED_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired)
)
# storescu's proposal flag for a stored transfer syntax (compressed ones also propose uncompressed).
STORESCU_PROPOSAL_FLAGS = {
    "1.2.840.10008.1.2.1": "-x=",  # Explicit VR Little Endian (the default proposal)
    "1.2.840.10008.1.2": "-xi",  # Implicit VR Little Endian only
    "1.2.840.10008.1.2.1.99": "-xd",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.5": "-xr",  # RLE Lossless
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.50": "-xy",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "-xx",  # JPEG Extended
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": "-xw",  # JPEG 2000
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "-xu",  # JPEG-LS Near-lossless
}
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


# --------------------------------------------------------------------------- Orthanc


def find_dicomweb_plugin() -> str | None:
    """Path of the Orthanc DICOMweb plugin shared library or None."""
    for d in ORTHANC_PLUGIN_DIRS:
        candidate = Path(d) / DICOMWEB_PLUGIN
        if candidate.is_file():
            return str(candidate)
    return None


class Orthanc(PeerProcess):
    """A private Orthanc (own storage, free DICOM/HTTP ports, no auth) configured from params.

    ``modalities`` maps a name to ``[aet, host, port]`` (or Orthanc's object form with ``AET``,
    ``Host``, ``Port``, ...); ``extra_config`` is merged last into the generated JSON
    configuration (see ``.config_path``). ``verbose`` adds ``--verbose`` to the log.
    """

    name = "orthanc"

    def __init__(
        self,
        work_dir: Path | None = None,
        aet: str = "ORTHANC",
        modalities: Mapping[str, Sequence[Any] | Mapping[str, Any]] | None = None,
        dicomweb: bool = False,
        lua_scripts: Sequence[Path | str] = (),
        stable_age: int = 1,
        extra_config: Mapping[str, Any] | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__(work_dir)
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.modalities = {
            k: dict(v) if isinstance(v, Mapping) else list(v) for k, v in (modalities or {}).items()
        }
        self.dicomweb = dicomweb
        self.lua_scripts = [str(Path(p).resolve()) for p in lua_scripts]
        self.stable_age = stable_age
        self.extra_config = dict(extra_config or {})
        self.verbose = verbose
        self.config_path = self.work_dir / "orthanc.json"
        self.storage_dir = self.work_dir / "storage"

    def config(self) -> dict[str, Any]:
        """The configuration written to ``config_path``."""
        plugins: list[str] = []
        if self.dicomweb:
            plugin = find_dicomweb_plugin()
            if plugin is None:
                raise FileNotFoundError(f"{DICOMWEB_PLUGIN} not found in {ORTHANC_PLUGIN_DIRS}")
            plugins.append(plugin)
        cfg = orthanc_config(f"test-{self.aet}", self.aet, self.storage_dir, self.dicom_port,
                             self.http_port, self.modalities, self.lua_scripts, self.stable_age,
                             plugins)
        cfg.update({"ConcurrentJobs": 2, "HttpThreadsCount": 10, "DicomThreadsCount": 4})
        if self.dicomweb:
            cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True,
                               "WadoRoot": "/wado", "Host": "127.0.0.1", "Ssl": False}
        cfg.update(self.extra_config)
        return cfg

    def prepare(self) -> None:
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))

    def command(self) -> list[str]:
        binary = find_orthanc()
        if binary is None:
            raise FileNotFoundError("Orthanc binary not found")
        cmd = [binary]
        if self.verbose:
            cmd.append("--verbose")
        return [*cmd, str(self.config_path)]

    def ready(self) -> bool:
        try:
            self.get("/system")
        except (OSError, urllib.error.URLError):
            return False
        return tcp_accepts(self.dicom_port)

    # REST helpers (urllib only)
    def request(self, method: str, path: str, body: Any = None, timeout: float = 60) -> bytes:
        """Send an HTTP request to the REST API and return the raw response body."""
        data: bytes | None
        headers = {}
        if body is None:
            data = None
        elif isinstance(body, bytes):
            data = body
            headers["Content-Type"] = "application/octet-stream"
        else:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return bytes(resp.read())

    def get(self, path: str) -> Any:
        """GET ``path`` and decode JSON."""
        return json.loads(self.request("GET", path))

    def post(self, path: str, body: Any = None) -> Any:
        """POST JSON (or bytes) to ``path`` and decode the JSON answer."""
        raw = self.request("POST", path, body if body is not None else b"")
        return json.loads(raw) if raw.strip() else None

    def delete(self, path: str) -> None:
        """DELETE ``path``."""
        self.request("DELETE", path)

    def instance_sop_uids(self) -> set[str]:
        """SOP Instance UIDs of every stored instance."""
        return {i["MainDicomTags"]["SOPInstanceUID"] for i in self.get("/instances?expand")}

    def instance_id(self, sop_uid: str) -> str:
        """Orthanc identifier of the instance with ``sop_uid`` (KeyError if absent)."""
        for hit in self.post("/tools/lookup", sop_uid.encode()) or []:
            if hit.get("Type") == "Instance":
                return str(hit["ID"])
        raise KeyError(sop_uid)

    def instance_file(self, sop_uid: str) -> bytes:
        """The stored DICOM file of the instance with ``sop_uid``."""
        return self.request("GET", f"/instances/{self.instance_id(sop_uid)}/file")

    def wait_for_instances(self, expected: Iterable[str], timeout: float = 60) -> set[str]:
        """Wait until every SOP Instance UID in ``expected`` is stored; return all stored UIDs."""
        want = set(expected)
        stored: set[str] = set()

        def arrived() -> bool:
            nonlocal stored
            stored = self.instance_sop_uids()
            return stored >= want

        wait_until(arrived, timeout=timeout, interval=0.25, ignore=(OSError,),
                   what=f"{len(want)} instances in Orthanc {self.aet}")
        return stored


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


class MotoS3(PeerProcess):
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
