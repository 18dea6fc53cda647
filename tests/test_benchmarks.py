"""The benchmark's bookkeeping: the FLOP formula, the data both arms get, result parsing."""

import json
import math
from pathlib import Path

from benchmarks.common import ArmResult, Spec, StepClock, emit, model_flops, parse
from benchmarks.trl_sft import prompt_completion_rows


def test_flop_formula_on_a_small_config(tmp_path):
    config = {
        "hidden_size": 8,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 16,
        "vocab_size": 10,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    flops = model_flops(str(tmp_path), 2, [3, 4], 5, gradient_checkpointing=True)
    # q 8x8, k 8x4, v 8x4, o 8x8, gate/up 8x16, down 16x8, in 2 layers
    assert flops["n_linear"] == 2 * (64 + 32 + 32 + 64 + 128 + 128 + 128) == 1152
    assert flops["n_lora"] == 2 * 2 * (16 + 12 + 12 + 16 + 24 + 24 + 24) == 512
    assert flops["linear"] == 7 * 6 * 1152  # fwd + input grad + recompute
    assert flops["lora"] == 7 * 8 * 512  # fwd + recompute + input and weight grads
    assert flops["attention"] == 2 * 2 * 4 * (6 + 10) * 16  # causal contexts 1+2+3, 1+..+4
    assert flops["head"] == 5 * 4 * 10 * 8
    assert flops["total"] == 48384 + 28672 + 4096 + 1600
    without = model_flops(str(tmp_path), 2, [3, 4], 5, gradient_checkpointing=False)
    assert without["linear"] == 7 * 4 * 1152 and without["lora"] == 7 * 6 * 512


def test_trl_arm_gets_the_chat_lorakit_renders(tmp_path):
    rows = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert prompt_completion_rows(str(path)) == [
        {
            "prompt": [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}],
            "completion": [{"role": "assistant", "content": "5"}],
        },
        {
            "prompt": [{"role": "user", "content": "Say hi."}],
            "completion": [{"role": "assistant", "content": "Hi!"}],
        },
    ]


def test_results_travel_as_one_json_line(capsys):
    clock = StepClock()
    clock.start()
    clock.tick()
    clock.tick()
    result = ArmResult(
        arm="lorakit",
        trained_tokens=100,
        real_tokens=800,
        padded_tokens=1000,
        steps=2,
        loop_seconds=4.0,
        step_seconds=[3.0, 1.0],
        losses=[2.0, 1.5],
        heldout_loss=1.7,
        heldout_se=0.1,
        peak_rss_mb=900.0,
        train_peak_rss_mb=850.0,
        setup_seconds=5.0,
        loop_cpu_seconds=7.5,
    )
    emit(result)
    parsed = parse("noise\n" + capsys.readouterr().out)
    assert parsed == result
    assert (parsed.trained_tokens_per_s, parsed.median_step_s, parsed.final_loss) == (25, 3.0, 1.5)
    assert len(clock.step_seconds) == 2 and clock.total >= 0


# --- `run.py --method dpo` -----------------------------------------------------------------


def test_dpo_arms_get_the_same_chats(tmp_path):
    """TRL's arm gets the string pairs as the conversational rows lorakit renders them as, and
    the SFT baseline each pair's prompt with its chosen answer."""
    from benchmarks.run import prepare_pairs
    from benchmarks.trl_dpo import conversational_pairs

    source = tmp_path / "source"
    source.mkdir()
    pairs = [
        {"prompt": f"Q{i}?", "chosen": f"A{i}.", "rejected": f"Long A{i}..."} for i in range(4)
    ]
    for name in ("train", "val"):
        (source / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    files = prepare_pairs(tmp_path, source, pairs=3, heldout=2)
    assert conversational_pairs(files["train"])[2] == {
        "prompt": [{"role": "user", "content": "Q2?"}],
        "chosen": [{"role": "assistant", "content": "A2."}],
        "rejected": [{"role": "assistant", "content": "Long A2..."}],
    }
    assert len(conversational_pairs(files["heldout"])) == 2
    sft = [json.loads(line) for line in Path(files["sft_train"]).read_text().splitlines()]
    assert sft[1] == {
        "messages": [{"role": "user", "content": "Q1?"}, {"role": "assistant", "content": "A1."}]
    }
    assert len(sft) == 3


def dpo_result(arm: str, loop: float, loop_peak: float, **extra) -> ArmResult:
    return ArmResult(
        arm=arm,
        trained_tokens=400,
        real_tokens=900,
        padded_tokens=1000,
        steps=2,
        loop_seconds=loop,
        step_seconds=[loop / 2, loop / 2],
        losses=[0.69, 0.6],
        heldout_loss=0.5,
        heldout_se=0.01,
        peak_rss_mb=loop_peak + 200,
        train_peak_rss_mb=loop_peak,
        setup_seconds=1.0,
        loop_cpu_seconds=loop,
        extra={
            "pairs": 8,
            "precompute_s": 0.0,
            "peak_rss_trained_mb": loop_peak + 100,
            "other_cores_during_loop": 0.5,
            "heldout_reward_accuracy": 0.75,
            "heldout_reward_margin": 0.4,
            "heldout_normalized_accuracy": 0.5,
            **extra,
        },
    )


def test_dpo_table_and_goals_show_the_ratios():
    from benchmarks.run import dpo_goals, dpo_table

    lk, trl = dpo_result("lorakit", 4.0, 900), dpo_result("trl", 10.0, 1500)
    sft = dpo_result("lorakit", 3.0, 800)
    table = dpo_table([lk], [trl], "test").splitlines()
    assert table[2].split() == ["pairs/s", "(training", "loop)", "2.00", "0.80", "2.50x"]
    assert "held-out reward accuracy" in "\n".join(table)
    goals = dpo_goals({"lorakit": [lk], "trl": [trl], "lorakit_sft": [sft]}, precompute=False)
    assert goals.splitlines() == [
        "goal lorakit DPO pairs/s >= 2x TRL: 2.50x (met)",
        "goal lorakit DPO loop peak RSS <= TRL's: 0.60x (met)",
        "goal lorakit DPO loop peak RSS <= 1.15x lorakit SFT's (prompt + chosen, same pairs and "
        "steps: 800 MB loop, 1000 MB process, 1.50 s/step): 1.12x (met); whole process 1.10x",
    ]


def test_both_dpo_arms_train_a_tiny_model_and_report(tmp_path, tiny_model):
    """Each arm's script trains two steps of DPO and prints one parseable RESULT; both see the
    same pairs as the same tokens (answer tokens and non-padding tokens agree)."""
    from benchmarks.run import dpo_specs, prepare_pairs, run_arm
    from tests.conftest import FACTS

    source = tmp_path / "source"
    source.mkdir()
    wrong = [a for _, a in FACTS[1:] + FACTS[:1]]
    rows = [
        {"prompt": q, "chosen": a, "rejected": w} for (q, a), w in zip(FACTS, wrong, strict=True)
    ]
    for name in ("train", "val"):
        (source / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = prepare_pairs(tmp_path, source, pairs=4, heldout=3)
    spec = Spec(
        model=str(tiny_model("llama")),
        train_file=files["train"],
        heldout_file=files["heldout"],
        compute_dtype="float32",
        micro_batch_size=2,
        gradient_accumulation_steps=1,
        method="dpo",
        threads=1,
    )
    lorakit, _ = run_arm("lorakit_arm.py", spec)
    trl, _ = run_arm("trl_dpo.py", spec)
    for result in (lorakit, trl):
        assert (result.steps, result.extra["pairs"], result.extra["heldout_pairs"]) == (2, 4, 3)
        assert len(result.losses) == 2 and abs(result.losses[0] - math.log(2)) < 1e-3
        assert 0 <= result.extra["heldout_reward_accuracy"] <= 1
        assert result.train_peak_rss_mb > 0 and result.extra["peak_rss_trained_mb"] > 0
    assert lorakit.trained_tokens == trl.trained_tokens
    assert lorakit.real_tokens == trl.real_tokens
    assert trl.extra["repacked_4bit_layers_before_training"] == 0
    sft, _ = run_arm(
        "lorakit_arm.py", dpo_specs(spec, files["sft_train"], files["sft_heldout"])["sft"]
    )
    assert sft.steps == 2 and sft.trained_tokens > 0


def test_the_defaults_comparison_is_200_steps_of_lorakits_autos_against_trls_qlora_settings():
    from benchmarks.lorakit_arm import recipe_dict
    from benchmarks.run import SFT_DEFAULTS, defaults_specs
    from lorakit.recipe import Recipe

    spec = Spec(model="m", train_file="t.jsonl", heldout_file="h.jsonl", compute_dtype="bfloat16")
    trl, lorakit = defaults_specs(spec)
    assert (trl.gradient_checkpointing, trl.optimizer) == (True, "paged_adamw_8bit")
    assert (lorakit.gradient_checkpointing, lorakit.torch_compile) == ("auto", "auto")
    steps = 200 * trl.epochs // (trl.micro_batch_size * trl.gradient_accumulation_steps)
    assert steps == 200 and SFT_DEFAULTS["micro_batch_size"] == trl.micro_batch_size
    train = Recipe.model_validate(recipe_dict(lorakit, "out")).train
    assert (train.gradient_checkpointing, train.torch_compile) == ("auto", "auto")
