"""The performance benchmark behind ``dicomrouter bench`` (see docs/performance.md), and the peer
harness the tests share with it; outside the runtime package (``dicomrouter``), which never
imports it, installed beside it.

``corpus`` generates the corpora, ``procs`` runs the peers (DCMTK, Orthanc, moto, PostgreSQL,
the router; binaries found on PATH or named by DCMTK_BIN / ORTHANC_BIN / ORTHANC_PLUGINS),
``scenarios`` takes the measurements P1-P7, ``report`` turns them into the table, ``profile``
records the router's receive path with py-spy, ``machine`` describes the box and ``cli`` is the
command.
"""
