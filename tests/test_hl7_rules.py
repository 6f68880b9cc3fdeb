"""``hl7_rules``: which messages are recorded and which orders reach the prefetch (the
``OrderHub`` contract: ``subscribe(callback)``, each order a dict with the agreed keys), in the
router's own handling code on a real state; and the configuration's keyed errors."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from hl7_peer import fields, message, msh
from test_hl7 import adt, orm

from dicomrouter.config import ConfigError, from_dict
from dicomrouter.hl7 import Hl7Service
from dicomrouter.hl7.message import ORDER_KEYS
from dicomrouter.state import open_state

RULES = [{"name": "ct-prefetch", "when": {"MessageType": "ORM^O01", "OBR-24": "CT",
                                          "OBR-4.2": "/chest/i"}, "prefetch": True},
         {"name": "adt", "when": {"MessageType": {"regex": "^ADT"}}}]


def _service(tmp_path: Path, rules: list[dict[str, Any]]) -> Hl7Service:
    cfg = from_dict({"hl7": {"port": 2575}, "hl7_rules": rules}, tmp_path, "test")
    return Hl7Service(cfg, open_state(tmp_path / "state.db"), None)


def _take(service: Hl7Service, text: str) -> str:
    answer = service.receive(text.encode(), "127.0.0.1:9")
    for row in service.state.hl7_unhandled():
        service.handle(row)
    return answer


def test_rules_decide_what_is_recorded_and_prefetched(tmp_path: Path) -> None:
    service = _service(tmp_path, RULES)
    got: list[dict[str, Any]] = []
    service.orders.subscribe(got.append)
    assert "MSA|AA|C1" in _take(service, orm("C1", "ACC-CT"))
    assert "MSA|AA|C2" in _take(service, orm("C2", "ACC-MR", modality="MR"))
    assert "MSA|AA|C3" in _take(service, adt("A08", "C3", "P1^^^HOSP", "DOE^JOHNNY"))
    # the CT chest order: prefetched and recorded; the MR order: neither (no rule matched)
    assert [o["accession"] for o in got] == ["ACC-CT"]
    order = got[0]
    assert set(ORDER_KEYS) <= set(order)
    assert (order["message_type"], order["patient_id"], order["issuer"], order["patient_name"],
            order["birth_date"], order["sex"], order["requested_procedure_id"],
            order["modality"], order["scheduled"], order["sending_application"],
            order["sending_facility"], order["control_id"]) == (
        "ORM^O01", "P1", "HOSP", "DOE^JOHN^Q", "19700101", "M", "RPC1", "CT",
        "2026-12-08T09:30:00", "RIS", "HOSP", "C1")
    assert order["study_uid"] == "1.2.826.0.1.3680043.2.1125.99.C1"
    assert service.state.latest_hl7_order(accession="ACC-CT") is not None
    assert service.state.latest_hl7_order(accession="ACC-MR") is None
    assert service.state.latest_hl7_order(patient_id="P1")["PatientName"] == "DOE^JOHNNY"
    outcomes = {r["control_id"]: r["outcome"] for r in service.state.hl7_messages()}
    assert outcomes["C2"].startswith("no hl7_rules matched")
    assert "prefetch: 1/1 subscriber(s)" in outcomes["C1"]


def test_a_failing_subscriber_does_not_keep_the_others_from_the_order(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    service = _service(tmp_path, [{"prefetch": True}])
    got: list[dict[str, Any]] = []

    def broken(order: dict[str, Any]) -> None:
        raise RuntimeError("prefetch is down")

    service.orders.subscribe(broken)
    service.orders.subscribe(got.append)
    with caplog.at_level(logging.INFO, logger="dicomrouter.hl7"):
        _take(service, orm("C9", "ACC9"))
    assert [o["accession"] for o in got] == ["ACC9"]
    failed = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(failed) == 1 and "prefetch is down" in failed[0]
    assert service.state.hl7_unhandled() == []
    assert "prefetch: 1/2 subscriber(s)" in service.state.hl7_messages()[0]["outcome"]


def test_omi_and_field_paths_over_every_obr(tmp_path: Path) -> None:
    """A condition on OBR-4.1 holds when any OBR of the message has the code."""
    service = _service(tmp_path, [{"when": {"OBR-4.1": "CTABD"}, "prefetch": True}])
    got: list[dict[str, Any]] = []
    service.orders.subscribe(got.append)
    text = message(msh("ORM^O01", "M1"), fields("PID", f1="1", f3="P5"),
                   fields("ORC", f1="NW"), fields("OBR", f1="1", f4="CTCHEST", f18="ACC5"),
                   fields("OBR", f1="2", f4="CTABD", f18="ACC5"))
    assert "MSA|AA" in _take(service, text)
    assert [o["accession"] for o in got] == ["ACC5"]


@pytest.mark.parametrize(("config", "error"), [
    ({"hl7_rules": [{"when": {"PID3": "x"}}]}, "hl7_rules[0].when.PID3: not an HL7 field path"),
    ({"hl7_rules": [{"when": {"MessageType": "ORM^O01"}, "prefetsh": True}]},
     "hl7_rules[0].prefetsh"),
    ({"hl7": {"port": 11112}, "port": 11112}, "hl7.port: 11112 is already used by port"),
    ({"hl7": {"allowed_senders": [{}]}}, "hl7.allowed_senders[0].application"),
    ({"hl7": {"max_message_size": "10"}}, "hl7.max_message_size"),
    ({"hl7": {"encoding": "klingon"}}, "hl7.encoding: unknown encoding"),
    ({"destinations": {"ris": {"type": "hl7", "host": "h", "port": 1,
                               "message_type": "ADT^A01"}}},
     "destinations.ris.message_type"),
    ({"destinations": {"ris": {"type": "hl7", "host": "h", "port": 1,
                               "template": "MSH|{{ oops"}}},
     "destinations.ris.template: template error"),
    ({"notifications": [{"events": ["delivered"], "hl7": {"host": "h"}}]},
     "notifications[0].hl7.port"),
    ({"routes": [{"to": "x", "when": {"OrderPriorty": "S"}}], "destinations": {
        "x": {"type": "folder", "path": "out"}}}, "did you mean 'OrderPriority'"),
])
def test_keyed_configuration_errors(tmp_path: Path, config: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict(config, tmp_path, "test")
    assert error in str(err.value)
