"""`lorakit eval` and `lorakit generate` on tiny models built in the session: loss and perplexity
against an independent computation from the logits, memorized answers, the comparison table,
streaming chat, and one-line errors for bad input."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from lorakit.artifacts import load_target, resolve_target
from lorakit.cli import app
from lorakit.commands.evaluate import EvalOptions, load_eval_rows, prompt_token_ids, run_eval
from lorakit.commands.train import train
from lorakit.data.batching import MIN_SHARED_PREFIX, shared_prefix_length
from lorakit.decoding import greedy_continuations, stop_token_ids
from lorakit.metrics import (
    compile_regex,
    corpus_chrf,
    normalize,
    parse_metrics,
    regex_match,
    score_generations,
    sentence_chrf,
)
from lorakit.recipe import load_recipe
from tests.conftest import FACTS, build_tokenizer, fact_rows, load_adapter_as_trained, write_jsonl

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, input: str | None = None):
    result = CliRunner().invoke(app, [str(a) for a in args], input=input, env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def memorized(tiny_model, tmp_path_factory):
    """A QLoRA adapter (NF4, fp32 compute) trained to recite the eight facts."""
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


# ---------------------------------------------------------------------------------------------
# Loss and perplexity


def _independent_nll(model, tokenizer, rows) -> tuple[float, int]:
    """Sum of -log p(token) over the assistant answers (and their end-of-turn), from the full
    logits in float64; prompt and answer are tokenized separately, as a chat template splits
    them."""
    total, count = 0.0, 0
    for row in rows:
        messages = row["messages"]
        prompt = tokenizer.apply_chat_template(
            messages[:-1], tokenize=False, add_generation_prompt=True
        )
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + answer_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()
        log_probs = torch.log_softmax(logits, dim=-1)
        for position in range(len(prompt_ids), ids.shape[1]):
            total -= log_probs[position - 1, ids[0, position]].item()
            count += 1
    return total, count


def test_perplexity_equals_exp_of_mean_token_nll_from_logits(memorized, tiny_model, tmp_path):
    result, data = memorized
    base_dir = tiny_model("llama")
    options = EvalOptions(metrics=["loss", "perplexity"], dtype="float32")
    report = run_eval([str(base_dir), str(result.run_dir)], [str(data)], options)
    base_scores, adapter_scores = report.results

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    rows = fact_rows()
    base_model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    nll, count = _independent_nll(base_model, tokenizer, rows)
    assert base_scores.trained_tokens == count
    assert base_scores.scores["loss"] == pytest.approx(nll / count, abs=1e-5)
    # A random tiny model has a perplexity in the hundreds: compare it relatively.
    assert base_scores.scores["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)

    adapter = load_adapter_as_trained(base_dir, result.adapter_dir)
    nll, count = _independent_nll(adapter, tokenizer, rows)
    assert adapter_scores.trained_tokens == count
    assert adapter_scores.scores["perplexity"] == pytest.approx(math.exp(nll / count), abs=1e-5)
    assert adapter_scores.scores["perplexity"] < 0.1 * base_scores.scores["perplexity"]


def test_adapter_loss_equals_the_training_runs_final_eval_loss(memorized):
    # Same data file as training's validation set, settings read from the saved recipe.
    result, data = memorized
    report = run_eval([str(result.adapter_dir)], [str(data)], EvalOptions(metrics=["loss"]))
    (scores,) = report.results
    assert scores.kind == "adapter"
    assert scores.precision == "4-bit nf4 + double quant, float32"
    assert scores.scores["loss"] == pytest.approx(result.eval_after, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Generation


def test_exact_match_is_one_after_memorization(memorized, tiny_model):
    result, data = memorized
    options = EvalOptions(
        metrics=["exact_match", "contains", "chrf"], max_new_tokens=16, dtype="float32"
    )
    report = run_eval([str(result.run_dir), str(tiny_model("llama"))], [str(data)], options)
    adapter, base = report.results
    assert adapter.predictions == [answer for _, answer in FACTS]
    assert adapter.scores == {"exact_match": 1.0, "contains": 1.0, "chrf": 100.0}
    assert base.scores["exact_match"] == 0.0
    assert base.scores["chrf"] < 50


def _generate_one_by_one(model, prompts, stops, max_new_tokens):
    """The reference: transformers' own greedy generate, one unpadded prompt at a time."""
    answers = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        output = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
        ends = [i for i, token in enumerate(output) if token in stops]
        answers.append(output[: ends[0]] if ends else output)
    return answers


def test_batched_generation_gives_the_one_by_one_tokens(memorized):
    result, data = memorized
    loaded = load_target(resolve_target(str(result.run_dir)), CPU)
    rows = load_eval_rows([str(data)], "auto", None)
    prompts = prompt_token_ids(rows, loaded.tokenizer)
    # Prompts of different lengths, so the batch is left-padded.
    assert len({len(p) for p in prompts}) > 1
    batched = greedy_continuations(loaded.model, loaded.tokenizer, prompts, 16, batch_size=8)
    stops = stop_token_ids(loaded.model, loaded.tokenizer)
    assert batched == _generate_one_by_one(loaded.model, prompts, stops, 16)
    # Answers end at different steps: rows left the batch one after another.
    assert len({len(ids) for ids in batched}) > 1
    assert loaded.tokenizer.batch_decode(batched) == [answer for _, answer in FACTS]


DIFFERENT_STARTS = [
    "The capital of France",
    "Water boils at one hundred",
    "Arr matey",
    "abc",
    "Ice",
]
SHARED_START = [
    "The capital of France is Paris. The capital of Italy",
    "The capital of France is Paris. Water boils at",
    "The capital of France is Paris. Arr",
    "The capital of France is Paris. The",
    "The capital of France is Paris. ABC abc",
]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("texts", [DIFFERENT_STARTS, SHARED_START], ids=["own", "shared"])
def test_batched_decoding_matches_transformers_generate(arch, texts, tiny_model):
    model_dir = tiny_model(arch)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    shared = shared_prefix_length(prompts)
    assert shared >= MIN_SHARED_PREFIX if texts is SHARED_START else shared < MIN_SHARED_PREFIX
    free = _generate_one_by_one(model, prompts, [-1], 12)
    # A random model never emits EOS: make a token it does generate a stop token, so rows stop
    # at different steps (or never) and leave the batch.
    model.generation_config.eos_token_id = free[0][4]
    stops = stop_token_ids(model, tokenizer)
    expected = _generate_one_by_one(model, prompts, stops, 12)
    assert len({len(ids) for ids in expected}) > 1
    assert greedy_continuations(model, tokenizer, prompts, 12, batch_size=5) == expected


def test_prompt_tokens_are_the_training_tokens_before_the_answer(memorized):
    result, data = memorized
    tokenizer = AutoTokenizer.from_pretrained(result.adapter_dir)
    rows = load_eval_rows([str(data)], "auto", None)
    (prompt,) = prompt_token_ids(rows[:1], tokenizer)
    question, _ = FACTS[0]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.decode(prompt) == text


def test_generation_stops_at_the_templates_end_of_turn_even_when_eos_differs(tiny_model):
    tokenizer = build_tokenizer(chat=True)
    tokenizer.eos_token = "<|endoftext|>"
    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"))
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    stops = stop_token_ids(model, tokenizer)
    assert stops == sorted(tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"]))


# ---------------------------------------------------------------------------------------------
# Comparison of several targets, report files, CLI


def _merged_folder(base_dir, adapter_dir, folder):
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.save_pretrained(folder)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(folder)
    (folder / "lorakit.json").write_text("{}")
    return folder


def test_comparison_table_lists_every_target(memorized, tiny_model, tmp_path):
    result, data = memorized
    base_dir = tiny_model("llama")
    merged = _merged_folder(base_dir, result.adapter_dir, tmp_path / "merged")
    out = tmp_path / "report"
    code, _, err = run(
        "eval",
        base_dir,
        result.run_dir,
        result.adapter_dir,
        merged,
        "--data",
        data,
        "--metrics",
        "loss,perplexity,exact_match",
        "--max-new-tokens",
        "12",
        "--dtype",
        "float32",
        "--out",
        out,
    )
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    labels = [t["label"] for t in report["targets"]]
    assert labels == [base_dir.name, "run", "run#2", "merged"]
    assert [t["kind"] for t in report["targets"]] == ["model", "adapter", "adapter", "merged"]
    # The run folder and its adapter/ are the same adapter.
    assert report["targets"][1]["loss"] == report["targets"][2]["loss"]
    assert report["targets"][1]["exact_match"] == 1.0
    lines = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(lines) == len(FACTS)
    assert list(lines[0]["outputs"]) == labels
    assert lines[0]["reference"] == FACTS[0][1]

    # The rich table on stderr has one row per target.
    rows = [line for line in err.splitlines() if line.startswith("│ ")]
    for label in labels:
        assert sum(line.startswith(f"│ {label} ") for line in rows) == 1, label


def test_generate_answers_a_prompt_with_the_adapters_template(memorized):
    result, _ = memorized
    question, answer = FACTS[1]
    code, out, err = run("generate", result.run_dir, "--prompt", question, "--max-new-tokens", "16")
    assert code == 0, err
    assert out == answer + "\n"


def test_generate_chat_streams_replies_to_piped_stdin(memorized):
    result, _ = memorized
    (q1, a1), (q2, a2) = FACTS[0], FACTS[4]
    code, out, err = run(
        "generate",
        result.run_dir,
        "--chat",
        "--max-new-tokens",
        "16",
        input=f"{q1}\n/reset\n\n{q2}\n/exit\n{q1}\n",
    )
    assert code == 0, err
    assert out.splitlines() == [a1, a2]


def test_chat_without_a_chat_template_answers_each_message_alone(tiny_model):
    code, out, err = run(
        "generate", tiny_model("gpt2"), "--chat", "--max-new-tokens", "4", input="hello\nagain\n"
    )
    assert code == 0, err
    assert "no chat template; each message is answered on its own" in err
    assert out.count("\n") >= 2


def test_harness_is_skipped_with_a_message_when_not_installed(tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    code, _, err = run("eval", tiny_model("llama"), "--harness", "hellaswag")
    assert code == 0, err
    assert "--harness skipped: lm-evaluation-harness is not installed" in err


def test_harness_runs_base_and_unmerged_adapter(memorized, tiny_model, tmp_path):
    result, _ = memorized
    facts = write_jsonl(tmp_path / "harness" / "facts.jsonl", [{"q": q, "a": a} for q, a in FACTS])
    (tmp_path / "harness" / "facts.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "lorakit_facts",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(facts)}},
                "test_split": "test",
                "output_type": "loglikelihood",
                "doc_to_text": "<|im_start|>user\n{{q}}<|im_end|>\n<|im_start|>assistant\n",
                "doc_to_target": "{{a}}",
                "target_delimiter": "",
                "metric_list": [{"metric": "perplexity"}, {"metric": "acc"}],
            }
        )
    )
    code, _, err = run(
        "eval",
        tiny_model("llama"),
        result.run_dir,
        "--harness",
        "lorakit_facts",
        "--harness-include",
        tmp_path / "harness",
        "--out",
        tmp_path / "out",
    )
    assert code == 0, err
    harness = json.loads((tmp_path / "out" / "report.json").read_text())["harness"]
    base, adapter = harness[tiny_model("llama").name], harness["run"]
    assert set(base["lorakit_facts"]) == {"perplexity", "acc"}
    # The adapter is active in the harness: the memorized answers are far likelier under it.
    # (The harness scores the template's trailing newline too, which training masks, so the
    # adapter's figure is not near 1.)
    assert adapter["lorakit_facts"]["perplexity"] < 1e-6 * base["lorakit_facts"]["perplexity"]


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written


def _assert_one_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def facts_file(tmp_path):
    return write_jsonl(tmp_path / "facts.jsonl", fact_rows())


def test_target_that_is_neither_model_nor_adapter(tmp_path, facts_file):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    code, _, err = run("eval", empty, "--data", facts_file, "--out", out)
    _assert_one_error(code, err, str(empty), "neither a model folder")
    code, _, err = run("eval", facts_file, "--data", facts_file, "--out", out)
    _assert_one_error(code, err, str(facts_file), "not a model or adapter")
    code, _, err = run("generate", empty, "--prompt", "hi")
    _assert_one_error(code, err, "neither a model folder")
    assert not out.exists()


def test_data_in_an_unknown_shape(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    code, _, err = run("eval", tiny_model("llama"), "--data", data, "--out", tmp_path / "out")
    _assert_one_error(code, err, f"{data}:1", "cannot tell the dataset format")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--metrics", "loss,bleu"], ["unknown metric 'bleu'", "chrf"]),
        (["--metrics", "regex"], ["--regex PATTERN"]),
        (["--metrics", "regex", "--regex", "(unclosed"], ["--regex: invalid pattern"]),
        (["--normalize", "stem"], ["--normalize: unknown option 'stem'"]),
        (["--format", "sharegpt-ish"], ["--format: unknown format"]),
        (["--dtype", "int3"], ["--dtype: 'int3' is not one of"]),
    ],
)
def test_bad_options(args, fragments, tiny_model, facts_file, tmp_path):
    code, _, err = run("eval", tiny_model("llama"), "--data", facts_file, *args)
    _assert_one_error(code, err, *fragments)


def test_generation_metrics_on_text_rows_name_the_row(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "plain.jsonl", [{"text": "just text"}])
    code, _, err = run("eval", tiny_model("llama"), "--data", data, "--metrics", "exact_match")
    _assert_one_error(code, err, f"{data}:1", "need rows with a prompt and a reference")


def test_eval_without_data(tiny_model):
    code, _, err = run("eval", tiny_model("llama"))
    _assert_one_error(code, err, "--data")


# ---------------------------------------------------------------------------------------------
# Metrics


def test_chrf_matches_sacrebleus_published_values():
    # Values from the sacreBLEU-backed chrF metric card (char order 6, beta 2, no word n-grams).
    assert sentence_chrf(
        "The relationship between Obama and Netanyahu is not exactly friendly.",
        "The ties between Obama and Netanyahu are not particularly friendly.",
    ) == pytest.approx(61.576379378113785, abs=1e-9)
    assert corpus_chrf(
        [
            "The relationship between cats and dogs is not exactly friendly.",
            "a good bookshop is just a genteel black hole that knows how to read.",
        ],
        [
            "The relationship between dogs and cats is not exactly friendly.",
            "A good bookshop is just a genteel Black Hole that knows how to read.",
        ],
    ) == pytest.approx(84.64214891738334, abs=1e-9)
    assert sentence_chrf("same words", "same  words") == 100.0
    assert sentence_chrf("xyz", "abc") == 0.0
    # By hand: "ab" vs "abc": unigrams P=1 R=2/3, bigrams P=1 R=1/2; orders 3-6 absent on one
    # side. P=1, R=7/12, F2 = 5*P*R / (4*P + R).
    assert sentence_chrf("ab", "abc") == pytest.approx(100 * 5 * (7 / 12) / (4 + 7 / 12))


def test_normalization_and_pair_metrics():
    assert normalize("  The  Cat, sat. ", ["strip"]) == "The  Cat, sat."
    assert normalize("  The  Cat, sat. ", ["lowercase", "punctuation", "whitespace"]) == (
        "the cat sat"
    )
    totals, per_example = score_generations(
        ["Paris.", "the answer is ROME", "Berlin"],
        ["paris", "Rome", "Madrid"],
        ["exact_match", "contains"],
        ["strip", "lowercase", "punctuation"],
    )
    assert per_example == [
        {"exact_match": 1.0, "contains": 1.0},
        {"exact_match": 0.0, "contains": 1.0},
        {"exact_match": 0.0, "contains": 0.0},
    ]
    assert totals == {"exact_match": pytest.approx(1 / 3), "contains": pytest.approx(2 / 3)}
    pattern = compile_regex(r"answer is (\w+)")
    assert regex_match(pattern, "so the answer is 42.", "42") == 1.0
    assert regex_match(pattern, "so the answer is 41.", "42") == 0.0
    assert regex_match(compile_regex(r"\d+"), "I think 42", "42") == 1.0
    assert regex_match(pattern, "no idea", "42") == 0.0
    assert parse_metrics("loss, chrf,loss") == ["loss", "chrf"]


def test_data_settings_come_from_the_adapters_recipe(memorized):
    from lorakit.commands.evaluate import data_settings

    result, _ = memorized
    trained_with = resolve_target(str(result.run_dir)).data_settings
    assert data_settings(EvalOptions(), trained_with) == (64, "completions")
    assert data_settings(EvalOptions(max_seq_len=8, train_on="all"), trained_with) == (8, "all")
    assert data_settings(EvalOptions(), None) == (512, "completions")


# ---------------------------------------------------------------------------------------------
# The embedded model


@pytest.mark.slow
def test_eval_and_generate_on_the_embedded_model(tmp_path):
    data = ROOT / "examples" / "eval" / "capitals.jsonl"
    code, _, err = run(
        "eval",
        "smollm2-135m-instruct",
        "--data",
        data,
        "--limit",
        "8",
        "--max-new-tokens",
        "24",
        "--out",
        tmp_path,
    )
    assert code == 0, err
    (target,) = json.loads((tmp_path / "report.json").read_text())["targets"]
    assert target["kind"] == "model" and target["examples"] == 8
    # The instruct model names the capital in a sentence (7 of these 8 on the machine this was
    # written on: it calls Portugal its own capital): contained, never an exact match.
    assert target["contains"] >= 0.75
    assert target["exact_match"] == 0.0
    assert 1.0 < target["perplexity"] < 100.0
    code, out, err = run(
        "generate", "smollm2-135m-instruct", "--prompt", "What is the capital of France?"
    )
    assert code == 0, err
    assert "Paris" in out
