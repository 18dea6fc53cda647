"""The recipe: one YAML file, validated once into a typed, frozen `Recipe`.

This is the only module that knows YAML. Keys keep the names of the libraries they feed
(PEFT's `LoraConfig`, transformers' `BitsAndBytesConfig`) so the library docs apply as written.
Every problem is reported as one line ``file:line: dotted.key: what is wrong``.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from lorakit.data.formats import FORMAT_FIELDS, FORMATS
from lorakit.dtypes import COMPUTE_DTYPES, DTYPE_CHOICES
from lorakit.errors import LorakitError

TARGET_PRESETS = ("all-linear", "attention", "mlp")
OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw_torch")
TRACKERS = ("tensorboard", "wandb", "mlflow")


class _Section(BaseModel):
    # Attribute docstrings become field descriptions: the recipe reference is generated from them.
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ModelSection(_Section):
    name_or_path: str = "smollm2-135m-instruct"
    """A local Hugging Face folder, a `.gguf` file, a built-in alias, or a hub id (online)."""
    revision: str | None = None
    """A hub revision (branch, tag or commit) when `name_or_path` is a hub id."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub model. Off unless you trust its author."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """The attention kernel (transformers' `attn_implementation`); `auto`: SDPA where the
    architecture supports it, else eager (Gemma 2)."""
    adapter: str | None = None
    """Start from this adapter (a run, adapter or checkpoint folder trained on the same base)
    instead of a new one: SFT on new data, or DPO after SFT, where it is also the reference.
    Its LoRA settings replace the `lora` section's."""


class QuantSection(_Section):
    load_in_4bit: bool = True
    """Load the frozen base in 4 bits (QLoRA); `false`: plain LoRA on a full-precision base."""
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    """NF4 (information-theoretically optimal for normally distributed weights) or FP4."""
    bnb_4bit_use_double_quant: bool = True
    """Quantize the quantization constants too: saves ~0.37 bit per parameter."""
    bnb_4bit_compute_dtype: Literal[DTYPE_CHOICES] = "auto"  # type: ignore[valid-type]
    """dtype of the matmuls; `auto` = bf16 where the hardware runs it fast, else fp32."""
    bnb_4bit_quant_storage: Literal[("uint8", *COMPUTE_DTYPES)] = "uint8"  # type: ignore[valid-type]
    """Storage dtype of packed 4-bit weights; FSDP needs it equal to the compute dtype."""


class LoraSection(_Section):
    r: PositiveInt = 16
    """LoRA rank: the inner dimension of the low-rank update B·A."""
    lora_alpha: float = Field(32, gt=0)
    """Scale of the update (alpha / r, or alpha / sqrt(r) with rslora); alpha = 2r is common."""
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA input; 0 enables the fastest path."""
    target_modules: list[str] | str = "all-linear"
    """A list of module names, or one of the presets `all-linear`, `attention`, `mlp`."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases to train besides the LoRA matrices."""
    layers_to_transform: list[NonNegativeInt] | None = None
    """Put LoRA on these layer indices only (default: every layer)."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter (e.g. `lm_head` for new tokens)."""
    use_rslora: bool = False
    """Rank-stabilized LoRA: scale by alpha / sqrt(r), so high ranks keep learning."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA): learns magnitude and direction separately."""

    @field_validator("target_modules")
    @classmethod
    def _known_preset(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, str) and value not in TARGET_PRESETS:
            raise ValueError(
                f"must be a list of module names or one of {', '.join(TARGET_PRESETS)}"
            )
        if isinstance(value, list) and not value:
            raise ValueError("must name at least one module")
        return value

    @field_validator("layers_to_transform", mode="before")
    @classmethod
    def _one_layer_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, int) else value


DATA_FORMATS = ("auto", *FORMATS)


class DatasetSpec(_Section):
    path: str
    """A .jsonl, .json, .csv, .parquet or .arrow file, a folder of .txt files, a folder written by
    `datasets`' `save_to_disk`, or a hub dataset id (online). Relative to the working dir."""
    format: Literal[DATA_FORMATS] = "auto"  # type: ignore[valid-type]
    """`auto` tells it from the fields (see "Data formats" below)."""
    columns: dict[str, str] = {}
    """The file's names for the fields the format reads, e.g. `{instruction: question,
    output: answer}` or `{messages: dialog, role: speaker, content: text}`."""
    weight: float = Field(1.0, gt=0)
    """Examples per epoch as a multiple of this dataset's size: 2 repeats each example twice,
    0.5 takes a seeded random half. Training data only."""
    split: str = "train"
    """The split to read from a hub dataset or a saved `DatasetDict`."""
    name: str | None = None
    """The configuration of a hub dataset (`load_dataset`'s `name`)."""

    @field_validator("columns")
    @classmethod
    def _known_fields(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(FORMAT_FIELDS))
        if unknown:
            raise ValueError(
                f"unknown field {unknown[0]!r}: map the fields a format reads "
                f"({', '.join(FORMAT_FIELDS)}) to your file's column names"
            )
        return value


def _as_spec_list(value: Any) -> Any:
    if isinstance(value, str | dict):
        value = [value]
    if isinstance(value, list):
        return [{"path": v} if isinstance(v, str) else v for v in value]
    return value


class DataSection(_Section):
    train: list[DatasetSpec]
    """One dataset or a list of them (a path, or an entry with `path`, `format`, `columns`,
    `weight`, …)."""
    validation: list[DatasetSpec] | None = None
    """Held-out datasets for the eval loss."""
    val_split: float | None = Field(None, gt=0, lt=1)
    """Hold out this fraction of the training examples for validation (when no `validation`)."""
    max_seq_len: PositiveInt = 512
    """Longer examples are truncated (and counted); `text` documents are cut into chunks of it."""
    train_on: Literal["completions", "all", "last_turn"] = "completions"
    """`completions`: the loss covers every assistant reply and the end-of-turn token closing it
    (prompts masked); `last_turn`: only the final reply; `all`: every token."""
    train_reasoning: bool = True
    """Train the reasoning of the replies that carry it (`reasoning_content`, or `<think>…</think>`
    in the content) along with their answers: reasoning data is usually there to teach the model
    to reason. `false`: the reasoning block, its tags included, carries no loss and the answer
    after it does (traces for the model to answer from, not to imitate)."""
    chat_template: str | None = None
    """Override the model's chat template: a named one (`chatml`, `llama3`, `alpaca`) or a
    .jinja file. The template used is saved with the adapter."""
    packing: bool = False
    """Pack examples into rows of `max_seq_len` (best-fit decreasing), each example keeping its
    own positions and attending only to itself."""
    strict: bool = False
    """Stop at the first bad row instead of skipping it (skips are counted and listed)."""
    group_by_length: bool = True
    """Fill each micro-batch with examples of similar length (from a shuffled window of 64
    batches), so less compute goes to padding; `false`: plain shuffled batches."""
    shared_prefix: bool = True
    """Run the untrained prefix all examples of a micro-batch start with (e.g. the chat
    template's default system prompt) once per micro-batch, not once per example: same loss and
    gradients, less compute. Used with SDPA attention and without packing, on models where a
    check at start-up confirms it is exact."""

    @field_validator("train", "validation", mode="before")
    @classmethod
    def _accept_plain_paths(cls, value: Any) -> Any:
        return _as_spec_list(value)

    @model_validator(mode="after")
    def _one_validation_source(self) -> DataSection:
        if not self.train:
            raise ValueError("train: list at least one dataset")
        if self.validation and self.val_split:
            raise ValueError("set either validation (files) or val_split (a fraction), not both")
        if any(spec.weight != 1 for spec in self.validation or []):
            raise ValueError("validation: weight applies to training datasets only")
        return self


METHODS = ("sft", "dpo", "orpo", "simpo")
PREFERENCE_METHODS = ("dpo", "orpo", "simpo")
METHOD_SETTINGS = {
    "beta": ("dpo", "orpo", "simpo"),
    "loss_type": ("dpo",),
    "label_smoothing": ("dpo", "simpo"),
    "gamma": ("simpo",),
    "precompute_ref_log_probs": ("dpo",),
}
"""Which methods each preference setting belongs to."""
PREFERENCE_DEFAULTS = {
    "dpo": {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0,
            "precompute_ref_log_probs": False},
    "orpo": {"beta": 0.1},
    "simpo": {"beta": 0.1, "gamma": 0.5, "label_smoothing": 0.0},
}  # fmt: skip
"""TRL 1.16's defaults (DPOConfig, ORPOConfig, CPOConfig with loss_type simpo)."""


class EarlyStopping(_Section):
    patience: PositiveInt = 3
    """Stop after this many evaluations in a row without improvement."""
    min_delta: float = Field(0.0, ge=0)
    """An evaluation improves on the best so far when its loss is lower by more than this."""


class TrainSection(_Section):
    epochs: float = Field(1.0, gt=0)
    max_steps: PositiveInt | None = None
    """Optimizer steps; overrides `epochs` when set."""
    micro_batch_size: PositiveInt | Literal["auto"] = 4
    """Rows (preference: pairs) per forward. `auto`: the largest power of two that fits the
    memory plan, keeping the effective batch 4 x gradient_accumulation_steps (accumulation
    adjusted)."""
    gradient_accumulation_steps: PositiveInt = 4
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal[OPTIMIZERS] = "paged_adamw_8bit"  # type: ignore[valid-type]
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    warmup_steps: NonNegativeInt | None = None
    """Overrides `warmup_ratio` when set."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 42
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    """Recompute activations in backward instead of keeping them: less memory, slower steps.
    `auto` (default): checkpoint the fewest layers the memory plan needs (none when memory
    allows: steps are ~1.5x faster), shown with its reason at start."""
    checkpoint_every_n_layers: PositiveInt = 1
    """With gradient checkpointing, checkpoint only every n-th decoder layer (transformers'
    `every_n_layers`); the others keep their activations: faster, more memory. 1: all."""
    torch_compile: bool | Literal["auto"] = False
    """Compile every decoder layer with `torch.compile` for the training steps (evaluation and
    generation stay eager): faster steps once compiled, after a first compilation (~35-75 s on
    2 CPU cores; ~13 s when inductor's kernel cache holds an earlier run's), so for long runs.
    Uses non-re-entrant checkpointing. `auto`: on for runs of 500 micro-batches or more."""
    eval_steps: PositiveInt | None = None
    """Evaluate every N optimizer steps (always before the first and after the last)."""
    save_steps: PositiveInt | None = None
    """Write a checkpoint every N optimizer steps (always at the end and when stopped by a
    signal)."""
    save_total_limit: PositiveInt | None = 2
    """Keep the last N checkpoints, plus the one with the best eval loss; null keeps all."""
    logging_steps: PositiveInt = 1
    report_to: list[Literal[TRACKERS]] = []  # type: ignore[valid-type]
    """Trackers fed besides metrics.jsonl (through Accelerate): tensorboard, wandb, mlflow."""
    max_bad_steps: PositiveInt = 5
    """A step with a NaN/inf loss or gradient is skipped; abort after this many in a row."""
    early_stopping: EarlyStopping | None = None
    """Stop when the eval loss stops improving (needs eval_steps and validation data)."""
    method: Literal[METHODS] = "sft"  # type: ignore[valid-type]
    """`sft`: learn the answers. Preference tuning on chosen/rejected pairs: `dpo` (against a
    reference: the base with the adapter off, or the starting `model.adapter`), `orpo` and
    `simpo` (no reference). The settings below are TRL's names; each belongs to some methods."""
    beta: float | None = Field(None, gt=0)
    """dpo, orpo, simpo (default 0.1): DPO's KL weight, ORPO's λ, SimPO's reward scale."""
    loss_type: Literal["sigmoid", "ipo"] | None = None
    """dpo (default sigmoid): `sigmoid` (the DPO paper) or `ipo` (length-normalized, as TRL)."""
    label_smoothing: float | None = Field(None, ge=0, lt=0.5)
    """dpo with sigmoid, simpo (default 0): the chance a pair's label is wrong (conservative
    DPO)."""
    gamma: float | None = Field(None, ge=0)
    """simpo (default 0.5): the target reward margin (TRL's `simpo_gamma`)."""
    precompute_ref_log_probs: bool | None = None
    """dpo (default false): compute the reference log-probs of every training pair once before
    training, instead of one reference forward per step."""

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data: Any) -> Any:
        """Fill the settings of the recipe's method with TRL's defaults, so the resolved recipe
        shows them; the other methods' settings stay unset."""
        if isinstance(data, dict) and data.get("method") in PREFERENCE_DEFAULTS:
            return {**PREFERENCE_DEFAULTS[data["method"]], **data}
        return data

    @field_validator(*METHOD_SETTINGS)
    @classmethod
    def _setting_of_the_method(cls, value: Any, info: ValidationInfo) -> Any:
        method = info.data.get("method", "sft")
        owners = METHOD_SETTINGS[info.field_name]
        if value is not None and method not in owners:
            raise ValueError(
                f"a setting of train.method {' / '.join(owners)}; this recipe's method is {method}"
            )
        return value

    @field_validator("micro_batch_size", "gradient_checkpointing", "torch_compile", mode="before")
    @classmethod
    def _value_or_auto(cls, value: Any, info: ValidationInfo) -> Any:
        """One message for a value that is neither (pydantic would give one per union member)."""
        if value == "auto":
            return value
        if info.field_name == "micro_batch_size":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError("must be a positive integer or auto")
        elif not isinstance(value, bool):
            raise ValueError("must be true, false or auto")
        return value

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker_is_a_list(cls, value: Any) -> Any:
        if value is None or value == "none":
            return []
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _early_stopping_needs_evaluations(self) -> TrainSection:
        if self.early_stopping is not None and self.eval_steps is None:
            raise ValueError("early_stopping needs eval_steps (evaluate every N steps)")
        return self

    @model_validator(mode="after")
    def _smoothing_fits_the_loss(self) -> TrainSection:
        if self.loss_type == "ipo" and self.label_smoothing:
            raise ValueError("label_smoothing applies to loss_type sigmoid, not ipo")
        return self

    @model_validator(mode="after")
    def _layer_choice_needs_checkpointing(self) -> TrainSection:
        if self.checkpoint_every_n_layers > 1 and self.gradient_checkpointing is not True:
            raise ValueError(
                "checkpoint_every_n_layers needs gradient_checkpointing: true (auto chooses the "
                "layers itself)"
            )
        return self


class EvalSection(_Section):
    sample_prompts: list[str] = []
    """Prompts generated greedily before and after training, shown side by side."""
    max_new_tokens: PositiveInt = 48
    """Length limit of those generations."""


class OutputSection(_Section):
    dir: str
    """The run folder; defaults to runs/<recipe file name>."""


class Recipe(_Section):
    model: ModelSection = ModelSection()
    quant: QuantSection = QuantSection()
    lora: LoraSection = LoraSection()
    data: DataSection
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    output: OutputSection

    @model_validator(mode="after")
    def _preference_pairs_are_not_packed(self) -> Recipe:
        if self.train.method != "sft" and self.data.packing:
            raise ValueError(
                f"data.packing: train.method {self.train.method} scores each answer on its own "
                "row; preference pairs are not packed (set data.packing: false)"
            )
        return self

    @model_validator(mode="after")
    def _early_stopping_needs_validation_data(self) -> Recipe:
        if self.train.early_stopping is not None and not (
            self.data.validation or self.data.val_split
        ):
            raise ValueError(
                "train.early_stopping needs validation data (data.validation or data.val_split)"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def load_recipe(path: str | Path, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read, override and validate a recipe; raise LorakitError with one line per problem."""
    path = Path(path)
    if not path.is_file():
        raise LorakitError(f"{path}: recipe file not found")
    text = read_recipe_text(path)
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: plain data only
    except DuplicateKey as exc:
        raise LorakitError(f"{path}:{exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise LorakitError(f"{where}: malformed YAML: {problem}") from None
    if raw is None:
        raise LorakitError(
            f"{path}: the recipe is empty (it needs at least data.train; "
            "`lorakit init` writes a commented starter)"
        )
    if not isinstance(raw, dict):
        raise LorakitError(f"{path}:1: a recipe is a mapping of sections (model, data, train, …)")
    overridden = [_apply_override(raw, item) for item in overrides]
    output = raw.get("output")
    if output is None or (isinstance(output, dict) and "dir" not in output):
        raw["output"] = {**(output or {}), "dir": f"runs/{path.stem}"}
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        lines = _describe_errors(exc, path, text, overridden)
        raise LorakitError("\n".join(lines)) from None


def read_recipe_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LorakitError(
            f"{path}: not UTF-8 (byte at offset {exc.start}); re-save the recipe as UTF-8"
        ) from None


class DuplicateKey(yaml.YAMLError):
    """`line: dotted.key: duplicate key (first at line N)`."""


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last
    silently: a second `lora:` block would replace the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, str | int | float | bool) and key in first:
                raise DuplicateKey(
                    f"{line}: {self._path_of(key_node)}: duplicate key (first at line {first[key]})"
                )
            first.setdefault(key, line)
        return super().construct_mapping(node, deep=deep)

    def _path_of(self, key_node: yaml.Node) -> str:
        """The dotted key, found by walking the document from the root to this key node."""
        loc = _key_path(self._root, key_node)
        return _dotted(loc) if loc else str(key_node.value)

    def construct_document(self, node: yaml.Node) -> Any:
        self._root = node
        return super().construct_document(node)


def _key_path(node: yaml.Node, target: yaml.Node) -> tuple | None:
    """The location (keys and list indices) of the key node `target` under `node`."""
    children: list[tuple[Any, yaml.Node, yaml.Node | None]] = []
    if isinstance(node, yaml.MappingNode):
        children = [(k.value, v, k) for k, v in node.value]
    elif isinstance(node, yaml.SequenceNode):
        children = [(i, item, None) for i, item in enumerate(node.value)]
    for part, child, key_node in children:
        if key_node is target:
            return (part,)
        inner = _key_path(child, target)
        if inner is not None:
            return (part, *inner)
    return None


def _apply_override(raw: dict[str, Any], item: str) -> tuple[str, ...]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise LorakitError(f"--set {item}: expected KEY=VALUE, e.g. train.learning_rate=1e-4")
    parts = tuple(key.strip().split("."))
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise LorakitError(f"--set {item}: {part} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError:
        node[parts[-1]] = value
    return parts


def _describe_errors(
    exc: ValidationError, path: Path, text: str, overridden: list[tuple[str, ...]]
) -> list[str]:
    lines: list[str] = []
    seen: set[tuple] = set()
    for error in exc.errors():
        loc = tuple(error["loc"])
        if loc in seen:
            continue
        seen.add(loc)
        key = _dotted(loc) or "recipe"
        if error["type"] == "extra_forbidden":
            message = "unknown key" + _did_you_mean(loc)
        elif error["type"] == "missing":
            message = "missing required field"
        else:
            message = error["msg"].removeprefix("Value error, ")
            if "input" in error and not isinstance(error["input"], dict | list):
                message += f" (got {error['input']!r})"
        if any(loc[: len(o)] == o for o in overridden):
            where = "--set"
        else:
            line = _line_of(text, loc)
            where = f"{path}:{line}" if line else str(path)
        lines.append(f"{where}: {key}: {message}")
    return lines


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _section_class(loc: tuple) -> type[BaseModel] | None:
    """The schema class that owns the last key of `loc`."""
    cls: type[BaseModel] = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return None
        inner = _model_in(field.annotation)
        if inner is None:
            return None
        cls = inner
    return cls


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


# Names other fine-tuning tools use for the same settings.
_SYNONYMS = {
    "lr": "learning_rate",
    "optim": "optimizer",
    "batch_size": "micro_batch_size",
    "per_device_train_batch_size": "micro_batch_size",
    "gradient_accumulation": "gradient_accumulation_steps",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "rank": "r",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "target": "target_modules",
    "sequence_len": "max_seq_len",
    "max_length": "max_seq_len",
    "cutoff_len": "max_seq_len",
    "output_dir": "dir",
    "base_model": "name_or_path",
    "model_name_or_path": "name_or_path",
    "log_with": "report_to",
    "early_stopping_patience": "early_stopping",
    "early_stopping_threshold": "min_delta",
    "threshold": "min_delta",
}


def _did_you_mean(loc: tuple) -> str:
    cls = _section_class(loc)
    if cls is None or not isinstance(loc[-1], str):
        return ""
    synonym = _SYNONYMS.get(loc[-1])
    close = [synonym] if synonym in cls.model_fields else []
    close = close or difflib.get_close_matches(loc[-1], list(cls.model_fields), n=1, cutoff=0.5)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f" (valid keys: {', '.join(cls.model_fields)})"


def _line_of(text: str, loc: tuple) -> int | None:
    """1-based line of the YAML node at `loc`, or of its nearest existing parent."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = 1
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.value == part:
                    line = key_node.start_mark.line + 1
                    child = value_node
                    break
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value)
        ):
            child = node.value[part]
            line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line


def recipe_reference() -> str:
    """The recipe reference in Markdown, generated from the schema so it cannot drift."""
    lines = [
        "# Recipe reference",
        "",
        "Generated from `lorakit/recipe.py` by `lorakit reference`; a test checks it is current.",
    ]
    for section, field in Recipe.model_fields.items():
        cls = _model_in(field.annotation)
        if cls is None:
            continue
        lines += ["", f"## `{section}`", ""]
        if section == "data":
            lines += ["Each dataset entry (`data.train[]`, `data.validation[]`) takes:", ""]
            lines += _reference_table(DatasetSpec) + ["", "The section itself:", ""]
        lines += _reference_table(cls)
    lines += ["", "## Data formats", "", "`format: auto` tries them in this order.", ""]
    lines += ["| format | identified by | reads |", "| --- | --- | --- |"]
    for fmt in FORMATS.values():
        identified = " + ".join(f"`{f}`" for f in fmt.signature)
        lines.append(f"| `{fmt.name}` | {identified} | {fmt.summary} |")
    return "\n".join(lines) + "\n"


def _reference_table(cls: type[BaseModel]) -> list[str]:
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, field in cls.model_fields.items():
        default = "required" if field.is_required() else f"`{_yaml_value(field.default)}`"
        kind = _type_name(field.annotation)
        meaning = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{name}` | {kind} | {default} | {meaning} |")
    return rows


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) is Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    args = typing.get_args(annotation)
    if args:
        parts = [_type_name(a) for a in args if a is not type(None)]
        name = getattr(typing.get_origin(annotation), "__name__", "")
        if name == "list":
            return f"list of {parts[0]}"
        suffix = " or null" if type(None) in args else ""
        return " or ".join(parts) + suffix
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "entries"
    return getattr(annotation, "__name__", str(annotation))
