"""Named, versioned recipes shipped with slm: YAML files beside this module (see RECIPES in the README), and the
token budgets they (and mixes, and --tokens) are written in."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from slm.errors import SlmError

HERE = Path(__file__).parent
_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_budget(value, where: str) -> int:
    """6T / 500B / 20M / 1.5k / 2_000 / an integer -> tokens."""
    if isinstance(value, bool):
        raise SlmError(f"{where}: expected a token budget like 6T, 500B or 20M, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float) and value.is_integer():
        n = int(value)
    else:
        m = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", str(value))
        if not m:
            raise SlmError(f"{where}: expected a token budget like 6T, 500B or 20M, got {value!r}")
        n = round(float(m.group(1).replace("_", "")) * _SUFFIX[m.group(2).upper()])
    if n <= 0:
        raise SlmError(f"{where}: expected a positive token budget, got {value!r}")
    return n


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


def load_step(spec: str, what: str) -> dict:
    """A recipe's named step, RECIPE:STEP (e.g. smollm2-1_7b:long_context): a mapping of the recipe's top level
    with a `mix:` and/or a `cooldown:` part. WHAT names the option for messages."""
    name, sep, step = spec.partition(":")
    if not sep or not step:
        raise SlmError(f"{what} {spec!r}: expected RECIPE:STEP (e.g. smollm2-1_7b:long_context)")
    recipe = load_recipe(name)
    steps = [k for k, v in recipe.items() if isinstance(v, dict) and ("cooldown" in v or "mix" in v)
             and k != "mix"]
    if step not in steps:
        raise SlmError(f"{what} {spec!r}: recipe {name} has no step {step!r}"
                       f"{' (steps: ' + ', '.join(steps) + ')' if steps else ''}")
    return recipe[step]
