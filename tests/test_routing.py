"""Routing rules and path safety, on stored instances (no network)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml
from pydicom import dcmread

from dicomrouter import config as cfgmod
from dicomrouter.dicomfile import render_template, safe_component
from dicomrouter.routing import route
from dicomrouter.state import Instance


def inst(tmp_path: Path | None = None, calling: str = "PACS", called: str = "DICOMROUTER",
         path: Path | None = None, **tags: str) -> Instance:
    return Instance(tags.get("SOPInstanceUID", "1.2.3"), "1.2", "1.2.1", "", "",
                    str(path or "/nonexistent"), 0, calling, called, tags)


def open_key(i: Instance):  # type: ignore[no-untyped-def]
    """What Spool.open does, for keys that are plain paths here."""
    return open(i.key, "rb")  # noqa: SIM115


def routes(tmp_path: Path, rules: list[dict]) -> cfgmod.Config:
    p = tmp_path / "r.yml"
    p.write_text(yaml.safe_dump({
        "destinations": {n: {"type": "folder", "path": n} for n in ("a", "b", "c")},
        "routes": rules}))
    return cfgmod.load(p)


def test_every_matching_route_fires_and_destinations_are_deduplicated(tmp_path: Path) -> None:
    cfg = routes(tmp_path, [
        {"name": "ct", "when": {"Modality": ["CT", "MR"]}, "to": ["a", "b"]},
        {"name": "pacs", "when": {"CallingAE": "PACS"}, "to": ["b", "c"]},
        {"name": "us", "when": {"Modality": "US"}, "to": ["c"]},
    ])
    d = route(cfg.routes, [inst(Modality="CT"), inst(Modality="SR")])
    assert d.routes == ("ct", "pacs")
    assert d.destinations == ("a", "b", "c")


def test_conditions_are_anded_and_regex_values_search(tmp_path: Path) -> None:
    cfg = routes(tmp_path, [
        {"name": "head", "when": {"StudyDescription": "/^HEAD/", "CalledAE": "ROUTER_B"},
         "to": ["a"]}])
    assert route(cfg.routes, [inst(StudyDescription="HEAD CT", called="ROUTER_B")]).destinations \
        == ("a",)
    assert route(cfg.routes, [inst(StudyDescription="HEAD CT")]).destinations == ()
    assert route(cfg.routes, [inst(StudyDescription="CHEST", called="ROUTER_B")]).destinations \
        == ()


def test_unindexed_keyword_is_read_from_the_file(tmp_path: Path, sample_study: list[Path]) -> None:
    ds = dcmread(sample_study[0])
    ds.ProtocolName = "STROKE PROTOCOL"
    f = tmp_path / "x.dcm"
    ds.save_as(f)
    cfg = routes(tmp_path, [{"name": "stroke", "when": {"ProtocolName": "/STROKE/"},
                             "to": ["a"]}])
    assert route(cfg.routes, [inst(path=f)], open_key).destinations == ("a",)
    assert route(cfg.routes, [inst(path=sample_study[1])], open_key).destinations == ()
    assert route(cfg.routes, [inst()], open_key).destinations == ()  # file gone: no match


def test_no_route_means_unrouted(tmp_path: Path) -> None:
    cfg = routes(tmp_path, [{"name": "mr", "when": {"Modality": "MR"}, "to": ["a"]}])
    assert route(cfg.routes, [inst(Modality="CT")]).destinations == ()


def test_tag_values_never_escape_the_folder() -> None:
    p = render_template("{PatientID}/{StudyInstanceUID}/{SOPInstanceUID}.dcm",
                        {"PatientID": "../../etc", "StudyInstanceUID": "..",
                         "SOPInstanceUID": "a/b\x00c"})
    assert ".." not in p.parts and len(p.parts) == 3
    assert p.parts[1] == "UNKNOWN"
    assert "/" not in p.parts[2] and "\x00" not in p.parts[2]
    assert safe_component("") == "UNKNOWN"
    assert safe_component("C:\\Windows") == "C__Windows"


def test_a_study_the_qr_proxy_fetched_is_seen_only_by_routes_naming_proxied(
        tmp_path: Path) -> None:
    cfg = routes(tmp_path, [
        {"name": "all", "to": ["a"]},
        {"name": "cached-ct", "when": {"Proxied": "true", "Modality": "CT"}, "to": ["b"]},
        {"name": "fresh", "when": {"Proxied": "false"}, "to": ["c"]},
        {"name": "else", "fallback": True, "to": ["c"]},
    ])
    fetched = route(cfg.routes, [inst(Modality="CT", _Proxied="1")])
    assert fetched.destinations == ("b",)
    assert "Q/R proxy" in fetched.explanation[0].skipped
    assert len(fetched.explanation) == 4
    # an instance pushed into a cached study (an AI result in the study it read): every route
    # sees that generation (the study-level Proxied is still true: one was fetched)
    mixed = route(cfg.routes, [inst(Modality="MR"), inst(Modality="MR", _Proxied="1",
                                                         SOPInstanceUID="1.2.4")])
    assert mixed.destinations == ("a",) and mixed.routes == ("all",)
    cached = inst(Modality="MR", _Proxied="1", SOPInstanceUID="1.2.4")
    ai_result = dataclasses.replace(inst(Modality="SEG", SOPInstanceUID="1.2.5"), generation=2)
    assert route(cfg.routes, [cached, ai_result]).destinations == ("a",)
    # a pushed study the proxy later completed from the PACS: that generation is a cache fill
    refill = dataclasses.replace(cached, generation=2)
    assert route(cfg.routes, [inst(Modality="MR"), refill]).destinations == ()
    pushed = route(cfg.routes, [inst(Modality="CT")])
    assert pushed.destinations == ("a", "c") and pushed.routes == ("all", "fresh")
