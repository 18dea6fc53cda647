"""Exact resume, which only `lorakit train` uses: the checkpoints under `<run>/checkpoints/`.

A checkpoint (`checkpoints/step-N/`) is a complete PEFT adapter folder (`lorakit.run_folder`),
so `merge` and `eval` can start from it, plus what an exact resume needs:

- `training_state.json`: step, data position (epoch, micro-batches consumed), counters, the
  scheduler state, and the fingerprints of recipe, data and tokenizer;
- `optimizer.safetensors`: the optimizer state (bitsandbytes 8-bit state included) with its
  structure in the file's metadata;
- `rng-<rank>.json`: the python, numpy and torch random states of each process.

Nothing is pickled: a checkpoint can be loaded without running code from it. A checkpoint is
written atomically; one whose files do not read back is reported as damaged and passed over.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from peft.utils import set_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from lorakit.data.pipeline import PreparedData
from lorakit.data.sources import source_fingerprint
from lorakit.errors import LorakitError
from lorakit.files import atomic_dir, read_json, write_json
from lorakit.recipe import Recipe
from lorakit.run_folder import ADAPTER_WEIGHTS, CHECKPOINTS_DIR, write_adapter_files

STATE_FILE = "training_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")

# Recipe keys that only say what to record, not what to train: changing them between a run and
# its resume is fine (e.g. keeping more checkpoints, adding TensorBoard).
BOOKKEEPING_KEYS = (
    "output.",
    "eval.",
    "train.logging_steps",
    "train.save_steps",
    "train.save_total_limit",
    "train.report_to",
    "train.max_bad_steps",
)


# --- What a checkpoint remembers about the loop -------------------------------------------


@dataclass
class TrainingState:
    """The loop's position and counters; everything here survives a resume."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    """Micro-batches of `epoch` already consumed (per process)."""
    trained_tokens: int = 0
    trained_pairs: int = 0
    """Preference tuning counts pairs where SFT counts tokens."""
    train_seconds: float = 0.0
    last_loss: float = float("nan")
    skipped_steps: int = 0
    bad_steps_in_a_row: int = 0
    eval_before: float | None = None
    eval_loss: float | None = None
    """The eval loss measured at `step`, if there was an evaluation at that step."""
    last_eval_loss: float | None = None
    best_eval_loss: float | None = None
    best_eval_step: int | None = None
    evals_without_improvement: int = 0
    stop_reason: str | None = None
    resumed_from: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainingState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


# --- Fingerprints: is this the same run? --------------------------------------------------


def recipe_fingerprint(recipe: Recipe) -> tuple[str, dict[str, Any]]:
    """A hash of every recipe key that can change the trained weights, and those keys."""
    keys = {k: v for k, v in _flatten(recipe.to_dict()).items() if not _bookkeeping(k)}
    return _sha256_json(keys), keys


def data_fingerprint(recipe: Recipe) -> dict[str, str]:
    """A content digest of each dataset the recipe names."""
    specs = recipe.data.train + (recipe.data.validation or [])
    return {spec.path: source_fingerprint(spec.path, spec.split, spec.name) for spec in specs}


def fingerprints(recipe: Recipe, data: PreparedData) -> dict[str, Any]:
    """What a resume must find unchanged: the recipe, and the data and tokenizer digests that
    `prepare_data` computed."""
    recipe_hash, recipe_keys = recipe_fingerprint(recipe)
    return {
        "recipe": recipe_hash,
        "recipe_keys": recipe_keys,
        "data": data.source_fingerprints,
        "tokenizer": data.tokenizer_fingerprint,
    }


def describe_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One line per difference between a checkpoint's fingerprints and the current ones."""
    changes: list[str] = []
    if saved["recipe"] != current["recipe"]:
        old, new = saved["recipe_keys"], current["recipe_keys"]
        for key in sorted(old.keys() | new.keys()):
            if old.get(key, "<unset>") != new.get(key, "<unset>"):
                changes.append(
                    f"recipe changed: {key}: {old.get(key, '<unset>')!r} → "
                    f"{new.get(key, '<unset>')!r}"
                )
    old_data, new_data = saved["data"], current["data"]
    for path in sorted(old_data.keys() | new_data.keys()):
        if path not in new_data:
            changes.append(f"data changed: {path} is no longer used")
        elif path not in old_data:
            changes.append(f"data changed: {path} is new")
        elif old_data[path] != new_data[path]:
            changes.append(f"data changed: {path} has different contents")
    if saved["tokenizer"] != current["tokenizer"]:
        changes.append("tokenizer changed: vocabulary, special tokens or chat template differ")
    return changes


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _flatten(value: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, dict):
            flat.update(_flatten(item, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = item
    return flat


def _bookkeeping(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in BOOKKEEPING_KEYS)


# --- Writing and reading checkpoints ------------------------------------------------------


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS_DIR / f"step-{step}"


def write_checkpoint(
    target: Path,
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    recipe: Recipe,
    provenance: dict[str, Any],
    *,
    state: TrainingState,
    scheduler_state: dict[str, Any],
    optimizer_state: dict[str, Any],
    rng_states: list[dict[str, Any]],
    run_fingerprints: dict[str, Any],
    num_processes: int,
    adapter_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write one complete checkpoint atomically: either all of it appears, or nothing does
    and the previous checkpoints are untouched."""
    with atomic_dir(target) as staging:
        write_adapter_files(staging, model, tokenizer, recipe, provenance, adapter_state)
        tensors, structure = encode_state(optimizer_state)
        save_file(tensors, staging / OPTIMIZER_FILE, metadata={"structure": json.dumps(structure)})
        for rank, rng in enumerate(rng_states):
            write_json(staging / f"rng-{rank}.json", rng)
        write_json(
            staging / STATE_FILE,
            {
                "state": state.to_dict(),
                "scheduler": encode_state(scheduler_state)[1],
                "fingerprints": run_fingerprints,
                "num_processes": num_processes,
            },
        )
    return target


@dataclass
class Checkpoint:
    path: Path
    state: TrainingState
    scheduler_state: dict[str, Any]
    fingerprints: dict[str, Any]
    num_processes: int

    def optimizer_state(self) -> dict[str, Any]:
        with safe_open(self.path / OPTIMIZER_FILE, framework="pt") as handle:
            structure = json.loads(handle.metadata()["structure"])
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        return decode_state(structure, tensors)

    def adapter_weights(self) -> dict[str, torch.Tensor]:
        return load_file(self.path / ADAPTER_WEIGHTS)

    def rng_state(self, rank: int) -> dict[str, Any] | None:
        """This process's random state; None for a rank the checkpoint did not have (a
        resume with another process count, under --ignore-changes)."""
        path = self.path / f"rng-{rank}.json"
        return read_json(path) if path.is_file() else None


class DamagedCheckpoint(LorakitError):
    """A checkpoint folder whose files cannot be read back (cut short, edited, bit rot)."""


def read_checkpoint(path: Path) -> Checkpoint:
    """A checkpoint whose every file reads back; DamagedCheckpoint names the first that does
    not (before anything is loaded into a model)."""
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise LorakitError(
            f"--resume: {path} is not a lorakit checkpoint (no {STATE_FILE}); "
            f"checkpoints are the folders under <run>/{CHECKPOINTS_DIR}/"
        )
    name = STATE_FILE
    try:
        saved = read_json(state_file)
        checkpoint = Checkpoint(
            path=path,
            state=TrainingState.from_dict(saved["state"]),
            scheduler_state=decode_state(saved["scheduler"], {}),
            fingerprints=saved["fingerprints"],
            num_processes=saved["num_processes"],
        )
        for name in (ADAPTER_WEIGHTS, OPTIMIZER_FILE):
            with safe_open(path / name, framework="pt") as handle:
                handle.metadata()
        for rank in range(checkpoint.num_processes):
            name = f"rng-{rank}.json"
            if (path / name).is_file():
                read_json(path / name)
    except json.JSONDecodeError as exc:
        raise DamagedCheckpoint(
            f"{path} is damaged: {name}: malformed JSON at line {exc.lineno} ({exc.msg})"
        ) from None
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if isinstance(exc, KeyError | TypeError):
            reason = f"missing or malformed entry {exc}"
        raise DamagedCheckpoint(f"{path} is damaged: {name}: {reason}") from None
    return checkpoint


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (staging folders are hidden and never match)."""
    root = run_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_intact_checkpoint(run_dir: Path) -> tuple[Checkpoint | None, list[str]]:
    """The newest checkpoint that reads back, and one note per newer one that does not."""
    notes: list[str] = []
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            return read_checkpoint(path), notes
        except DamagedCheckpoint as exc:
            notes.append(str(exc))
    return None, notes


def find_checkpoint(resume: str, run_dir: Path) -> tuple[Checkpoint | None, list[str]]:
    """`auto`: the run folder's newest intact checkpoint, or None when it has none. A path: a
    checkpoint folder, or a run folder whose newest intact checkpoint is taken. The notes say
    which damaged checkpoints were passed over."""
    if resume == "auto":
        return latest_intact_checkpoint(run_dir)
    path = Path(resume)
    if not path.is_dir():
        raise LorakitError(f"--resume: {resume} is not a folder")
    if (path / STATE_FILE).is_file():
        try:
            return read_checkpoint(path), []
        except DamagedCheckpoint as exc:
            intact, _ = latest_intact_checkpoint(path.parent.parent)
            hint = f"; the newest intact one is {intact.path}" if intact else ""
            raise LorakitError(f"--resume: {exc}{hint}") from None
    if not list_checkpoints(path):
        raise LorakitError(f"--resume: {resume} holds no checkpoint")
    checkpoint, notes = latest_intact_checkpoint(path)
    if checkpoint is None:
        raise LorakitError(f"--resume: {resume} holds no intact checkpoint: {notes[0]}")
    return checkpoint, notes


def prune_checkpoints(run_dir: Path, keep_last: int | None) -> list[Path]:
    """Delete all checkpoints but the last `keep_last` and the one with the best eval loss;
    return what was deleted."""
    found = list_checkpoints(run_dir)
    if keep_last is None or len(found) <= keep_last:
        return []
    keep = {path for _, path in found[-keep_last:]}
    best = best_checkpoint(run_dir)
    if best is not None:
        keep.add(best[0])
    removed = [path for _, path in found if path not in keep]
    for path in removed:
        shutil.rmtree(path)
    return removed


def best_checkpoint(run_dir: Path) -> tuple[Path, float] | None:
    """The checkpoint with the lowest eval loss measured at its own step."""
    scored = []
    for _, path in list_checkpoints(run_dir):
        try:
            eval_loss = read_json(path / STATE_FILE)["state"].get("eval_loss")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # a damaged checkpoint is no candidate
        if eval_loss is not None:
            scored.append((eval_loss, path))
    if not scored:
        return None
    eval_loss, path = min(scored, key=lambda item: item[0])
    return path, eval_loss


def restore_adapter(model: PeftModel, weights: dict[str, torch.Tensor]) -> None:
    result = set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise LorakitError(
            f"--resume: the checkpoint's adapter does not fit this model ({unexpected[0]} ...)"
        )


# --- Random states ------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "python": _encode_value(random.getstate()),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": numpy_state["state"]["key"].tolist(),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": _bytes_to_text(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_bytes_to_text(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_decode_value(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy_state["bit_generator"],
            "state": {
                "key": np.array(numpy_state["key"], dtype=np.uint32),
                "pos": numpy_state["pos"],
            },
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    torch.set_rng_state(_text_to_bytes(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_text_to_bytes(s) for s in state["cuda"]])


def _bytes_to_text(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _text_to_bytes(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


# --- Nested state dicts as safetensors + JSON (no pickle) ---------------------------------


def encode_state(value: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (dicts, lists, tuples, numbers, tensors) into a flat dict of
    tensors and a JSON-able structure that names them."""
    tensors: dict[str, torch.Tensor] = {}
    names: dict[tuple, str] = {}

    def encode(item: Any) -> Any:
        if isinstance(item, torch.Tensor):
            # One tensor referenced twice (bitsandbytes shares its quantization maps between
            # parameters) is stored once; copies keep other views from sharing storage.
            key = (item.data_ptr(), item.dtype, tuple(item.shape), tuple(item.stride()))
            if key not in names:
                names[key] = f"t{len(tensors)}"
                tensors[names[key]] = item.detach().to("cpu", copy=True).contiguous()
            return {"$tensor": names[key]}
        return _encode_value(item, encode)

    return tensors, encode(value)


def decode_state(structure: Any, tensors: dict[str, torch.Tensor]) -> Any:
    def decode(item: Any) -> Any:
        if isinstance(item, dict) and "$tensor" in item:
            return tensors[item["$tensor"]]
        return _decode_value(item, decode)

    return decode(structure)


def _encode_value(item: Any, inner=None) -> Any:
    inner = inner or (lambda x: _encode_value(x))
    if isinstance(item, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in item):
            return {k: inner(v) for k, v in item.items()}
        return {"$items": [[inner(k), inner(v)] for k, v in item.items()]}
    if isinstance(item, tuple):
        return {"$tuple": [inner(v) for v in item]}
    if isinstance(item, list):
        return [inner(v) for v in item]
    if item is None or isinstance(item, bool | int | float | str):
        return item
    raise TypeError(f"cannot store {type(item).__name__} in a checkpoint")


def _decode_value(item: Any, inner=None) -> Any:
    inner = inner or (lambda x: _decode_value(x))
    if isinstance(item, dict):
        if "$items" in item:
            return {inner(k): inner(v) for k, v in item["$items"]}
        if "$tuple" in item:
            return tuple(inner(v) for v in item["$tuple"])
        return {k: inner(v) for k, v in item.items()}
    if isinstance(item, list):
        return [inner(v) for v in item]
    return item
