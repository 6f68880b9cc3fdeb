"""Configuration: valid files load, invalid ones name the key and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from router_fixtures import dicomrouter

from dicomrouter import config as cfgmod
from dicomrouter.config import ConfigError, parse_duration, parse_size

GOOD = {
    "ae_title": "ROUTER1",
    "port": 11113,
    "allowed_calling_aes": ["PACS", "ORTHANC"],
    "spool": "./spool",
    "stable_age": "500ms",
    "destinations": {
        "pacs": {"type": "dicom", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242},
        "archive": {"type": "folder", "path": "./received"},
    },
    "routes": [
        {"name": "CT to PACS", "when": {"Modality": ["CT", "MR"], "CallingAE": "PACS"},
         "to": ["pacs", "archive"]},
        {"name": "rest", "when": {"StudyDescription": "/^HEAD/"}, "to": "archive"},
    ],
}


def load_dict(tmp_path: Path, data: object) -> cfgmod.Config:
    p = tmp_path / "router.yml"
    p.write_text(yaml.safe_dump(data))
    return cfgmod.load(p)


def test_good_config_loads_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    cfg = load_dict(tmp_path, GOOD)
    assert cfg.ae_title == "ROUTER1" and cfg.port == 11113
    assert cfg.stable_age == 0.5
    assert cfg.spool == tmp_path / "spool"
    assert cfg.destinations["archive"].options["path"] == str(tmp_path / "received")
    assert cfg.routes[0].to == ("pacs", "archive")
    assert cfg.routes[1].when[0].patterns[0].pattern == "^HEAD"


@pytest.mark.parametrize(("value", "seconds"), [
    ("3s", 3.0), ("500ms", 0.5), ("2m", 120.0), ("1h", 3600.0), (4, 4.0), ("1.5s", 1.5)])
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value, "stable_age") == seconds


@pytest.mark.parametrize(("value", "size"), [("50GB", 50 * 10**9), ("500MB", 500 * 10**6),
                                              ("2GiB", 2 * 2**30), (1024, 1024)])
def test_sizes(value: object, size: int) -> None:
    assert parse_size(value, "max_spool_size") == size


@pytest.mark.parametrize(("change", "message"), [
    ({"routes": [GOOD["routes"][0], {"name": "x", "to": ["pacs2"]}]},
     "routes[1].to: unknown destination 'pacs2'"),
    ({"stable_age": "soon"}, "stable_age: expected a duration"),
    ({"port": 70000}, "port: expected a whole number from 1 to 65535"),
    ({"colour": "blue"}, "colour: unknown key"),
    ({"ae_title": "A_VERY_LONG_AE_TITLE_X"}, "ae_title: an AE title is 1-16 characters"),
    ({"destinations": {"x": {"type": "ftp"}}}, "destinations.x.type: unknown destination type"),
    ({"destinations": {"x": {"type": "dicom", "host": "h", "port": 1}}},
     "destinations.x.ae_title: required"),
    ({"destinations": {"x": {"type": "folder", "path": "p", "template": "{PatientId}.dcm"}}},
     "destinations.x.template: {PatientId} is not a DICOM keyword"),
    ({"routes": [{"name": "r", "when": {"Modalty": "CT"}, "to": ["archive"]}]},
     "routes[0].when.Modalty: not a DICOM keyword"),
    ({"routes": [{"name": "r", "when": {"Modality": "/[/"}, "to": ["archive"]}]},
     "routes[0].when.Modality: invalid regular expression"),
    ({"routes": [{"name": "r"}]}, "routes[0].to: required"),
    ({"retry": {"max_attempts": 0}}, "retry.max_attempts: expected a whole number"),
    ({"max_spool_size": "lots"}, "max_spool_size: expected a size"),
    ({"destinations": {"x": {"type": "dicom", "ae_title": "A", "host": "h", "port": 1,
                             "associations": 0}}},
     "destinations.x.associations: expected a whole number from 1 to 16"),
])
def test_invalid_config_names_the_key(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_dict(tmp_path, {**GOOD, **change})
    assert str(err.value).startswith(message), str(err.value)


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("routes: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        cfgmod.load(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        cfgmod.load(tmp_path / "nope.yml")


def test_embedded_default_routes_everything_to_received(tmp_path: Path) -> None:
    cfg = cfgmod.embedded_default(tmp_path)
    assert (cfg.ae_title, cfg.port) == ("DICOMROUTER", 11112)
    assert cfg.destinations["received"].options["path"] == str(tmp_path / "received")
    assert cfg.routes[0].when == () and cfg.routes[0].to == ("received",)


def test_serve_refuses_invalid_config_with_keyed_message(tmp_path: Path) -> None:
    p = tmp_path / "router.yml"
    p.write_text(yaml.safe_dump({**GOOD, "routes": [{"name": "x", "to": ["pacs2"]}]}))
    r = dicomrouter("serve", "--config", str(p))
    assert r.returncode != 0
    assert "routes[0].to: unknown destination 'pacs2'" in r.stderr
    ok = tmp_path / "ok.yml"
    ok.write_text(yaml.safe_dump(GOOD))
    r = dicomrouter("serve", "--check", "--config", str(ok))
    assert r.returncode == 0 and "configuration OK" in r.stdout
