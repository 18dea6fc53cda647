"""The memory plan against what lorakit's training path really allocates, on tiny models.

Every comparison is with a deterministic quantity: bytes of the tensors a loaded model holds,
PEFT's own parameter count, the optimizer's state tensors, the tensors autograd saves, and the
torch allocations of a training step (profiler). RSS, which depends on the allocator and on
other processes, is left to `benchmarks/plan_accuracy.py`.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lorakit import memory_plan as mp
from lorakit.loss import TokenNLL, chunk_positions
from lorakit.models import load_config
from lorakit.peft_setup import build_trainable_model
from lorakit.quantization.bnb import memory_bytes
from lorakit.recipe import Recipe
from lorakit.training.optim import build_optimizer

CPU = torch.device("cpu")


def make_recipe(model_dir, **sections) -> Recipe:
    raw = {
        "model": {"name_or_path": str(model_dir)},
        "quant": {"bnb_4bit_compute_dtype": "bfloat16"},
        "lora": {"r": 8, "lora_alpha": 16},
        "data": {"train": "unused.jsonl", "max_seq_len": 64},
        "train": {"micro_batch_size": 4, "gradient_checkpointing": True},
        "output": {"dir": "unused"},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return Recipe.model_validate(raw)


def plan_for(recipe: Recipe, **kwargs) -> mp.MemoryPlan:
    return mp.estimate(recipe, load_config(recipe.model.name_or_path), **kwargs)


def held_bytes(model: torch.nn.Module) -> int:
    """Every byte the loaded model holds: `quantize.memory_bytes` plus the double-quant offset
    (one fp32 per 4-bit weight), which it leaves out."""
    offsets = {}
    for module in model.modules():  # a LoRA wrapper and its base layer share one state
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and state.nested:
            offsets[id(state.offset)] = state.offset.numel() * state.offset.element_size()
    return memory_bytes(model) + sum(offsets.values())


@pytest.mark.parametrize(
    "arch, quant",
    [
        ("llama", {"bnb_4bit_compute_dtype": "bfloat16"}),
        ("llama", {"bnb_4bit_compute_dtype": "float32", "bnb_4bit_use_double_quant": False}),
        ("qwen2", {"bnb_4bit_compute_dtype": "bfloat16"}),
        ("llama", {"load_in_4bit": False, "bnb_4bit_compute_dtype": "bfloat16"}),
        ("llama", {"load_in_4bit": False, "bnb_4bit_compute_dtype": "float32"}),
    ],
)
def test_weight_bytes_equal_what_the_trainable_model_holds(tiny_model, arch, quant):
    recipe = make_recipe(tiny_model(arch), quant=quant)
    model, _ = build_trainable_model(recipe, recipe.model.name_or_path, CPU)
    plan = plan_for(recipe)
    assert plan.frozen_4bit + plan.frozen_other + plan.lora_weights == held_bytes(model)
    assert (plan.frozen_4bit > 0) == quant.get("load_in_4bit", True)


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges where this process maps `path`."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            start, end = line.split()[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_fp32_views_keep_the_checkpoint_mapped(tiny_model, compute):
    """The tiny checkpoint is stored in fp32. Computing in fp32, the frozen embeddings are views
    of the mapped file (so its pages stay resident); in bf16 they are copies."""
    model_dir = tiny_model("llama")
    recipe = make_recipe(model_dir, quant={"bnb_4bit_compute_dtype": compute})
    model, _ = build_trainable_model(recipe, str(model_dir), CPU)
    pointer = model.get_input_embeddings().weight.data_ptr()
    ranges = mapped_ranges((model_dir / "model.safetensors").resolve())
    is_view = any(start <= pointer < end for start, end in ranges)
    plan = plan_for(recipe)
    assert is_view == (compute == "float32")
    layout = mp.model_layout(load_config(str(model_dir)), recipe)
    linear = sum(lin.weights for lin in layout.linears)
    assert plan.mapped_checkpoint == (4 * linear if is_view else 0)


def test_4bit_bytes_follow_the_qlora_formula_on_a_big_model():
    """Llama-3-8B's 4-bit linear weights: 4 + 8/64 + 32/(64·256) bits per value (QLoRA's
    double quantization), plus bitsandbytes' per-weight code books (1,092 bytes each)."""
    config = mp.published_config("meta-llama/Meta-Llama-3-8B-Instruct")
    recipe = make_recipe("meta-llama/Meta-Llama-3-8B-Instruct")
    layout = mp.model_layout(config, recipe)
    plan = mp.estimate(recipe, config, device="cuda", layout=layout)
    values = sum(lin.weights for lin in layout.linears)
    assert values == 6_979_321_856  # 8.03B minus 2 x 128256 x 4096 (embeddings, head)
    formula = values * (4 + 8 / 64 + 32 / (64 * 256)) / 8 + len(layout.linears) * (64 + 1028)
    assert plan.frozen_4bit == pytest.approx(formula, rel=1e-6)
    # Embeddings and head in bf16, norms in fp32, RoPE's two fp32 frequency buffers.
    assert plan.frozen_other == 2 * 128256 * 4096 * 2 + (2 * 32 + 1) * 4096 * 4 + 2 * 64 * 4


@pytest.mark.parametrize(
    "arch, lora",
    [
        ("llama", {}),
        ("llama", {"target_modules": "attention", "r": 4}),
        ("llama", {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1]}),
        ("llama", {"target_modules": "mlp", "use_dora": True}),
        ("llama", {"modules_to_save": ["lm_head"]}),
        ("qwen2", {"bias": "all"}),
        ("qwen2", {"bias": "lora_only", "target_modules": "attention"}),
        ("gpt2", {}),
        ("gpt2", {"bias": "all"}),
    ],
)
def test_trainable_parameters_equal_peft_count(tiny_model, arch, lora):
    recipe = make_recipe(tiny_model(arch), lora=lora)
    model, _ = build_trainable_model(recipe, recipe.model.name_or_path, CPU)
    trainable, _ = model.get_nb_trainable_parameters()
    assert plan_for(recipe).trainable_parameters == trainable


def test_llama3_8b_trainable_parameters_at_r16_all_linear():
    """The count PEFT prints for Llama-3-8B with r=16 on every linear layer."""
    recipe = make_recipe("meta-llama/Meta-Llama-3-8B-Instruct", lora={"r": 16})
    config = mp.published_config("meta-llama/Meta-Llama-3-8B-Instruct")
    assert mp.estimate(recipe, config, device="cuda").trainable_parameters == 41_943_040


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    seen: dict[int, int] = {}
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                seen[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.mark.parametrize(
    "optimizer", ["paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit", "adamw_torch"]
)
def test_optimizer_state_equals_the_optimizers_after_one_step(tiny_model, optimizer):
    # r=64: some LoRA tensors have >= 4096 values (8-bit state), k/v's B has 2048 (32-bit).
    recipe = make_recipe(tiny_model("llama"), lora={"r": 64}, train={"optimizer": optimizer})
    model, _ = build_trainable_model(recipe, recipe.model.name_or_path, CPU)
    sizes = {p.numel() for p in model.parameters() if p.requires_grad}
    assert min(sizes) < mp.ADAM8BIT_MIN_SIZE <= max(sizes)
    opt = build_optimizer(model, recipe.train)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    opt.step()
    assert plan_for(recipe).optimizer_state == state_bytes(opt)


def test_fsdp_shards_weights_gradients_and_state_but_not_activations(tiny_model):
    recipe = make_recipe(
        tiny_model("llama"),
        quant={"bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "bfloat16"},
        train={"optimizer": "adamw_torch"},
    )
    one = plan_for(recipe, fsdp=True)
    four = plan_for(recipe, fsdp=True, processes=4)
    for part in ("frozen_4bit", "frozen_other", "lora_weights", "lora_gradients"):
        assert getattr(four, part) == math.ceil(getattr(one, part) / 4)
    assert four.optimizer_state == math.ceil(one.optimizer_state / 4)
    assert (four.activations, four.working) == (one.activations, one.working)
    assert four.parallel == one.parallel > 0  # two gathered layers, whatever the process count


def test_ddp_processes_hold_everything_plus_gradient_buckets(tiny_model):
    recipe = make_recipe(tiny_model("llama"))
    one, four = plan_for(recipe), plan_for(recipe, processes=4)
    assert four.total == one.total + one.lora_gradients
    assert four.parallel == one.lora_gradients


def kept_by_autograd(model: torch.nn.Module, batch: dict) -> int:
    """Bytes of the distinct tensors autograd saves in one training forward, weights aside."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        TokenNLL(model).train()(**batch)
    return sum(n for ptr, n in storages.items() if ptr not in weights)


def full_batch(rows: int, width: int, vocab: int, padded: bool) -> dict:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, width), generator=generator)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, -1] = 0  # one padded position: transformers builds a mask for SDPA
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}


@pytest.mark.parametrize(
    "quant, lora, train, padded",
    [
        ({"bnb_4bit_compute_dtype": "bfloat16"}, {}, {"gradient_checkpointing": False}, False),
        ({"bnb_4bit_compute_dtype": "bfloat16"}, {}, {"gradient_checkpointing": False}, True),
        ({"bnb_4bit_compute_dtype": "float32"}, {}, {"gradient_checkpointing": False}, False),
        ({"load_in_4bit": False}, {}, {"gradient_checkpointing": False}, True),
        ({}, {"lora_dropout": 0.1, "r": 16}, {"gradient_checkpointing": False}, False),
        ({}, {"target_modules": "attention"}, {"gradient_checkpointing": False}, False),
        ({}, {"target_modules": "mlp"}, {"gradient_checkpointing": False}, True),
        (
            {"bnb_4bit_compute_dtype": "float32"},
            {"lora_dropout": 0.1},
            {"gradient_checkpointing": False},
            True,
        ),
    ],
)
def test_kept_activations_equal_what_autograd_saves(tiny_model, quant, lora, train, padded):
    """Without checkpointing: a checkpointed layer's keyword arguments (mask, cos/sin) live in
    a closure autograd's hooks do not see; `test_step_peak_equals_torch_allocations` covers
    checkpointing."""
    recipe = make_recipe(tiny_model("llama"), quant=quant, lora=lora, train=train)
    model, _ = build_trainable_model(recipe, recipe.model.name_or_path, CPU)
    config = model.get_base_model().config
    batch = full_batch(4, 64, config.vocab_size, padded)
    plan = mp.estimate(recipe, config, full_rows=not padded)
    assert plan.activations == pytest.approx(kept_by_autograd(model, batch), rel=0.01)


def step_allocation_peak(model: torch.nn.Module, recipe: Recipe, batch: dict) -> int:
    """Peak of live torch allocations during the second of two training steps (forward,
    backward, clip, optimizer step, zero_grad), above what existed before it: the step's
    activations, working memory and gradients (the optimizer state was made by the first)."""
    from torch.profiler import ProfilerActivity, profile

    loss_module = TokenNLL(model).train()
    optimizer = build_optimizer(model, recipe.train)
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        nll, count = loss_module(**batch)
        (nll / count).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = prof.profiler.kineto_results.events()
    changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize(
    "train, width",
    [
        ({"gradient_checkpointing": False}, 64),
        ({}, 64),
        ({"checkpoint_every_n_layers": 2}, 128),
    ],
)
def test_step_peak_equals_torch_allocations(tiny_model, train, width):
    """A vocabulary of a few hundred puts the whole head in one chunk; the peak is then either
    the end of the forward or the top layer's backward, as the plan says."""
    recipe = make_recipe(
        tiny_model("llama"), train=train, data={"train": "unused.jsonl", "max_seq_len": width}
    )
    model, _ = build_trainable_model(recipe, recipe.model.name_or_path, CPU)
    config = model.get_base_model().config
    batch = full_batch(4, width, config.vocab_size, padded=True)
    plan = mp.estimate(recipe, config)
    expected = plan.activations + plan.working + plan.lora_gradients
    measured = step_allocation_peak(model, recipe, batch)
    assert measured <= expected
    assert measured == pytest.approx(expected, rel=0.10)


def test_head_chunks_alive_at_once():
    vocab = 49152
    chunk = chunk_positions(vocab)  # 341
    f, w = chunk * vocab * 4, chunk * vocab * 2
    # bf16 head: the previous chunk's fp32 logits and bf16 gradient, and the new chunk's two.
    assert mp._head_chunk_peak([chunk, chunk], vocab, 2) == 2 * f + 2 * w
    # fp32 head: the previous logits (held as the gradient), the new ones, logsumexp's copy.
    assert mp._head_chunk_peak([chunk, chunk], vocab, 4) == 3 * f
    # One short chunk: its logits and logsumexp's temporary.
    assert mp._head_chunk_peak([100], vocab, 2) == 2 * 100 * vocab * 4


def test_checkpointing_every_n_layers_keeps_the_multiples_of_n():
    recipe = make_recipe("unused", train={"checkpoint_every_n_layers": 4})
    assert mp.checkpointed_layers(recipe, 10) == {0, 4, 8}
    off = make_recipe("unused", train={"gradient_checkpointing": False})
    assert mp.checkpointed_layers(off, 10) == set()


def test_largest_micro_batch_and_seq_len_are_monotone_and_tight(tiny_model):
    recipe = make_recipe(tiny_model("llama"))
    config = load_config(recipe.model.name_or_path)
    layout = mp.model_layout(config, recipe)
    base = mp.estimate(recipe, config, layout=layout).total
    budgets = [base + extra * 2**20 for extra in (0, 1, 2, 4, 8, 16)]
    batches = [mp.largest_micro_batch(recipe, config, b, layout=layout) for b in budgets]
    assert batches == sorted(batches) and batches[0] >= 4
    for budget, n in zip(budgets, batches, strict=True):
        fits = mp.with_values(recipe, train__micro_batch_size=n)
        too_many = mp.with_values(recipe, train__micro_batch_size=n + 1)
        assert mp.estimate(fits, config, layout=layout).fits(budget)
        assert not mp.estimate(too_many, config, layout=layout).fits(budget)
    lengths = [mp.largest_seq_len(recipe, config, b, limit=4096, layout=layout) for b in budgets]
    assert lengths == sorted(lengths) and lengths[0] >= 64
    assert mp.largest_micro_batch(recipe, config, 1, layout=layout) == 0


def levers_by_key(recipe: Recipe, config, budget: int) -> dict[str, mp.Lever]:
    found = mp.levers(recipe, config, budget, device="cuda")
    return {lever.change.split("=")[0]: lever for lever in found}


def test_levers_name_the_changes_that_fit():
    """Llama-3-8B at 16 x 2048 on a 24 GiB GPU: eight rows per micro-batch with twice the
    accumulation fit, as do shorter rows; a smaller r alone does not (the adapter is not what
    fills the GPU). Without checkpointing even one row does not fit, and checkpointing does."""
    name = "meta-llama/Meta-Llama-3-8B-Instruct"
    config = mp.published_config(name)
    budget = 24 * mp.GiB
    data = {"train": "unused.jsonl", "max_seq_len": 2048}
    recipe = make_recipe(name, data=data, train={"micro_batch_size": 16}, lora={"r": 16})
    assert not mp.estimate(recipe, config, device="cuda").fits(budget)
    found = levers_by_key(recipe, config, budget)
    assert "train.gradient_checkpointing" not in found  # already on
    assert found["train.micro_batch_size"].change == (
        "train.micro_batch_size=8 train.gradient_accumulation_steps=8"
    )
    assert found["train.micro_batch_size"].fits and found["data.max_seq_len"].fits
    assert not found["lora.r"].fits
    fitting = mp.with_values(recipe, train__micro_batch_size=8)
    assert mp.estimate(fitting, config, device="cuda").fits(budget)

    no_checkpointing = mp.with_values(
        recipe, train__micro_batch_size=1, train__gradient_checkpointing=False
    )
    found = levers_by_key(no_checkpointing, config, budget)
    assert found["train.gradient_checkpointing"].fits
    assert "train.micro_batch_size" not in found  # 1 is already the smallest


@pytest.mark.parametrize("name", sorted(mp.PUBLISHED_CONFIGS))
def test_published_configs_build_offline(name):
    config = mp.published_config(name)
    layout = mp.model_layout(config, make_recipe(name))
    billions = {
        "meta-llama/Meta-Llama-3-8B-Instruct": 8.03,
        "Qwen/Qwen2.5-7B-Instruct": 7.62,
        "mistralai/Mistral-7B-Instruct-v0.3": 7.25,
        "meta-llama/Meta-Llama-3-70B-Instruct": 70.55,
        "huggyllama/llama-65b": 65.29,
    }[name]
    assert layout.parameters / 1e9 == pytest.approx(billions, abs=0.01)
