"""The conversion processes (dicomrouter/conversion.py): a real conversion round trip, a process
that dies (a codec's crash) or hangs, and the idle stop. Real spawned processes throughout."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from peers import wait_until
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from dicomrouter.conversion import ConversionPool
from dicomrouter.sample import generate
from dicomrouter.transcode import ConversionError


@pytest.fixture
def pool():  # type: ignore[no-untyped-def]
    p = ConversionPool(processes=1, timeout=60, idle=60)
    yield p
    p.close()


def _pids(pool: ConversionPool) -> list[int]:
    executor = pool._executor  # noqa: SLF001 - the test looks at the processes themselves
    return list(getattr(executor, "_processes", {}) or {}) if executor else []


def test_a_conversion_in_another_process_decodes_to_the_source(tmp_path: Path,
                                                               pool: ConversionPool) -> None:
    src = generate(tmp_path / "src", series=1, instances=1, rows=48, cols=40, seed=3)[0]
    ds = dcmread(src)
    ds.compress(RLELossless, generate_instance_uid=False)
    rle = tmp_path / "rle.dcm"
    ds.save_as(rle, enforce_file_format=True)
    out = tmp_path / "out.dcm"
    pool.to_file(str(rle), RLELossless, ImplicitVRLittleEndian, str(out))
    got = dcmread(out)
    assert got.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert got.SOPInstanceUID == ds.SOPInstanceUID
    assert np.array_equal(got.pixel_array, dcmread(src).pixel_array)
    assert os.getpid() not in _pids(pool) and _pids(pool)
    # part10=False: the dataset's bytes only, as they go into P-DATA
    raw, whole = tmp_path / "raw.bin", tmp_path / "whole.dcm"
    pool.to_file(str(rle), RLELossless, ExplicitVRLittleEndian, str(raw), part10=False)
    pool.to_file(str(rle), RLELossless, ExplicitVRLittleEndian, str(whole))
    header = len(whole.read_bytes()) - len(raw.read_bytes())
    assert whole.read_bytes()[128:132] == b"DICM" and header > 132
    assert whole.read_bytes()[header:] == raw.read_bytes()


def test_a_broken_file_is_a_permanent_conversion_error(tmp_path: Path,
                                                       pool: ConversionPool) -> None:
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00" * 10)
    with pytest.raises(ConversionError) as err:
        pool.to_file(str(bad), RLELossless, ImplicitVRLittleEndian, str(tmp_path / "o.dcm"))
    assert err.value.permanent


def test_a_process_that_dies_fails_the_call_and_the_next_one_works(
        tmp_path: Path, pool: ConversionPool) -> None:
    assert pool.call(int, "7") == 7
    first = _pids(pool)
    with pytest.raises(ConversionError) as err:
        pool.call(os.abort)  # what a codec's segfault looks like from here
    assert not err.value.permanent  # a retry is worth it: it was the process, maybe not the file
    assert "died" in str(err.value)
    assert pool.call(int, "8") == 8
    assert set(_pids(pool)).isdisjoint(first)


def test_a_conversion_over_the_timeout_is_stopped(pool: ConversionPool) -> None:
    pool.call(int, "1")  # started with the long timeout: a cold start is not what is timed
    pool.timeout = 1.0
    (pid,) = _pids(pool)
    started = time.monotonic()
    with pytest.raises(ConversionError) as err:
        pool.call(time.sleep, 120)
    assert time.monotonic() - started < 60
    assert "conversion_timeout" in str(err.value) and not err.value.permanent
    wait_until(lambda: not Path(f"/proc/{pid}").exists() or
               Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z",
               timeout=30, what="the hung conversion process killed")
    assert pool.call(int, "2") == 2


def test_the_processes_stop_when_idle(pool: ConversionPool) -> None:
    pool.configure(1, timeout=60, idle=0.5)
    pool.call(int, "3")
    (pid,) = _pids(pool)
    wait_until(lambda: not pool.running, timeout=30, what="the idle pool stopped")
    wait_until(lambda: not Path(f"/proc/{pid}").exists() or
               Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z",
               timeout=30, what="the idle conversion process gone")
    assert pool.call(int, "4") == 4  # and a new one starts on demand
