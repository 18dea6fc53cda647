"""The bad-input corpus: every file in `tests/bad_inputs/` is one case a user can run into.

A case names a command line, the files it needs, and what must happen:

```yaml
why: what a user did
command: [validate, recipe.yaml]     # run in the case's own folder
files:
  recipe.yaml: |                     # written as UTF-8
    data: {train: data.jsonl}
  data.jsonl: {latin-1: "..."}       # or utf-8-bom:, or text: with encoding none
exit: 2
error: "error: data.jsonl:2: not UTF-8 (byte 0xe9 at column 20); re-save the file as UTF-8"
```

For every case: the exit code is the one expected; an error is one `error:` line (the first
line equals `error`, every line is an error line) and never a traceback; nothing in the case's
folder is created, changed or removed; and no model is loaded or converted (bad input is
caught before anything slow). A case with `exit: 0` is input that must be accepted (`stdout`
names text the output must hold). `error_pattern:` instead of `error:` is a regular expression
the line must match whole, for messages with numbers measured on the machine. `{tiny_llama}`
(a chat model) and `{tiny_gpt2}` (no chat template) in a case are tiny model folders built in
the session.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lorakit.cli import app

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = sorted(CORPUS.glob("*.yaml"))


def _fill(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


def _content(spec, values: dict[str, str]) -> bytes:
    if isinstance(spec, str):
        return _fill(spec, values).encode("utf-8")
    (encoding, text), *_ = spec.items()
    text = _fill(text, values)
    if encoding == "utf-8-bom":
        return b"\xef\xbb\xbf" + text.encode("utf-8")
    if encoding == "truncate":  # the first N bytes of a text: a file cut short
        count, _, body = text.partition("\n")
        return body.encode("utf-8")[: int(count)]
    return text.encode(encoding)


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file()
        else ""
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture
def nothing_slow(monkeypatch):
    """Loading or converting a model fails the case: bad input must be refused before."""
    from transformers import AutoModelForCausalLM

    import lorakit.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(lorakit.models, "convert_gguf", refuse)


def test_the_corpus_is_large_and_every_case_says_why():
    assert len(CASES) >= 40
    for path in CASES:
        case = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert {"why", "command", "exit"} <= set(case), path.name
        error = case.get("error") or case.get("error_pattern", "")
        assert case["exit"] == 0 or error.startswith("error: "), path.name


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_case(path, tmp_path, tiny_model, nothing_slow, monkeypatch):
    case = yaml.safe_load(path.read_text(encoding="utf-8"))
    values = {
        "tiny_llama": str(tiny_model("llama")),
        "tiny_gpt2": str(tiny_model("gpt2")),
        "dir": str(tmp_path),
    }
    for name, spec in (case.get("files") or {}).items():
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(_content(spec, values))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path.parent / f"{tmp_path.name}-cache"))
    before = _snapshot(tmp_path)
    result = CliRunner().invoke(app, [_fill(str(a), values) for a in case["command"]])

    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{path.name}: {type(result.exception).__name__}: {result.exception}"
    )
    assert "Traceback" not in result.stderr + result.stdout, path.name
    assert result.exit_code == case["exit"], (path.name, result.stderr)
    if case["exit"] != 0:
        lines = result.stderr.strip().splitlines()
        if "error_pattern" in case:
            assert re.fullmatch(_fill(case["error_pattern"], values), lines[0]), lines[0]
        else:
            assert lines[0] == _fill(case["error"], values), path.name
        assert all(line.startswith("error: ") for line in lines), (path.name, result.stderr)
    for text in case.get("stdout", []):
        assert _fill(text, values) in result.stdout + result.stderr, (path.name, result.stdout)
    assert _snapshot(tmp_path) == before, f"{path.name}: the command changed files"


def test_chat_data_for_a_gguf_model_without_template_fails_before_conversion(
    tmp_path, tiny_model, nothing_slow, monkeypatch
):
    """A GGUF source is converted to a folder (a minute for a real model) only after its data is
    known good: the tokenizer is read from the file's metadata first."""
    import shutil

    from transformers import AutoTokenizer

    from lorakit.quantization.gguf import export_gguf
    from tests.conftest import fact_rows, write_jsonl

    folder = tmp_path / "plain"
    shutil.copytree(tiny_model("llama"), folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = None
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer.save_pretrained(folder)
    monkeypatch.undo()  # the export reads the model; the training below must not
    export_gguf(str(folder), tmp_path / "plain.gguf")
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    import lorakit.models

    def refuse(*args, **kwargs):
        raise AssertionError("converted the GGUF model before checking the data")

    monkeypatch.setattr(lorakit.models, "convert_gguf", refuse)
    write_jsonl(tmp_path / "chat.jsonl", fact_rows("chat"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {{name_or_path: {tmp_path / 'plain.gguf'}}}\n"
        f"data: {{train: {tmp_path / 'chat.jsonl'}}}\noutput: {{dir: {tmp_path / 'run'}}}\n"
    )
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: chat data needs a tokenizer with a chat template; this model has none (set "
        "data.chat_template, or use alpaca, prompt_completion or text data)"
    ]
    assert not (tmp_path / "run").exists()
