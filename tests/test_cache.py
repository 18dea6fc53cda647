"""The tokenization cache (`lorakit.data.cache`): reused while nothing it depends on changes."""

import pytest

from lorakit.data import prepare_data
from lorakit.models import load_tokenizer
from lorakit.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("private_cache")


def test_tokenization_cache_is_reused_and_invalidated(
    tmp_path, tiny_model, write_recipe, monkeypatch
):
    from lorakit.data import pipeline

    model = tiny_model("llama")
    path = write_recipe(model)
    tokenizer = load_tokenizer(str(model))
    first = prepare_data(load_recipe(path), tokenizer)
    assert [s.cached for s in first.stats["train"].datasets] == [False]
    assert len(list((tmp_path / "cache" / "data").iterdir())) == 1

    # A hit reads neither the rows nor the template: make both fail loudly.
    def fail(*args, **kwargs):
        raise AssertionError("re-tokenized")

    with monkeypatch.context() as patched:
        patched.setattr(pipeline, "read_dataset", fail)
        again = prepare_data(
            load_recipe(path, ["data.packing=true", "data.val_split=0.25", "data.validation=null"]),
            tokenizer,
        )
        assert again.stats["train"].datasets[0].cached
        reused = prepare_data(load_recipe(path), tokenizer)
    assert [(e.input_ids, e.labels) for e in reused.train] == [
        (e.input_ids, e.labels) for e in first.train
    ]
    assert reused.stats["train"].trained_tokens == first.stats["train"].trained_tokens

    def cached_after(recipe, tok):
        return prepare_data(recipe, tok).stats["train"].datasets[0].cached

    assert not cached_after(load_recipe(path, ["data.train_on=all"]), tokenizer)
    assert not cached_after(load_recipe(path, ["data.max_seq_len=32"]), tokenizer)
    other_template = load_tokenizer(str(model))
    other_template.chat_template = other_template.chat_template.replace("\n", "\n\n")
    assert not cached_after(load_recipe(path), other_template)
    data_file = load_recipe(path).data.train[0].path
    with open(data_file, "a") as handle:
        handle.write('{"text": "one more row"}\n')
    assert not cached_after(load_recipe(path), tokenizer)
    assert cached_after(load_recipe(path), tokenizer)
