"""Model references (`lorakit.models`): what a name resolves to, and a GGUF model whose tokenizer
is read from the file before (and the same as after) its one-time conversion."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorakit.data.cache import tokenizer_fingerprint
from lorakit.errors import LorakitError
from lorakit.models import ResolvedModel, converted_folder, load_tokenizer, loadable, resolve_model


def test_references_resolve_to_their_kind(tmp_path, tiny_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = resolve_model(str(tiny_model("llama")))
    assert folder.kind == "folder" and folder.location == str(tiny_model("llama").resolve())
    assert resolve_model("some-org/some-model") == ResolvedModel(
        "some-org/some-model", "some-org/some-model", "hub"
    )
    alias = resolve_model("smollm2-135m-instruct", convert=False)
    assert alias.kind == "alias" and alias.location.endswith(".gguf")
    (tmp_path / "weights").mkdir()
    for reference, message in [
        ("missing.gguf", "GGUF file not found: missing.gguf"),
        ("weights", "weights has no config.json"),
        ("no such model", "is not a local model folder, a .gguf file, a hub id or a built-in"),
    ]:
        with pytest.raises(LorakitError, match=message):
            resolve_model(reference)


def test_a_gguf_model_is_converted_once_its_tokenizer_is_read_first(
    tmp_path, tiny_model, monkeypatch
):
    from lorakit.quantization.gguf import export_gguf

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    export_gguf(str(tiny_model("llama")), gguf, gguf_type="f32")
    before = load_tokenizer(str(gguf))
    assert not converted_folder(gguf).exists()  # read from the file's metadata

    resolved = loadable(resolve_model(str(gguf), convert=False))
    assert resolved.location == str(converted_folder(gguf)) and resolved.kind == "gguf"
    after = load_tokenizer(str(gguf))  # now from the converted folder
    assert tokenizer_fingerprint(before) == tokenizer_fingerprint(after)
    ids = torch.tensor([[5, 17, 42, 99]])
    original = AutoModelForCausalLM.from_pretrained(tiny_model("llama"))(ids).logits
    converted = AutoModelForCausalLM.from_pretrained(resolved.location)(ids).logits
    assert torch.equal(original, converted)
    assert loadable(resolved) == resolved  # a folder is used as it is
