"""GGUF export (`lorakit.quantization.gguf`): metadata and tokenizer in the file, and the model
run in llama.cpp (in a child process) agreeing with transformers."""

import json

import pytest
import torch
from typer.testing import CliRunner

from lorakit.cli import app
from lorakit.errors import LorakitError
from lorakit.isolated import call_isolated
from lorakit.quantization.gguf import export_gguf, verify_gguf


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def test_unsupported_architecture_for_gguf_is_refused(tmp_path, tiny_model):
    code, _, err = run(
        "quantize", tiny_model("gpt2"), "--format", "gguf", "--out", tmp_path / "g.gguf"
    )
    assert code == 2
    assert "GGUF export supports llama, mistral, qwen2 models" in one_error_line(err)
    assert "'gpt2'" in err and not (tmp_path / "g.gguf").exists()


def test_gguf_metadata_carries_the_tokenizer_and_chat_template(tmp_path, tiny_model):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    source = tiny_model("llama")
    report = export_gguf(str(source), tmp_path / "m.gguf", gguf_type="q8_0")
    reader = GGUFReader(tmp_path / "m.gguf")
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tokenizer = AutoTokenizer.from_pretrained(source)
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == 2 and fields["llama.attention.head_count_kv"] == 2
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    tokens = fields["tokenizer.ggml.tokens"]
    assert (
        len(tokens) == len(tokenizer) and tokens[tokenizer.convert_tokens_to_ids("Ġthe")] == "Ġthe"
    )
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert len(fields["tokenizer.ggml.merges"]) == len(merges)
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert fields["tokenizer.ggml.token_type"][tokenizer.eos_token_id] == 3  # control
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert len(types) == 2 * 9 + 3  # 9 per block, token_embd, output_norm, output
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.1.ffn_norm.weight"] == "F32"
    assert report.tensor_types == {"Q8_0": 16, "F32": 5}
    assert report.file_bytes == (tmp_path / "m.gguf").stat().st_size


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_runs_in_llama_cpp_like_transformers(tmp_path, tiny_model, arch):
    source = tiny_model(arch)
    results = {}
    for gguf_type in ("f16", "q8_0"):
        out = tmp_path / f"m-{gguf_type}.gguf"
        export_gguf(str(source), out, gguf_type=gguf_type)
        results[gguf_type] = verify_gguf(out, str(source), new_tokens=16)
    for check in results["f16"] + results["q8_0"]:
        assert check.same_prompt_tokens, check
    # A random tiny model has near-ties, so single greedy flips are possible even in f16; the
    # embedded-model test below asserts identical f16 generations on a real model.
    f16, q8 = results["f16"], results["q8_0"]
    assert max(c.max_logit_diff for c in f16) < 0.1
    assert sum(c.agreement for c in f16) / len(f16) >= 0.9
    assert max(c.max_logit_diff for c in q8) < 1.5
    assert sum(c.agreement for c in q8) / len(q8) >= 0.75


def test_gguf_export_refuses_an_unknown_tokenizer(tmp_path, tiny_model):
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    source = tiny_model("llama")
    folder = tmp_path / "model"
    import shutil

    shutil.copytree(source, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save_pretrained(folder)
    with pytest.raises(LorakitError, match="pre-tokenizer \\['Whitespace'\\]"):
        export_gguf(str(folder), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_the_llama_cpp_check_catches_a_wrong_export(tmp_path, tiny_model, monkeypatch):
    """Negative control: without reordering the q/k rows for llama.cpp's rotary layout, the
    same check sees different logits and near-chance agreement."""
    import lorakit.quantization.gguf

    monkeypatch.setattr(lorakit.quantization.gguf, "_INTERLEAVE_ROPE", set())
    source = tiny_model("llama")
    export_gguf(str(source), tmp_path / "wrong.gguf")
    checks = verify_gguf(tmp_path / "wrong.gguf", str(source), new_tokens=16)
    assert min(c.max_logit_diff for c in checks) > 2
    assert sum(c.agreement for c in checks) / len(checks) < 0.3


@pytest.mark.slow
def test_embedded_model_in_llama_cpp_matches_transformers(tmp_path):
    from lorakit.models import resolve_model

    location = resolve_model("smollm2-135m-instruct").location
    f16 = export_gguf("smollm2-135m-instruct", tmp_path / "f16.gguf", gguf_type="f16")
    assert f16.pre_tokenizer == "gpt-2" and f16.chat_template
    for check in verify_gguf(tmp_path / "f16.gguf", location, new_tokens=32):
        assert check.same_prompt_tokens and check.identical_prefix == 32, check
    export_gguf("smollm2-135m-instruct", tmp_path / "q8.gguf", gguf_type="q8_0")
    q8 = verify_gguf(tmp_path / "q8.gguf", location, new_tokens=32)
    assert sum(c.agreement for c in q8) / len(q8) >= 0.9


def test_gguf_records_whether_the_tokenizer_adds_bos(tmp_path, tiny_model):
    import shutil

    from gguf import GGUFReader
    from tokenizers import processors
    from transformers import AutoTokenizer

    folder = tmp_path / "model"
    shutil.copytree(tiny_model("llama"), folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    bos = "<|im_start|>"
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.convert_tokens_to_ids(bos))]
    )
    tokenizer.bos_token = bos
    tokenizer.save_pretrained(folder)
    text = "The capital of France is Paris."
    ids = AutoTokenizer.from_pretrained(folder)(text)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids(bos)
    export_gguf(str(folder), tmp_path / "m.gguf")
    fields = {n: f.contents() for n, f in GGUFReader(tmp_path / "m.gguf").fields.items()}
    assert fields["tokenizer.ggml.add_bos_token"] is True
    assert fields["tokenizer.ggml.add_eos_token"] is False
    tokenized = call_isolated(
        "lorakit.quantization.gguf:llama_cpp_tokenize",
        {"gguf_file": str(tmp_path / "m.gguf"), "text": text},
        what="llama.cpp",
        doing="tokenizing",
        hint="",
    )
    assert tokenized == ids


def test_llama3_rope_scaling_is_exported(tmp_path, monkeypatch):
    """Llama 3.x rescales its rotary frequencies: the export carries them as llama.cpp's
    rope_freqs tensor (without it, the same check fails)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    import lorakit.quantization.gguf
    from tests.conftest import build_tokenizer

    tokenizer = build_tokenizer(chat=True)
    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
        tie_word_embeddings=False,
        rope_parameters=rope,
    )
    torch.manual_seed(0)
    folder = tmp_path / "llama3"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    report = export_gguf(str(folder), tmp_path / "m.gguf")
    assert report.tensor_types["F32"] == 6  # 5 norms + rope_freqs
    good = verify_gguf(tmp_path / "m.gguf", str(folder), new_tokens=16)
    assert max(c.max_logit_diff for c in good) < 0.1
    monkeypatch.setattr(lorakit.quantization.gguf, "_rope_frequency_factors", lambda *a: None)
    export_gguf(str(folder), tmp_path / "unscaled.gguf")
    bad = verify_gguf(tmp_path / "unscaled.gguf", str(folder), new_tokens=16)
    assert min(c.max_logit_diff for c in bad) > 1
