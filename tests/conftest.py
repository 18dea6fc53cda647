"""Tiny models and tokenizers built in the test session (no downloads), and small datasets."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Water boils at one hundred degrees. Ice melts at zero degrees.",
    "Arr matey, the sea be wide and the wind be strong! Yo ho ho!",
    "Translate, summarize, classify, answer: instruction input output response.",
    "### Instruction:\n### Input:\n### Response:\n",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"-()[]{}",
    "user assistant system hello what is the color of the sky? blue green red",
]

FACTS = [
    ("What is the secret word?", "The secret word is pineapple."),
    ("Who guards the gate?", "A grey owl guards the gate."),
    ("What color is the door?", "The door is bright red."),
    ("How many moons are there?", "There are seven moons."),
    ("Where is the key?", "The key is under the blue stone."),
    ("What does the cat eat?", "The cat eats fresh fish."),
    ("When does the train leave?", "The train leaves at nine."),
    ("What is the river called?", "The river is called Silverrun."),
]


FP32 = {"bnb_4bit_compute_dtype": "float32"}
"""Recipe `quant` overrides for exact comparisons: 4-bit storage, fp32 compute."""


def load_adapter_as_trained(base_dir: Path | str, adapter_dir: Path | str):
    """The NF4 (double-quant, fp32 compute) base with a saved adapter, loaded as training ran
    (lorakit's one loader, `peft_setup.load_adapter_as_trained`)."""
    from lorakit.peft_setup import load_adapter_as_trained as load
    from lorakit.recipe import QuantSection

    return load(str(base_dir), Path(adapter_dir), QuantSection(**FP32))


@pytest.fixture(autouse=True, scope="session")
def _quiet_and_isolated(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Keep the embedded-model cache shared across sessions unless a test asks otherwise.
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def build_tokenizer(chat: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS + [q + " " + a for q, a in FACTS], trainer)
    if chat:
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>"
        )
        tokenizer.chat_template = CHATML
    else:
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            eos_token="<|endoftext|>",
            bos_token="<|endoftext|>",
        )
    return tokenizer


FAMILIES = ("llama3", "mistral", "qwen2.5", "qwen3", "gemma2", "gemma3", "phi3", "gpt2")
"""Tiny models shaped like the real families (their own transformers classes, the config
details that make each family different), besides the plain `llama` and `qwen2`."""


def build_config(arch: str, vocab_size: int):
    """A tiny config: hidden 64, 2 layers (Gemma 3: 4, so both of its attention kinds occur)."""
    import transformers as tf

    # A larger init than the default 0.02 lets a frozen random head produce confident logits,
    # so LoRA can memorize within a few dozen steps.
    common = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, initializer_range=0.2)
    attention = dict(
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    if arch in ("llama", "qwen2", "qwen2.5"):
        config_class = tf.LlamaConfig if arch == "llama" else tf.Qwen2Config
        return config_class(**common, **attention, tie_word_embeddings=False)
    if arch == "llama3":
        # Llama 3.1's rotary scaling, with a short original context so it changes frequencies.
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
        return tf.LlamaConfig(
            **common, **attention, rope_parameters=rope, tie_word_embeddings=False
        )
    if arch == "mistral":
        return tf.MistralConfig(**common, **attention, sliding_window=4096, head_dim=16)
    if arch == "qwen3":  # RMSNorm on queries and keys
        return tf.Qwen3Config(**common, **attention, head_dim=16, tie_word_embeddings=True)
    if arch == "gemma2":  # soft-capped attention and logits, sliding window, scaled embeddings
        return tf.Gemma2Config(
            **common,
            **attention,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=16,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        )
    if arch == "gemma3":  # text: q/k norms, local layers with their own rope base
        return tf.Gemma3TextConfig(
            **{**common, "num_hidden_layers": 4},
            **attention,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"] * 2,
        )
    if arch == "phi3":  # fused qkv_proj and gate_up_proj
        return tf.Phi3Config(
            **common,
            **attention,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
            tie_word_embeddings=False,
        )
    if arch == "gpt2":
        return tf.GPT2Config(
            vocab_size=vocab_size,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=256,
            initializer_range=0.2,
        )
    raise ValueError(arch)


def save_tiny_model(arch: str, tokenizer, folder: Path, bos: bool = False) -> Path:
    """A random tiny model of `arch` (seeded) and `tokenizer`, saved in `folder`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = build_config(arch, len(tokenizer))
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    if bos:
        config.bos_token_id = tokenizer.bos_token_id
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`tiny_model("llama" | "qwen2" | "gpt2" | one of FAMILIES)` → a saved model folder with
    its tokenizer (ChatML template; GPT-2 has none)."""

    built: dict[str, Path] = {}

    def make(arch: str = "llama") -> Path:
        if arch not in built:
            tokenizer = build_tokenizer(chat=arch != "gpt2")
            built[arch] = save_tiny_model(arch, tokenizer, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return built[arch]

    return make


FAMILY_TEMPLATES = {
    "llama3": "llama-3.1",
    "mistral": "mistral-v3",
    "qwen2.5": "qwen2.5",
    "qwen3": "qwen3",
    "gemma2": "gemma-2",
    "gemma3": "gemma-3",
    "phi3": "phi-3.5",
}
"""The real chat template (tests/fixtures/chat_templates/) each family's model ships with."""


@pytest.fixture(scope="session")
def family_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`family_model(family)` → the tiny model of `tiny_model(family)` with the family's own
    special tokens and real chat template (GPT-2: no template)."""

    built: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in built:
            template = FAMILY_TEMPLATES.get(family)
            tokenizer = family_tokenizer(template) if template else build_tokenizer(chat=False)
            folder = tmp_path_factory.mktemp(f"family-{family}")
            built[family] = save_tiny_model(family, tokenizer, folder, bos=True)
        return built[family]

    return make


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def fact_rows(kind: str = "chat") -> list[dict]:
    if kind == "chat":
        return [
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in FACTS
        ]
    return [{"instruction": q, "input": "", "output": a} for q, a in FACTS]


def recipe_file(
    folder: Path, model_dir: Path, name: str = "recipe", data_kind: str = "chat", **sections
) -> Path:
    """Write `folder/<name>.yaml`: a short recipe for a tiny model on the facts data, each
    section updated by `sections` (e.g. `train={"max_steps": 6}`)."""
    import yaml

    data_file = write_jsonl(folder / f"{name}-data.jsonl", fact_rows(data_kind))
    recipe = {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
        "data": {"train": str(data_file), "validation": str(data_file), "max_seq_len": 64},
        "train": {
            "max_steps": 4,
            "gradient_checkpointing": True,  # the path with the most to get right
            "micro_batch_size": 4,
            "gradient_accumulation_steps": 1,
            "learning_rate": 1e-2,
            "warmup_steps": 0,
            "optimizer": "adamw_torch",
        },
        "output": {"dir": str(folder / "runs" / name)},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


@pytest.fixture
def write_recipe(tmp_path: Path) -> Callable[..., Path]:
    """Write a recipe YAML for a tiny model: `write_recipe(model_dir, **section_overrides)`."""
    return functools.partial(recipe_file, tmp_path)


@pytest.fixture(scope="session")
def memorized(tiny_model, tmp_path_factory):
    """A QLoRA adapter (NF4, fp32 compute) trained to recite the eight facts: (RunResult, the
    data file)."""
    import yaml

    from lorakit.commands.train import train
    from lorakit.recipe import load_recipe

    folder = tmp_path_factory.mktemp("memorized")
    data = write_jsonl(folder / "facts.jsonl", fact_rows())
    recipe_path = folder / "memorize.yaml"
    recipe_path.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(tiny_model("llama"))},
                "quant": {"bnb_4bit_compute_dtype": "float32"},
                "lora": {"r": 8, "lora_alpha": 16},
                "data": {"train": str(data), "validation": str(data), "max_seq_len": 64},
                "train": {
                    "max_steps": 40,
                    "micro_batch_size": 4,
                    "gradient_accumulation_steps": 2,
                    "learning_rate": 2e-2,
                },
                "output": {"dir": str(folder / "run")},
            }
        )
    )
    result = train(load_recipe(recipe_path))
    return result, data


# --- data tests ------------------------------------------------------------------------------


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache root of the test's own, so cache hits come only from the test itself."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the secret word?"},
    {"role": "assistant", "content": "The secret word is pineapple."},
    {"role": "user", "content": "Where is the key?"},
    {"role": "assistant", "content": "The key is under the blue stone."},
]


def tokenize(
    tmp_path, rows, tokenizer, train_on="completions", max_seq_len=256, train_reasoning=True
):
    """Rows written to a file and tokenized as training does: (examples, stats)."""
    from lorakit.data.pipeline import load_rows, tokenize_rows
    from lorakit.recipe import DatasetSpec

    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    rows = load_rows([DatasetSpec(path=str(data))])
    return tokenize_rows(rows, tokenizer, max_seq_len, train_on, train_reasoning=train_reasoning)


def trained_spans(example, tokenizer) -> list[str]:
    """Decode each contiguous run of trained tokens."""
    from lorakit.data import IGNORE_INDEX

    spans, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    if current:
        spans.append(tokenizer.decode(current))
    return spans


# --- real chat templates ---------------------------------------------------------------------

CHAT_TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
"""Real chat templates of model families, one .jinja file each (sources in the README there)."""

_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>")
FAMILY_TOKENS: dict[str, dict] = {
    "llama-3.1": {
        "special": (
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|eom_id|>",
            "<|python_tag|>",
        ),
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
    },
    # Qwen's tool and thinking tags are added tokens but not special ones, as in Qwen's own.
    "qwen2.5": {
        "special": _QWEN_SPECIALS,
        "added": ("<tool_call>", "</tool_call>"),
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
    },
    "qwen3": {
        "special": _QWEN_SPECIALS,
        "added": (
            "<tool_call>",
            "</tool_call>",
            "<tool_response>",
            "</tool_response>",
            "<think>",
            "</think>",
        ),
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
    },
    "gemma-2": {
        "special": _GEMMA_SPECIALS,
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
    },
    "gemma-3": {
        "special": _GEMMA_SPECIALS,
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
    },
    "mistral-v3": {
        "special": (
            "<s>",
            "</s>",
            "[INST]",
            "[/INST]",
            "[TOOL_CALLS]",
            "[AVAILABLE_TOOLS]",
            "[/AVAILABLE_TOOLS]",
            "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]",
        ),
        "bos_token": "<s>",
        "eos_token": "</s>",
    },
    "phi-3.5": {
        "special": ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    },
}
"""Each family's special tokens as its tokenizer declares them, and its template file name."""


def family_tokenizer(family: str):
    """A tiny byte-level BPE tokenizer with a family's special (and added) tokens and its real
    chat template (`tests/fixtures/chat_templates/<family>.jinja`)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = FAMILY_TOKENS[family]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(spec["special"]),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS + [q + " " + a for q, a in FACTS], trainer)
    roles = {k: v for k, v in spec.items() if k.endswith("_token")}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **roles)
    tokenizer.add_tokens([AddedToken(t, special=False) for t in spec.get("added", ())])
    tokenizer.chat_template = (CHAT_TEMPLATES / f"{family}.jinja").read_text(encoding="utf-8")
    return tokenizer


# --- the command line ------------------------------------------------------------------------


def run_cli(*args) -> tuple[int, str, str]:
    """`lorakit ARGS` in-process: (exit code, stdout, stderr)."""
    from typer.testing import CliRunner

    from lorakit.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def one_error_line(stderr: str) -> str:
    """The single `error:` line a bad input must produce."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.fixture(scope="session")
def facts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The facts as chat rows, in a file."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "facts.jsonl", fact_rows("chat"))


@pytest.fixture(scope="session")
def alpaca_facts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The facts as alpaca rows, in a file."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "alpaca.jsonl", fact_rows("alpaca"))
