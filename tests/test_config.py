"""Configuration: valid files load, invalid ones name the key and the problem."""

from __future__ import annotations

import os
import time
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
    assert cfg.destinations["archive"].path == tmp_path / "received"
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
    ({"destinations": {"x": {"type": "s3", "bucket": "b", "part_size": "1MB"}}},
     "destinations.x.part_size: must be between 5MiB and 5GiB"),
    ({"destinations": {"x": {"type": "s3", "bucket": "b", "transfer_threads": 0}}},
     "destinations.x.transfer_threads: expected a whole number from 1 to 64"),
    ({"conversion_timeout": "never"}, "conversion_timeout: expected a duration"),
    ({"routes": [{"to": "pacs", "forward": "now"}]},
     "routes[0].forward: one of complete, immediate"),
    ({"routes": [{"to": "pacs", "forward": "immediate", "fallback": True}]},
     "routes[0].fallback: not with forward: immediate"),
    ({"routes": [{"to": "pacs", "forward": "immediate", "stable_age": "5s"}]},
     "routes[0].stable_age: not with forward: immediate"),
    ({"routes": [{"to": "pacs", "forward": "immediate", "level": "series"}]},
     "routes[0].level: not with forward: immediate"),
    ({"routes": [{"to": "pacs", "forward": "immediate",
                  "when": {"NumberOfStudyRelatedInstances": {">": 3}}}]},
     "routes[0].forward: immediate needs conditions on instance attributes; "
     "NumberOfStudyRelatedInstances"),
    ({"routes": [{"to": "pacs", "forward": "immediate",
                  "when": {"not": {"Modality": "SR"}}}]},
     "routes[0].forward: immediate needs conditions that, once they hold, hold for the rest"),
    ({"routes": [{"to": "pacs", "forward": "immediate",
                  "when": {"any": [{"Modality": "CT"}, {"BodyPartExamined": {"missing": True}}]}}]},
     "routes[0].forward: immediate needs conditions that, once they hold, hold for the rest"),
    ({"routes": [{"to": "pacs", "forward": "immediate", "when": {"StudyDescription": ""}}]},
     "routes[0].forward: immediate needs conditions that, once they hold, hold for the rest"),
    ({"destinations": {"z": {"type": "folder", "path": "p", "zip": True}},
      "routes": [{"to": "z", "forward": "immediate"}]},
     "routes[0].forward: immediate cannot send to 'z': it writes one zip per study"),
    ({"destinations": {"b": {"type": "s3", "bucket": "b"}},
      "routes": [{"to": "b", "forward": "immediate"}]},
     "routes[0].forward: immediate cannot send to 'b': it uploads one zip per study"),
    ({"conversion_processes": 0}, "conversion_processes: expected a whole number from 1 to 64"),
    ({"routes": [{"to": "pacs", "order": "time"}]},
     "routes[0].order: one of series, references"),
    ({"routes": [{"to": "pacs", "order": "series", "forward": "immediate"}]},
     "routes[0].order: not with forward: immediate"),
    ({"routes": [{"to": "pacs", "order": "references", "level": "series"}]},
     "routes[0].order: references is not with level: series"),
    ({"destinations": {"z": {"type": "folder", "path": "p", "zip": True}},
      "routes": [{"to": "z", "order": "references"}]},
     "routes[0].order: references does not apply to 'z': it writes one zip per study"),
    ({"routes": [{"to": "pacs", "order": "series"},
                 {"name": "ai", "to": "pacs", "forward": "immediate"}]},
     "routes[0].order: series cannot hold for 'pacs': route 'ai' forwards studies there"),
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
    assert cfg.destinations["received"].path == tmp_path / "received"
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


@pytest.mark.parametrize(("text", "key", "problem"), [
    # a YAML alias bomb as a value: the error names the key without expanding the value
    ("port: &a [[[[[[[[x]]]]]]]]\nstable_age: [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n",
     "port", "expected a whole number"),
    # nine levels deep inside the value (9**9 scalars if expanded)
    ("port: [&l0 [x, x, x, x, x, x, x, x, x], "
     + ", ".join(f"&l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)) + "]\n",
     "port", "YAML aliases expand"),
    ("destinations:\n  a: {type: folder, path: /tmp/x}\nroutes:\n  - to: [{a: 1}]\n",
     "routes[0].to[0]", "expected a destination name"),
    ("destinations:\n  a: {type: [folder], path: /tmp/x}\n", "destinations.a.type",
     "unknown destination type"),
    ("stable_age: .nan\n", "stable_age", "finite"),
    ("retention: .inf\n", "retention", "finite"),
    ("stable_age: -.inf\n", "stable_age", "finite"),
    ("allowed_calling_aes: [PACS]\nallowed_calling_aes: []\n", "allowed_calling_aes",
     "given twice"),
    ("destinations:\n  a: {type: folder, path: /x, path: /y}\n", "path", "given twice"),
    ("log_level: [1, 2]\n", "log_level", "one of DEBUG"),
    ("max_spool_size: .nan\n", "max_spool_size", "expected a size"),
    ("acse_timeout: 0s\n", "acse_timeout", "more than 0"),
    ("max_associate_rq_size: 100\n", "max_associate_rq_size", "from 1024"),
    ("max_associations: 0\n", "max_associations", "whole number from 1"),
    ("check_called_ae: yes please\n", "check_called_ae", "true or false"),
    ("destinations:\n  p: {type: dicom, ae_title: P, host: h, port: 1,"
     " transfer_syntaxes: [JPEGBaseline8Bit]}\n", "destinations.p.transfer_syntaxes[0]",
     "lossless only"),
])
def test_bad_yaml_is_a_keyed_error(tmp_path: Path, text: str, key: str, problem: str) -> None:
    p = tmp_path / "router.yml"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        cfgmod.load(p)
    assert err.value.key == key, str(err.value)
    assert problem in err.value.problem
    assert len(str(err.value)) < 2000, "the error message expanded a value"


def _bomb(levels: int = 9) -> str:
    """Nine nested aliases of nine: 9**9 scalars once expanded ("billion laughs")."""
    return "[&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol], " + ", ".join(
        f"&l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)) + "]"


@pytest.mark.parametrize(("text", "key"), [
    (f"stable_age: {_bomb()}\n", "stable_age"),
    (f"ae_title: {_bomb()}\n", "ae_title"),
    (f"destinations:\n  a: {{type: folder, path: /tmp/x, template: {_bomb()}}}\n",
     "destinations.a.template"),
    (f"routes:\n  - to: [a]\n    when: {{Modality: {_bomb()}}}\n", "routes[0].when.Modality"),
    (f"known_aes: {{P: {{host: h, port: 1}}}}\nx: {_bomb()}\n", "x"),
])
def test_alias_bomb_anywhere_is_refused_at_once(tmp_path: Path, text: str, key: str) -> None:
    """Whatever key it sits in, a config that expands past the limit is refused in well under a
    second with that key (it once kept ``serve --check`` busy for minutes in stable_age)."""
    p = tmp_path / "router.yml"
    p.write_text(text)
    started = time.monotonic()
    with pytest.raises(ConfigError) as err:
        cfgmod.load(p)
    assert time.monotonic() - started < 1.0
    assert err.value.key == key and "YAML aliases expand" in err.value.problem
    r = dicomrouter("serve", "--check", "--config", str(p), timeout=30)
    assert r.returncode != 0 and f"{key}: YAML aliases expand" in r.stderr


def test_aliases_that_refer_to_themselves_and_ordinary_merges(tmp_path: Path) -> None:
    p = tmp_path / "router.yml"
    p.write_text("allowed_calling_aes: &a [PACS, *a]\n")
    with pytest.raises(ConfigError, match="refer to themselves"):
        cfgmod.load(p)
    # an ordinary anchor and merge key still works
    p.write_text("known_aes:\n  A: &peer {host: h, port: 104}\n  B: {<<: *peer, port: 105}\n")
    cfg = cfgmod.load(p)
    assert (cfg.known_aes["B"].host, cfg.known_aes["B"].port) == ("h", 105)


def test_non_utf8_config_is_a_clear_error(tmp_path: Path) -> None:
    p = tmp_path / "router.yml"
    p.write_bytes("ae_title: R\u00c9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        cfgmod.load(p)
    r = dicomrouter("serve", "--check", "--config", str(p))
    assert r.returncode != 0 and "not UTF-8" in r.stderr and "Traceback" not in r.stderr


def test_limits_and_transfer_syntaxes_load(tmp_path: Path) -> None:
    cfg = load_dict(tmp_path, {
        "acse_timeout": "5s", "network_timeout": "10s", "dimse_timeout": "1m",
        "max_associations": 10, "max_pending_connections": 4, "max_associate_rq_size": "32kB",
        "min_free_disk": "2GB", "max_sequence_depth": 8, "check_called_ae": True,
        "destinations": {"p": {"type": "dicom", "ae_title": "P", "host": "h", "port": 1,
                               "transfer_syntaxes": ["JPEG2000Lossless", "1.2.840.10008.1.2"]}},
        "routes": [{"to": "p"}]})
    lim = cfg.limits
    assert (lim.acse_timeout, lim.network_timeout, lim.dimse_timeout) == (5, 10, 60)
    assert (lim.max_associations, lim.max_pending_connections) == (10, 4)
    assert (lim.max_associate_rq_size, lim.min_free_disk, lim.max_sequence_depth) == \
        (32000, 2 * 10**9, 8)
    assert cfg.check_called_ae
    assert cfg.destinations["p"].transfer_syntaxes == \
        ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2")
    default = cfgmod.embedded_default(tmp_path)
    assert (default.acse_timeout, default.max_associations, default.min_free_disk) == \
        (30.0, 64, 10**9) and not default.check_called_ae


def test_misspelt_key_gets_a_did_you_mean(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_dict(tmp_path, {"stabel_age": "3s"})
    assert err.value.key == "stabel_age" and "did you mean 'stable_age'?" in err.value.problem
    with pytest.raises(ConfigError) as err:
        load_dict(tmp_path, {"destinations": {"p": {"type": "dicom", "ae_titel": "P",
                                                    "host": "h", "port": 1}}})
    assert err.value.key == "destinations.p.ae_titel"
    assert "did you mean 'ae_title'?" in err.value.problem


def test_every_destination_and_source_type_has_its_class() -> None:
    from dicomrouter.destinations.registry import CLASSES
    from dicomrouter.sources import CLASSES as SOURCES

    assert set(CLASSES) == set(cfgmod.DESTINATION_MODELS.values())
    assert set(SOURCES) == set(cfgmod.SOURCE_MODELS.values())


@pytest.mark.parametrize(("data", "message"), [
    ({"destinations": {"a": 5}}, "destinations.a: expected a mapping, got int"),
    ({"destinations": {"a": {"path": "x"}}}, "destinations.a.type: required; one of folder"),
    ({"routes": "x"}, "routes: expected a list"),
    ({"port": "11112"}, "port: expected a whole number from 1 to 65535, got '11112'"),
    ({"check_called_ae": "true"}, "check_called_ae: expected true or false"),
    ({"destinations": {"a": {"type": "folder", "path": "x", "retry": {"max_attempts": "x"}}}},
     "destinations.a.retry.max_attempts: expected a whole number"),
    ({"routes": [{"to": "a", "when": {"Modality": ["CT", None]}}],
      "destinations": {"a": {"type": "folder", "path": "x"}}},
     "routes[0].when.Modality[1]: expected a value or /regex/"),
    ({"known_aes": {"WAYTOOLONGAETITLE": {"host": "h", "port": 1}}},
     "known_aes.WAYTOOLONGAETITLE: an AE title is 1-16 characters"),
    ({"known_aes": {"PACS": {"host": "h", "port": 0}}},
     "known_aes.PACS.port: expected a whole number from 1 to 65535"),
    ({"destinations": {"m": {"type": "move", "move_destination": "X"}}},
     "destinations.m.source: required for a move destination"),
    ({"destinations": {"m": {"type": "move", "move_destination": "X",
                             "source": {"ae_title": "P", "host": "h"}}}},
     "destinations.m.source.port: required"),
    ({"sources": {"p": {"type": "ftp"}}}, "sources.p.type: unknown source type ftp; one of dicom"),
    ({"sources": {"p": {"type": "dicom", "ae_title": "P", "host": "h", "port": 1,
                        "retrieve": "copy"}}}, "sources.p.retrieve: one of move, get"),
    ({"sources": {"p": {"type": "orthanc", "url": "ftp://x"}}},
     "sources.p.url: expected an http:// or https:// URL"),
    ({"sources": {"p": {"type": "dicomweb", "url": "http://x", "lookback": "forever"}}},
     "sources.p.lookback: expected a duration"),
    ({"destinations": {"w": {"type": "dicomweb", "url": "http://x", "parallel_requests": 17}}},
     "destinations.w.parallel_requests: expected a whole number from 1 to 16, got 17"),
    ({"sources": {"p": {"type": "orthanc", "url": "http://x", "interval": 0}}},
     "sources.p.interval: must be at least 100ms"),
    ({"routes": [{"to": "a", "when": {"Source": "pcas"}}],
      "destinations": {"a": {"type": "folder", "path": "x"}},
      "sources": {"pacs": {"type": "orthanc", "url": "http://x"}}},
     "routes[0].when.Source: unknown source 'pcas' (sources: pacs)"),
    ({"listeners": [{"port": 11112}]}, "listeners[0].port: 11112 is already used by port"),
    ({"listeners": [{"name": "wan"}]}, "listeners[0].port: required"),
    ({"listeners": [{"port": 2762, "tls": {"cert": "c.pem"}}]},
     "listeners[0].tls.key: required"),
    ({"listeners": [{"port": 2762, "tls": {"cert": "c", "key": "k", "verify_client": True}}]},
     "listeners[0].tls.ca: verify_client needs the CA"),
    ({"tls": {"cert": "/no/such.pem", "key": "/no/such.key"}}, "tls.cert: cannot read"),
    ({"tls": {"cert": "c", "key": "k", "min_version": "SSLv3"}},
     "tls.min_version: one of TLSv1.2, TLSv1.3"),
    ({"receiver": "pynetdicom", "tls": {"cert": "c", "key": "k"}},
     "tls: DICOM TLS needs 'receiver: fast'"),
    ({"destinations": {"a": {"type": "dicom", "ae_title": "A", "host": "h", "port": 1,
                             "tls": {"key": "k"}}}}, "destinations.a.tls.key: needs cert"),
    ({"routes": [{"to": "a", "when": {"Listener": "wna"}}],
      "destinations": {"a": {"type": "folder", "path": "x"}},
      "listeners": [{"name": "wan", "port": 2762}]},
     "routes[0].when.Listener: unknown listener 'wna' (listeners: main, wan)"),
    ({"query_retrieve_proxy": "PAC", "known_aes": {"PACS": {"host": "h", "port": 104}}},
     "query_retrieve_proxy: 'PAC' is neither in known_aes nor a dicomweb source (known: PACS)"),
    ({"query_retrieve_proxy": "o", "sources": {"o": {"type": "orthanc", "url": "http://h"}}},
     "query_retrieve_proxy: source 'o' is of type orthanc: only a dicomweb source"),
    ({"query_retrieve_proxy_cache": "soon"}, "query_retrieve_proxy_cache:"),
    ({"query_retrieve_proxy_max_answers": 0}, "query_retrieve_proxy_max_answers:"),
])
def test_schema_errors_are_keyed_and_strict(tmp_path: Path, data: dict, message: str) -> None:
    """The pydantic schema is strict ("11112" is not a port) and speaks in YAML key paths."""
    for name in ("c", "k"):  # certificate files some cases name: there, so the case is about
        (tmp_path / name).write_text("not read by the check")  # what it is about
    with pytest.raises(ConfigError) as err:
        cfgmod.from_dict(data, tmp_path, "test")
    assert str(err.value).startswith(message), str(err.value)


def test_deploy_files_are_consistent(monkeypatch: pytest.MonkeyPatch) -> None:
    """No Docker engine here: the compose file, the Dockerfile and the router config they ship
    are checked by reading them, and the mounted config by ``serve --check`` with the example
    secrets."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"pacs", "dicomrouter", "cloud", "minio", "minio-init"} <= set(services)
    router = services["dicomrouter"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in router["volumes"] if v.startswith("./")}
    config_in_container = router["environment"]["DICOMROUTER_CONFIG"]
    assert mounts[config_in_container] == "./deploy/router.yml"
    assert "./deploy/secrets.env" in router["env_file"]
    assert '"router": ["DICOMROUTER", "dicomrouter", 11112]' in \
        services["pacs"]["environment"]["ORTHANC__DICOM_MODALITIES"]
    assert services["cloud"]["environment"]["DICOM_WEB_PLUGIN_ENABLED"] == "true"
    assert "mc mb" in services["minio-init"]["entrypoint"]
    # the mounted configuration validates, with the example secrets in the environment
    env = dict(os.environ)
    for line in (root / "deploy" / "secrets.env.example").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            env[key] = value
            monkeypatch.setenv(key, value)
    r = subprocess.run([sys.executable, "-m", "dicomrouter", "serve", "--check", "--config",
                        str(root / "deploy" / "router.yml")], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    cfg = cfgmod.load(root / "deploy" / "router.yml")
    assert {d.type for d in cfg.destinations.values()} == {"dicom", "dicomweb", "s3"}
    yml = (root / "deploy" / "router.yml").read_text()
    assert "password" not in yml.lower() and "secret_key_env" in yml  # secrets by name only
    dockerfile = (root / "Dockerfile").read_text()
    assert "pip install" in dockerfile and 'CMD ["dicomrouter", "serve"]' in dockerfile
    assert any(line.startswith("USER ") and "root" not in line
               for line in dockerfile.splitlines())
    assert "HEALTHCHECK" in dockerfile and "/health" in dockerfile
    # no config mounted: the embedded defaults (no DICOMROUTER_CONFIG to a missing file)
    assert "ENV DICOMROUTER_CONFIG" not in dockerfile


def test_cluster_deploy_files_are_consistent(monkeypatch: pytest.MonkeyPatch) -> None:
    """The three-node compose file (docs/scale-out.md), read: a TCP load balancer in front of
    three nodes that share one router.yml, PostgreSQL and a MinIO bucket; the config validates
    with the example secrets and is in cluster mode."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent / "deploy" / "cluster"
    services = yaml.safe_load((root / "docker-compose.yml").read_text())["services"]
    assert {"haproxy", "node1", "node2", "node3", "postgres", "minio", "minio-init"} <= \
        set(services)
    for n in (1, 2, 3):
        node = services[f"node{n}"]
        assert node["hostname"] == f"node{n}"  # node_id defaults to the host name
        assert "./router.yml:/etc/dicomrouter/router.yml:ro" in node["volumes"]
        assert node["environment"]["DICOMROUTER_CONFIG"] == "/etc/dicomrouter/router.yml"
        assert "./secrets.env" in node["env_file"]
    haproxy = (root / "haproxy.cfg").read_text()
    assert "mode tcp" in haproxy
    assert all(f"server node{n} node{n}:11112 check" in haproxy for n in (1, 2, 3))
    assert "mc mb --ignore-existing local/dicomrouter-spool" in \
        services["minio-init"]["entrypoint"]
    env = dict(os.environ)
    for line in (root / "secrets.env.example").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            env[key] = value
            monkeypatch.setenv(key, value)
    r = subprocess.run([sys.executable, "-m", "dicomrouter", "serve", "--check", "--config",
                        str(root / "router.yml")], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    cfg = cfgmod.load(root / "router.yml")
    assert cfg.cluster and cfg.shared_spool is not None and cfg.ack_after == "shared"
    assert cfg.shared_spool is not None and cfg.shared_spool.bucket == "dicomrouter-spool"
    assert cfg.state.dsn.startswith("postgresql://")
    assert "password" not in (root / "router.yml").read_text().lower()


PG = {"type": "postgresql", "dsn_env": "DICOMROUTER_TEST_DSN"}
S3 = {"type": "s3", "bucket": "spool"}


@pytest.mark.parametrize(("data", "message"), [
    ({"state": {"type": "postgres"}}, "state.type: one of sqlite, postgresql"),
    ({"state": {"type": "postgresql"}}, "state.dsn_env: required for type: postgresql"),
    ({"state": {"type": "postgresql", "dsn_env": "NO_SUCH_VARIABLE_X"}},
     "state.dsn_env: environment variable NO_SUCH_VARIABLE_X is not set"),
    ({"state": {"dsn_env": "DICOMROUTER_TEST_DSN"}}, "state.dsn_env: only for type: postgresql"),
    ({"state": {**PG, "lease": "1s"}}, "state.lease: must be at least 3 s"),
    ({"state": {**PG, "dsn_file": "x"}}, "state.dsn_file: give dsn_env or dsn_file"),
    ({"shared_spool": S3}, "shared_spool: needs 'state: {type: postgresql"),
    ({"state": PG, "shared_spool": {"type": "s3"}}, "shared_spool.bucket: required"),
    ({"state": PG, "shared_spool": {**S3, "prefix": "../x"}},
     "shared_spool.prefix: must be a relative key prefix"),
    ({"state": PG, "shared_spool": {**S3, "access_key_env": "A"}},
     "shared_spool.access_key_env: access_key_env and secret_key_env go together"),
    ({"state": PG, "shared_spool": {**S3, "bukket": "x"}},
     "shared_spool.bukket: unknown key (did you mean 'bucket'?"),
    ({"ack_after": "shared"}, "ack_after: only with shared_spool"),
    ({"state": PG, "shared_spool": S3, "ack_after": "never"},
     "ack_after: one of shared, local"),
    ({"node_id": "node 1/../x"}, "node_id: 'node 1/../x' is not a node id"),
])
def test_cluster_keys_are_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  data: dict, message: str) -> None:
    monkeypatch.setenv("DICOMROUTER_TEST_DSN", "postgresql://u:pw1234@db/x")
    with pytest.raises(ConfigError) as err:
        cfgmod.from_dict(data, tmp_path, "test")
    assert str(err.value).startswith(message), str(err.value)
    assert "pw1234" not in str(err.value)


def test_cluster_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    embedded = cfgmod.from_dict({}, tmp_path, "test")
    assert embedded.state.type == "sqlite" and not embedded.cluster
    assert embedded.shared_spool is None and embedded.ack_after == "local"
    assert embedded.node_id  # the host name, made safe
    assert embedded.node_id.split("-")[0] in socket.gethostname() or embedded.node_id == "node"
    monkeypatch.setenv("DICOMROUTER_TEST_DSN", "postgresql://u:pw1234@db/x")
    cfg = cfgmod.from_dict({"state": PG, "shared_spool": S3, "node_id": "n1"}, tmp_path, "t")
    assert cfg.cluster and cfg.ack_after == "shared" and cfg.node_id == "n1"
    assert cfg.state.dsn == "postgresql://u:pw1234@db/x" and cfg.state.lease == 30.0
    assert "pw1234" not in repr(cfg.state)  # the DSN is kept out of reprs (and logs)


def test_processing_concurrency_per_route(tmp_path: Path) -> None:
    """A remote-only chain processes 4 studies at once by default (one waiting for its node
    must not hold the others back), a chain with a local step one; process_concurrency sets
    it, and only beside process:."""
    ai = {"type": "dicom", "ae_title": "AI", "host": "127.0.0.1", "port": 11112}
    remote = {"remote": {"destination": "ai"}}
    local = {"command": ["true"]}
    cfg = load_dict(tmp_path, {"destinations": {"ai": ai}, "routes": [
        {"name": "remote", "process": [remote]},
        {"name": "local", "process": [local]},
        {"name": "mixed", "process": [remote, local]},
        {"name": "set", "process": [local], "process_concurrency": 3}]})
    assert {name: cfg.destinations[f"process:{name}"].concurrency
            for name in ("remote", "local", "mixed", "set")} == {
        "remote": 4, "local": 1, "mixed": 1, "set": 3}
    with pytest.raises(cfgmod.ConfigError, match=r"routes\[0\]\.process_concurrency: goes "
                                                 "with process:"):
        load_dict(tmp_path, {"destinations": {"ai": ai}, "routes": [
            {"to": "ai", "process_concurrency": 2}]})
    with pytest.raises(cfgmod.ConfigError, match="process_concurrency"):
        load_dict(tmp_path, {"destinations": {"ai": ai}, "routes": [
            {"name": "r", "process": [remote], "process_concurrency": 0}]})
