"""The bandwidth cap per destination (issue 26, item 4): ``max_rate``.

End to end: a study goes to two DCMTK storescp (``--fork``: each association its own
process) from one router; one destination is capped and sends over three associations at
once, the other is not. The bytes arriving at the capped peer, sampled from its output folder
over the middle of the transfer (startup and tail left out), come at the cap within 5 %
(the bucket is shared by the associations: each on its own would triple it), while the
uncapped destination has the whole study long before. Plus the rate's parser and its keyed
errors, and the bucket's fairness across threads.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from peers import StoreSCP, run_storescu, sop_uids, wait_until
from pydicom.errors import InvalidDicomError
from router_fixtures import Router
from stow_server import StowServer

from dicomrouter import config as cfgmod
from dicomrouter.config import ConfigError
from dicomrouter.ratelimit import TokenBucket, parse_rate
from dicomrouter.sample import generate

CAP = 2_000_000  # bytes per second: "2MB/s"


class Arrivals:
    """Bytes arrived at a peer over time (in an output folder and its subfolders, or what
    ``total`` says), sampled every 20 ms by a thread."""

    def __init__(self, folder: Path | None = None,
                 total: Callable[[], int] | None = None) -> None:
        self.folder = folder
        if total is not None:
            self._total = total  # type: ignore[method-assign]
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _total(self) -> int:
        total = 0
        assert self.folder is not None
        for p in self.folder.rglob("*"):
            with contextlib.suppress(OSError):  # renamed or removed meanwhile
                total += p.stat().st_size
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self._total()))
            self._stop.wait(0.02)

    def __enter__(self) -> Arrivals:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def rate_between(self, low: float, high: float) -> tuple[float, float]:
        """(bytes per second, seconds) between the samples at ``low`` and ``high`` of the
        final total: the least-squares slope of bytes over time (files grow as their PDVs
        arrive, storescp ``+B``; the slope evens out the steps of the sampling)."""
        final = self.samples[-1][1]
        window = [(t, b) for t, b in self.samples if low * final <= b <= high * final]
        n = len(window)
        assert n >= 10, f"{n} samples in the window: too quick to measure"
        mt = sum(t for t, _ in window) / n
        mb = sum(b for _, b in window) / n
        slope = sum((t - mt) * (b - mb) for t, b in window) / \
            sum((t - mt) ** 2 for t, _ in window)
        return slope, window[-1][0] - window[0][0]

    def done_at(self, total: int) -> float:
        """When the first sample had ``total`` bytes (1: when the first bytes were there)."""
        return next(t for t, b in self.samples if b >= total)


def _served(scp: StoreSCP, files: list[Path]) -> bool:
    """Every instance arrived whole (with ``+B`` a file grows as it arrives: one being
    written does not parse yet)."""
    try:
        return sop_uids(scp.files()) >= sop_uids(files)
    except (InvalidDicomError, OSError, EOFError):
        return False


def test_capped_destination_sends_at_its_rate_and_the_other_is_unaffected(
        tmp_path: Path) -> None:
    files = generate(tmp_path / "study", series=2, instances=12, rows=512, cols=512, seed=264)
    size = sum(p.stat().st_size for p in files)
    assert size > 5 * CAP  # a window of seconds at the cap
    with StoreSCP(tmp_path / "wan", aet="WAN", extra=["--fork", "+B"]) as wan, \
            StoreSCP(tmp_path / "lan", aet="LAN", extra=["--fork", "+B"]) as lan:
        router = Router(tmp_path / "router", {
            "stable_age": "1s",
            "destinations": {
                "wan": {"type": "dicom", "ae_title": "WAN", "host": "127.0.0.1",
                        "port": wan.port, "associations": 3, "max_rate": "2MB/s"},
                "lan": {"type": "dicom", "ae_title": "LAN", "host": "127.0.0.1",
                        "port": lan.port}},
            "routes": [{"name": "all", "to": ["wan", "lan"]}]})
        with router, Arrivals(wan.out_dir) as wan_in, Arrivals(lan.out_dir) as lan_in:
            assert run_storescu(files, router.port, aet=router.aet).returncode == 0
            wait_until(lambda: _served(wan, files), timeout=120,
                       what="the capped destination served")
            wait_until(lambda: _served(lan, files), timeout=60,
                       what="the uncapped destination served")
            time.sleep(0.1)  # one more sample of the finished folders
            log = router.log(50000)
        assert "3 associations per study" in log
        rate, window = wan_in.rate_between(0.15, 0.85)
        assert window >= 3.0, window  # seconds, not a burst
        assert abs(rate - CAP) <= 0.05 * CAP, (rate, window)
        # the uncapped one finished long before the capped one (same study, same router)
        wan_done = wan_in.done_at(wan_in.samples[-1][1])
        lan_done = lan_in.done_at(lan_in.samples[-1][1])
        assert lan_done < wan_done - 2.0, (lan_done, wan_done)
        # and took well under half the time (it may be too quick to sample a rate from)
        lan_took = lan_done - lan_in.done_at(1)
        assert lan_took < 0.5 * (wan_done - wan_in.done_at(1)), (lan_took, wan_done)
        assert len(wan.files()) == len(files) == len(lan.files())


def test_every_sender_is_paced(tmp_path: Path) -> None:
    """The pynetdicom sender (per PDU), STOW-RS (as the body is read) and folder copies
    (per read) each keep to a 500kB/s cap, measured where the bytes arrive (per instance
    here, so within 10 %)."""
    cap = 500_000
    files = generate(tmp_path / "study", series=1, instances=16, rows=256, cols=256, seed=267)
    size = sum(p.stat().st_size for p in files)
    assert size > 4 * cap
    capped = {"max_rate": "500kB/s"}
    with StoreSCP(tmp_path / "scp", aet="SCP") as scp, StowServer() as web:
        router = Router(tmp_path / "router", {"destinations": {
            "scp": {"type": "dicom", "ae_title": "SCP", "host": "127.0.0.1", "port": scp.port,
                    "sender": "pynetdicom", **capped},
            "web": {"type": "dicomweb", "url": web.url, "batch_size": 1, **capped},
            "folder": {"type": "folder", "path": str(tmp_path / "out"), **capped}},
            "routes": [{"name": "all", "to": ["scp", "web", "folder"]}]})
        with router, Arrivals(scp.out_dir) as at_scp, \
                Arrivals(total=lambda: sum(len(p) for p in list(web.parts.values()))) as at_web, \
                Arrivals(tmp_path / "out") as at_folder:
            assert run_storescu(files, router.port, aet=router.aet).returncode == 0
            wait_until(lambda: _served(scp, files) and len(web.stored) == len(files)
                       and len(list((tmp_path / "out").rglob("*.dcm"))) == len(files),
                       timeout=120, what="every destination served")
            time.sleep(0.1)  # one more sample of the finished transfers
        for name, arrivals in (("scp", at_scp), ("web", at_web), ("folder", at_folder)):
            rate, window = arrivals.rate_between(0.15, 0.85)
            assert window >= 2.0, (name, window)
            assert abs(rate - cap) <= 0.10 * cap, (name, rate, window)


@pytest.mark.parametrize(("value", "rate"), [
    ("5MB/s", 5e6), ("5 MB/s", 5e6), ("500kB/s", 5e5), ("500KB/s", 5e5),
    ("2MiB/s", 2 * 2**20), ("100Mbit/s", 12.5e6), ("100Mbps", 12.5e6), ("1GB/s", 1e9),
    ("64KiB/s", 65536), ("8000bit/s", 1000), (5000, 5000),
])
def test_rates(value: object, rate: float) -> None:
    assert parse_rate(value, "max_rate") == rate


@pytest.mark.parametrize(("value", "problem"), [
    ("5Mb/s", "is ambiguous: write 5MB/s (bytes) or 5Mbit/s (bits)"),
    ("5MB", "expected a rate like 5MB/s"),
    ("fast", "expected a rate like 5MB/s"),
    ("5 XB/s", "unknown unit 'XB'"),
    ("0MB/s", "must be at least 1kB/s"),
    (True, "expected a rate like 5MB/s"),
    ("-1MB/s", "expected a rate like 5MB/s"),
])
def test_invalid_rate_is_a_keyed_config_error(tmp_path: Path, value: object,
                                              problem: str) -> None:
    p = tmp_path / "router.yml"
    p.write_text(yaml.safe_dump({"destinations": {"wan": {
        "type": "dicom", "ae_title": "WAN", "host": "127.0.0.1", "port": 104,
        "max_rate": value}}}))
    with pytest.raises(ConfigError) as err:
        cfgmod.load(p)
    assert str(err.value).startswith("destinations.wan.max_rate: "), str(err.value)
    assert problem in str(err.value), str(err.value)


def test_breaker_keys_are_checked(tmp_path: Path) -> None:
    base = {"type": "folder", "path": str(tmp_path / "out")}
    for change, message in (({"probe_every": "10ms"}, "probe_every: must be at least 100ms"),
                            ({"breaker_failures": -1}, "breaker_failures: expected a whole")):
        p = tmp_path / "router.yml"
        p.write_text(yaml.safe_dump({"destinations": {"f": {**base, **change}}}))
        with pytest.raises(ConfigError, match=f"destinations.f.{message}"):
            cfgmod.load(p)
    p.write_text(yaml.safe_dump({"destinations": {"f": base}}))
    d = cfgmod.load(p).destinations["f"]
    assert (d.breaker_failures, d.probe_every, d.max_rate) == (5, 30.0, None)


def test_breaker_failures_below_max_attempts(tmp_path: Path) -> None:
    """Each of the first ``breaker_failures`` failed runs uses an attempt: set at or above the
    destination's effective ``retry.max_attempts`` (its own, else the global one), a job
    would be dead-lettered before the breaker opens. 0 (off) is allowed, and so is the
    default with a low max_attempts (configs written before the breaker)."""
    base = {"type": "folder", "path": str(tmp_path / "out")}
    p = tmp_path / "router.yml"
    for top, change in (({}, {"breaker_failures": 10}),
                        ({"retry": {"max_attempts": 3}}, {"breaker_failures": 3}),
                        ({"retry": {"max_attempts": 20}},
                         {"breaker_failures": 4, "retry": {"max_attempts": 4}})):
        p.write_text(yaml.safe_dump({**top, "destinations": {"f": {**base, **change}}}))
        with pytest.raises(ConfigError) as err:
            cfgmod.load(p)
        assert str(err.value).startswith("destinations.f.breaker_failures: "), str(err.value)
        assert "must be less than the destination's retry.max_attempts" in str(err.value)
    for top, change in (({}, {"breaker_failures": 9}),
                        ({"retry": {"max_attempts": 1}}, {"breaker_failures": 0}),
                        ({"retry": {"max_attempts": 2}}, {}),
                        ({"retry": {"max_attempts": 3}},
                         {"breaker_failures": 5, "retry": {"max_attempts": 6}})):
        p.write_text(yaml.safe_dump({**top, "destinations": {"f": {**base, **change}}}))
        cfgmod.load(p)


def test_bucket_is_shared_and_fair_across_threads() -> None:
    """Four threads taking 10 kB pieces from one 1 MB/s bucket: together 1 MB/s (not 4), and
    each gets about a quarter."""
    bucket = TokenBucket(1_000_000)
    sent = [0, 0, 0, 0]
    stop = time.monotonic() + 1.5

    def sender(i: int) -> None:
        while time.monotonic() < stop:
            bucket.take(10_000)
            sent[i] += 10_000

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(4)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rate = sum(sent) / (time.monotonic() - started)
    assert 0.9e6 <= rate <= 1.1e6, rate
    assert min(sent) >= 0.7 * max(sent), sent


def test_a_move_destination_takes_no_cap(tmp_path: Path) -> None:
    p = tmp_path / "router.yml"
    p.write_text(yaml.safe_dump({"destinations": {"m": {
        "type": "move", "source": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104},
        "move_destination": "VIEWER", "max_rate": "5MB/s"}}}))
    with pytest.raises(ConfigError, match="destinations.m.max_rate: a move destination sends "
                       "no bytes itself"):
        cfgmod.load(p)


def test_pynetdicom_sender_under_a_tight_cap_keeps_its_associations(tmp_path: Path) -> None:
    """``sender: pynetdicom`` with a cap so tight that an instance's share of it (2
    associations, ~295 kB instances at 200kB/s: ~3 s each) is longer than the peer's
    ``timeout`` (2 s, some room for a loaded machine): the bytes are paced as they stream, so
    no association sits idle past pynetdicom's network timeout; every instance arrives in the
    first attempt, at the cap."""
    cap = 200_000
    files = generate(tmp_path / "study", series=1, instances=10, rows=384, cols=384, seed=268)
    size = sum(p.stat().st_size for p in files)
    assert size / len(files) * 2 / cap > 2 * 1.2  # each instance's share: beyond the timeout
    with StoreSCP(tmp_path / "scp", aet="SCP", extra=["--fork", "+B"]) as scp:
        router = Router(tmp_path / "router", {"destinations": {
            "scp": {"type": "dicom", "ae_title": "SCP", "host": "127.0.0.1", "port": scp.port,
                    "sender": "pynetdicom", "associations": 2, "timeout": "2s",
                    "max_rate": "200kB/s", "retry": {"initial": "1s", "max_attempts": 3}}},
            "routes": [{"name": "all", "to": ["scp"]}]})
        with router, Arrivals(scp.out_dir) as at_scp:
            assert run_storescu(files, router.port, aet=router.aet).returncode == 0
            wait_until(lambda: _served(scp, files) and "delivered 10 instance(s)" in
                       router.log(2000), timeout=120, what="the destination served")
            time.sleep(0.1)  # one more sample of the finished transfer
            log = router.log(50000)
        assert "2 associations per study" in log
        assert "Network timeout" not in log, log[-3000:]
        assert "failed" not in log and "refused:" not in log, log[-3000:]
        rate, window = at_scp.rate_between(0.15, 0.85)
        assert window >= 3.0, window
        assert abs(rate - cap) <= 0.10 * cap, (rate, window)


def test_a_paced_wait_ends_at_shutdown(tmp_path: Path) -> None:
    """A folder copy at 1kB/s waits minutes for its second file: the router stops at SIGTERM
    in seconds (the bucket's wait is woken by the workers' stop), not after the workers'
    30 s grace."""
    files = generate(tmp_path / "study", series=1, instances=4, rows=256, cols=256, seed=269)
    router = Router(tmp_path / "router", {"destinations": {
        "slow": {"type": "folder", "path": str(tmp_path / "out"), "max_rate": "1kB/s"}},
        "routes": [{"name": "all", "to": ["slow"]}]})
    with router:
        assert run_storescu(files, router.port, aet=router.aet).returncode == 0
        wait_until(lambda: "sending 4 instance(s)" in router.log(2000), timeout=60,
                   what="the paced delivery started")
        time.sleep(0.5)  # into the bucket's wait
        assert router.proc is not None
        started = time.monotonic()
        router.proc.terminate()
        router.proc.wait(60)
        took = time.monotonic() - started
        assert took < 10, took
        # the instance on the wire went at full speed; the rest waits for the next start
        assert "interrupted by shutdown after 2 instance(s); will resume" in router.log(2000)


def test_an_interrupted_bucket_stops_waiting() -> None:
    bucket = TokenBucket(1000)
    bucket.take(1000)  # the next take waits about 1 s...
    threading.Timer(0.2, bucket.interrupt).start()
    started = time.monotonic()
    bucket.take(100_000)  # ...this one 100 s, unless interrupted
    assert time.monotonic() - started < 5
