"""Extra receiver processes (``receivers: N``): more cores for concurrent associations.

Each child binds the same port with SO_REUSEPORT (the kernel spreads incoming connections), runs
the lean C-STORE receiver into the shared spool and state database, and does nothing else: study
completion, routing and delivery stay in the main process. Ingest and deletion of one study
exclude each other across processes through the spool's byte-range locks (spool.py). A child
exits when the main process is gone.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading

from . import conversion, logsafe
from .common import nocodecs
from .config import Config
from .scp import services
from .scp.listener import FastStorageSCP
from .spool import spool_for
from .state import state_for

log = logging.getLogger("dicomrouter")


def run_receiver(cfg: Config, parent_pid: int) -> None:
    """The body of one receiver process."""
    logging.basicConfig(level=getattr(logging, cfg.log_level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s [%(processName)s]: "
                               "%(message)s")
    logsafe.install()
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the main process; it stops us
    conversion.POOL.configure(cfg.conversion_processes, cfg.conversion_timeout,
                              cfg.conversion_idle)
    state = state_for(cfg)
    spool = spool_for(cfg, state, receiver_process=True)
    spool.start()
    scp = FastStorageSCP(cfg, spool)
    services.register(scp, cfg, state, spool)  # Q/R, commitment: a peer may land here too
    scp.start()
    while not stop.wait(1.0):
        if os.getppid() != parent_pid:
            log.warning("main process gone: receiver stops")
            break
    scp.stop()
    conversion.POOL.close()
    spool.stop()
    state.close()


class ReceiverProcesses:
    """Starts and stops the ``receivers - 1`` extra processes."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.procs: list[multiprocessing.process.BaseProcess] = []

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter, no inherited threads
        for i in range(1, self.cfg.receivers):
            args = pickle.dumps((self.cfg, os.getpid()))
            # not daemonic: a C-GET/C-MOVE landing here may start conversion processes
            # (a daemonic process may not have children); stop() and the parent-pid watch
            # end it
            p = ctx.Process(target=nocodecs.run_lean, args=(f"{__name__}:run_receiver", args),
                            name=f"receiver-{i}", daemon=False)
            p.start()
            self.procs.append(p)
        if self.procs:
            log.info("%d extra receiver process(es) share port %d", len(self.procs),
                     self.cfg.port)

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.join(15)
            if p.is_alive():
                p.kill()
                p.join(5)
        self.procs.clear()
