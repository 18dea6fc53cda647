"""`lorakit merge` on tiny models: exactness of the merge, weighted combinations, the two merge
bases, the output folder, and bad input."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from lorakit.artifacts import resolve_target
from lorakit.cli import app
from lorakit.commands.merge import (
    MergeOptions,
    VerifyReport,
    attach_adapters,
    merge,
    read_adapter,
    resolve_base,
)
from lorakit.commands.train import train
from lorakit.errors import LorakitError
from lorakit.models import load_tokenizer, resolve_model
from lorakit.peft_setup import build_trainable_model
from lorakit.recipe import load_recipe
from lorakit.run_folder import PROVENANCE_FILE, RECIPE_FILE, provenance, save_adapter
from tests.conftest import FP32, build_config, build_tokenizer, load_adapter_as_trained, recipe_file
from tests.test_cli import assert_one_error_line

IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 31, 8, 120, 64]])


def write_recipe_file(folder: Path, model_dir: Path, name: str, **sections) -> Path:
    """conftest's short recipe with fp32 compute, 6 steps and a higher learning rate."""
    train = {"max_steps": 6, "learning_rate": 2e-2}
    return recipe_file(folder, model_dir, name, quant=FP32, train=train, **sections)


def random_adapter(folder: Path, model_dir: Path, name: str, seed: int, **lora) -> Path:
    """A real PEFT adapter folder in lorakit's layout, with random non-zero LoRA factors
    (training would only make the tests slower without changing what they check)."""
    recipe = load_recipe(write_recipe_file(folder, model_dir, name, lora=lora))
    torch.manual_seed(seed)
    model, _ = build_trainable_model(recipe, str(model_dir), torch.device("cpu"))
    for param_name, param in model.named_parameters():
        if "lora_B" in param_name:
            torch.nn.init.normal_(param, std=0.05)
    tokenizer = load_tokenizer(str(model_dir))
    resolved = resolve_model(str(model_dir))
    info = provenance(resolved, tokenizer=tokenizer.name_or_path, steps=0)
    run = Path(recipe.output.dir)
    save_adapter(run / "adapter", model, tokenizer, recipe, info)
    (run / RECIPE_FILE).write_text(recipe.to_yaml(), encoding="utf-8")
    return run


@pytest.fixture(scope="module")
def trained_run(tiny_model, tmp_path_factory) -> Path:
    """One real QLoRA run (NF4 + double quant) written by `lorakit train`."""
    folder = tmp_path_factory.mktemp("merge-run")
    recipe = load_recipe(write_recipe_file(folder, tiny_model("llama"), "qlora"))
    return train(recipe).run_dir


@pytest.fixture(scope="module")
def second_run(tiny_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("merge-second")
    return random_adapter(folder, tiny_model("llama"), "second", seed=1, r=8, lora_alpha=16)


def fp32_base(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def lora_delta(adapter_dir: Path, module: str, scale_override: float | None = None):
    """ΔW = scale · B @ A of one module, straight from the saved tensors."""
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    key = f"base_model.model.{module}"
    a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
    scale = config["lora_alpha"] / (config["r"] ** 0.5 if config["use_rslora"] else config["r"])
    return (scale_override or scale) * b @ a


def run_cli(*args):
    result = CliRunner().invoke(app, ["merge", *[str(a) for a in args]])
    return result.exit_code, result.stderr


# --- exactness ---------------------------------------------------------------------------


def test_merged_model_equals_base_plus_adapter_in_fp32(trained_run, tiny_model, tmp_path):
    out = tmp_path / "merged"
    result = merge(MergeOptions(source=trained_run, out=out, dtype="float32"))
    report = result.verify
    assert report is not None and report.passed
    assert report.max_abs_logit_diff < 1e-4
    assert report.greedy_agreement == 1.0
    assert report.adapter_effect > 1e-2  # the adapter changes the model: there was work to do
    assert report.prompts == 4

    # Independently: a fresh fp32 base + the saved adapter, unmerged, vs the written model.
    unmerged = PeftModel.from_pretrained(fp32_base(tiny_model("llama")), trained_run / "adapter")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert (logits(loaded) - logits(unmerged.eval())).abs().max().item() < 1e-4
    assert (logits(loaded) - logits(fp32_base(tiny_model("llama")))).abs().max().item() > 1e-2


@pytest.mark.parametrize("arch", ["qwen2", "gpt2", "tied-llama"])
def test_each_architecture_merges_and_reloads(arch, tiny_model, tmp_path):
    # Qwen2 has q/k/v biases, GPT-2 Conv1D layers (fan_in_fan_out), SmolLM2-style models tie
    # the output head to the embeddings.
    if arch == "tied-llama":
        model_dir = other_model(tmp_path, "tied", tie_word_embeddings=True)
        build_tokenizer(chat=True).save_pretrained(model_dir)
    else:
        model_dir = tiny_model(arch)
    run = random_adapter(tmp_path, model_dir, arch, seed=6)
    out = tmp_path / "merged"
    result = merge(MergeOptions(source=run, out=out, dtype="float32", verify_prompts=2))
    assert result.verify is not None and result.verify.passed
    unmerged = PeftModel.from_pretrained(fp32_base(model_dir), run / "adapter").eval()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (logits(loaded) - logits(unmerged)).abs().max().item() < 1e-4
    assert (logits(loaded) - logits(fp32_base(model_dir))).abs().max().item() > 1e-3


def test_output_folder_holds_a_servable_model_and_provenance(trained_run, tmp_path):
    out = tmp_path / "merged"
    merge(MergeOptions(source=trained_run / "adapter", out=out, dtype="float32"))
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        PROVENANCE_FILE,
    } <= names
    assert not any(n.startswith("adapter_") for n in names)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".merged.tmp")]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    info = json.loads((out / PROVENANCE_FILE).read_text())
    adapter_file = trained_run / "adapter" / "adapter_model.safetensors"
    assert info["merge"] == {
        "base": "original",
        "dtype": "float32",
        "method": None,
        "density": None,
        "weights": [1.0],
    }
    (adapter,) = info["adapters"]
    assert adapter["sha256"] == hashlib.sha256(adapter_file.read_bytes()).hexdigest()
    assert adapter["r"] == 8 and adapter["training"]["steps"] == 6
    weights = (out / "model.safetensors").read_bytes()
    assert info["files"] == {"model.safetensors": hashlib.sha256(weights).hexdigest()}
    assert list(info["base_model"]["files"]) == ["model.safetensors"]
    assert info["verify"]["passed"] is True
    tokenizer = load_tokenizer(str(out))
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template


def test_large_output_is_sharded_and_loads(trained_run, tmp_path):
    out = tmp_path / "sharded"
    result = merge(
        MergeOptions(source=trained_run, out=out, dtype="float32", max_shard_size="60KB")
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and result.files == shards
    info = json.loads((out / PROVENANCE_FILE).read_text())
    assert sorted(info["files"]) == shards
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    whole = tmp_path / "whole"
    merge(MergeOptions(source=trained_run, out=whole, dtype="float32", verify=False))
    expected = logits(AutoModelForCausalLM.from_pretrained(whole).eval())
    assert torch.equal(logits(loaded), expected)


def test_merge_adds_the_deltas_in_place_without_a_second_copy(trained_run, tiny_model):
    """Memory: merge_and_unload writes into the loaded base weights, so the merged model is
    the same storage as the base (peak RSS on the embedded model: benchmarks/merge_latency.py)."""
    base = fp32_base(tiny_model("llama"))
    before = {name: p.data_ptr() for name, p in base.named_parameters()}
    merged = attach_adapters(base, [read_adapter(trained_run)], [1.0], None, None)
    merged = merged.merge_and_unload()
    after = {name: p.data_ptr() for name, p in merged.named_parameters()}
    assert after == before


def test_dequantized_base_reproduces_the_trained_qlora_model(trained_run, tiny_model, tmp_path):
    """`--base dequantized` equals the model the adapter was trained in (NF4 base + adapter);
    `--base original` does not: the adapter never saw the unrounded weights."""
    model_dir = tiny_model("llama")
    trained = load_adapter_as_trained(model_dir, trained_run / "adapter")
    expected = logits(trained)
    distance = {}
    for base in ("dequantized", "original"):
        out = tmp_path / base
        merge(MergeOptions(source=trained_run, out=out, base=base, dtype="float32"))
        got = logits(AutoModelForCausalLM.from_pretrained(out).eval())
        distance[base] = (got - expected).abs().max().item()
    assert distance["dequantized"] < 1e-4
    assert distance["original"] > 1e-2


# --- several adapters --------------------------------------------------------------------


def test_cat_merges_the_exact_weighted_sum_of_deltas(trained_run, tiny_model, tmp_path):
    # Different ranks and rsLoRA: cat must still give W + Σ w_i · scale_i · B_i A_i exactly.
    other = random_adapter(
        tmp_path, tiny_model("llama"), "rs", seed=2, r=4, lora_alpha=8, use_rslora=True
    )
    out = tmp_path / "cat"
    merge(
        MergeOptions(
            source=trained_run, out=out, adapters=(other,), weights=(0.7, -0.3), dtype="float32"
        )
    )
    merged = load_file(out / "model.safetensors")
    base = load_file(tiny_model("llama") / "model.safetensors")
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        expected = (
            base[f"{module}.weight"]
            + 0.7 * lora_delta(trained_run / "adapter", module)
            - 0.3 * lora_delta(other / "adapter", module)
        )
        assert torch.allclose(merged[f"{module}.weight"], expected, atol=1e-6), module
    info = json.loads((out / PROVENANCE_FILE).read_text())
    assert info["merge"]["method"] == "cat" and info["merge"]["weights"] == [0.7, -0.3]
    assert [a["r"] for a in info["adapters"]] == [8, 4]


def test_a_single_adapter_weight_scales_its_delta(trained_run, tiny_model, tmp_path):
    out = tmp_path / "half"
    merge(MergeOptions(source=trained_run, out=out, weights=(0.5,), dtype="float32"))
    merged = load_file(out / "model.safetensors")
    base = load_file(tiny_model("llama") / "model.safetensors")
    module = "model.layers.1.self_attn.v_proj"
    expected = base[f"{module}.weight"] + 0.5 * lora_delta(trained_run / "adapter", module)
    assert torch.allclose(merged[f"{module}.weight"], expected, atol=1e-6)


@pytest.mark.parametrize(
    ("method", "density"),
    [
        ("linear", None),
        ("svd", None),
        ("ties", 0.5),
        ("dare_ties", 0.5),
        ("dare_linear", 0.5),
        ("magnitude_prune", 0.5),
    ],
)
def test_each_method_combines_and_verifies(method, density, trained_run, second_run, tmp_path):
    out = tmp_path / method
    result = merge(
        MergeOptions(
            source=trained_run,
            out=out,
            adapters=(second_run,),
            weights=(0.6, 0.4),
            method=method,
            density=density,
            dtype="float32",
            verify_prompts=2,
        )
    )
    assert result.verify is not None and result.verify.passed
    assert result.verify.max_abs_logit_diff < 1e-4
    assert result.verify.adapter_effect > 1e-2
    assert json.loads((out / PROVENANCE_FILE).read_text())["merge"]["density"] == density


# --- verification gate and the output folder ---------------------------------------------


def test_bf16_merge_is_measured_and_a_tight_tolerance_fails(trained_run, tmp_path):
    out = tmp_path / "bf16"
    code, err = run_cli(trained_run, "--out", out, "--dtype", "bfloat16", "--tolerance", "1e-12")
    assert code == 1
    # The measurements are printed, then one error line.
    assert "greedy-token agreement" in err and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1]
    assert "mean KL" in errors[0] and "nothing written" in errors[0]
    assert not out.exists()
    code, err = run_cli(trained_run, "--out", out, "--dtype", "bfloat16", "--verify-prompts", "1")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    info = json.loads((out / PROVENANCE_FILE).read_text())
    assert 0 < info["verify"]["mean_kl"] <= info["verify"]["tolerance"]


@pytest.mark.parametrize(
    ("mean_kl", "adapter_kl", "tolerance", "passed"),
    [
        (3e-8, 0.5, 1e-4, True),  # an fp32 merge
        (4e-3, 0.5, 2e-2, True),  # a bf16 merge of a strong adapter
        (3e-2, 0.5, 2e-2, False),  # above the tolerance
        (4e-3, 5e-3, 2e-2, False),  # within tolerance, but rounding erased most of the adapter
        (5e-7, 1e-7, 1e-4, True),  # float noise on a barely trained adapter
        (0.0, 0.0, 1e-4, True),  # an untrained adapter (B = 0) merges exactly
        (float("nan"), 0.5, 1e-4, False),
    ],
)
def test_verify_gate(mean_kl, adapter_kl, tolerance, passed):
    report = VerifyReport(
        prompts=4,
        tokens=100,
        max_abs_logit_diff=0.1,
        mean_kl=mean_kl,
        greedy_agreement=1.0,
        adapter_effect=5.0,
        adapter_kl=adapter_kl,
        tolerance=tolerance,
    )
    assert report.passed is passed


@pytest.mark.parametrize("flag", ["--overwrite", "--force"])
def test_existing_output_needs_overwrite(flag, trained_run, tmp_path):
    """`--overwrite` replaces output in every command; merge's old `--force` still works, with a
    deprecation note."""
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, err = run_cli(trained_run, "--out", out, "--no-verify")
    assert code == 2
    assert_one_error_line(err, str(out), "--overwrite")
    assert (out / "precious.txt").read_text() == "keep me"
    code, err = run_cli(trained_run, "--out", out, "--no-verify", flag, "--dtype", "float32")
    assert code == 0, err
    deprecated = "note: --force is deprecated here; it means --overwrite"
    assert (deprecated in err) == (flag == "--force")
    assert not (out / "precious.txt").exists()
    assert (out / "model.safetensors").is_file()


def test_merge_and_eval_find_an_adapters_base_the_same_way(second_run, tmp_path):
    """The folder the base was loaded from in training, while it exists (a relative name then
    works from any working directory); else the name, resolved again; else one clear error."""
    run = shutil.copytree(second_run, tmp_path / "run")
    record = run / "adapter" / PROVENANCE_FILE
    info = json.loads(record.read_text())
    location = info["base_model"]["location"]

    def rewrite(**base):
        info["base_model"].update(base)
        record.write_text(json.dumps(info))

    def both():
        return resolve_base(read_adapter(run), None), resolve_target(str(run))

    rewrite(reference="./models/tiny")  # relative to a working directory we are not in
    merged_base, target = both()
    assert merged_base.location == target.model_location == location
    assert merged_base.reference == target.base_reference == "./models/tiny"
    rewrite(reference=location, location=str(tmp_path / "moved"))
    merged_base, target = both()
    assert merged_base.location == target.model_location == location
    rewrite(reference="./models/tiny")
    for lookup in (lambda: resolve_base(read_adapter(run), None), lambda: both()[1]):
        with pytest.raises(LorakitError, match=r"base model './models/tiny' cannot be found"):
            lookup()
    with pytest.raises(LorakitError, match="pass --base-model"):
        resolve_base(read_adapter(run), None)
    assert resolve_base(read_adapter(run), location).location == location
    record.unlink()
    config_file = run / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config.pop("base_model_name_or_path", None)
    config_file.write_text(json.dumps(config))
    for lookup in (lambda: resolve_base(read_adapter(run), None), lambda: both()[1]):
        with pytest.raises(LorakitError, match="does not name its base model"):
            lookup()


# --- bad input: one error line, exit 2, nothing written ----------------------------------


def other_model(tmp_path: Path, name: str, **config_changes) -> Path:
    tokenizer = build_tokenizer(chat=True)
    config = build_config("llama", len(tokenizer))
    for key, value in config_changes.items():
        setattr(config, key, value)
    folder = tmp_path / name
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def test_bad_input_is_one_line_and_writes_nothing(trained_run, second_run, tiny_model, tmp_path):
    out = tmp_path / "out"
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text(
        (trained_run / "adapter" / "adapter_config.json").read_text()
    )
    narrow = other_model(tmp_path, "narrow", hidden_size=32, intermediate_size=64)
    small_vocab = other_model(tmp_path, "small-vocab", vocab_size=100)
    qwen = random_adapter(tmp_path, tiny_model("qwen2"), "qwen", seed=3)
    attention_only = random_adapter(
        tmp_path, tiny_model("llama"), "attn", seed=4, target_modules="attention"
    )
    cases = [
        ([tmp_path / "nowhere"], ["nowhere", "no such run or adapter folder"]),
        ([no_weights], ["adapter_model.safetensors is missing"]),
        ([trained_run, "--method", "bogus"], ["--method", "unknown method 'bogus'"]),
        (
            [trained_run, "--adapter", second_run, "--weights", "0.5,0.3,0.2"],
            ["--weights", "3 weight(s) for 2 adapter(s)"],
        ),
        ([trained_run, "--weights", "half"], ["--weights", "'half'"]),
        (
            [trained_run, "--adapter", second_run, "--method", "ties"],
            ["--density", "ties needs"],
        ),
        ([trained_run, "--base-model", narrow], ["does not fit", "hidden size 32"]),
        (
            [trained_run, "--base-model", tmp_path / "no-base"],
            ["--base-model", "no-base", "is not a local model folder"],
        ),
        ([trained_run, "--base-model", tiny_model("gpt2")], ["GPT2LMHeadModel", "no layer"]),
        ([trained_run, "--base-model", small_vocab], ["vocabulary of 100"]),
        ([trained_run, "--adapter", qwen], ["different bases", "tiny-qwen2"]),
        (
            [trained_run, "--adapter", attention_only, "--method", "linear"],
            ["equal target_modules", "--method cat or svd"],
        ),
        ([trained_run, "--dtype", "int8"], ["--dtype", "'int8'"]),
        ([trained_run, "--base", "fp4"], ["--base", "'fp4'"]),
        ([trained_run], ["--out"]),
    ]
    for args, fragments in cases:
        extra = [] if args == [trained_run] else ["--out", out]
        code, err = run_cli(*args, *extra)
        assert code == 2, (args, err)
        assert_one_error_line(err, *fragments)
        assert not out.exists(), args
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_dequantized_needs_a_4bit_training_run(tiny_model, tmp_path):
    plain = random_adapter(tmp_path, tiny_model("llama"), "plain", seed=5)
    recipe = yaml.safe_load((plain / RECIPE_FILE).read_text())
    recipe["quant"]["load_in_4bit"] = False
    for folder in (plain, plain / "adapter"):
        (folder / RECIPE_FILE).write_text(yaml.safe_dump(recipe))
    code, err = run_cli(plain, "--out", tmp_path / "out", "--base", "dequantized")
    assert code == 2
    assert_one_error_line(err, "load_in_4bit: false", "--base original")
    assert not (tmp_path / "out").exists()
