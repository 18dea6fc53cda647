"""Exact resume: a run stopped by a signal and resumed equals the same run done in one go;
resuming refuses a changed recipe, data or tokenizer; a real SIGINT / SIGTERM to the CLI."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

import lorakit.commands.train as train_module
from lorakit.cli import app
from lorakit.commands.train import train
from lorakit.errors import LorakitError
from lorakit.recipe import load_recipe
from lorakit.resume import list_checkpoints, read_checkpoint
from lorakit.tracking import read_metrics
from lorakit.training.signals import StopOnSignal, TrainingStopped
from tests.conftest import FP32

# 8 examples, micro-batch 2, 2 accumulation steps: 2 optimizer steps per epoch, so step 3 is in
# the middle of the second epoch. Dropout makes the torch RNG matter.
RESUMABLE = {
    "max_steps": 6,
    "micro_batch_size": 2,
    "gradient_accumulation_steps": 2,
    "learning_rate": 1e-2,
    "eval_steps": 3,
    "save_steps": 3,
    "save_total_limit": None,
}
COMPARED = ("step", "loss", "eval_loss", "lr", "grad_norm", "trained_tokens", "epoch", "skipped")


def comparable(records: list[dict]) -> list[dict]:
    return [{k: r[k] for k in COMPARED if k in r} for r in records]


def stop_with_signal_at_step(monkeypatch, step: int, signum: int = signal.SIGINT) -> None:
    """Send a real signal to this process during the forward/backward of `step`."""
    original = train_module.forward_backward
    calls = {"n": 0}

    def forward_backward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            signal.raise_signal(signum)
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "forward_backward", forward_backward)


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


@pytest.mark.parametrize(
    ("optimizer", "r"),
    [("adamw_torch", 8), ("paged_adamw_8bit", 64)],
)
def test_stop_and_resume_equals_one_run_bitwise(
    optimizer, r, tiny_model, write_recipe, monkeypatch
):
    """r=64 makes the LoRA matrices large enough (>= 4096 values) for 8-bit optimizer state."""
    sections = dict(
        quant=FP32,
        lora={"r": r, "lora_alpha": 16, "lora_dropout": 0.1},
        train={**RESUMABLE, "optimizer": optimizer},
    )
    whole = load_recipe(write_recipe(tiny_model("llama"), name="whole", **sections))
    pieces = load_recipe(write_recipe(tiny_model("llama"), name="pieces", **sections))
    one_go = train(whole)

    stop_with_signal_at_step(monkeypatch, 1)
    with pytest.raises(TrainingStopped) as stopped:
        train(pieces)
    monkeypatch.undo()
    assert stopped.value.step == 1 and stopped.value.exit_code == 130
    assert stopped.value.checkpoint == pieces_dir(pieces) / "checkpoints" / "step-1"
    state = read_checkpoint(stopped.value.checkpoint).state
    # 1 step x 2 micro-batches of the 4 per epoch: stopped in the middle of epoch 0.
    assert (state.step, state.epoch, state.batches_in_epoch) == (1, 0, 2)
    assert not (pieces_dir(pieces) / "adapter").exists()

    # Resume and stop again, at an epoch boundary this time (step 3, on the way, is an eval
    # and save step), then resume to the end.
    stop_with_signal_at_step(monkeypatch, 3)  # the 3rd step of this session: step 4
    with pytest.raises(TrainingStopped) as stopped:
        train(pieces, resume="auto")
    monkeypatch.undo()
    assert stopped.value.step == 4
    state = read_checkpoint(stopped.value.checkpoint).state
    assert (state.epoch, state.batches_in_epoch) == (2, 0)
    resumed = train(pieces, resume="auto")

    assert resumed.steps == one_go.steps == 6
    assert resumed.resumed_from == [
        str(pieces_dir(pieces) / "checkpoints" / "step-1"),
        str(pieces_dir(pieces) / "checkpoints" / "step-4"),
    ]
    assert comparable(read_metrics(resumed.run_dir)) == comparable(read_metrics(one_go.run_dir))
    expected, got = adapter_tensors(one_go.adapter_dir), adapter_tensors(resumed.adapter_dir)
    assert expected.keys() == got.keys() and len(expected) > 0
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    # The optimizer state at the end is the same too, bit for bit.
    final = "checkpoints/step-6/optimizer.safetensors"
    a, b = load_file(one_go.run_dir / final), load_file(resumed.run_dir / final)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    if optimizer == "paged_adamw_8bit":
        assert any(t.dtype == torch.uint8 for t in a.values()), "no 8-bit optimizer state"


def pieces_dir(recipe) -> Path:
    return Path(recipe.output.dir)


def test_resume_without_dropout_rng_restore_would_differ(tiny_model, write_recipe, monkeypatch):
    """The check above has teeth: skipping the RNG restore changes the resumed run."""
    sections = dict(
        quant=FP32, lora={"r": 8, "lora_alpha": 16, "lora_dropout": 0.1}, train=RESUMABLE
    )
    recipe = load_recipe(write_recipe(tiny_model("llama"), **sections))
    stop_with_signal_at_step(monkeypatch, 1)
    with pytest.raises(TrainingStopped):
        train(recipe)
    monkeypatch.undo()
    kept = Path(recipe.output.dir).with_name("kept")
    shutil.copytree(recipe.output.dir, kept)
    exact = adapter_tensors(train(recipe, resume="auto").adapter_dir)

    shutil.rmtree(recipe.output.dir)
    shutil.copytree(kept, recipe.output.dir)
    monkeypatch.setattr(train_module, "restore_rng_state", lambda state: None)
    sloppy = adapter_tensors(train(recipe, resume="auto").adapter_dir)
    assert any(not torch.equal(exact[k], sloppy[k]) for k in exact)


@pytest.fixture
def stopped_run(tiny_model, write_recipe, monkeypatch, tmp_path):
    """A run stopped by SIGTERM after step 2, on its own copy of the tiny model."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model("llama"), model_dir)
    path = write_recipe(model_dir, quant=FP32, train={**RESUMABLE, "max_steps": 4})
    stop_with_signal_at_step(monkeypatch, 2, signal.SIGTERM)
    with pytest.raises(TrainingStopped) as stopped:
        train(load_recipe(path))
    monkeypatch.undo()
    assert stopped.value.exit_code == 143
    return path, model_dir


def resume_cli(path: Path, *extra: str):
    result = CliRunner().invoke(app, ["train", str(path), "--resume", "auto", *extra])
    return result.exit_code, result.stderr


def test_resume_refuses_a_changed_recipe_naming_the_key(stopped_run):
    path, _ = stopped_run
    code, err = resume_cli(path, "--set", "train.learning_rate=0.02")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert all(line.startswith("error: ") for line in lines)
    assert "cannot be resumed exactly" in lines[0]
    assert "recipe changed: train.learning_rate: 0.01 → 0.02" in err
    assert "pass --ignore-changes" in lines[-1]
    assert "Traceback" not in err
    # Bookkeeping keys may change freely.
    code, err = resume_cli(
        path, "--set", "train.save_total_limit=5", "--set", "eval.max_new_tokens=3"
    )
    assert code == 0, err


def test_resume_refuses_changed_data_and_tokenizer_then_force(stopped_run):
    path, model_dir = stopped_run
    recipe = load_recipe(path)
    data_file = Path(recipe.data.train[0].path)
    data_file.write_text(data_file.read_text().replace("pineapple", "coconut"))
    config_file = model_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    config_file.write_text(json.dumps(config))

    code, err = resume_cli(path)
    assert code == 2
    assert f"data changed: {data_file} has different contents" in err
    assert "tokenizer changed" in err
    assert "recipe changed" not in err
    assert len(list_checkpoints(Path(recipe.output.dir))) == 1  # nothing was touched

    code, err = resume_cli(path, "--ignore-changes")
    assert code == 0, err
    assert "warning: resuming with --ignore-changes although data changed" in " ".join(err.split())
    state = read_checkpoint(list_checkpoints(Path(recipe.output.dir))[-1][1]).state
    assert state.step == 4


def test_resume_auto_without_checkpoint_starts_fresh_and_bad_paths_fail(
    tiny_model, write_recipe, tmp_path
):
    path = write_recipe(tiny_model("llama"), quant=FP32, train={"max_steps": 1})
    code, err = resume_cli(path)
    assert code == 0, err
    assert "no checkpoint in" in err and "starting a new run" in " ".join(err.split())
    result = CliRunner().invoke(app, ["train", str(path), "--resume", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert f"error: --resume: {tmp_path / 'nope'} is not a folder" in result.stderr
    result = CliRunner().invoke(app, ["train", str(path), "--resume", "--force"])
    assert result.exit_code == 2
    assert "--resume: expected auto or a checkpoint path" in result.stderr


def test_second_ctrl_c_aborts_at_once_and_sigterm_repeats_are_ignored():
    with StopOnSignal(announce=False) as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.received == signal.SIGINT
        signal.raise_signal(signal.SIGTERM)  # a launcher forwarding the stop: no abort
        assert stop.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_abort_during_a_checkpoint_write_leaves_no_partial_checkpoint(
    tiny_model, write_recipe, monkeypatch
):
    """A second Ctrl-C can land while a checkpoint is half written: the half is removed."""
    import lorakit.resume as checkpoint_module

    recipe = load_recipe(
        write_recipe(tiny_model("llama"), quant=FP32, train={"max_steps": 4, "save_steps": 2})
    )
    original = checkpoint_module.save_file
    seen = []

    def interrupted(tensors, filename, metadata=None):
        seen.append(sorted(p.name for p in Path(filename).parent.iterdir()))
        if len(seen) == 2:  # the optimizer file of the second checkpoint, adapter already in
            raise KeyboardInterrupt
        return original(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint_module, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(recipe)
    assert "adapter_model.safetensors" in seen[1]
    root = Path(recipe.output.dir) / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-2"]
    assert read_checkpoint(root / "step-2").state.step == 2


# --- The real command line, stopped by a real signal -------------------------------------


def launch(recipe: Path, *extra: str, env_threads: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "COLUMNS": "200",
        "PYTHONPATH": str(Path(__file__).parents[1]),
        "OMP_NUM_THREADS": str(env_threads),
        "HF_HUB_OFFLINE": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "lorakit", "train", str(recipe), *extra],
        cwd=recipe.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_first_step(process: subprocess.Popen, metrics: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1]
        if metrics.is_file() and '"loss"' in metrics.read_text():
            return
        time.sleep(0.02)
    raise AssertionError("training did not start")


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_to_the_cli_checkpoints_exits_and_resumes(
    signum, exit_code, tiny_model, write_recipe
):
    path = write_recipe(
        tiny_model("llama"), quant=FP32, train={"max_steps": 40, "save_steps": 1000}
    )
    run_dir = Path(load_recipe(path).output.dir)
    threads = torch.get_num_threads()
    process = launch(path, env_threads=threads)
    wait_for_first_step(process, run_dir / "metrics.jsonl")
    process.send_signal(signum)
    _, err = process.communicate(timeout=180)

    assert process.returncode == exit_code, err
    assert "finishing this optimizer step and writing a checkpoint" in err
    assert f"resume with: lorakit train {path} --resume auto" in err
    (step, checkpoint), *_ = list_checkpoints(run_dir)
    assert 1 <= step < 40
    assert f"stopped by {signum.name} after step {step}; checkpoint: {checkpoint}" in err
    logged = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert logged[-1] >= step  # the step under way when the signal came was completed
    assert not (run_dir / "adapter").exists()

    process = launch(path, "--resume", "auto", env_threads=threads)
    _, err = process.communicate(timeout=180)
    assert process.returncode == 0, err
    assert f"resuming from {checkpoint} at step {step}/40" in " ".join(err.split())
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 41))
    assert read_checkpoint(list_checkpoints(run_dir)[-1][1]).state.step == 40
    with safe_open(run_dir / "adapter" / "adapter_model.safetensors", "pt") as handle:
        assert len(list(handle.keys())) > 0


def test_resume_auto_refuses_a_run_folder_without_checkpoints(tiny_model, write_recipe):
    path = write_recipe(tiny_model("llama"), quant=FP32, train={"max_steps": 1})
    run_dir = Path(load_recipe(path).output.dir)
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("")
    with pytest.raises(LorakitError, match="holds no checkpoint to continue from"):
        train(load_recipe(path), resume="auto")


def test_a_missing_data_file_is_one_clear_error_when_resuming(tiny_model, write_recipe):
    path = write_recipe(tiny_model("llama"), quant=FP32)
    result = CliRunner().invoke(
        app, ["train", str(path), "--resume", "auto", "--set", "data.train=nowhere.jsonl"]
    )
    assert result.exit_code == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: nowhere.jsonl: dataset file not found"], result.stderr


def test_an_abort_exits_130_saying_the_checkpoints_are_kept(tiny_model, write_recipe, monkeypatch):
    def aborted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", aborted)
    result = CliRunner().invoke(app, ["train", str(write_recipe(tiny_model("llama")))])
    assert result.exit_code == 130
    assert result.stderr.strip() == "aborted; the checkpoints written so far are intact"


@pytest.mark.parametrize("damage", ["training_state.json", "optimizer.safetensors"])
def test_resume_auto_passes_over_a_damaged_checkpoint(
    damage, tiny_model, write_recipe, monkeypatch
):
    """The newest checkpoint cut short (a full disk, a killed copy): `--resume auto` names it,
    continues from the newest intact one, and still ends where one unbroken run ends."""
    sections = dict(quant=FP32, train={**RESUMABLE, "eval_steps": 2, "save_steps": 2})
    whole = load_recipe(write_recipe(tiny_model("llama"), name="whole", **sections))
    path = write_recipe(tiny_model("llama"), name="pieces", **sections)
    one_go = train(whole)
    stop_with_signal_at_step(monkeypatch, step=4)
    with pytest.raises(TrainingStopped):
        train(load_recipe(path))
    monkeypatch.undo()
    run_dir = Path(load_recipe(path).output.dir)
    newest = run_dir / "checkpoints" / "step-4"
    assert newest.is_dir()
    file = newest / damage
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])

    code, err = resume_cli(path)
    assert code == 0, err
    said = " ".join(err.split())
    assert f"warning: {newest} is damaged: {damage}:" in said
    assert f"resuming from the newest intact checkpoint, {run_dir / 'checkpoints' / 'step-2'}" in (
        said
    )
    want, got = adapter_tensors(one_go.adapter_dir), adapter_tensors(run_dir / "adapter")
    assert all(torch.equal(want[k], got[k]) for k in want)
