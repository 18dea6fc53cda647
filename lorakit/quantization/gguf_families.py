"""What each model family needs in a GGUF file so llama.cpp computes what transformers computes.

The reference is the llama.cpp that llama-cpp-python 0.3.36 vendors: its converter
(`convert_hf_to_gguf.py`, `conversion/{llama,qwen,gemma,phi}.py`) for tensor names and metadata,
and `src/models/*.cpp` for what each architecture reads and computes. Per family:

- **llama** (Llama 2/3, and Mistral, which llama.cpp runs as llama): llama.cpp rotates adjacent
  pairs of q/k dimensions, transformers the two halves of each head, so q/k rows are reordered;
  Llama 3.x frequency scaling becomes a `rope_freqs` tensor.
- **qwen2** (Qwen2, Qwen2.5), **qwen3** (q/k RMSNorm tensors), **phi3** (fused `attn_qkv` and
  `ffn_up` = [gate | up], which llama.cpp's phi3 takes as they are): rotate halves like
  transformers (NeoX style), so rows stay.
- **gemma2**, **gemma3** (text): transformers' Gemma RMSNorm computes x·(1 + w), llama.cpp's
  x·w, so every norm weight gets +1; llama.cpp scales embeddings by √hidden itself; four norms
  per layer; soft-capping, the sliding window and which layers use it, and Gemma 3's local rope
  base are metadata; Gemma 3 normalizes q and k.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lorakit.errors import LorakitError


@dataclass(frozen=True)
class GgufFamily:
    arch: str
    """llama.cpp's architecture name."""
    interleave_rope: bool = False
    """llama.cpp's `llama` rotates adjacent pairs; q/k rows are reordered to match."""
    norm_offset: float = 0.0
    """Added to every RMSNorm weight (Gemma: transformers multiplies by 1 + w)."""
    hyperparameters: Callable[[Any, Any], None] | None = None
    """Writes the family's own metadata (after checking llama.cpp can represent the config)."""
    query_scale_into: tuple[str, ...] = ()
    """Gemma: the weight that absorbs the difference between transformers' query scale
    (query_pre_attn_scalar^-½) and llama.cpp's (head_dim^-½)."""


def rope_parameters(config, kind: str = "full_attention") -> dict[str, Any]:
    """The rotary settings of the global layers (Gemma 3 keeps one set per attention kind)."""
    rope = getattr(config, "rope_parameters", None)
    if rope:
        return dict(rope[kind]) if kind in rope else dict(rope)
    scaling = getattr(config, "rope_scaling", None) or {}
    return {"rope_theta": getattr(config, "rope_theta", 10000.0), **scaling}


def rope_type(rope: dict[str, Any]) -> str:
    return rope.get("rope_type", rope.get("type")) or "default"


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rotary_dims(config) -> int:
    """Rotated dimensions per head (Phi-3 may rotate a fraction of them)."""
    partial = rope_parameters(config).get("partial_rotary_factor") or getattr(
        config, "partial_rotary_factor", 1.0
    )
    return int(head_dim(config) * partial)


def write_hyperparameters(writer, family: GgufFamily, config) -> None:
    from gguf import RopeScalingType

    heads = config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(rotary_dims(config))
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_vocab_size(config.vocab_size)
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    kind = rope_type(rope)
    if kind == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind not in ("default", "llama3") or (kind == "llama3" and family.arch != "llama"):
        # llama3: a rope_freqs tensor (`rope_frequency_factors`)
        raise LorakitError(
            f"GGUF export: RoPE scaling {kind!r} is not supported by lorakit's GGUF writer "
            "(none, linear and llama3 are)"
        )
    if family.hyperparameters is not None:
        family.hyperparameters(writer, config)


def rope_frequency_factors(model, config) -> torch.Tensor | None:
    """Llama 3.x scales its rotary frequencies; llama.cpp divides each base frequency by a
    factor read from a `rope_freqs` tensor. The factors are taken from the frequencies
    transformers itself computed for this model, so both sides rotate identically."""
    rope = rope_parameters(config)
    if rope_type(rope) != "llama3":
        return None
    dims = head_dim(config)
    scaled = next(m.inv_freq for m in model.modules() if hasattr(m, "inv_freq")).float()
    exponents = torch.arange(0, dims, 2, dtype=torch.float32) / dims
    base = 1.0 / (float(rope["rope_theta"]) ** exponents)
    return base / scaled


def prepare_tensor(family: GgufFamily, config, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """The transformers tensor `key`, changed where llama.cpp computes differently."""
    if family.norm_offset and key.endswith("norm.weight"):
        tensor = tensor.float() + family.norm_offset
    if family.query_scale_into and key.endswith(family.query_scale_into):
        tensor = tensor.float() * query_scale_correction(family, config)
    if family.interleave_rope:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        if key.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = _interleave_rope_rows(tensor, heads)
        elif key.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = _interleave_rope_rows(tensor, kv_heads)
    return tensor


def _interleave_rope_rows(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from [first half | second half] to alternating pairs."""
    rows = tensor.shape[0]
    return (
        tensor.reshape(heads, 2, rows // heads // 2, *tensor.shape[1:])
        .swapaxes(1, 2)
        .reshape(tensor.shape)
    )


# --- Gemma -----------------------------------------------------------------------------------


# llama.cpp recognizes the 27B models by layer count and scales their queries by
# (hidden/heads)^-½ instead of head_dim^-½ (src/models/gemma2.cpp, gemma3.cpp).
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def query_scale_correction(family: GgufFamily, config) -> float:
    """transformers' query scale over llama.cpp's; queries are linear in the weight that absorbs
    it (Gemma 2: q_proj; Gemma 3: q_norm, after which nothing but the rotation comes)."""
    if config.num_hidden_layers == _GEMMA_27B_LAYERS[family.arch]:
        llama_cpp = config.hidden_size // config.num_attention_heads
    else:
        llama_cpp = head_dim(config)
    return math.sqrt(llama_cpp / config.query_pre_attn_scalar)


def _check_gemma(config, arch: str) -> None:
    activation = getattr(config, "hidden_activation", None) or config.hidden_act
    if activation != "gelu_pytorch_tanh":
        raise LorakitError(
            f"GGUF export: llama.cpp's {arch} uses the tanh GELU; this model's activation is "
            f"{activation!r}"
        )
    if not getattr(config, "tie_word_embeddings", True) and arch == "gemma2":
        raise LorakitError(
            "GGUF export: llama.cpp's gemma2 uses the token embeddings as the output head; this "
            "model has its own lm_head (tie_word_embeddings is false)"
        )


def _sliding_layers(config) -> list[bool]:
    return [kind == "sliding_attention" for kind in config.layer_types]


def _gemma2_hyperparameters(writer, config) -> None:
    _check_gemma(config, "gemma2")
    # llama.cpp's gemma2 always soft-caps both (50 and 30 when the keys are absent).
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, name, None) is None:
            raise LorakitError(
                f"GGUF export: this Gemma 2 model has no {name}; llama.cpp's gemma2 always "
                "soft-caps"
            )
    writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
    writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    writer.add_sliding_window(config.sliding_window)
    writer.add_sliding_window_pattern(_sliding_layers(config))


def _gemma3_hyperparameters(writer, config) -> None:
    _check_gemma(config, "gemma3")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise LorakitError(
            "GGUF export: llama.cpp's gemma3 does not soft-cap attention; this model sets "
            f"attn_logit_softcapping={config.attn_logit_softcapping}"
        )
    if getattr(config, "final_logit_softcapping", None) is not None:
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    sliding = _sliding_layers(config)
    if any(sliding):
        local = rope_parameters(config, "sliding_attention")
        if rope_type(local) != "default":
            raise LorakitError(
                f"GGUF export: the local layers' RoPE scaling {rope_type(local)!r} is not "
                "supported (llama.cpp's gemma3 scales only the global layers)"
            )
        writer.add_sliding_window(config.sliding_window)
        writer.add_sliding_window_pattern(sliding)
        writer.add_rope_freq_base_swa(float(local["rope_theta"]))


def _phi3_hyperparameters(writer, config) -> None:
    if config.hidden_act != "silu":
        raise LorakitError(f"GGUF export: llama.cpp's phi3 uses SiLU; this is {config.hidden_act}")
    # llama.cpp disables Phi-3's sliding window (src/models/phi3.cpp) and so does its
    # converter's output; transformers applies it past `sliding_window` tokens.


def _qwen2_hyperparameters(writer, config) -> None:
    if getattr(config, "use_sliding_window", False):
        raise LorakitError(
            "GGUF export: llama.cpp's qwen2/qwen3 have no sliding window; this model uses one"
        )


GGUF_FAMILIES = {
    "llama": GgufFamily("llama", interleave_rope=True),
    "mistral": GgufFamily("llama", interleave_rope=True),
    "qwen2": GgufFamily("qwen2", hyperparameters=_qwen2_hyperparameters),
    "qwen3": GgufFamily("qwen3", hyperparameters=_qwen2_hyperparameters),
    "gemma2": GgufFamily(
        "gemma2",
        norm_offset=1.0,
        hyperparameters=_gemma2_hyperparameters,
        query_scale_into=("self_attn.q_proj.weight", "self_attn.q_proj.bias"),
    ),
    "gemma3_text": GgufFamily(
        "gemma3",
        norm_offset=1.0,
        hyperparameters=_gemma3_hyperparameters,
        query_scale_into=("self_attn.q_norm.weight",),
    ),
    "phi3": GgufFamily("phi3", hyperparameters=_phi3_hyperparameters),
}
"""transformers model_type → what llama.cpp needs."""


def gguf_family(model_type: str, source: str) -> GgufFamily:
    family = GGUF_FAMILIES.get(model_type)
    if family is None:
        raise LorakitError(
            f"GGUF export supports {', '.join(sorted(GGUF_FAMILIES))} models; "
            f"{source} is {model_type!r}"
        )
    return family
