"""The data pipeline (`lorakit.data.pipeline`): truncation, splits, weights, skipped rows and
tokenization, from the recipe's data section to examples."""

import pytest

from lorakit.data import prepare_data
from lorakit.data.pipeline import SplitStats, load_rows, read_dataset, tokenize_rows
from lorakit.errors import LorakitError
from lorakit.models import load_tokenizer
from lorakit.recipe import DatasetSpec, load_recipe
from tests.conftest import CONVERSATION, tokenize, write_jsonl

pytestmark = pytest.mark.usefixtures("private_cache")


def test_truncation_is_counted_and_rows_without_trained_tokens_dropped(tmp_path, tiny_model):
    tokenizer = load_tokenizer(str(tiny_model("llama")))
    long_prompt = {
        "messages": [
            {"role": "user", "content": "hello " * 50},
            {"role": "assistant", "content": "hi"},
        ]
    }
    long_answer = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello " * 50},
        ]
    }
    examples, stats = tokenize(tmp_path, [long_prompt, long_answer], tokenizer, max_seq_len=20)
    assert stats.rows == 2
    assert stats.truncated == 2
    assert stats.dropped == 1
    assert len(examples) == 1 and len(examples[0].input_ids) == 20


def test_val_split_holds_out_a_fraction(tmp_path, tiny_model, write_recipe):
    path = write_recipe(tiny_model("llama"))
    recipe = load_recipe(path, ["data.validation=null", "data.val_split=0.25"])
    data = prepare_data(recipe, load_tokenizer(str(tiny_model("llama"))))
    assert (len(data.train), len(data.validation)) == (6, 2)
    assert not {tuple(e.input_ids) for e in data.train} & {
        tuple(e.input_ids) for e in data.validation
    }


def test_text_documents_are_joined_with_eos_and_chunked(tmp_path, tiny_model):
    tokenizer = load_tokenizer(str(tiny_model("llama")))
    docs = ["The sea be wide and the wind be strong.", "Water boils at one hundred degrees."]
    stream = tokenizer(docs[0] + "<|im_end|>" + docs[1] + "<|im_end|>")["input_ids"]
    examples, stats = tokenize(tmp_path, [{"text": d} for d in docs], tokenizer, max_seq_len=8)
    assert [len(e.input_ids) for e in examples[:-1]] == [8] * (len(examples) - 1)
    assert [t for e in examples for t in e.input_ids] == stream[: len(stream) // 8 * 8] + (
        stream[len(stream) // 8 * 8 :] if len(stream) % 8 > 1 else []
    )
    assert all(e.labels == e.input_ids for e in examples)
    assert (stats.rows, stats.truncated, stats.examples) == (2, 0, len(examples))


def test_bad_rows_are_skipped_and_counted_or_stop_with_strict(tmp_path, tiny_model):
    tokenizer = load_tokenizer(str(tiny_model("llama")))
    good = {"messages": CONVERSATION[1:3]}
    rows = [
        good,
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
        {"messages": [{"role": "user", "content": ["a", "list"]}, CONVERSATION[2]]},
        {"messages": [{"role": "tool", "content": "x"}, CONVERSATION[2]]},
        {"instruction": "no messages here"},
        good,
    ]
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    loaded = load_rows([DatasetSpec(path=str(data))])
    assert len(loaded) == 2
    examples, stats = tokenize_rows(loaded, tokenizer, 256, "completions")
    assert len(examples) == 2
    source = read_dataset(DatasetSpec(path=str(data)))
    assert (source.stats.rows, source.stats.skipped) == (6, 4)
    assert source.stats.skip_reasons == [
        f"{data}:2: messages[1] (assistant) has empty content",
        f"{data}:3: messages[0] needs a string 'content'",
        f"{data}:4: messages[0] (tool) does not follow an assistant turn with tool calls",
        f"{data}:5: missing required field 'messages'",
    ]
    with pytest.raises(LorakitError, match=f"^{data}:2: messages\\[1\\] \\(assistant\\) has empty"):
        read_dataset(DatasetSpec(path=str(data)), strict=True)


def test_a_dataset_with_no_usable_row_is_an_error(tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"messages": []}, {"messages": []}])
    with pytest.raises(LorakitError) as caught:
        load_rows([DatasetSpec(path=str(data))])
    assert str(caught.value) == (
        f"{data}:1: 'messages' is empty (2 of 2 rows of {data} have a problem, "
        "none is left to train on)"
    )


def test_weights_repeat_or_sample_each_dataset(tmp_path, tiny_model, write_recipe):
    from tests.conftest import fact_rows

    model = tiny_model("llama")
    chat = write_jsonl(tmp_path / "chat.jsonl", fact_rows("chat"))
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", fact_rows("alpaca"))
    recipe = load_recipe(
        write_recipe(model),
        [f"data.train=[{{path: {chat}, weight: 2}}, {{path: {alpaca}, weight: 0.5}}]"],
    )
    data = prepare_data(recipe, load_tokenizer(str(model)))
    assert len(data.train) == 8 * 2 + 4
    first, second = data.stats["train"].datasets
    assert (first.examples, first.weight, second.examples, second.weight) == (8, 2, 8, 0.5)
    again = prepare_data(recipe, load_tokenizer(str(model)))
    assert [e.input_ids for e in again.train] == [e.input_ids for e in data.train]


def test_validation_weight_is_rejected(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data:\n  train: a.jsonl\n  validation:\n    - {path: b.jsonl, weight: 2}\n")
    with pytest.raises(LorakitError, match="weight applies to training datasets only"):
        load_recipe(path)


def test_pad_equal_to_eos_is_explained_and_masked_eos_labels_warned(tmp_path, tiny_model):
    from lorakit.data.pipeline import pad_note

    gpt2 = load_tokenizer(str(tiny_model("gpt2")))
    llama = load_tokenizer(str(tiny_model("llama")))
    assert gpt2.pad_token_id == gpt2.eos_token_id
    assert "never by token id, so the EOS closing each reply stays trained" in pad_note(gpt2)
    assert pad_note(llama) is None
    eos = gpt2.eos_token_id
    rows = [{"input_ids": [5, 6, 7, eos], "labels": [-100, 6, 7, -100]}]
    data = write_jsonl(tmp_path / "tok.jsonl", rows)
    spec = DatasetSpec(path=str(data))
    from lorakit.data.cache import tokenizer_fingerprint
    from lorakit.data.pipeline import data_warnings, dataset_examples
    from lorakit.data.sources import source_fingerprint
    from lorakit.recipe import DataSection

    digest = source_fingerprint(spec.path)
    _, stats = dataset_examples(
        spec, DataSection(train=[spec]), gpt2, tokenizer_fingerprint(gpt2), digest
    )
    assert stats.masked_eos_rows == 1
    split = SplitStats(datasets=[stats])
    assert data_warnings(gpt2, split) == [
        f"{data}: the labels of 1 rows mask the EOS that ends a trained span, so the model does "
        "not learn to stop there (pad token == EOS: they were likely masked as padding)"
    ]


def _metaspace_tokenizer():
    """A Llama-2 style tokenizer: Metaspace pre-tokenizer that marks only a text's first word."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.conftest import CORPUS

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    backend.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", bos_token="<s>")


@pytest.mark.parametrize("kind", ["chatml", "metaspace-first"])
def test_encode_texts_gives_the_tokenizers_own_ids(kind):
    from lorakit.data.pipeline import _special_token_splitter, encode_texts
    from tests.conftest import build_tokenizer

    tokenizer = build_tokenizer(chat=True) if kind == "chatml" else _metaspace_tokenizer()
    marker = "<|im_end|>" if kind == "chatml" else "</s>"
    texts = [
        f"hello{marker}\nworld{marker}{marker} sea  wide",
        f"{marker}",
        f" leading space{marker}x",
        "plain text, no marker",
        f"hello{marker}\nworld{marker}{marker} sea  wide",
    ]
    assert encode_texts(tokenizer, texts) == tokenizer(texts, add_special_tokens=False)["input_ids"]
    # Pieces are reused only where splitting cannot change the ids: for Metaspace "first" it
    # would (each piece would get a word-start mark).
    assert (_special_token_splitter(tokenizer) is None) == (kind == "metaspace-first")
    if kind == "metaspace-first":
        whole = tokenizer("sea</s>wide", add_special_tokens=False)["input_ids"]
        pieces = tokenizer(["sea", "</s>", "wide"], add_special_tokens=False)["input_ids"]
        assert whole != [t for piece in pieces for t in piece]


def test_a_folder_of_text_files_trains_end_to_end(tmp_path, tiny_model, write_recipe):
    import json

    from lorakit.commands.train import train
    from lorakit.data.sources import source_fingerprint

    docs = tmp_path / "docs"
    docs.mkdir()
    for i, text in enumerate(["The sea be wide.", "Water boils at one hundred degrees."] * 3):
        (docs / f"{i}.txt").write_text(text)
    path = write_recipe(
        tiny_model("llama"),
        data={"train": str(docs), "validation": None, "max_seq_len": 16},
        quant={"bnb_4bit_compute_dtype": "float32"},
        train={"max_steps": 1},
    )
    result = train(load_recipe(path))
    provenance = json.loads((result.adapter_dir / "lorakit.json").read_text())
    assert provenance["data"] == {str(docs): source_fingerprint(str(docs))}
    (docs / "0.txt").write_text("changed")
    assert source_fingerprint(str(docs)) != provenance["data"][str(docs)]
