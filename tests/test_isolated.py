"""Native code in a child process: a crash there is one error line, never a dead process."""

import os
import signal

import pytest
from typer.testing import CliRunner

from lorakit.cli import app
from lorakit.errors import LorakitError
from lorakit.isolated import NativeCrash, call_isolated


def crash_with(signum: int, workdir: str) -> None:
    """Runs in the child: dies as a native crash would."""
    os.kill(os.getpid(), signum)


def answer(value: int, workdir: str) -> dict:
    return {"double": 2 * value, "workdir_exists": os.path.isdir(workdir)}


def refuse(workdir: str) -> None:
    raise LorakitError("the child says no")


def fail(workdir: str) -> None:
    raise RuntimeError("something unexpected")


def isolated(function: str, **payload):
    return call_isolated(
        f"tests.test_isolated:{function}", payload, what="the tool", doing="testing", hint="fix it"
    )


def test_the_child_returns_its_value():
    assert isolated("answer", value=21) == {"double": 42, "workdir_exists": True}


@pytest.mark.parametrize(
    ("signum", "described"),
    [
        (signal.SIGILL, "SIGILL, illegal instruction"),
        (signal.SIGSEGV, "SIGSEGV, segmentation fault"),
    ],
)
def test_a_child_killed_by_a_signal_is_one_error(signum, described):
    with pytest.raises(NativeCrash) as crash:
        isolated("crash_with", signum=int(signum))
    assert str(crash.value) == f"the tool crashed ({described}) while testing: fix it"
    assert crash.value.exit_code == 1


def test_errors_in_the_child_keep_their_message():
    with pytest.raises(LorakitError, match="^the child says no$") as error:
        isolated("refuse")
    assert error.value.exit_code == 2
    with pytest.raises(NativeCrash, match="the tool failed while testing: RuntimeError: something"):
        isolated("fail")


def test_a_llama_cpp_crash_while_verifying_is_one_line_and_keeps_the_file(
    tmp_path, tiny_model, monkeypatch
):
    """The verify child dies with SIGILL (as llama.cpp's AMX kernels did on an Intel Xeon):
    exit 1, one error line naming the file, and the exported file stays, reported."""
    import lorakit.quantization.gguf

    monkeypatch.setattr(lorakit.quantization.gguf, "LLAMA_CPP_SCORER", "tests.test_isolated:sigill")
    out = tmp_path / "m.q8_0.gguf"
    result = CliRunner().invoke(
        app,
        [
            "quantize",
            str(tiny_model("llama")),
            "--format",
            "gguf",
            "--type",
            "q8_0",
            "--out",
            str(out),
            "--verify",
        ],
    )
    assert result.exit_code == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: llama.cpp crashed (SIGILL, illegal instruction) while verifying {out}: {out} is "
        "written and complete; " + lorakit.quantization.gguf.LLAMA_CPP_HINT
    ]
    assert "Traceback" not in result.stderr
    assert out.stat().st_size > 0
    assert "lorakit quantize --format gguf" in result.stderr  # the export's table, before the error


def sigill(workdir: str, **payload) -> None:
    os.kill(os.getpid(), signal.SIGILL)
