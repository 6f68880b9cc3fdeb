"""Where the router's receive time goes: py-spy attached to ``serve`` while storescu sends.

Two recordings of the same receive, each into its own router (``pip install py-spy``; attaching
needs ptrace permission, e.g. root or ``kernel.yama.ptrace_scope=0``):

* ``gil`` (``--gil``): only the thread holding the GIL, i.e. where the interpreter spends its
  time; samples / (seconds x rate) is roughly how busy the GIL was;
* ``wall`` (``--idle --threads``): every thread at every sample, idle or not, i.e. what each
  thread (the association's reactor, pynetdicom's DUL reader, ...) waits for.

The raw collapsed stacks (``receive-<mode>.txt``, or ``receive-<corpus>-<mode>.txt`` for a corpus
other than the first, one ``frame;frame;... count`` per line) load in speedscope or
flamegraph.pl; ``summary.txt`` has the top functions of each.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from .corpus import Corpus
from .procs import BenchError, RouterServer, StoreSCU, log_tail, popen, storescu_argv, wait_until
from .scenarios import LONG_STABLE_AGE

MODES: dict[str, list[str]] = {"gil": ["--gil"], "wall": ["--idle", "--threads"]}
_LINE = re.compile(r":\d+\)$")
_THREAD = re.compile(r"^thread \((\w+)\): ?(.*?)(@\d+)?$")


@dataclass
class Profile:
    """Aggregated samples of one recording; per thread too when recorded with ``--threads``."""

    total: int = 0
    self_lines: Counter[str] = field(default_factory=Counter)
    cumulative: Counter[str] = field(default_factory=Counter)
    threads: Counter[str] = field(default_factory=Counter)
    thread_self: defaultdict[str, Counter[str]] = field(
        default_factory=lambda: defaultdict(Counter))
    thread_cumulative: defaultdict[str, Counter[str]] = field(
        default_factory=lambda: defaultdict(Counter))


def function_of(frame: str) -> str:
    """``run_reactor (pynetdicom/dul.py:403)`` → ``run_reactor (pynetdicom/dul.py)``."""
    return _LINE.sub(")", frame)


def parse_collapsed(text: str) -> Profile:
    """Aggregate py-spy ``--format raw`` output (collapsed stacks, root first)."""
    prof = Profile()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = None
        m = _THREAD.match(frames[0])
        if m:
            thread = f"{m.group(2) or '?'} [{m.group(1)}]"
            prof.threads[thread] += n
            frames = frames[1:]
        if not frames:
            continue
        prof.total += n
        prof.self_lines[frames[-1]] += n
        functions = {function_of(f) for f in frames}
        for fn in functions:
            prof.cumulative[fn] += n
        if thread is not None:
            prof.thread_self[thread][frames[-1]] += n
            for fn in functions:
                prof.thread_cumulative[thread][fn] += n
    return prof


def top(counter: Counter[str], total: int, n: int) -> list[tuple[str, float]]:
    """The ``n`` largest entries with their share of ``total`` in percent."""
    return [(k, 100.0 * v / total) for k, v in counter.most_common(n)] if total else []


def format_profile(name: str, prof: Profile, n: int = 15) -> str:
    """Top self lines and cumulative functions; per thread when threads were recorded.

    Threads that spent the whole recording on one line (an idle server loop) get one line.
    """
    out = [f"== {name}: {prof.total} samples"]
    if not prof.threads:
        out.append("self (the line executing):")
        out += [f"  {pct:5.1f}%  {f}" for f, pct in top(prof.self_lines, prof.total, n)]
        out.append("cumulative (function on the stack):")
        out += [f"  {pct:5.1f}%  {f}" for f, pct in top(prof.cumulative, prof.total, 2 * n)]
        return "\n".join(out)
    for thread, samples in prof.threads.most_common():
        lines = prof.thread_self[thread]
        if not lines:
            continue
        (first, first_n), = lines.most_common(1)
        if first_n >= 0.98 * samples:
            out.append(f"thread {thread}: {samples} samples, all in {first}")
            continue
        out.append(f"thread {thread}: {samples} samples; self (% of this thread):")
        out += [f"  {pct:5.1f}%  {f}" for f, pct in top(lines, samples, n // 2)]
        out.append("  cumulative:")
        out += [f"  {pct:5.1f}%  {f}"
                for f, pct in top(prof.thread_cumulative[thread], samples, n)]
    return "\n".join(out)


def _attached(spy: subprocess.Popen[bytes], log: Path) -> bool:
    """py-spy is sampling, or has exited (which the caller reports)."""
    return spy.poll() is not None or "Sampling" in log_tail(log)


def profile_receive(corpora: list[Corpus], work: Path, out_dir: Path,
                    progress: Callable[[str], None], rate: int = 250) -> str:
    """Record the router receiving each corpus once per mode; return the summary text."""
    pyspy = shutil.which("py-spy")
    if pyspy is None:
        raise BenchError("py-spy not found: pip install py-spy")
    out_dir.mkdir(parents=True, exist_ok=True)
    parts: list[str] = []
    for i, corpus in enumerate(corpora):
        parts += _profile_corpus(pyspy, corpus, "" if i == 0 else f"{corpus.name}-",
                                 work, out_dir, progress, rate)
    summary = "\n\n".join(parts) + "\n"
    (out_dir / "summary.txt").write_text(summary)
    return summary


def _profile_corpus(pyspy: str, corpus: Corpus, prefix: str, work: Path, out_dir: Path,
                    progress: Callable[[str], None], rate: int) -> list[str]:
    parts: list[str] = []
    for mode, flags in MODES.items():
        raw = out_dir / f"receive-{prefix}{mode}.txt"
        log = out_dir / f"py-spy-{prefix}{mode}.log"
        with RouterServer(work / f"{prefix}{mode}", {"stable_age": LONG_STABLE_AGE}) as router:
            spy = popen([pyspy, "record", "--pid", str(router.pid), "--rate", str(rate),
                         "--format", "raw", "--output", str(raw), *flags], log)
            try:
                wait_until(partial(_attached, spy, log), timeout=60, what="py-spy to attach")
                if spy.poll() is not None:
                    raise BenchError(f"py-spy failed (ptrace permission?):\n{log_tail(log)}")
                seconds = StoreSCU(work / f"{prefix}{mode}" / "storescu").run(
                    [storescu_argv(corpus.files, router.port, router.aet,
                                   corpus.transfer_syntax)], timeout=600)
            finally:
                if spy.poll() is None:
                    spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
                try:
                    spy.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    spy.wait(timeout=30)
        if not raw.exists():
            raise BenchError(f"py-spy wrote no {raw}:\n{log_tail(log)}")
        prof = parse_collapsed(raw.read_text())
        title = (f"{mode} ({' '.join(flags) or 'default'}): {corpus.describe()} received in "
                 f"{seconds:.2f} s under py-spy at {rate} Hz")
        if mode == "gil":
            held = 100.0 * prof.total / (seconds * rate)
            title += f"; the GIL was held ~{held:.0f}% of the time"
        progress(f"profile {title}")
        parts.append(format_profile(title, prof))
    return parts
