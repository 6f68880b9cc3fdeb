"""The performance benchmark behind ``dicomrouter bench`` (see docs/performance.md).

``corpus`` generates the corpora, ``procs`` runs the peers (DCMTK, Orthanc, the router),
``scenarios`` takes the measurements P1-P5, ``report`` turns them into the table, ``profile``
records the router's receive path with py-spy and ``machine`` describes the box.
"""
