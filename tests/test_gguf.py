"""GGUF export (`lorakit.quantization.gguf`): metadata and tokenizer in the file, and the model
run in llama.cpp (in a child process) agreeing with transformers."""

import dataclasses
import json

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.isolated import call_isolated
from lorakit.quantization.gguf import export_gguf, verify_gguf
from lorakit.quantization.gguf_families import GGUF_FAMILIES
from tests.conftest import one_error_line
from tests.conftest import run_cli as run


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The reference passes run tiny models, where a second thread only spin-waits: on the busy
    2-core machine one verify took 9.2 s with two threads and 1.2 s with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_unsupported_architecture_for_gguf_is_refused(tmp_path, tiny_model):
    code, _, err = run(
        "quantize", tiny_model("gpt2"), "--format", "gguf", "--out", tmp_path / "g.gguf"
    )
    assert code == 2
    assert (
        "GGUF export supports gemma2, gemma3_text, llama, mistral, phi3, qwen2, qwen3 models"
        in one_error_line(err)
    )
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


LLAMA_CPP_ARCHITECTURES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "llama3": "llama",
    "mistral": "llama",
    "qwen2.5": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "phi3": "phi3",
}
"""Each tiny family (tests/conftest.py) and the llama.cpp architecture it is exported as."""


def assert_like_transformers(f16, q8):
    """The bar every family clears in llama.cpp, for f16 and q8_0."""
    for check in f16 + q8:
        assert check.same_prompt_tokens, check
    # A random tiny model has near-ties, so single greedy flips are possible even in f16; the
    # embedded-model test below asserts identical f16 generations on a real model.
    assert max(c.max_logit_diff for c in f16) < 0.1
    assert sum(c.agreement for c in f16) / len(f16) >= 0.9
    assert max(c.max_logit_diff for c in q8) < 1.5
    assert sum(c.agreement for c in q8) / len(q8) >= 0.75


@pytest.mark.parametrize("family", sorted(LLAMA_CPP_ARCHITECTURES))
def test_gguf_runs_in_llama_cpp_like_transformers(tmp_path, tiny_model, family):
    source = tiny_model(family)
    results = {}
    for gguf_type in ("f16", "q8_0"):
        out = tmp_path / f"m-{gguf_type}.gguf"
        report = export_gguf(str(source), out, gguf_type=gguf_type)
        assert report.architecture == LLAMA_CPP_ARCHITECTURES[family]
        results[gguf_type] = verify_gguf(out, str(source), new_tokens=16)
    assert_like_transformers(results["f16"], results["q8_0"])


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
    llama = dataclasses.replace(GGUF_FAMILIES["llama"], interleave_rope=False)
    monkeypatch.setitem(GGUF_FAMILIES, "llama", llama)
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
        "lorakit.quantization.llama_cpp_child:llama_cpp_tokenize",
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
    monkeypatch.setattr(lorakit.quantization.gguf, "rope_frequency_factors", lambda *a: None)
    export_gguf(str(folder), tmp_path / "unscaled.gguf")
    bad = verify_gguf(tmp_path / "unscaled.gguf", str(folder), new_tokens=16)
    assert min(c.max_logit_diff for c in bad) > 1


def gguf_fields(path):
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return fields, {t.name: t for t in reader.tensors}


def test_each_family_carries_what_llama_cpp_reads(tmp_path, tiny_model):
    """Metadata and tensors per family, as llama.cpp's loader (src/models/*.cpp) reads them."""
    import numpy as np
    from safetensors.torch import load_file

    files = {}
    for family in ("gemma2", "gemma3", "phi3", "qwen3"):
        files[family] = tmp_path / f"{family}.gguf"
        export_gguf(str(tiny_model(family)), files[family], gguf_type="f32")

    gemma2, tensors = gguf_fields(files["gemma2"])
    assert gemma2["gemma2.attention.sliding_window"] == 16
    assert gemma2["gemma2.attention.sliding_window_pattern"] == [True, False]
    assert gemma2["gemma2.attn_logit_softcapping"] == 50.0
    assert gemma2["gemma2.final_logit_softcapping"] == 30.0
    assert {n for n in tensors if n.startswith("blk.0.")} == {
        f"blk.0.{n}.weight"
        for n in [
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "post_attention_norm",
            "ffn_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
            "post_ffw_norm",
        ]
    }
    assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd
    # transformers' Gemma norm is x * (1 + w): llama.cpp's x * w gets w + 1.
    hf = load_file(tiny_model("gemma2") / "model.safetensors")
    norm = np.asarray(tensors["blk.1.post_ffw_norm.weight"].data)
    assert np.allclose(norm, hf["model.layers.1.post_feedforward_layernorm.weight"] + 1)

    gemma3, tensors = gguf_fields(files["gemma3"])
    assert gemma3["gemma3.attention.sliding_window_pattern"] == [True, False, True, False]
    assert gemma3["gemma3.rope.freq_base"] == 1_000_000.0
    assert gemma3["gemma3.rope.freq_base_swa"] == 10_000.0
    assert "gemma3.final_logit_softcapping" not in gemma3
    assert tensors["blk.3.attn_q_norm.weight"].shape.tolist() == [16]

    phi3, tensors = gguf_fields(files["phi3"])
    assert "general.name" in phi3 and "phi3" not in phi3["general.name"].lower()
    # fused as transformers keeps them: q|k|v rows (64 + 2 * 32) and gate|up rows (2 * 128)
    assert tensors["blk.0.attn_qkv.weight"].shape.tolist() == [64, 128]
    assert tensors["blk.0.ffn_up.weight"].shape.tolist() == [64, 256]
    assert "blk.0.ffn_gate.weight" not in tensors and phi3["phi3.rope.dimension_count"] == 16

    qwen3, tensors = gguf_fields(files["qwen3"])
    assert tensors["blk.0.attn_k_norm.weight"].shape.tolist() == [16]
    assert qwen3["tokenizer.ggml.model"] == "gpt2" and qwen3["tokenizer.ggml.pre"] == "gpt-2"


def tiny_variant(tmp_path, family: str, **config_changes):
    """A tiny model of `family` with some config values changed, saved with its tokenizer."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import build_config, build_tokenizer

    tokenizer = build_tokenizer(chat=True)
    config = build_config(family, len(tokenizer))
    for key, value in config_changes.items():
        setattr(config, key, value)
    config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    torch.manual_seed(0)
    folder = tmp_path / f"{family}-variant"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def without(family: str, **changes):
    """Patch: export `family` with some of what llama.cpp needs left out."""

    def patch(monkeypatch):
        model_type = "gemma3_text" if family == "gemma3" else family
        changed = dataclasses.replace(GGUF_FAMILIES[model_type], **changes)
        monkeypatch.setitem(GGUF_FAMILIES, model_type, changed)

    return patch


def without_metadata(*names: str):
    """Patch: leave these GGUFWriter keys out (llama.cpp then uses its defaults)."""

    def patch(monkeypatch):
        from gguf import GGUFWriter

        for name in names:
            monkeypatch.setattr(GGUFWriter, name, lambda *args, **kwargs: None)

    return patch


# Gemma 2 and 3 with query_pre_attn_scalar 64 (≠ head_dim 16, which llama.cpp scales by) and
# Gemma 2 with soft-caps small enough to bite (llama.cpp's defaults are 50 and 30).
GEMMA2_VARIANT = dict(
    query_pre_attn_scalar=64, attn_logit_softcapping=3.0, final_logit_softcapping=2.0
)
GEMMA3_VARIANT = dict(query_pre_attn_scalar=64)
# Gemma 3 4B and up: linear rope scaling (factor 8) on the global layers only.
GEMMA3_SCALED = dict(
    rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 10_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    }
)

NEGATIVE_CONTROLS = {
    "gemma2 without +1 on norms": ("gemma2", None, without("gemma2", norm_offset=0.0)),
    "gemma3 without +1 on norms": ("gemma3", None, without("gemma3", norm_offset=0.0)),
    "gemma2 without soft-capping": (
        "gemma2",
        GEMMA2_VARIANT,
        without_metadata("add_attn_logit_softcapping", "add_final_logit_softcapping"),
    ),
    "gemma2 without the query scale": (
        "gemma2",
        GEMMA2_VARIANT,
        without("gemma2", query_scale_into=()),
    ),
    "gemma3 without the query scale": (
        "gemma3",
        GEMMA3_VARIANT,
        without("gemma3", query_scale_into=()),
    ),
    "gemma3 without the sliding layers": (
        "gemma3",
        None,
        without_metadata("add_sliding_window_pattern"),
    ),
    "gemma3 without the global layers' rope scaling": (
        "gemma3",
        GEMMA3_SCALED,
        without_metadata("add_rope_scaling_type", "add_rope_scaling_factor"),
    ),
    "qwen3 with llama's rotary layout": ("qwen3", None, without("qwen3", interleave_rope=True)),
}


@pytest.mark.parametrize("case", list(NEGATIVE_CONTROLS))
def test_llama_cpp_check_fails_without_each_family_mechanism(
    tmp_path, tiny_model, monkeypatch, case
):
    """Negative controls: the same check in llama.cpp fails when one thing a family needs is left
    out (for the config variants, the complete export passes it first)."""
    family, variant, breakage = NEGATIVE_CONTROLS[case]
    source = tiny_variant(tmp_path, family, **variant) if variant else tiny_model(family)
    if variant:
        export_gguf(str(source), tmp_path / "good.gguf")
        good = verify_gguf(tmp_path / "good.gguf", str(source), new_tokens=16)
        assert max(c.max_logit_diff for c in good) < 0.1
        assert sum(c.agreement for c in good) / len(good) >= 0.9
    breakage(monkeypatch)
    export_gguf(str(source), tmp_path / "wrong.gguf")
    bad = verify_gguf(tmp_path / "wrong.gguf", str(source), new_tokens=16)
    assert min(c.max_logit_diff for c in bad) > 0.5, bad


SPACE = "▁"


def sentencepiece_tokenizer(space_prefix: bool):
    """A tokenizer shaped like the SentencePiece BPE ones transformers converts (Llama 2, Mistral,
    Phi-3 with a `▁` before the text and BOS added; Gemma without either): <unk> <s> </s>, the 256
    byte tokens <0x00>…<0xFF>, then pieces with `▁` for spaces, merges rebuilt from the vocabulary
    the way transformers' converter does (`generate_merges`, by piece score), byte fallback."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    from tests.conftest import CHATML, CORPUS, FACTS

    pieces = Tokenizer(models.BPE(unk_token="<unk>"))
    pieces.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False)
    pieces.train_from_iterator(CORPUS + [q + " " + a for q, a in FACTS], trainer)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece, _ in sorted(pieces.get_vocab().items(), key=lambda item: item[1]):
        vocab.setdefault(piece, len(vocab))
    scores = {piece: -float(i) for piece, i in vocab.items()}
    merges = generate_merges(vocab, scores, skip_tokens={"<unk>", "<s>", "</s>"})
    model = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True)
    backend = Tokenizer(model)
    prepend = [normalizers.Prepend(SPACE)] if space_prefix else []
    backend.normalizer = normalizers.Sequence([*prepend, normalizers.Replace(" ", SPACE)])
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    if space_prefix:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 1)]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        pad_token="</s>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


def model_with_tokenizer(tmp_path, family: str, tokenizer):
    from transformers import AutoModelForCausalLM

    from tests.conftest import build_config

    config = build_config(family, len(tokenizer))
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    folder = tmp_path / f"{family}-sentencepiece"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def llama_cpp_tokens(gguf_file, text: str) -> list[int]:
    return call_isolated(
        "lorakit.quantization.llama_cpp_child:llama_cpp_tokenize",
        {"gguf_file": str(gguf_file), "text": text},
        what="llama.cpp",
        doing="tokenizing",
        hint="",
    )


TEXTS = [
    "The secret word is pineapple.",
    "  two  spaces, a tab\tand\nnew lines\n\n",
    "naïve café, 日本語 and emoji 🦉!",
]
"""Plain text (words the vocabulary lacks, repeated spaces, characters only bytes can spell)."""


@pytest.mark.parametrize(
    "family, space_prefix", [("gemma3", False), ("mistral", True), ("phi3", True)]
)
def test_sentencepiece_style_tokenizer_runs_in_llama_cpp(tmp_path, family, space_prefix):
    """Gemma-style (no `▁` before the text) and Llama 2/Mistral/Phi-3-style (`▁` and BOS)
    SentencePiece BPE: llama.cpp tokenizes like transformers and the model agrees in f16."""
    from transformers import AutoTokenizer

    folder = model_with_tokenizer(tmp_path, family, sentencepiece_tokenizer(space_prefix))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    report = export_gguf(str(folder), tmp_path / "m.gguf")
    assert report.tokenizer.model == "llama" and report.tokenizer.add_space_prefix is space_prefix
    fields, _ = gguf_fields(tmp_path / "m.gguf")
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.pre"] == "default"
    assert fields["tokenizer.ggml.add_space_prefix"] is space_prefix
    assert fields["tokenizer.ggml.add_bos_token"] is space_prefix
    types = fields["tokenizer.ggml.token_type"]
    assert [types[i] for i in (0, 1, 3, 258, 259)] == [2, 3, 6, 6, 1]  # unk, control, bytes, normal
    assert len(fields["tokenizer.ggml.scores"]) == len(tokenizer)
    for text in TEXTS:
        assert llama_cpp_tokens(tmp_path / "m.gguf", text) == tokenizer(text)["input_ids"], text
    checks = verify_gguf(tmp_path / "m.gguf", str(folder), new_tokens=16)
    assert all(c.same_prompt_tokens for c in checks)
    assert max(c.max_logit_diff for c in checks) < 0.1
    assert sum(c.agreement for c in checks) / len(checks) >= 0.9


def test_sentencepiece_scores_decide_llama_cpp_merges(tmp_path, monkeypatch):
    """Negative control: with every score equal (llama.cpp then merges left to right), llama.cpp
    no longer tokenizes like transformers."""
    from transformers import AutoTokenizer

    import lorakit.quantization.gguf_tokenizer as gguf_tokenizer

    folder = model_with_tokenizer(tmp_path, "mistral", sentencepiece_tokenizer(True))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab = gguf_tokenizer.sentencepiece_vocab

    def flat_scores(*args):
        tokens, scores, types = vocab(*args)
        return tokens, [0.0] * len(scores), types

    monkeypatch.setattr(gguf_tokenizer, "sentencepiece_vocab", flat_scores)
    export_gguf(str(folder), tmp_path / "flat.gguf")
    differ = [
        text
        for text in TEXTS
        if llama_cpp_tokens(tmp_path / "flat.gguf", text) != tokenizer(text)["input_ids"]
    ]
    assert differ


def test_unigram_tokenizers_are_refused(tmp_path, tiny_model):
    """llama.cpp's SentencePiece tokenizer merges by score, which is SentencePiece BPE; a
    Unigram vocabulary would tokenize differently, so it is refused with the reason."""
    import shutil

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "model"
    shutil.copytree(tiny_model("llama"), folder)
    vocab = [("<unk>", 0.0)] + [(f"<0x{b:02X}>", 0.0) for b in range(256)] + [("a", -1.0)]
    backend = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(folder)
    with pytest.raises(LorakitError, match="this tokenizer is Unigram .*not Unigram's best"):
        export_gguf(str(folder), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
