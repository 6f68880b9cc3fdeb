"""Every YAML example in the README is a configuration the router accepts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from dicomrouter.config import from_dict

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```yaml\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


@pytest.mark.parametrize("block", BLOCKS, ids=[f"example{i + 1}" for i in range(len(BLOCKS))])
def test_readme_yaml_examples_validate(block: str, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    for env in re.findall(r"_env:\s*([A-Z0-9_]+)", block):
        monkeypatch.setenv(env, "x" * 32)  # a key (key_env) must be 32 characters or more
    for name in re.findall(r"/etc/dicomrouter/tls/([\w.-]+)", block):  # certificates: exist
        (tmp_path / "tls").mkdir(exist_ok=True)
        (tmp_path / "tls" / name).write_text("not read by the config check")
    block = block.replace("/etc/dicomrouter/tls/", f"{tmp_path}/tls/")
    cfg = from_dict(yaml.safe_load(block), tmp_path, "README")
    assert cfg.destinations or cfg.sources or cfg.routes


def test_readme_has_the_examples() -> None:
    assert len(BLOCKS) >= 5
