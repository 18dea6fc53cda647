"""Native code users do not control (llama.cpp, built by pip on their machine) runs in a child
process: a crash there (SIGILL from instructions the CPU or kernel refuses, a segfault in a
kernel) becomes one error line in the parent, never a dead `lorakit` (or a dead pytest).

`call_isolated("package.module:function", payload)` runs `function(**payload)` in a fresh
Python process (`python -m lorakit.isolated`) and returns its JSON-able result. Large arrays
travel as files the function writes into the folder it is given (`workdir`).
"""

from __future__ import annotations

import importlib
import json
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError

REQUEST_FILE = "request.json"
RESULT_FILE = "result.json"


class NativeCrash(LorakitError):
    """The child process died from a signal."""

    exit_code = 1


def signal_description(returncode: int) -> str:
    """`SIGILL, illegal instruction` for a child killed by signal 4."""
    signum = -returncode
    try:
        name = signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
    text = signal.strsignal(signum) or name
    return f"{name}, {text[0].lower()}{text[1:]}"


def call_isolated(
    function: str,
    payload: dict[str, Any],
    *,
    what: str,
    doing: str,
    hint: str,
    workdir: Path | None = None,
) -> Any:
    """`function(**payload, workdir=...)` in a child process; its return value (JSON).

    `workdir`: a folder for files the function writes (a temporary one, removed, when None).
    A LorakitError in the child is raised again here with its message and exit code. A child
    killed by a signal raises NativeCrash: `{what} crashed (SIGILL, illegal instruction) while
    {doing}: {hint}`. Any other failure raises with the last line the child printed."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="lorakit-child-") as folder:
            return call_isolated(
                function, payload, what=what, doing=doing, hint=hint, workdir=Path(folder)
            )
    (workdir / REQUEST_FILE).write_text(
        json.dumps({"function": function, "payload": payload}), encoding="utf-8"
    )
    process = subprocess.run(
        [sys.executable, "-m", "lorakit.isolated", str(workdir)],
        capture_output=True,
        text=True,
        errors="replace",
    )
    if process.returncode < 0:
        description = signal_description(process.returncode)
        raise NativeCrash(f"{what} crashed ({description}) while {doing}: {hint}")
    result_file = workdir / RESULT_FILE
    result = json.loads(result_file.read_text(encoding="utf-8")) if result_file.is_file() else {}
    if "error" in result:
        error = LorakitError(result["error"])
        error.exit_code = result.get("exit_code", 2)
        raise error
    if process.returncode != 0 or "value" not in result:
        lines = [line for line in process.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit status {process.returncode}"
        raise NativeCrash(f"{what} failed while {doing}: {last}")
    return result["value"]


def _run(workdir: Path) -> int:
    request = json.loads((workdir / REQUEST_FILE).read_text(encoding="utf-8"))
    module_name, _, name = request["function"].partition(":")
    function = getattr(importlib.import_module(module_name), name)
    try:
        value = function(**request["payload"], workdir=str(workdir))
        result: dict[str, Any] = {"value": value}
    except LorakitError as exc:
        result = {"error": str(exc), "exit_code": exc.exit_code}
    except Exception:  # reported to the parent through stderr and the exit status
        traceback.print_exc()
        return 1
    (workdir / RESULT_FILE).write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(_run(Path(sys.argv[1])))
