"""`lorakit quantize` at the command line: the report, and clear refusals of adapters,
quantized models, wrong options and existing output."""

from pathlib import Path

import pytest

from lorakit.quantization.bnb import (
    quantize_model,
)
from tests.conftest import one_error_line
from tests.conftest import run_cli as run


def test_cli_prints_the_report(tmp_path, tiny_model, facts):
    code, _, err = run(
        "quantize", tiny_model("llama"), "--out", tmp_path / "q", "--data", facts,
        "--no-double-quant", "--dtype", "float32",
    )  # fmt: skip
    assert code == 0, err
    assert "4.500 measured" in err and "QLoRA formula 4.500" in err
    assert "perplexity" in err and "q_proj" in err
    assert (tmp_path / "q" / "config.json").is_file()


def make_adapter(model_dir: Path, target: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lora = LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    get_peft_model(model, lora).save_pretrained(target)


def test_adapter_folder_is_refused_with_the_merge_command(tmp_path, tiny_model):
    run_dir = tmp_path / "run"
    make_adapter(tiny_model("llama"), run_dir / "adapter")
    code, _, err = run("quantize", run_dir / "adapter", "--out", tmp_path / "q")
    assert code == 2
    line = one_error_line(err)
    assert "is a LoRA adapter, not a model" in line
    assert f"`lorakit merge {run_dir / 'adapter'} --out {run_dir / 'merged'}`" in line
    code, _, err = run("quantize", run_dir, "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert code == 2
    assert f"`lorakit merge {run_dir} --out {run_dir / 'merged'}`" in one_error_line(err)
    assert not (tmp_path / "q").exists() and not (tmp_path / "m.gguf").exists()


def test_already_quantized_model_is_refused(tmp_path, tiny_model):
    quantize_model(str(tiny_model("llama")), tmp_path / "q", dtype="float32")
    for args in (["--out", tmp_path / "again"], ["--format", "gguf", "--out", tmp_path / "q.gguf"]):
        code, _, err = run("quantize", tmp_path / "q", *args)
        assert code == 2
        assert "is already quantized (bitsandbytes nf4)" in one_error_line(err)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--format", "gguf", "--method", "fp4"], "--method apply to --format bnb"),
        (["--format", "gguf", "--type", "q3_k"], "--type: 'q3_k' is not one of"),
        (["--type", "q8_0"], "--type and --verify apply to --format gguf"),
        (["--method", "int4"], "--method: 'int4' is not one of nf4, fp4"),
        (["--format", "onnx"], "--format: 'onnx' is not bnb or gguf"),
    ],
)
def test_bad_options(tmp_path, tiny_model, args, expected):
    out = tmp_path / ("x.gguf" if "gguf" in args else "x")
    code, _, err = run("quantize", tiny_model("llama"), "--out", out, *args)
    assert code == 2
    assert expected in one_error_line(err)


def test_existing_output_is_kept_without_overwrite(tmp_path, tiny_model):
    out = tmp_path / "q"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, _, err = run("quantize", tiny_model("llama"), "--out", out)
    assert code == 2
    assert "already exists (pass --overwrite to replace it)" in one_error_line(err)
    assert (out / "precious.txt").read_text() == "keep me"
    code, _, err = run("quantize", tiny_model("llama"), "--format", "gguf", "--out", tmp_path / "m")
    assert "give a path ending in .gguf" in one_error_line(err)
