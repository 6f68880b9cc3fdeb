"""The adjustments dicomrouter makes to pynetdicom (``netutil``), against a real DCMTK peer."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from peers import StoreSCP, wait_until
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.dimse_primitives import C_STORE

from dicomrouter.netutil import hand_back_stolen_responses
from dicomrouter.sample import generate


class _ReactorHeldPastItsCheckpoint(threading.Event):
    """pynetdicom's reactor checkpoint, holding the reactor once just after it passed it.

    The reactor sets ``_is_paused``, waits at the checkpoint, clears ``_is_paused`` and takes
    any message off the DIMSE queue. A sender pauses it by clearing the checkpoint and waiting
    for ``_is_paused``: a sender that clears it while the reactor is between its wait and
    clearing ``_is_paused`` sees the reactor paused when it is not. On a busy machine the thread
    switch that lets that happen comes by itself, rarely; here the reactor is held there.
    """

    def __init__(self, hold_for: float) -> None:
        super().__init__()
        self.set()
        self.hold_for = hold_for
        self.hold = threading.Event()
        self.holding = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        passed = super().wait(timeout)
        if self.hold.is_set():
            self.hold.clear()
            self.holding.set()
            time.sleep(self.hold_for)
        return passed


def _associate(scp: StoreSCP) -> Any:
    ae = AE(ae_title="TESTSCU")
    ae.dimse_timeout = 5
    ae.requested_contexts = [build_context(CTImageStorage, [ExplicitVRLittleEndian])]
    assoc = ae.associate("127.0.0.1", scp.port, ae_title=scp.aet)
    assert assoc.is_established
    return assoc


def test_a_response_the_reactor_takes_goes_back_to_the_waiting_sender(
        tmp_path: Path, storescp: StoreSCP, caplog: pytest.LogCaptureFixture) -> None:
    """CI saw it once: "Received unexpected C-STORE service message", then the C-STORE's DIMSE
    timeout and an abort, though storescp had answered at once. Forced here: the reactor is
    held past its checkpoint while the sender sends, and the sender reaches its wait for the
    response only after the reactor took the response off the queue."""
    hand_back_stolen_responses()
    sent = generate(tmp_path / "study", series=1, instances=2, rows=8, cols=8, seed=5)
    assoc = _associate(storescp)
    try:
        checkpoint = _ReactorHeldPastItsCheckpoint(hold_for=0.5)
        assoc._reactor_checkpoint = checkpoint
        get_msg = assoc.dimse.get_msg

        def late_get_msg(block: bool = False) -> Any:
            if block:  # the sender: it comes to the queue after the reactor did
                time.sleep(1.0)
            return get_msg(block)

        assoc.dimse.get_msg = late_get_msg
        checkpoint.hold.set()
        assert checkpoint.holding.wait(10), "the reactor never came to its checkpoint"
        with caplog.at_level(logging.WARNING, logger="pynetdicom"):
            status = assoc.send_c_store(sent[0]).get("Status")
        assert status == 0, caplog.text
        assert "unexpected" not in caplog.text
        assoc.dimse.get_msg = get_msg
        assert assoc.send_c_store(sent[1]).Status == 0, "the association goes on"
        assoc.release()
    finally:
        if not assoc.is_released:
            assoc.abort()
    wait_until(lambda: len(storescp.sop_uids()) == 2, timeout=30, what="both at storescp")


def test_a_response_nobody_waits_for_is_still_dropped(
        storescp: StoreSCP, caplog: pytest.LogCaptureFixture) -> None:
    """Only a response that arrives while a sender waits goes back on the queue: a stray one
    (a peer answering twice) is logged and dropped as pynetdicom does, not served to the
    next request."""
    hand_back_stolen_responses()
    assoc = _associate(storescp)
    try:
        stray = C_STORE()
        stray.MessageIDBeingRespondedTo = 7
        stray.AffectedSOPClassUID = CTImageStorage
        stray.Status = 0
        with caplog.at_level(logging.WARNING, logger="pynetdicom"):
            assoc._serve_request(stray, 1)
        assert "Received unexpected C-STORE service message" in caplog.text
        assert assoc.dimse.msg_queue.empty()
        assoc.release()
    finally:
        if not assoc.is_released:
            assoc.abort()
