"""P7: several routers on one PostgreSQL and one S3 bucket (moto), against one and against the
embedded default.

Each measurement starts its own PostgreSQL (``fsync`` on: a real commit cost), moto and N
router nodes, spreads the small corpus over N storescu associations, one per node, and waits
until every instance is recorded cluster-wide. Besides the wall time it records what bounds the
scaling on any machine: CPU seconds per instance of the routers, PostgreSQL and the S3 server,
and the PostgreSQL transactions and S3 objects per instance. On 2 cores N nodes cannot go
faster than one (they share the cores); on a bigger machine the same command shows the scaling.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from .corpus import Corpus
from .procs import (
    BenchError,
    MotoServer,
    Postgres,
    RouterServer,
    StoreSCU,
    running,
    storescu_argv,
    wait_until,
)

BUCKET = "bench-cluster"
_TICK = os.sysconf("SC_CLK_TCK")


def available() -> str:
    """'' when P7 can run here, else what is missing."""
    if not Postgres.available():
        return "PostgreSQL and psycopg (apt-get install postgresql; pip install " \
               "'dicomrouter[cluster]')"
    if not MotoServer.available():
        return "moto[server] and boto3 (pip install)"
    return ""


def cpu_seconds(pid: int, with_children: bool = False, reaped: bool = False) -> float:
    """utime + stime of a process (and, for PostgreSQL, of every backend it forked; with
    ``reaped``, also of the children it has waited for: cutime + cstime, e.g. the processes
    ``storescp --fork`` forks per association)."""
    pids = [pid]
    if with_children:
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == pid:
                    pids.append(int(entry))
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
            if reaped:
                total += int(fields[13]) + int(fields[14])
        except (OSError, IndexError, ValueError):
            continue
    return total / _TICK


def _transactions(pg: Postgres) -> int:
    rows = pg.sql("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE"
                  " datname = 'dicomrouter'")
    return int(rows[0][0]) if rows else 0


def _settled_transactions(pg: Postgres, quiet: float = 1.5, timeout: float = 20.0) -> int:
    """The transaction count once backends have flushed their statistics (PostgreSQL 15
    reports them at most once a second, when idle): unchanged for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    last, since = _transactions(pg), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = _transactions(pg)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return last


def node_config(work: Path, n: int, pg: Postgres, s3: MotoServer, ack: str,
                stable_age: str) -> dict[str, Any]:
    dsn = work / f"node{n}.dsn"
    dsn.write_text(pg.dsn + "\n")
    return {"node_id": f"node{n}", "stable_age": stable_age, "log_level": "INFO",
            "state": {"type": "postgresql", "dsn_file": str(dsn)},
            "shared_spool": {"type": "s3", "bucket": BUCKET, "endpoint_url": s3.url,
                             "region": "us-east-1", "access_key_env": "BENCH_S3_KEY",
                             "secret_key_env": "BENCH_S3_KEY"},
            "ack_after": ack}


class PinnedRouter(RouterServer):
    """A router node run under ``taskset -c CPU``: the nodes of the pinned P7 row each get a
    CPU of their own, so their scaling is not that of the cores they share."""

    def __init__(self, work_dir: Path, config: dict[str, Any], cpu: int) -> None:
        super().__init__(work_dir, config)
        self.cpu = cpu

    def command(self) -> list[str]:
        return ["taskset", "-c", str(self.cpu), *super().command()]


def receive(work: Path, corpus: Corpus, nodes: int, ack: str, stable_age: str,
            timeout: float, pinned: bool = False) -> dict[str, Any]:
    """storescu → ``nodes`` routers at once (one association each); wall time and costs.
    ``pinned``: node *n* runs on CPU *n-1* (modulo the CPUs there are)."""
    cpus = os.cpu_count() or 1
    with running() as start:
        pg = start(Postgres(work / "postgres", fsync=True))
        s3 = start(MotoServer(work / "moto"))
        s3.create_bucket(BUCKET)
        routers = [start(PinnedRouter(work / f"node{n}", node_config(
            work, n, pg, s3, ack, stable_age), (n - 1) % cpus) if pinned else
            RouterServer(work / f"node{n}", node_config(work, n, pg, s3, ack, stable_age)))
            for n in range(1, nodes + 1)]
        parts = corpus.parts(nodes)
        argvs = [storescu_argv(files, r.port, r.aet, corpus.transfer_syntax,
                               calling=f"BENCHSCU{n}")
                 for n, (files, r) in enumerate(zip(parts, routers, strict=False), 1)]
        tx0 = _transactions(pg)
        cpu0 = ([cpu_seconds(r.pid) for r in routers], cpu_seconds(pg.pid, True),
                cpu_seconds(s3.pid))
        seconds = StoreSCU(work / "storescu").run(argvs, timeout=timeout)

        def recorded() -> bool:
            rows = pg.sql("SELECT COUNT(*), COALESCE(SUM(shared), 0) FROM instances")
            return int(rows[0][0]) >= corpus.count and int(rows[0][1]) >= corpus.count

        wait_until(recorded, timeout=timeout, interval=0.2, ignore=(OSError,),
                   what=f"{corpus.count} instances recorded and shared")
        cpu1 = ([cpu_seconds(r.pid) for r in routers], cpu_seconds(pg.pid, True),
                cpu_seconds(s3.pid))
        pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        objects = sum(int(page.get("KeyCount", 0)) for page in pages)
        if objects < corpus.count:
            raise BenchError(f"only {objects} object(s) in the shared spool")
        tx = _settled_transactions(pg) - tx0
    shutil.rmtree(pg.data_dir, ignore_errors=True)  # stopped with the others: its data goes
    n = corpus.count
    return {"seconds": seconds, "instances": n, "bytes": corpus.size, "nodes": nodes,
            "ack_after": ack, "pinned": pinned,
            "router_cpu_ms": 1000 * sum(b - a for a, b in zip(cpu0[0], cpu1[0], strict=True))
            / n,
            "postgres_cpu_ms": 1000 * (cpu1[1] - cpu0[1]) / n,
            "s3_cpu_ms": 1000 * (cpu1[2] - cpu0[2]) / n,
            "pg_transactions": tx / n, "s3_objects": objects / n}
