"""GGUF export for llama.cpp and ollama, and its check in llama.cpp.

Tensors are renamed with gguf-py's tensor map and written with its `GGUFWriter`, one tensor at a
time (the file is never held in memory); the tokenizer (byte-level BPE), its special tokens and
the chat template go into the metadata. `verify_gguf` runs the file in llama.cpp
(llama-cpp-python, in a child process: `lorakit.isolated`) and compares its greedy tokens and
logits with transformers'.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from lorakit.data.formats import render_prompt
from lorakit.errors import LorakitError
from lorakit.files import atomic_file
from lorakit.isolated import call_isolated
from lorakit.models import (
    load_config,
)
from lorakit.quantization.source import check_output, mib, resolve_source

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
"""Types the gguf package can write (it quantizes these in numpy, as llama.cpp does)."""


# HF model_type -> llama.cpp architecture name.
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}


# llama.cpp's `llama` architecture rotates adjacent pairs of q/k dimensions; transformers'
# Llama rotates the two halves of each head. The rows of q_proj/k_proj are reordered to match.
_INTERLEAVE_ROPE = {"llama"}


# Pre-tokenizers lorakit recognizes, mapped to llama.cpp's names for them.
_GPT2_SPLIT = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"


_LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)


_QWEN2_SPLIT = _LLAMA3_SPLIT.replace("\\p{N}{1,3}", "\\p{N}")


_PRE_TOKENIZERS = {
    (("ByteLevel", True),): "gpt-2",
    (("Split", _GPT2_SPLIT), ("ByteLevel", False)): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", _LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
    (("Split", _QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",
}


@dataclass
class GgufReport:
    source: str
    location: str
    """The model folder the file was written from."""
    out: str
    type: str
    architecture: str
    parameters: int
    file_bytes: int
    tensor_types: dict[str, int]
    """Tensor count per GGML type."""
    pre_tokenizer: str
    chat_template: bool

    @property
    def bits_per_parameter(self) -> float:
        return 8 * self.file_bytes / self.parameters


def gguf_pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer, read from its tokenizer.json."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise LorakitError(
            "GGUF export supports byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3, Qwen2); "
            f"this tokenizer is {model.get('type')}"
            + (" with byte fallback (SentencePiece style)" if model.get("byte_fallback") else "")
        )
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    shape = tuple(_pre_tokenizer_step(step) for step in steps)
    name = _PRE_TOKENIZERS.get(shape)
    normalizer = (spec.get("normalizer") or {}).get("type")
    if name is None or (normalizer and not (name == "qwen2" and normalizer == "NFC")):
        raise LorakitError(
            f"GGUF export: the tokenizer's pre-tokenizer {[s[0] for s in shape]} "
            f"(normalizer {normalizer}) is not one lorakit maps to llama.cpp "
            "(GPT-2, SmolLM, Llama 3 and Qwen2 byte-level BPE are)"
        )
    return name


def _pre_tokenizer_step(step: dict[str, Any]) -> tuple[str, Any]:
    kind = step.get("type")
    if kind == "ByteLevel":
        if step.get("add_prefix_space"):
            return (kind, "add_prefix_space")
        return (kind, step.get("use_regex", True))
    if kind == "Digits":
        return (kind, step.get("individual_digits", False))
    if kind == "Split":
        return (kind, (step.get("pattern") or {}).get("Regex"))
    return (str(kind), None)


def gguf_vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types, indexed by id (holes become unused pads)."""
    from gguf import TokenType

    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise LorakitError(
            f"GGUF export: the tokenizer has token id {max(by_id)} but the model's vocab_size "
            f"is {vocab_size}"
        )
    added = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    return tokens, types


def _adds_special_tokens(tokenizer) -> dict[str, bool]:
    """Whether the tokenizer puts BOS/EOS around plain text, as measured on a probe."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    start = full[:1] == [tokenizer.bos_token_id] and full[1 : 1 + len(bare)] == bare
    end = full[-1:] == [tokenizer.eos_token_id] and full[-1 - len(bare) : -1] == bare
    return {"bos": len(full) > len(bare) and start, "eos": len(full) > len(bare) and end}


def _rope_parameters(config) -> dict[str, Any]:
    rope = getattr(config, "rope_parameters", None)
    if rope:
        return dict(rope)
    scaling = getattr(config, "rope_scaling", None) or {}
    return {"rope_theta": getattr(config, "rope_theta", 10000.0), **scaling}


def _write_hyperparameters(writer, config, head_dim: int) -> None:
    from gguf import RopeScalingType

    heads = config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    rope = _rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type not in ("default", None, "llama3"):  # llama3: a rope_freqs tensor
        raise LorakitError(
            f"GGUF export: RoPE scaling {rope_type!r} is not supported by lorakit's GGUF writer "
            "(none, linear and llama3 are)"
        )


def _rope_frequency_factors(model: PreTrainedModel, config, head_dim: int) -> torch.Tensor | None:
    """Llama 3.x scales its rotary frequencies; llama.cpp divides each base frequency by a
    factor read from a `rope_freqs` tensor. The factors are taken from the frequencies
    transformers itself computed for this model, so both sides rotate identically."""
    rope = _rope_parameters(config)
    if rope.get("rope_type", rope.get("type")) != "llama3":
        return None
    scaled = next(m.inv_freq for m in model.modules() if hasattr(m, "inv_freq")).float()
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    base = 1.0 / (float(rope["rope_theta"]) ** exponents)
    return base / scaled


def _write_tokenizer(writer, tokenizer, location: str, vocab_size: int) -> tuple[str, bool]:
    import gguf

    pre = gguf_pre_tokenizer(tokenizer)
    tokens, types = gguf_vocab(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # gguf-py reads merges and special token ids from the folder's tokenizer files; whether BOS
    # and EOS are added, and the chat template, come from the tokenizer transformers loaded.
    special = gguf.SpecialVocab(location, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise LorakitError(f"GGUF export: no BPE merges found in {location}/tokenizer.json")
    special.add_special_token = _adds_special_tokens(tokenizer)
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = [{"name": k, "template": v} for k, v in template.items()]
    special.chat_template = template
    special.add_to_gguf(writer, quiet=True)
    return pre, template is not None


@dataclass(frozen=True)
class _PlannedTensor:
    name: str
    """GGUF name."""
    source: str
    """Key in the transformers state dict."""
    ggml_type: Any
    shape: tuple[int, ...]


def _tensor_type(shape: tuple[int, ...], wanted):
    """llama.cpp's rules: 1-D tensors (norms, biases) stay F32; a row that does not split into
    whole quantization blocks falls back to F16."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if len(shape) < 2:
        return GGMLQuantizationType.F32
    block, _ = GGML_QUANT_SIZES[wanted]
    return wanted if shape[-1] % block == 0 else GGMLQuantizationType.F16


def _plan_tensors(
    state: dict[str, torch.Tensor], arch: str, blocks: int, wanted
) -> list[_PlannedTensor]:
    import gguf

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, blocks)
    seen: set[int] = set()
    plan: list[_PlannedTensor] = []
    for key, tensor in state.items():
        # Tied output head: llama.cpp reuses token_embd when output.weight is absent.
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LorakitError(f"GGUF export: no llama.cpp {arch} tensor corresponds to {key}")
        shape = tuple(tensor.shape)
        plan.append(_PlannedTensor(name, key, _tensor_type(shape, wanted), shape))
    return plan


def _interleave_rope_rows(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from [first half | second half] to alternating pairs."""
    rows = tensor.shape[0]
    return (
        tensor.reshape(heads, 2, rows // heads // 2, *tensor.shape[1:])
        .swapaxes(1, 2)
        .reshape(tensor.shape)
    )


def _gguf_data(tensor: torch.Tensor, ggml_type):
    import gguf

    return gguf.quants.quantize(tensor.detach().float().contiguous().numpy(), ggml_type)


def export_gguf(
    source: str, out: Path, *, gguf_type: str = "f16", overwrite: bool = False
) -> GgufReport:
    """Write a full (or merged) model as one GGUF file with tokenizer and chat template."""
    import gguf
    import numpy as np

    if gguf_type not in GGUF_TYPES:
        raise LorakitError(f"--type: {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    if out.suffix != ".gguf":
        raise LorakitError(f"--out: a GGUF export is one file; give a path ending in .gguf: {out}")
    resolved = resolve_source(source)
    if resolved.kind == "hub":
        raise LorakitError(
            f"{source}: GGUF export reads a local model folder; download the model first "
            "(huggingface-cli download ID --local-dir DIR) and pass DIR"
        )
    check_output(out, overwrite, resolved, is_file=True)
    config = load_config(resolved.location)
    arch = GGUF_ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise LorakitError(
            f"GGUF export supports {', '.join(sorted(GGUF_ARCHITECTURES))} models; "
            f"{source} is {config.model_type!r}"
        )
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    tokenizer = AutoTokenizer.from_pretrained(resolved.location)
    wanted = gguf.GGMLQuantizationType[gguf_type.upper()]

    writer = gguf.GGUFWriter(None, arch)
    writer.add_type("model")
    writer.add_name(Path(source.rstrip("/")).name)
    writer.add_file_type(gguf.LlamaFileType[_FILE_TYPES[gguf_type]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_hyperparameters(writer, config, head_dim)
    pre, has_template = _write_tokenizer(writer, tokenizer, resolved.location, config.vocab_size)

    model = AutoModelForCausalLM.from_pretrained(resolved.location, dtype="auto")
    state = model.state_dict()
    plan = _plan_tensors(state, arch, config.num_hidden_layers, wanted)
    factors = _rope_frequency_factors(model, config, head_dim)
    if factors is not None:
        state = {**state, "rope_freqs": factors}
        f32 = gguf.GGMLQuantizationType.F32
        plan.append(_PlannedTensor("rope_freqs.weight", "rope_freqs", f32, (len(factors),)))
    for item in plan:
        block, size = gguf.GGML_QUANT_SIZES[item.ggml_type]
        nbytes = math.prod(item.shape) // block * size
        if item.ggml_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if item.ggml_type == gguf.GGMLQuantizationType.F32 else np.float16
            writer.add_tensor_info(item.name, item.shape, np.dtype(dtype), nbytes)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(item.shape, item.ggml_type)
            writer.add_tensor_info(
                item.name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=item.ggml_type
            )

    try:
        with atomic_file(out) as staging:
            writer.write_header_to_file(staging)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for item in plan:
                tensor = state[item.source]
                q_rows = item.source.endswith(("q_proj.weight", "q_proj.bias"))
                k_rows = item.source.endswith(("k_proj.weight", "k_proj.bias"))
                if arch in _INTERLEAVE_ROPE and (q_rows or k_rows):
                    tensor = _interleave_rope_rows(tensor, heads if q_rows else kv_heads)
                writer.write_tensor_data(_gguf_data(tensor, item.ggml_type))
            writer.close()
    finally:
        writer.close()

    counts: dict[str, int] = {}
    for item in plan:
        counts[item.ggml_type.name] = counts.get(item.ggml_type.name, 0) + 1
    return GgufReport(
        source=source,
        location=resolved.location,
        out=str(out),
        type=gguf_type,
        architecture=arch,
        parameters=sum(math.prod(item.shape) for item in plan),
        file_bytes=out.stat().st_size,
        tensor_types=counts,
        pre_tokenizer=pre,
        chat_template=has_template,
    )


_FILE_TYPES = {
    "f32": "ALL_F32",
    "f16": "MOSTLY_F16",
    "bf16": "MOSTLY_BF16",
    "q8_0": "MOSTLY_Q8_0",
    "q5_1": "MOSTLY_Q5_1",
    "q5_0": "MOSTLY_Q5_0",
    "q4_1": "MOSTLY_Q4_1",
    "q4_0": "MOSTLY_Q4_0",
}


DEFAULT_CHECK_PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "List three uses of a paperclip.",
)


@dataclass
class PromptCheck:
    prompt: str
    same_prompt_tokens: bool
    """llama.cpp tokenized the rendered prompt into the same ids as transformers."""
    new_tokens: int
    identical_prefix: int
    """How many of transformers' greedy tokens llama.cpp reproduces before the first difference."""
    agreement: float
    """Fraction of positions where llama.cpp's next-token choice (given transformers' greedy
    prefix) equals transformers' greedy token."""
    max_logit_diff: float


LLAMA_CPP_SCORER = "lorakit.quantization.gguf:llama_cpp_scores"
"""The function the verify child runs (a name, so a test can point it at a crashing one)."""


LLAMA_CPP_HINT = (
    "llama-cpp-python may be compiled for another CPU, or use instructions this machine does "
    'not allow (AMX, AVX-512); reinstall it portably: CMAKE_ARGS="-DGGML_NATIVE=OFF" pip '
    "install --no-cache-dir --force-reinstall llama-cpp-python (`make install` does), or "
    "verify the file on another machine"
)


def verify_gguf(
    gguf_file: Path,
    model_location: str,
    prompts: tuple[str, ...] | list[str] = DEFAULT_CHECK_PROMPTS,
    new_tokens: int = 16,
) -> list[PromptCheck]:
    """Run the GGUF file in llama.cpp and compare it with transformers on the source model:
    greedy tokens (teacher-forced on transformers' greedy continuation) and logits.

    llama.cpp runs in a child process (`lorakit.isolated`): a crash in its native code is an
    error that names the file, which stays written."""
    import numpy as np

    if importlib.util.find_spec("llama_cpp") is None:
        raise LorakitError(
            "checking a GGUF file needs llama-cpp-python: pip install 'lorakit[gguf]'"
        )
    tokenizer = AutoTokenizer.from_pretrained(model_location)
    model = AutoModelForCausalLM.from_pretrained(model_location, dtype=torch.float32).eval()
    cases = []
    for prompt in prompts:
        text = render_prompt(tokenizer, prompt)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        greedy = _greedy_tokens(model, ids, new_tokens)
        with torch.no_grad():
            reference = model(torch.tensor([ids + greedy])).logits[0, len(ids) - 1 : -1].numpy()
        cases.append((prompt, text, ids, greedy, reference))
    with tempfile.TemporaryDirectory(prefix="lorakit-verify-") as folder:
        scores = call_isolated(
            LLAMA_CPP_SCORER,
            {
                "gguf_file": str(gguf_file),
                "texts": [text for _, text, _, _, _ in cases],
                "sequences": [ids + greedy for _, _, ids, greedy, _ in cases],
                "starts": [len(ids) for _, _, ids, _, _ in cases],
            },
            what="llama.cpp",
            doing=f"verifying {gguf_file}",
            hint=f"{gguf_file} is written and complete; {LLAMA_CPP_HINT}",
            workdir=Path(folder),
        )
        logits_of = [np.load(Path(folder) / s["logits"], allow_pickle=False) for s in scores]
    checks: list[PromptCheck] = []
    for case, score, logits in zip(cases, scores, logits_of, strict=True):
        prompt, _, ids, greedy, reference = case
        matches = logits.argmax(-1) == np.asarray(greedy)
        checks.append(
            PromptCheck(
                prompt=prompt,
                same_prompt_tokens=score["prompt_ids"] == ids,
                new_tokens=len(greedy),
                identical_prefix=int(matches.argmin()) if not matches.all() else len(greedy),
                agreement=float(matches.mean()),
                max_logit_diff=float(np.abs(logits - reference).max()),
            )
        )
    return checks


def llama_cpp_scores(
    gguf_file: str,
    texts: list[str],
    sequences: list[list[int]],
    starts: list[int],
    workdir: str,
) -> list[dict[str, Any]]:
    """In the child process: llama.cpp's tokens for each text, and its logits at positions
    `start - 1 …` of each token sequence (those that predict the continuation), saved as
    .npy files in `workdir`."""
    import numpy as np
    from llama_cpp import Llama

    # One thread: ggml's worker threads spin while they wait, which on a busy 2-core machine
    # made a 60-token pass take seconds instead of milliseconds.
    llm = Llama(
        model_path=gguf_file,
        n_ctx=max(len(sequence) for sequence in sequences) + 8,
        logits_all=True,
        verbose=False,
        n_threads=1,
        n_threads_batch=1,
    )
    results = []
    for number, (text, sequence, start) in enumerate(zip(texts, sequences, starts, strict=True)):
        prompt_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        llm.reset()
        llm.eval(sequence)
        logits = np.asarray(llm.scores[start - 1 : len(sequence) - 1], dtype=np.float32)
        name = f"logits-{number}.npy"
        np.save(Path(workdir) / name, logits)
        results.append({"prompt_ids": list(prompt_ids), "logits": name})
    llm.close()
    return results


def llama_cpp_tokenize(gguf_file: str, text: str, workdir: str) -> list[int]:
    """In the child process: the ids llama.cpp's tokenizer gives `text` (BOS as it adds it)."""
    from llama_cpp import Llama

    llm = Llama(model_path=gguf_file, vocab_only=True, verbose=False)
    return list(llm.tokenize(text.encode("utf-8")))


@torch.no_grad()
def _greedy_tokens(model: PreTrainedModel, ids: list[int], count: int) -> list[int]:
    """Greedy continuation of exactly `count` tokens (no stop at EOS: every position compares),
    one token per step on the KV cache."""
    # transformers 5.24 renamed `past_key_values` to `cache`; older 5.x releases take the former.
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    tokens: list[int] = []
    inputs, cache = torch.tensor([ids]), None
    for _ in range(count):
        result = model(input_ids=inputs, use_cache=True, logits_to_keep=1, **{name: cache})
        cache = result.cache if name == "cache" else result.past_key_values
        tokens.append(int(result.logits[0, -1].argmax()))
        inputs = torch.tensor([[tokens[-1]]])
    return tokens


def gguf_table(report: GgufReport, checks: list[PromptCheck]) -> Table:
    table = Table(title="lorakit quantize --format gguf", show_header=False, title_justify="left")
    table.add_row("model", f"{report.source} ({report.architecture}) → {report.out}")
    types = ", ".join(f"{n} {t}" for t, n in sorted(report.tensor_types.items()))
    table.add_row("tensors", f"{sum(report.tensor_types.values())} ({types})")
    table.add_row(
        "size",
        f"{mib(report.file_bytes)} for {report.parameters:,} parameters "
        f"({report.bits_per_parameter:.2f} bits/param)",
    )
    table.add_row(
        "tokenizer",
        f"byte-level BPE, pre-tokenizer {report.pre_tokenizer}, chat template "
        + ("included" if report.chat_template else "none"),
    )
    for check in checks:
        table.add_row(
            f"llama.cpp: {check.prompt[:30]}",
            f"prompt tokens {'identical' if check.same_prompt_tokens else 'DIFFER'}; "
            f"greedy: first {check.identical_prefix}/{check.new_tokens} identical, "
            f"{100 * check.agreement:.0f}% agree; max |Δlogit| {check.max_logit_diff:.3g}",
        )
    table.add_row("use", f"llama-cli -m {report.out}   |   ollama: FROM ./{Path(report.out).name}")
    return table
