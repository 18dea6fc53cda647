"""Checkpoints: state round trips without pickle, fingerprints, pruning, and save failures
(a full disk, a read-only folder) that leave the previous checkpoint intact."""

import hashlib
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import bitsandbytes as bnb
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.commands.train import train
from lorakit.errors import LorakitError
from lorakit.recipe import load_recipe
from lorakit.resume import (
    STATE_FILE,
    capture_rng_state,
    decode_state,
    describe_changes,
    encode_state,
    list_checkpoints,
    prune_checkpoints,
    read_checkpoint,
    restore_rng_state,
)
from tests.conftest import FP32


def _two_optimizers(kind: str):
    torch.manual_seed(0)
    shapes = [(64, 80), (80, 64), (16,)]  # the first two get 8-bit state (>= 4096 values)
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    make = {
        "adamw_torch": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        "paged_adamw_8bit": lambda ps: bnb.optim.PagedAdamW8bit(ps, lr=1e-2),
    }[kind]
    return params, make(params), twins, make(twins)


def _step(params, optimizer, seed):
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    optimizer.step()


@pytest.mark.parametrize("kind", ["adamw_torch", "paged_adamw_8bit"])
def test_optimizer_state_round_trips_through_safetensors(kind, tmp_path):
    params, optimizer, twins, fresh = _two_optimizers(kind)
    for seed in range(3):
        _step(params, optimizer, seed)
    tensors, structure = encode_state(optimizer.state_dict())
    save_file(tensors, tmp_path / "opt.safetensors", metadata={"s": json.dumps(structure)})
    if kind == "paged_adamw_8bit":
        assert any(t.dtype == torch.uint8 for t in tensors.values())
    loaded = decode_state(
        json.loads(json.dumps(structure)), load_file(tmp_path / "opt.safetensors")
    )

    with torch.no_grad():
        for twin, p in zip(twins, params, strict=True):
            twin.copy_(p)
    fresh.load_state_dict(loaded)
    for seed in range(3, 6):
        _step(params, optimizer, seed)
        _step(twins, fresh, seed)
    for p, twin in zip(params, twins, strict=True):
        assert torch.equal(p, twin)


def test_encoding_keeps_tuples_int_keys_and_special_floats():
    value = {"state": {0: {"step": 3}}, "groups": [{"betas": (0.9, 0.99), "x": None}]}
    value["groups"][0]["nan"] = float("inf")
    tensors, structure = encode_state(value)
    assert tensors == {}
    assert decode_state(json.loads(json.dumps(structure)), {}) == value


def test_rng_states_round_trip():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    saved = json.loads(json.dumps(capture_rng_state()))
    first = (random.random(), np.random.standard_normal(), torch.rand(3))
    restore_rng_state(saved)
    second = (random.random(), np.random.standard_normal(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1]
    assert torch.equal(first[2], second[2])


def test_describe_changes_names_each_difference():
    saved = {
        "recipe": "a",
        "recipe_keys": {"train.learning_rate": 0.01, "lora.r": 8},
        "data": {"train.jsonl": "1", "old.jsonl": "2"},
        "tokenizer": "t",
    }
    current = {
        "recipe": "b",
        "recipe_keys": {"train.learning_rate": 0.02, "lora.r": 8, "lora.use_dora": True},
        "data": {"train.jsonl": "3", "new.jsonl": "4"},
        "tokenizer": "u",
    }
    assert describe_changes(saved, current) == [
        "recipe changed: lora.use_dora: '<unset>' → True",
        "recipe changed: train.learning_rate: 0.01 → 0.02",
        "data changed: new.jsonl is new",
        "data changed: old.jsonl is no longer used",
        "data changed: train.jsonl has different contents",
        "tokenizer changed: vocabulary, special tokens or chat template differ",
    ]
    assert describe_changes(saved, saved) == []


def _fake_checkpoint(run_dir: Path, step: int, eval_loss: float | None) -> None:
    folder = run_dir / "checkpoints" / f"step-{step}"
    folder.mkdir(parents=True)
    (folder / STATE_FILE).write_text(json.dumps({"state": {"step": step, "eval_loss": eval_loss}}))


def test_prune_keeps_the_last_k_and_the_best(tmp_path):
    for step, eval_loss in [(10, 2.0), (20, 1.2), (30, None), (40, 1.5), (50, 1.9)]:
        _fake_checkpoint(tmp_path, step, eval_loss)
    (tmp_path / "checkpoints" / ".step-60.tmp-x").mkdir()  # an unfinished write: never listed
    removed = prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == ["step-10", "step-30"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [20, 40, 50]
    assert prune_checkpoints(tmp_path, keep_last=None) == []


def _mount(*args: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a filesystem needs root")
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount here: {result.stderr.strip()}")


def _disk_pages(paths) -> int:
    """Bytes a tmpfs needs for these files (whole 4 KiB pages)."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in paths if p.is_file())


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def tiny_disk(tmp_path):
    """A tmpfs mount point; unmounted afterwards."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_full_disk_keeps_the_previous_checkpoint_and_resume_recovers(
    tiny_model, write_recipe, tmp_path, tiny_disk
):
    sections = dict(quant=FP32, train={"max_steps": 4, "save_steps": 2, "save_total_limit": 1})
    # Measure one checkpoint on an ordinary disk first.
    probe = load_recipe(write_recipe(tiny_model("llama"), name="probe", **sections))
    train(probe)
    run = Path(probe.output.dir)
    checkpoint_bytes = _disk_pages((run / "checkpoints" / "step-4").rglob("*"))
    other_bytes = _disk_pages([run / "metrics.jsonl", run / "recipe.resolved.yaml"])
    # Room for one checkpoint and a half: the second write must fail half-way.
    size = other_bytes + checkpoint_bytes + checkpoint_bytes // 2
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(tiny_disk))

    recipe = load_recipe(
        write_recipe(tiny_model("llama"), **sections), [f"output.dir={tiny_disk / 'run'}"]
    )
    with pytest.raises(LorakitError) as failed:
        train(recipe)
    message = str(failed.value)
    previous = tiny_disk / "run" / "checkpoints" / "step-2"
    assert f"cannot write {tiny_disk / 'run' / 'checkpoints' / 'step-4'}" in message
    assert "No space left on device" in message
    assert f"the previous checkpoint {previous} is intact" in message
    assert sorted(p.name for p in previous.parent.iterdir()) == ["step-2"]  # no half write
    assert read_checkpoint(previous).state.step == 2
    assert len(read_checkpoint(previous).optimizer_state()["state"]) > 0
    assert load_file(previous / "adapter_model.safetensors")

    _mount("-o", "remount,size=16m", str(tiny_disk))
    result = train(recipe, resume="auto")
    assert result.steps == 4 and result.resumed_from == [str(previous)]
    assert (tiny_disk / "run" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.fixture
def read_only(tmp_path):
    """Make a folder read-only for real (a read-only bind mount as root, chmod otherwise)."""
    undo = []

    def make(folder: Path) -> None:
        if os.geteuid() == 0:
            _mount("--bind", str(folder), str(folder))
            undo.append(lambda: subprocess.run(["umount", "-l", str(folder)], check=True))
            _mount("-o", "remount,bind,ro", str(folder))
        else:
            folder.chmod(0o555)
            undo.append(lambda: folder.chmod(0o755))

    def restore() -> None:
        while undo:
            undo.pop()()

    make.restore = restore
    yield make
    restore()


def test_read_only_folder_keeps_the_previous_checkpoint(tiny_model, write_recipe, read_only):
    recipe = load_recipe(
        write_recipe(tiny_model("llama"), quant=FP32, train={"max_steps": 4, "save_steps": 2})
    )
    whole = train(recipe)
    expected = load_file(whole.adapter_dir / "adapter_model.safetensors")
    run = Path(recipe.output.dir)
    # As if the run had been preempted after step 2, and its disk then became read-only.
    shutil.rmtree(run / "checkpoints" / "step-4")
    shutil.rmtree(run / "adapter")
    previous = run / "checkpoints" / "step-2"
    before = _tree_digest(previous)
    read_only(run / "checkpoints")

    with pytest.raises(LorakitError) as failed:
        train(recipe, resume="auto")
    message = str(failed.value)
    assert f"cannot write {run / 'checkpoints' / 'step-4'}" in message
    assert "Read-only file system" in message or "Permission denied" in message
    assert f"the previous checkpoint {previous} is intact" in message
    assert _tree_digest(previous) == before

    read_only.restore()
    result = train(recipe, resume="auto")
    got = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert all(torch.equal(expected[k], got[k]) for k in expected)
