"""The benchmark's bookkeeping: the FLOP formula, the data both arms get, result parsing."""

import json

from benchmarks.common import ArmResult, StepClock, emit, model_flops, parse
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
