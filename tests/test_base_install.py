"""The default install is the product: ``pip install .`` without extras runs every feature the
README shows, and a configuration that needs an extra says so in one line.

The test machine has every extra installed, so the base install is simulated: a
``sitecustomize`` makes every installed package that the base requirements (and their own
requirements) do not bring unimportable in the router's process. An ``s3`` destination once
passed ``serve --check`` on the default install and then failed every delivery for want of
boto3; these tests catch that class of defect.
"""

from __future__ import annotations

import ast
import os
import re
import sys
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from peers import MotoS3, wait_until
from router_fixtures import Router, dicomrouter, tags_of

from dicomrouter.config import extras
from dicomrouter.sample import generate

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dicomrouter"

BLOCKER = '''
import os, sys
from importlib.abc import MetaPathFinder

_BLOCKED = frozenset(os.environ["DICOMROUTER_TEST_NOT_INSTALLED"].split(","))


class _NotInTheBaseInstall(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NotInTheBaseInstall())

# ... and their metadata (entry points: pylibjpeg loads every installed plugin it finds)
import importlib.metadata as _md

_HIDDEN = frozenset(os.environ["DICOMROUTER_TEST_NOT_INSTALLED_DISTS"].split(","))
_discover = _md.Distribution.discover.__func__


def _base_only(cls, **kwargs):
    for dist in _discover(cls, **kwargs):
        name = (dist.metadata["Name"] or "").lower().replace("_", "-").replace(".", "-")
        if name not in _HIDDEN:
            yield dist


_md.Distribution.discover = classmethod(_base_only)
'''


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@cache
def base_distributions() -> frozenset[str]:
    """dicomrouter's requirements without extras, and theirs, transitively."""
    seen: set[str] = set()
    todo = ["dicomrouter"]
    while todo:
        name = _norm(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return frozenset(seen)


@cache
def module_owners() -> dict[str, frozenset[str]]:
    return {m: frozenset(_norm(d) for d in ds)
            for m, ds in metadata.packages_distributions().items()}


def base_modules() -> frozenset[str]:
    base = base_distributions()
    return frozenset(m for m, ds in module_owners().items() if ds & base)


def not_in_base_install() -> frozenset[str]:
    """Top-level modules installed here that the base install would not have."""
    base = base_modules()
    return frozenset(m for m in module_owners() if m not in base
                     and m not in sys.stdlib_module_names and m != "dicomrouter")


def not_in_base_install_dists() -> frozenset[str]:
    base = base_distributions()
    return frozenset(_norm(d.metadata["Name"]) for d in metadata.distributions()
                     if _norm(d.metadata["Name"]) not in base)


def base_install_env(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "base-install-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": f"{site}{os.pathsep}{path}" if path else str(site),
            "DICOMROUTER_TEST_NOT_INSTALLED": ",".join(sorted(not_in_base_install())),
            "DICOMROUTER_TEST_NOT_INSTALLED_DISTS": ",".join(sorted(not_in_base_install_dists()))}


def imports_of(path: Path) -> set[str]:
    """Top-level modules a source file imports, at any level (function-level ones too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name.partition(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.partition(".")[0])
    return found


def test_the_simulation_knows_the_extras() -> None:
    """The blocked set is what the extras add here (so the tests below can fail)."""
    blocked = not_in_base_install()
    assert {"psycopg", "moto", "pytest"} <= blocked
    assert {"boto3", "botocore", "pynetdicom", "pydicom", "fastapi"} <= base_modules()


def test_every_import_is_in_the_base_install_or_declared_optional() -> None:
    base = base_modules()
    undeclared = []
    for path in sorted(PACKAGE.rglob("*.py")):
        allowed = set(extras.OPTIONAL_MODULES) | {"dicomrouter_bench"}  # `bench`: optional
        for module in sorted(imports_of(path)):
            if module in sys.stdlib_module_names or module == "dicomrouter":
                continue
            if module not in base and module not in allowed:
                undeclared.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not undeclared, ("not in the base install and not in config/extras.py "
                            "OPTIONAL_MODULES: " + "; ".join(undeclared))


def _local_folders(text: str, tmp_path: Path) -> str:
    """Absolute output folders (/archive, a container's /data) moved under ``tmp_path``:
    serve --check tests that folders can be created, which only root may do at /."""
    return re.sub(r"(path:\s*)/", rf"\g<1>{tmp_path}/root/", text)


def _example_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Every example configuration in the README and deploy/, as files serve --check reads."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    configs: dict[str, Path] = {}
    for i, block in enumerate(re.findall(r"```yaml\n(.*?)```", readme, re.S)):
        for name in re.findall(r"/etc/dicomrouter/tls/([\w.-]+)", block):
            (tmp_path / "tls").mkdir(exist_ok=True)
            (tmp_path / "tls" / name).write_text("not read by the config check")
        block = block.replace("/etc/dicomrouter/tls/", f"{tmp_path}/tls/")
        p = tmp_path / f"readme{i + 1}.yml"
        p.write_text(_local_folders(block, tmp_path))
        configs[p.name] = p
    for p in sorted((ROOT / "deploy").rglob("*.yml")):
        text = p.read_text()
        if "services" in (yaml.safe_load(text) or {}):
            continue  # a compose file
        copy = tmp_path / p.relative_to(ROOT).as_posix().replace("/", "-")
        copy.write_text(_local_folders(text, tmp_path))
        configs[str(p.relative_to(ROOT))] = copy
    for p in configs.values():
        for env in re.findall(r"_env:\s*([A-Z0-9_]+)", p.read_text()):
            monkeypatch.setenv(env, "postgresql://router@db/router" if "DSN" in env else "x" * 32)
    return configs


def test_serve_check_on_every_example_config_with_the_base_install(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in base_install_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    configs = _example_configs(tmp_path, monkeypatch)
    assert len(configs) >= 8
    needing_extras = 0
    for name, path in configs.items():
        r = dicomrouter("serve", "--check", "--config", str(path), cwd=tmp_path, timeout=60)
        out = r.stdout + r.stderr
        assert "Traceback" not in out, f"{name}: {out}"
        cfg = yaml.safe_load(path.read_text()) or {}
        if (cfg.get("state") or {}).get("type") == "postgresql":
            needing_extras += 1
            assert r.returncode != 0, f"{name}: {out}"
            assert ("state.type: postgresql needs the Python package(s) psycopg, psycopg_pool, "
                    "not installed: pip install 'dicomrouter[cluster]'") in r.stderr, out
            assert len(r.stderr.strip().splitlines()) == 1, out
        else:
            assert r.returncode == 0 and "configuration OK" in r.stdout, f"{name}: {out}"
    assert needing_extras >= 2, "the README's and deploy/'s cluster configs"
    # every command that reads the state says the same, before touching it
    cluster = next(p for p in configs.values()
                   if "postgresql" in p.read_text() and "shared_spool" in p.read_text())
    r = dicomrouter("status", "--config", str(cluster), cwd=tmp_path, timeout=60)
    assert r.returncode != 0 and "pip install 'dicomrouter[cluster]'" in r.stderr
    assert "Traceback" not in r.stderr


def test_with_every_extra_installed_the_cluster_config_passes(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """The same check is quiet when psycopg is there (here: the test extra has it)."""
    configs = _example_configs(tmp_path, monkeypatch)
    cluster = next(p for p in configs.values() if "postgresql" in p.read_text())
    r = dicomrouter("serve", "--check", "--config", str(cluster), cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr


class BaseInstallRouter(Router):
    def __init__(self, work_dir: Path, config: dict, blocked_env: dict[str, str]) -> None:
        super().__init__(work_dir, config)
        self._blocked_env = blocked_env

    def env(self) -> dict[str, str]:
        env = super().env()
        env["PYTHONPATH"] = f"{self._blocked_env['PYTHONPATH']}{os.pathsep}{env['PYTHONPATH']}"
        for key in ("DICOMROUTER_TEST_NOT_INSTALLED", "DICOMROUTER_TEST_NOT_INSTALLED_DISTS"):
            env[key] = self._blocked_env[key]
        return env


def test_the_readme_s3_export_delivers_on_the_base_install(
        tmp_path: Path, moto_s3: MotoS3, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's "PACS exporting to a human-friendly bucket", pointed at the S3 server."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    after = readme.split("A PACS exporting to a human-friendly bucket", 1)[1]
    block = re.findall(r"```yaml\n(.*?)```", after, re.S)[0]
    assert "type: s3" in block
    config = yaml.safe_load(block)
    bucket = config["destinations"]["bucket"]
    bucket.update(endpoint_url=moto_s3.endpoint_url, region="us-east-1",
                  access_key_env="S3_KEY", secret_key_env="S3_SECRET")
    config["allowed_calling_aes"] = ["DICOMSEND"]
    monkeypatch.setenv("S3_KEY", MotoS3.access_key)
    monkeypatch.setenv("S3_SECRET", MotoS3.secret_key)
    s3 = moto_s3.client()
    s3.create_bucket(Bucket=bucket["bucket"])
    study = generate(tmp_path / "study", series=1, instances=3, rows=16, cols=16, seed=77)
    with BaseInstallRouter(tmp_path / "router", config, base_install_env(tmp_path)) as router:
        r = dicomrouter("send", str(tmp_path / "study"), "--port", str(router.port))
        assert r.returncode == 0, r.stderr
        uid = tags_of(study[0], "StudyInstanceUID")[0]
        router.wait_state(uid, "delivered", timeout=120)
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket["bucket"])["Contents"]]
        assert len(keys) == 1 and keys[0].endswith(f"/{uid}.zip")
        head = s3.head_object(Bucket=bucket["bucket"], Key=keys[0])
        assert head["Metadata"]["instance-count"] == "3"
        log = router.log(2000)
        assert "ModuleNotFoundError" not in log and "Traceback" not in log
        wait_until(lambda: "delivered to every destination" in router.log(2000), timeout=30,
                   what="the delivery log line")
