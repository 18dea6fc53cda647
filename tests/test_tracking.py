"""What a run records: metrics.jsonl, TensorBoard through Accelerate's tracker, the plot."""

import json
from pathlib import Path

import pytest

from lorakit.commands.train import train
from lorakit.errors import LorakitError
from lorakit.recipe import load_recipe
from lorakit.tracking import read_metrics, tracker_config, truncate_metrics
from lorakit.training.steps import launched_one_cpu_process
from tests.conftest import FP32


def test_tensorboard_receives_every_logged_value(tiny_model, write_recipe):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = load_recipe(
        write_recipe(
            tiny_model("llama"),
            quant=FP32,
            train={"max_steps": 3, "eval_steps": 2, "report_to": "tensorboard"},
        )
    )
    result = train(recipe)
    logs = result.run_dir / "logs" / "lorakit"
    events = EventAccumulator(str(logs))
    events.Reload()
    records = read_metrics(result.run_dir)
    for tag in ("loss", "lr", "grad_norm", "eval_loss"):
        expected = [(r["step"], r[tag]) for r in records if tag in r]
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in expected], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6), tag
    assert [s for s, _ in expected] == [0, 2, 3]  # eval_loss: before, every 2 steps, at the end
    # The resolved recipe is the run's configuration.
    hparams = next(logs.rglob("hparams.yml")).read_text()
    assert "lora.r: 8" in hparams and "train.learning_rate: 0.01" in hparams


def test_a_tracker_that_is_not_installed_is_named_before_anything_is_written(
    tiny_model, write_recipe, monkeypatch
):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    recipe = load_recipe(write_recipe(tiny_model("llama"), train={"report_to": ["wandb"]}))
    with pytest.raises(LorakitError, match=r"train.report_to: wandb is not installed \(pip"):
        train(recipe)
    assert not Path(recipe.output.dir).exists()


def test_tracker_config_is_flat_scalars(tiny_model, write_recipe, tmp_path):
    config = tracker_config(load_recipe(write_recipe(tiny_model("llama"))))
    assert config["lora.r"] == 8 and config["train.optimizer"] == "adamw_torch"
    assert config["lora.target_modules"] == "all-linear"
    (dataset,) = json.loads(config["data.train"])
    assert dataset["path"] == str(tmp_path / "recipe-data.jsonl") and dataset["format"] == "auto"
    assert json.loads(config["train.report_to"]) == []
    assert all(isinstance(v, str | int | float | bool) for v in config.values())


def test_truncate_metrics_keeps_the_records_up_to_a_step(tmp_path):
    lines = [{"step": 0, "eval_loss": 3.0}, {"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    lines += [{"step": 2, "eval_loss": 1.4}, {"step": 3, "loss": 1.2}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    truncate_metrics(tmp_path, 2)
    assert read_metrics(tmp_path) == lines[:4]


def test_single_process_cpu_launch_is_recognised(monkeypatch):
    for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert launched_one_cpu_process(1)
    assert not launched_one_cpu_process(2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not launched_one_cpu_process(1)


def test_wandb_offline_and_mlflow_local_store_need_no_network(
    tiny_model, write_recipe, monkeypatch
):
    pytest.importorskip("wandb")
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recipe = load_recipe(
        write_recipe(
            tiny_model("llama"),
            quant=FP32,
            train={"max_steps": 3, "report_to": ["wandb", "mlflow"]},
        )
    )
    result = train(recipe)
    losses = [(r["step"], r["loss"]) for r in read_metrics(result.run_dir) if "loss" in r]

    client = mlflow.MlflowClient(f"sqlite:///{result.run_dir / 'logs' / 'mlflow.db'}")
    (run,) = client.search_runs(client.get_experiment_by_name("lorakit").experiment_id)
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [step for step, _ in losses]
    assert [m.value for m in history] == pytest.approx([loss for _, loss in losses])
    assert run.data.params["lora.r"] == "8"

    # wandb keeps an offline run in one protobuf log (synced later with `wandb sync`); each
    # logged value is in it as JSON text.
    (log,) = (result.run_dir / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    data = log.read_bytes()
    assert all(json.dumps(loss).encode() in data for _, loss in losses)
    assert b"train.learning_rate" in data and b"trained_tokens_per_s" in data
