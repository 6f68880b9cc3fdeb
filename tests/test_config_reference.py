"""The configuration's keys are declared once, in the models, and the README documents every
one of them: a key added to a model without a word in the README fails here (and every YAML
example in the README validates against the models, tests/test_readme.py)."""

from __future__ import annotations

import re
import typing
from pathlib import Path

from pydantic import BaseModel

from dicomrouter.config import DESTINATION_MODELS, SOURCE_MODELS, ConfigModel
from dicomrouter.deid_table import DeidentifyModel

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def _models_in(annotation: typing.Any) -> list[type[BaseModel]]:
    out: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation) or (annotation,):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            out.append(arg)
        elif typing.get_args(arg):
            out += _models_in(arg)
    return out


def every_key() -> list[str]:
    """Every key of the configuration, as ``path.key`` (``destinations.<dicom>.ae_title``)."""
    seen: set[type[BaseModel]] = set()
    keys: list[str] = []

    def walk(model: type[BaseModel], where: str) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, field in model.model_fields.items():
            name = field.alias or name  # the key as written (prefetch's ``from``)
            keys.append(f"{where}.{name}" if where else name)
            for sub in _models_in(field.annotation):
                walk(sub, f"{where}.{name}" if where else name)

    walk(ConfigModel, "")
    # the router's own types (a test may have registered a throw-away one in this process)
    for kind, model in DESTINATION_MODELS.items():
        if model.__module__.startswith("dicomrouter."):
            walk(model, f"destinations.<{kind}>")
    for kind, model in SOURCE_MODELS.items():
        if model.__module__.startswith("dicomrouter."):
            walk(model, f"sources.<{kind}>")
    walk(DeidentifyModel, "transforms[].deidentify")
    return keys


def test_every_key_is_in_the_readme() -> None:
    keys = every_key()
    assert len(keys) > 150  # the walk reached the nested models
    undocumented = [k for k in keys
                    if not re.search(rf"(^|[\s{{,`(]){re.escape(k.rpartition('.')[2])}(:|`)",
                                     README, re.M)]
    assert not undocumented, f"document these keys in README.md: {undocumented}"
