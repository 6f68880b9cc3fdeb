"""Peer processes for the benchmark: DCMTK, Orthanc and ``dicomrouter serve`` on loopback.

Every process writes its output to a log file in its own work directory, is waited for by
polling (never a fixed sleep) and is stopped with SIGTERM, then SIGKILL. Processes that are still
running are tracked, so :func:`stop_all` can end them whatever happened; on Linux each child also
gets ``PR_SET_PDEATHSIG`` so it dies with the benchmark even if the benchmark is killed.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import yaml

T = TypeVar("T")

START_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0
LOOPBACK = "127.0.0.1"
BENCH_S3_KEY = "bench"


class BenchError(RuntimeError):
    """A measurement could not be taken: a peer failed, or data did not arrive."""


# --------------------------------------------------------------------------- finding programs


def is_elf(path: Path) -> bool:
    """True if ``path`` is an executable ELF binary (not a wrapper script)."""
    try:
        if not (path.is_file() and os.access(path, os.X_OK)):
            return False
        with path.open("rb") as fh:
            return fh.read(4) == b"\x7fELF"
    except OSError:
        return False


def find_dcmtk(tool: str) -> str | None:
    """Path of the real DCMTK ``tool`` or None.

    pynetdicom installs Python scripts named storescu/storescp/echoscu that shadow DCMTK's in
    PATH, so only ELF binaries count. ``$DCMTK_BIN`` (a directory) wins when set.
    """
    bin_dir = os.environ.get("DCMTK_BIN")
    if bin_dir:
        dirs = [bin_dir]
    else:
        dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d] + ["/usr/bin"]
    for d in dirs:
        candidate = Path(d) / tool
        if is_elf(candidate):
            return str(candidate)
    return None


def dcmtk(tool: str) -> str:
    """Path of the real DCMTK ``tool``; raises BenchError if it is not installed."""
    path = find_dcmtk(tool)
    if path is None:
        raise BenchError(f"DCMTK {tool!r} not found (apt-get install dcmtk, or set DCMTK_BIN)")
    return path


def find_orthanc() -> str | None:
    """Path of the Orthanc binary or None: ``$ORTHANC_BIN`` when set, else ``Orthanc`` on PATH
    (Debian installs it in /usr/sbin, which a non-root PATH may lack: searched too)."""
    named = os.environ.get("ORTHANC_BIN")
    if named:
        return named if is_elf(Path(named)) else None
    for d in [*os.environ.get("PATH", "").split(os.pathsep), "/usr/sbin", "/usr/local/sbin"]:
        candidate = Path(d or ".") / "Orthanc"
        if is_elf(candidate):
            return str(candidate)
    return None


def tool_version(argv: Sequence[str]) -> str:
    """First non-empty line of ``argv --version`` (or ``?``)."""
    try:
        out = subprocess.run([*argv, "--version"], capture_output=True, text=True, timeout=30,
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = [ln.strip() for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    return lines[0] if lines else "?"


# --------------------------------------------------------------------------- small helpers


_HANDED_OUT: set[int] = set()  # ports this process gave out already
_PORTS = random.Random()  # seeded from the OS: every process (xdist worker) draws its own


def _ephemeral_low() -> int:
    """The first port of the kernel's range for outgoing connections' local ports."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for a server started next.

    Drawn at random below the kernel's ephemeral range, not by ``bind(0)``: a port ``bind(0)``
    hands out lies in the range every outgoing connection takes its local port from, and a
    storescu, an HTTP request or a database connection of a test running beside took it
    before the server meant for it was listening (a router failing to start in CI with
    "port ... is in use"). A port is free when it binds without SO_REUSEADDR (so no
    connection in TIME_WAIT holds it either), and never handed out twice by one process."""
    low = _ephemeral_low()
    first = max(10_000, low - 12_000)
    if low - first >= 1_000:
        for _ in range(500):
            port = _PORTS.randrange(first, low)
            if port in _HANDED_OUT:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((LOOPBACK, port))
                except OSError:
                    continue
            _HANDED_OUT.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # no room below it
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def tcp_accepts(port: int, host: str = LOOPBACK, timeout: float = 1.0) -> bool:
    """True if something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.1,
    what: str = "",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Poll ``predicate`` until it returns a truthy value, which is returned.

    Exceptions in ``ignore`` count as "not yet". Raises BenchError naming ``what`` on timeout.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except ignore as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_exc!r})" if last_exc is not None else ""
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}{detail}")
        time.sleep(interval)


def peer_env(**extra: str) -> dict[str, str]:
    """Environment for peer processes: the current one plus ``TCP_NODELAY=1``."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    env.update(extra)
    return env


def router_env() -> dict[str, str]:
    """:func:`peer_env` whose PYTHONPATH starts with the directory holding *this* dicomrouter.

    So ``python -m dicomrouter`` in a subprocess runs the same code as the benchmark, whatever
    an editable install elsewhere points to.
    """
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    # BENCH_S3_KEY: the credentials the router's s3 destination names (moto takes any)
    return peer_env(PYTHONPATH=f"{root}{os.pathsep}{path}" if path else root,
                    BENCH_S3_KEY=BENCH_S3_KEY)


def log_tail(path: Path | None, lines: int = 40) -> str:
    """Last ``lines`` lines of a log file (empty string if missing)."""
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


_PR_SET_PDEATHSIG = 1
_libc: Any = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError):
        _libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGKILL when the benchmark process dies (Linux)."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def popen(argv: Sequence[str], log_path: Path, cwd: Path | None = None,
          env: Mapping[str, str] | None = None,
          user: str | None = None) -> subprocess.Popen[bytes]:
    """Start ``argv`` with stdout+stderr appended to ``log_path``; it dies with us. ``user``:
    run as that user (PostgreSQL refuses to run as root)."""
    with log_path.open("ab") as log:
        return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, cwd=cwd, env=dict(env or peer_env()),
                                preexec_fn=_die_with_parent, user=user,
                                group=user if user else None)


def terminate(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT,
              signal_sent: bool = False) -> None:
    """SIGTERM (unless already sent), wait up to ``timeout``, then SIGKILL."""
    if proc.poll() is not None:
        return
    if not signal_sent:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=timeout)


def wait_exit(proc: subprocess.Popen[bytes], timeout: float,
              tick: Callable[[], None] | None = None, every: float = 0.05) -> bool:
    """Wait until ``proc`` exits; False if ``timeout`` passed first.

    Wakes up the moment the process ends (a pidfd, Linux >= 5.3), unlike ``Popen.wait(timeout)``,
    which polls with sleeps of up to 50 ms: too coarse for sub-second timings. ``tick`` is called
    every ``every`` seconds meanwhile.
    """
    deadline = time.monotonic() + timeout
    try:
        pidfd: int | None = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux, or already reaped
        pidfd = None
    try:
        while proc.poll() is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            step = min(remaining, every) if tick is not None or pidfd is None else remaining
            if pidfd is not None:
                select.select([pidfd], [], [], step)
            else:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=step)
            if tick is not None:
                tick()
        return True
    finally:
        if pidfd is not None:
            os.close(pidfd)


def proc_status_kb(pid: int, field: str) -> int | None:
    """A ``kB`` field of /proc/PID/status (``VmHWM``, ``VmRSS``), or None if unavailable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


# --------------------------------------------------------------------------- peers

_LIVE: set[Peer] = set()


def stop_together(peers: Iterable[Peer]) -> None:
    """SIGTERM every peer at once, then wait for each: Orthanc alone needs ~3.5 s to stop."""
    peers = list(peers)
    for peer in peers:
        peer.signal_stop()
    for peer in peers:
        peer.stop()


def stop_all() -> None:
    """Stop every peer that is still running (used on the way out, whatever happened)."""
    stop_together(_LIVE)


P = TypeVar("P", bound="Peer")


@contextmanager
def running() -> Iterator[Callable[[P], P]]:
    """``with running() as start: a = start(Peer(...))``: all started peers stop together."""
    started: list[Peer] = []

    def start(peer: P) -> P:
        peer.start()
        started.append(peer)
        return peer

    try:
        yield start
    finally:
        stop_together(started)


class Peer:
    """One long-running subprocess with a log file in its work directory.

    The one peer harness of the benchmark and the tests (tests/peers.py adds fixtures). Without
    a ``work_dir`` a temporary one is made, and removed on a clean exit (kept when the ``with``
    block failed, for its logs).
    """

    name = "peer"
    user: str | None = None  # run as this user (None: as we run)

    def __init__(self, work_dir: Path | None = None) -> None:
        self._own_dir = work_dir is None
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix=f"dicomrouter-{self.name}-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.work_dir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopping = False

    def command(self) -> list[str]:
        """The argv to run."""
        raise NotImplementedError

    def ready(self) -> bool:
        """True once the peer serves requests."""
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        """Environment of the process."""
        return peer_env()

    def prepare(self) -> None:
        """Write config files before the process starts."""

    @property
    def pid(self) -> int:
        """PID of the peer process."""
        if self.proc is None:
            raise BenchError(f"{self.name} is not running")
        return self.proc.pid

    def start(self) -> Self:
        """Start the process and wait until it is ready; stop it again if that fails."""
        self.prepare()
        self.proc = popen(self.command(), self.log_path, cwd=self.work_dir, env=self.env(),
                          user=self.user)
        _LIVE.add(self)
        try:
            wait_until(self._ready_or_died, timeout=START_TIMEOUT, interval=0.05,
                       what=f"{self.name} to become ready (log {self.log_path})")
        except BaseException:
            self.stop()
            raise
        return self

    def _ready_or_died(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited with code {self.proc.returncode} during "
                             f"start-up; log {self.log_path}:\n{log_tail(self.log_path)}")
        return self.ready()

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def running(self) -> bool:
        return self.alive()

    def stop(self) -> None:
        """SIGTERM (unless :meth:`signal_stop` sent it), then SIGKILL after a grace period."""
        proc, self.proc = self.proc, None
        _LIVE.discard(self)
        if proc is not None:
            terminate(proc, signal_sent=self._stopping)
        self._stopping = False

    def signal_stop(self) -> None:
        """Send SIGTERM without waiting (see :func:`stop_together`)."""
        if self.proc is not None and self.proc.poll() is None and not self._stopping:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            self._stopping = True

    def log(self, lines: int = 200) -> str:
        """Tail of the log."""
        return log_tail(self.log_path, lines)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        if self._own_dir and exc_type is None:
            shutil.rmtree(self.work_dir, ignore_errors=True)


class StoreSCP(Peer):
    """DCMTK ``storescp`` writing received instances to ``out_dir/<MOD>.<SOPInstanceUID>.dcm``.

    ``accept_all`` (``+xa``): every syntax DCMTK knows, so instances are stored as sent;
    ``extra`` adds options (``+xi``: Implicit VR Little Endian only). Single-process:
    concurrent associations queue in the listen backlog.
    """

    name = "storescp"

    def __init__(self, work_dir: Path | None = None, aet: str = "STORESCP",
                 extra: Sequence[str] = (), port: int | None = None, accept_all: bool = True,
                 verbose: bool = False) -> None:
        super().__init__(work_dir)
        self.aet = aet
        self.port = port or free_port()
        self.out_dir = self.work_dir / "received"
        self.extra = list(extra)
        self.accept_all = accept_all
        self.verbose = verbose

    def prepare(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        return [dcmtk("storescp"), *(["-v"] if self.verbose else []), "--aetitle", self.aet,
                "-od", str(self.out_dir), "-uf", "-fe", ".dcm",
                *(["+xa"] if self.accept_all else []), *self.extra, str(self.port)]

    def ready(self) -> bool:
        if "--refuse" in self.extra or "+tls" in self.extra:  # echoscu speaks plain DICOM
            return tcp_accepts(self.port)
        result = subprocess.run(
            [dcmtk("echoscu"), "-to", "5", "-aec", self.aet, "-aet", "READYCHECK", LOOPBACK,
             str(self.port)],
            capture_output=True, env=peer_env(), timeout=60, check=False)
        return result.returncode == 0

    def files(self) -> list[Path]:
        """Received files, sorted by name."""
        return sorted(p for p in self.out_dir.glob("*.dcm") if p.is_file())

    def count(self) -> int:
        """Number of received files."""
        return len(self.files())


ORTHANC_PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins")
DICOMWEB_PLUGIN = "libOrthancDicomWeb.so"


def find_dicomweb_plugin() -> str | None:
    """Path of the Orthanc DICOMweb plugin, or None (``$ORTHANC_PLUGINS``, a folder, first)."""
    named = os.environ.get("ORTHANC_PLUGINS")
    for d in ([named] if named else []) + list(ORTHANC_PLUGIN_DIRS):
        candidate = Path(d) / DICOMWEB_PLUGIN
        if candidate.is_file():
            return str(candidate)
    return None


def orthanc_config(name: str, aet: str, storage_dir: Path, dicom_port: int, http_port: int,
                   modalities: Mapping[str, Any], lua_scripts: Sequence[str],
                   stable_age: int, plugins: Sequence[str] = ()) -> dict[str, Any]:
    """A private Orthanc's configuration: own storage, loopback ports, no authentication."""
    return {
        "Name": name,
        "StorageDirectory": str(storage_dir),
        "IndexDirectory": str(storage_dir),
        "DicomServerEnabled": True,
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomModalities": dict(modalities),
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": list(plugins),
        "LuaScripts": list(lua_scripts),
        "StableAge": stable_age,
        "SaveJobs": False,
    }


class Orthanc(Peer):
    """A private Orthanc (own storage, free DICOM/HTTP ports, no authentication).

    ``modalities`` maps a name to ``[aet, host, port]`` (or Orthanc's object form);
    ``dicomweb`` loads the DICOMweb plugin; ``extra_config`` is merged last into the generated
    configuration (``config_path``).
    """

    name = "orthanc"

    def __init__(
        self,
        work_dir: Path | None = None,
        aet: str = "ORTHANC",
        modalities: Mapping[str, Sequence[Any] | Mapping[str, Any]] | None = None,
        lua_scripts: Sequence[Path | str] = (),
        stable_age: int = 1,
        dicomweb: bool = False,
        extra_config: Mapping[str, Any] | None = None,
        verbose: bool = False,
        users: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(work_dir)
        self.aet = aet
        self.users = dict(users or {})  # HTTP basic auth on when given; we use the first
        self.dicom_port = free_port()
        self.http_port = free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        self.url = f"http://{LOOPBACK}:{self.http_port}"
        self.modalities = {k: dict(v) if isinstance(v, Mapping) else list(v)
                           for k, v in (modalities or {}).items()}
        self.lua_scripts = [str(Path(p).resolve()) for p in lua_scripts]
        self.stable_age = stable_age
        self.dicomweb = dicomweb
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
                raise BenchError(f"{DICOMWEB_PLUGIN} not found in {ORTHANC_PLUGIN_DIRS}")
            plugins.append(plugin)
        config = orthanc_config(f"peer-{self.aet}", self.aet, self.storage_dir,
                                self.dicom_port, self.http_port, self.modalities,
                                self.lua_scripts, self.stable_age, plugins)
        if self.dicomweb:
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True,
                                  "WadoRoot": "/wado", "Host": LOOPBACK, "Ssl": False}
        if self.users:
            config.update({"AuthenticationEnabled": True, "RegisteredUsers": self.users})
        config.update(self.extra_config)
        return config

    def prepare(self) -> None:
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))

    def command(self) -> list[str]:
        binary = find_orthanc()
        if binary is None:
            raise BenchError("Orthanc not found (apt-get install orthanc)")
        return [binary, *(["--verbose"] if self.verbose else []), str(self.config_path)]

    def ready(self) -> bool:
        try:
            self.get("/system")
        except (OSError, urllib.error.URLError):
            return False
        return tcp_accepts(self.dicom_port)

    def request(self, method: str, path: str, body: Any = None, timeout: float = 60) -> bytes:
        """An HTTP request to the REST API; the raw response body."""
        data: bytes | None = None
        headers = {}
        if isinstance(body, bytes):
            data, headers["Content-Type"] = body, "application/octet-stream"
        elif body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        if self.users:
            user, password = next(iter(self.users.items()))
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return bytes(resp.read())

    def get(self, path: str) -> Any:
        """GET a REST resource and decode its JSON."""
        return json.loads(self.request("GET", path))

    def post(self, path: str, body: Any = None) -> Any:
        """POST JSON (or bytes) to ``path`` and decode the JSON answer."""
        raw = self.request("POST", path, body if body is not None else b"")
        return json.loads(raw) if raw.strip() else None

    def delete(self, path: str) -> None:
        self.request("DELETE", path)

    def count(self) -> int:
        """``CountInstances`` from ``/statistics``."""
        return int(self.get("/statistics")["CountInstances"])

    def instance_sop_uids(self) -> set[str]:
        """SOP Instance UIDs of every stored instance."""
        return {i["MainDicomTags"]["SOPInstanceUID"] for i in self.get("/instances?expand")}

    def instance_id(self, sop_uid: str) -> str:
        """Orthanc's identifier of the instance with ``sop_uid`` (KeyError if absent)."""
        for hit in self.post("/tools/lookup", sop_uid.encode()) or []:
            if hit.get("Type") == "Instance":
                return str(hit["ID"])
        raise KeyError(sop_uid)

    def instance_file(self, sop_uid: str) -> bytes:
        """The stored DICOM file of the instance with ``sop_uid``."""
        return self.request("GET", f"/instances/{self.instance_id(sop_uid)}/file")

    def wait_for_instances(self, expected: Iterable[str], timeout: float = 60) -> set[str]:
        """Wait until every SOP Instance UID in ``expected`` is stored; all stored UIDs."""
        want = set(expected)
        stored: set[str] = set()

        def arrived() -> bool:
            nonlocal stored
            stored = self.instance_sop_uids()
            return stored >= want

        wait_until(arrived, timeout=timeout, interval=0.25, ignore=(OSError,),
                   what=f"{len(want)} instances in Orthanc {self.aet}")
        return stored


class MotoServer(Peer):
    """An S3 server: moto in server mode (``pip install 'moto[server]'``), over real HTTP."""

    name = "moto"
    key = BENCH_S3_KEY  # moto takes any credentials

    def __init__(self, work_dir: Path | None = None) -> None:
        super().__init__(work_dir)
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"

    @staticmethod
    def available() -> bool:
        try:
            import boto3  # noqa: F401
            import moto.server  # noqa: F401
        except ImportError:
            return False
        return True

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(self.port)]

    def env(self) -> dict[str, str]:
        return peer_env(BENCH_S3_KEY=self.key)

    def ready(self) -> bool:
        return tcp_accepts(self.port)

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id=self.key, aws_secret_access_key=self.key)

    def create_bucket(self, bucket: str) -> None:
        self.client().create_bucket(Bucket=bucket)

    def count(self) -> int:
        """Objects in every bucket."""
        c = self.client()
        return sum(int(c.list_objects_v2(Bucket=b["Name"]).get("KeyCount", 0))
                   for b in c.list_buckets()["Buckets"])


def find_postgres() -> Path | None:
    """The directory of PostgreSQL's server programs (Debian: /usr/lib/postgresql/N/bin);
    ``PG_BIN`` overrides."""
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                   else 0)
    if found:
        return found[-1].parent
    path = shutil.which("postgres")
    return Path(path).parent if path else None


class Postgres(Peer):
    """A PostgreSQL server of its own: ``initdb`` in a temporary directory, ``postgres`` on a
    free loopback port, trust authentication for the ``dicomrouter`` role and database.

    As root, it runs as the ``postgres`` user (the server refuses root), so its data directory
    lives in a temporary directory of its own that that user owns. ``stop`` + ``start`` is a
    restart with the same data and port. ``fsync=False`` trades durability for speed in tests.
    """

    name = "postgres"

    def __init__(self, work_dir: Path | None = None, fsync: bool = False,
                 port: int | None = None) -> None:
        super().__init__(work_dir)
        self.bin = find_postgres()
        self.port = port or free_port()
        self.fsync = fsync
        self.user = "postgres" if os.geteuid() == 0 else None
        self.data_dir = Path(tempfile.mkdtemp(prefix="dicomrouter-pgdata-"))
        self.dsn = f"postgresql://dicomrouter@{LOOPBACK}:{self.port}/dicomrouter"
        self._created = False

    @staticmethod
    def available() -> bool:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            return False
        return find_postgres() is not None

    def prepare(self) -> None:
        if self.bin is None:
            raise BenchError("PostgreSQL not found (apt-get install postgresql, or set PG_BIN)")
        if (self.data_dir / "PG_VERSION").exists():
            return  # a restart
        if self.user:
            shutil.chown(self.data_dir, self.user, self.user)
        r = subprocess.run([str(self.bin / "initdb"), "-D", str(self.data_dir), "-U",
                            "dicomrouter", "--auth=trust", "-E", "UTF8", "--no-sync"],
                           capture_output=True, text=True, timeout=120, check=False,
                           user=self.user, group=self.user, cwd=self.data_dir)
        if r.returncode != 0:
            raise BenchError(f"initdb failed: {r.stderr.strip() or r.stdout.strip()}")

    def command(self) -> list[str]:
        return [str(self.bin / "postgres"), "-D", str(self.data_dir), "-p", str(self.port),
                "-k", str(self.data_dir), "-c", f"listen_addresses={LOOPBACK}",
                "-c", f"fsync={'on' if self.fsync else 'off'}", "-c", "max_connections=200",
                "-c", "synchronous_commit=" + ("on" if self.fsync else "off")]

    def ready(self) -> bool:
        if not tcp_accepts(self.port):
            return False
        import psycopg

        try:
            with psycopg.connect(f"postgresql://dicomrouter@{LOOPBACK}:{self.port}/postgres",
                                 autocommit=True, connect_timeout=2) as conn:
                if not self._created:
                    have = conn.execute("SELECT 1 FROM pg_database WHERE datname='dicomrouter'"
                                        ).fetchone()
                    if not have:
                        conn.execute("CREATE DATABASE dicomrouter")
                    self._created = True
        except psycopg.OperationalError:
            return False  # starting up
        return True

    def new_database(self, name: str) -> str:
        """A fresh, empty database on this server; its DSN."""
        import psycopg

        with psycopg.connect(f"postgresql://dicomrouter@{LOOPBACK}:{self.port}/postgres",
                             autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://dicomrouter@{LOOPBACK}:{self.port}/{name}"

    def sql(self, query: str, args: Sequence[Any] = (), dsn: str | None = None
            ) -> list[tuple[Any, ...]]:
        """Run one statement on the router's database; its rows."""
        import psycopg

        with psycopg.connect(dsn or self.dsn, autocommit=True, connect_timeout=10) as conn:
            cur = conn.execute(query, tuple(args) or None)
            return list(cur.fetchall()) if cur.description else []

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        super().__exit__(exc_type, exc, tb)
        shutil.rmtree(self.data_dir, ignore_errors=True)


class RouterServer(Peer):
    """``python -m dicomrouter serve --config <generated yml>``; ``config`` overrides defaults."""

    name = "router"

    def __init__(self, work_dir: Path, config: Mapping[str, Any]) -> None:
        super().__init__(work_dir)
        self.config: dict[str, Any] = {
            "ae_title": "DICOMROUTER",
            "bind": LOOPBACK,
            "spool": str(work_dir / "spool"),
            "log_level": "INFO",
            "web": {"enabled": False},  # tests and bench run several routers at once
            **config,
        }
        self.config.setdefault("port", free_port())
        self.port = int(self.config["port"])
        self.aet = str(self.config["ae_title"])
        self.spool = Path(self.config["spool"])
        self.config_path = work_dir / "router.yml"

    def prepare(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))

    def command(self) -> list[str]:
        return [sys.executable, "-m", "dicomrouter", "serve", "--config", str(self.config_path)]

    def env(self) -> dict[str, str]:
        return router_env()

    def ready(self) -> bool:
        return "listening as" in self.log(400) and tcp_accepts(self.port)

    def status(self) -> dict[str, Any]:
        """``dicomrouter status --json --all`` of this router's spool."""
        r = subprocess.run([sys.executable, "-m", "dicomrouter", "status", "--json", "--all",
                            "--config", str(self.config_path)], capture_output=True, text=True,
                           timeout=120, check=False, env=router_env())
        if r.returncode != 0:
            raise BenchError(f"dicomrouter status failed: {r.stderr.strip()}")
        return dict(json.loads(r.stdout))

    def count(self) -> int:
        """Instances recorded in the spool."""
        return sum(int(s["instances_in_spool"]) for s in self.status()["studies"])

    def peak_rss_kb(self) -> int | None:
        """VmHWM (peak resident set size) of the router process."""
        return proc_status_kb(self.pid, "VmHWM")

    def rss_kb(self) -> int | None:
        """VmRSS (current resident set size) of the router process."""
        return proc_status_kb(self.pid, "VmRSS")


# --------------------------------------------------------------------------- storescu

# storescu's proposal flag for the transfer syntax the files are stored in
STORESCU_PROPOSAL_FLAGS = {
    "1.2.840.10008.1.2.1": "-x=",  # Explicit VR Little Endian (uncompressed, explicit first)
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


def storescu_argv(files: Sequence[Path], port: int, aet: str, transfer_syntax: str,
                  calling: str = "BENCHSCU", extra: Sequence[str] = ()) -> list[str]:
    """``storescu`` sending ``files`` in one association, each in its own transfer syntax.

    ``-R`` proposes only the SOP classes present; the syntax flag proposes the files' own
    transfer syntax (the corpora are uniform), so nothing is converted on the way.
    """
    flag = STORESCU_PROPOSAL_FLAGS.get(transfer_syntax)
    if flag is None:
        raise BenchError(f"no storescu proposal flag for transfer syntax {transfer_syntax}")
    return [dcmtk("storescu"), "-aet", calling, "-aec", aet, "-R", flag, *extra, LOOPBACK,
            str(port), *map(str, files)]


class StoreSCU:
    """One or more concurrent ``storescu`` processes; :meth:`run` returns their wall time."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)

    def run(self, argvs: Sequence[Sequence[str]], timeout: float,
            tick: Callable[[], None] | None = None) -> float:
        """Start every argv at once, wait for all; seconds from the first start to the last end.

        ``tick`` is called about every 50 ms while waiting (e.g. to sample memory). Raises
        BenchError (with the log) if one fails or times out; none is left running.
        """
        procs: list[tuple[subprocess.Popen[bytes], Path]] = []
        started = time.perf_counter()
        try:
            for n, argv in enumerate(argvs):
                log = self.log_dir / f"storescu-{n}.log"
                procs.append((popen(argv, log), log))
            deadline = time.monotonic() + timeout
            for proc, log in procs:
                if not wait_exit(proc, deadline - time.monotonic(), tick):
                    raise BenchError(f"storescu did not finish within {timeout:g} s; log "
                                     f"{log}:\n{log_tail(log)}")
            elapsed = time.perf_counter() - started
            for proc, log in procs:
                if proc.returncode != 0:
                    raise BenchError(f"storescu exited with {proc.returncode}; log {log}:\n"
                                     f"{log_tail(log)}")
            return elapsed
        finally:
            for proc, _log in procs:
                terminate(proc, timeout=10)
