"""Named, versioned recipes shipped with slm: YAML files beside this module (see RECIPES in the README)."""

from __future__ import annotations

from pathlib import Path

import yaml

from slm.errors import SlmError

HERE = Path(__file__).parent


def names() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.yaml"))


def find_recipe(name: str) -> Path | None:
    path = HERE / f"{name}.yaml"
    return path if path.is_file() else None


def load_recipe(name: str) -> dict:
    path = find_recipe(name)
    if path is None:
        raise SlmError(f"no recipe {name!r} (recipes: {', '.join(names())})")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise SlmError(f"{path}: a recipe must be a mapping")
    return data
