"""A step's work folder: ``input/``, ``output/``, ``task.json`` (runner.py says the contract)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WorkFolder:
    root: Path

    @property
    def input(self) -> Path:
        return self.root / "input"

    @property
    def output(self) -> Path:
        return self.root / "output"

    @property
    def task(self) -> Path:
        return self.root / "task.json"

    def placeholders(self) -> dict[str, str]:
        return {"{input}": str(self.input), "{output}": str(self.output),
                "{task}": str(self.task), "{work}": str(self.root)}
