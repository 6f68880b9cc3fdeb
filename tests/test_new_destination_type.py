"""A new destination type is one module: its model (registered under its ``type``) and its
class (registered for the model). This test is that module: a throw-away ``memory`` destination
that keeps what it gets in a list. Nothing else in the router is edited: the configuration
accepts ``type: memory`` with keyed errors for its keys, the delivery workers deliver to it."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import pytest

from dicomrouter.config import ConfigError, DestinationBase, destination_type, from_dict
from dicomrouter.delivery import DeliveryWorkers
from dicomrouter.destinations import Context, Destination, Session, build, implements
from dicomrouter.dicomfile import identify
from dicomrouter.sample import generate
from dicomrouter.schema import Int, Text
from dicomrouter.spool import Spool
from dicomrouter.state import Instance, open_state


@destination_type("memory")
class MemoryModel(DestinationBase):
    label: Text  # required: a missing one is a keyed error
    keep_at_most: Int(1, 1000) = 100


KEPT: dict[str, list[bytes]] = {}


@implements(MemoryModel)
class MemoryDestination(Destination):
    def __init__(self, cfg: MemoryModel, ctx: Context) -> None:
        super().__init__(cfg, ctx)
        self.model = cfg
        self.router_ae = ctx.router_ae

    def open(self, instances: Sequence[Instance], routes: Sequence[str] = ()) -> Session:
        return _MemorySession(self)


class _MemorySession(Session):
    def __init__(self, dest: MemoryDestination) -> None:
        self.dest = dest

    def send(self, inst: Instance, data: BinaryIO) -> bool:
        kept = KEPT.setdefault(self.dest.model.label, [])
        if len(kept) < self.dest.model.keep_at_most:
            kept.append(data.read())
        return True


def test_the_configuration_knows_the_new_type_with_keyed_errors(tmp_path: Path) -> None:
    cfg = from_dict({"destinations": {"m": {"type": "memory", "label": "x"}},
                     "routes": [{"to": "m"}]}, tmp_path, "test")
    model = cfg.destinations["m"]
    assert isinstance(model, MemoryModel) and model.name == "m" and model.keep_at_most == 100
    assert model.retry_policy.max_attempts == 10  # the global policy, inherited
    with pytest.raises(ConfigError) as err:
        from_dict({"destinations": {"m": {"type": "memory"}}}, tmp_path, "test")
    assert str(err.value) == "destinations.m.label: required for a memory destination"
    with pytest.raises(ConfigError) as err:
        from_dict({"destinations": {"m": {"type": "memory", "label": "x", "keep_at_most": 0}}},
                  tmp_path, "test")
    assert str(err.value).startswith("destinations.m.keep_at_most: expected a whole number")
    with pytest.raises(ConfigError) as err:
        from_dict({"destinations": {"m": {"type": "memroy"}}}, tmp_path, "test")
    assert "unknown destination type memroy" in str(err.value) and "memory" in str(err.value)


def test_the_router_delivers_to_the_new_type(tmp_path: Path) -> None:
    cfg = from_dict({"ae_title": "ME", "destinations": {"m": {"type": "memory", "label": "t2"}},
                     "routes": [{"to": "m"}]}, tmp_path, "test")
    state = open_state(tmp_path / "spool" / "state.db")
    spool = Spool(tmp_path / "spool", state)
    files = generate(tmp_path / "study", series=1, instances=3, rows=8, cols=8, seed=41)
    for f in files:
        tags, ts = identify(f)
        copy = tmp_path / "copy.dcm"
        shutil.copy(f, copy)
        spool._place(str(copy), tags, ts, "TEST", "ME")
    study = tags["StudyInstanceUID"]
    assert state.route_study(study, ["m"], ["route 1"], state.study(study))
    dest = build(cfg.destinations["m"], Context(cfg.ae_title, state, spool, cfg))
    assert isinstance(dest, MemoryDestination) and dest.router_ae == "ME"
    workers = DeliveryWorkers(cfg, state, spool, {"m": dest}, lambda job, outcome: None)
    job = state.claim_job("m")
    assert job is not None and workers.run(job, dest) == "delivered"
    assert len(KEPT["t2"]) == 3
    assert {bytes(b[132:]) for b in KEPT["t2"]} == {f.read_bytes()[132:] for f in files}
    assert state.ledger_stats("m")["delivered"] == 3
