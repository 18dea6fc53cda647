"""The shape of the code, checked: commands on top, the libraries they share below, data apart
from model loading, resume for training only, and functions that read in one sitting.

Every `import` counts, including those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lorakit"
MAX_FUNCTION_LINES = 100


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
COMMANDS = {name for name in MODULES if name.startswith("lorakit.commands.")}
MODEL_LOADING = ("lorakit.models", "lorakit.peft_setup", "lorakit.artifacts")
TRAINING = ("lorakit.commands.train", "lorakit.training", "lorakit.resume")


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from lorakit.commands import train` imports the module lorakit.commands.train
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in MODULES}


def within(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_package_has_both_floors():
    assert {
        "lorakit.commands.train",
        "lorakit.commands.evaluate",
        "lorakit.commands.generate",
        "lorakit.commands.merge",
        "lorakit.commands.quantize",
        "lorakit.commands.prepare",
        "lorakit.commands.validate",
    } <= COMMANDS
    assert {"lorakit.run_folder", "lorakit.resume", "lorakit.decoding", "lorakit.loss"} <= set(
        MODULES
    )


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_no_command_imports_another(command):
    others = {m for m in imports_of(MODULES[command]) if m in COMMANDS and m != command}
    assert not others, f"{command} imports {others}"


ENTRY_POINTS = {"lorakit.cli", "lorakit.__main__"}


@pytest.mark.parametrize("library", sorted(set(MODULES) - COMMANDS - ENTRY_POINTS))
def test_no_library_imports_a_command_or_the_cli(library):
    upward = {m for m in imports_of(MODULES[library]) if m in COMMANDS or m == "lorakit.cli"}
    assert not upward, f"{library} imports {upward}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if within(m, "lorakit.data")))
def test_data_knows_nothing_of_model_loading(module):
    loading = {m for m in imports_of(MODULES[module]) if within(m, *MODEL_LOADING)}
    assert not loading, f"{module} imports {loading}"


def test_only_training_imports_the_resume_machinery():
    users = {name for name, path in MODULES.items() if "lorakit.resume" in imports_of(path)} - {
        "lorakit.resume"
    }
    assert users and all(within(name, *TRAINING) for name in users), users


def test_no_function_is_longer_than_a_screen_or_two():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long


def test_the_training_loop_reads_on_one_screen():
    tree = ast.parse(MODULES["lorakit.commands.train"].read_text(encoding="utf-8"))
    train = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert train.end_lineno - train.lineno + 1 <= 60
