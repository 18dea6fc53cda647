"""The shipped recipes (`configs/`): `lorakit recipes` lists them, `lorakit init` copies one."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import LorakitError

STARTER = "starter"


def recipes_dir() -> Path:
    """`configs/` of a source checkout, else the copy installed under <prefix>/share/lorakit."""
    for candidate in (
        Path(__file__).resolve().parents[1] / "configs",
        Path(sys.prefix) / "share" / "lorakit" / "configs",
    ):
        if candidate.is_dir():
            return candidate
    raise LorakitError("the shipped recipes (configs/) are not installed with this lorakit")


@dataclass(frozen=True)
class ShippedRecipe:
    name: str
    path: Path
    summary: str


def shipped_recipes() -> list[ShippedRecipe]:
    root = recipes_dir()
    found = []
    for path in sorted(root.rglob("*.yaml")):
        if path.parent.name == "accelerate":
            continue  # launcher configs, not recipes
        name = path.relative_to(root).with_suffix("").as_posix()
        found.append(ShippedRecipe(name, path, _first_comment(path)))
    return found


def _first_comment(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def write_starter(target: Path, template: str = STARTER, overwrite: bool = False) -> Path:
    """Copy a shipped recipe (comments included) to `target`."""
    recipes = {r.name: r for r in shipped_recipes()}
    if template not in recipes:
        raise LorakitError(
            f"--template: unknown recipe {template!r} (shipped: {', '.join(sorted(recipes))})"
        )
    if target.exists() and not overwrite:
        raise LorakitError(f"{target}: already exists (pass --overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(recipes[template].path.read_text(encoding="utf-8"), encoding="utf-8")
    return target
