"""The tokenizer in a GGUF file, written the way llama.cpp's own converter writes it.

Two kinds, read from the tokenizer transformers loaded (its tokenizer.json pipeline), so the file
tokenizes like the model was trained:

- **byte-level BPE** (GPT-2, SmolLM, Llama 3, Qwen2): `tokenizer.ggml.model` `gpt2`, the
  pre-tokenizer by llama.cpp's name for it, tokens and merges;
- **SentencePiece-style BPE** with byte fallback and `▁` for spaces (Llama 2, Mistral v0.1–v0.3,
  Gemma, Phi-3): `tokenizer.ggml.model` `llama`, tokens, scores, token types (byte tokens
  `<0x..>` included) and whether a space is put before the text (`add_space_prefix`).

llama.cpp's tokenizer for the second kind merges the adjacent pair whose joined token scores
highest. A SentencePiece BPE model ranks its pieces by score; its tokenizer.json ranks merges in
the same order, so each token's score here is minus the rank of the first merge that makes it,
and both sides merge in the same order. llama.cpp's converter reads scores from tokenizer.model
with the `sentencepiece` package; tokenizer.json holds the same order and needs nothing more.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from lorakit.errors import LorakitError

# Pre-tokenizers lorakit recognizes, mapped to llama.cpp's names for them.
_GPT2_SPLIT = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"


_LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)


_QWEN2_SPLIT = _LLAMA3_SPLIT.replace("\\p{N}{1,3}", "\\p{N}")


_PRE_TOKENIZERS = {
    (("ByteLevel", True),): "gpt-2",
    (("Split", _GPT2_SPLIT), ("ByteLevel", False)): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", _LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
    (("Split", _QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",
}


SPACE = "▁"
"""SentencePiece's visible space (U+2581)."""


@dataclass(frozen=True)
class GgufTokenizer:
    """What `write_tokenizer` put in the file, for the report."""

    model: str
    """`gpt2` (byte-level BPE) or `llama` (SentencePiece-style)."""
    pre_tokenizer: str
    """llama.cpp's pre-tokenizer name (`default` for SentencePiece-style)."""
    add_space_prefix: bool | None
    """SentencePiece-style only: llama.cpp puts a space before the text (and after specials)."""
    chat_template: bool

    def describe(self) -> str:
        if self.model == "gpt2":
            return f"byte-level BPE, pre-tokenizer {self.pre_tokenizer}"
        prefix = "space prefix" if self.add_space_prefix else "no space prefix"
        return f"SentencePiece-style BPE with byte fallback, {prefix}"


def _backend_spec(tokenizer) -> dict[str, Any]:
    return json.loads(tokenizer.backend_tokenizer.to_str())


def is_sentencepiece_style(spec: dict[str, Any]) -> bool:
    return (spec.get("model") or {}).get("byte_fallback", False)


def gguf_pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer, read from its tokenizer.json."""
    spec = _backend_spec(tokenizer)
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise LorakitError(
            "GGUF export supports BPE tokenizers: byte-level (GPT-2, SmolLM, Llama 3, Qwen2) or "
            "SentencePiece-style with byte fallback (Llama 2, Mistral, Gemma, Phi-3); "
            f"this tokenizer is {model.get('type')}"
            + (
                " (llama.cpp's SentencePiece tokenizer merges pieces by score, which reproduces "
                "SentencePiece BPE, not Unigram's best segmentation)"
                if model.get("type") == "Unigram"
                else ""
            )
        )
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    shape = tuple(_pre_tokenizer_step(step) for step in steps)
    name = _PRE_TOKENIZERS.get(shape)
    normalizer = (spec.get("normalizer") or {}).get("type")
    if name is None or (normalizer and not (name == "qwen2" and normalizer == "NFC")):
        raise LorakitError(
            f"GGUF export: the tokenizer's pre-tokenizer {[s[0] for s in shape]} "
            f"(normalizer {normalizer}) is not one lorakit maps to llama.cpp "
            "(GPT-2, SmolLM, Llama 3 and Qwen2 byte-level BPE are)"
        )
    return name


def _pre_tokenizer_step(step: dict[str, Any]) -> tuple[str, Any]:
    kind = step.get("type")
    if kind == "ByteLevel":
        if step.get("add_prefix_space"):
            return (kind, "add_prefix_space")
        return (kind, step.get("use_regex", True))
    if kind == "Digits":
        return (kind, step.get("individual_digits", False))
    if kind == "Split":
        return (kind, (step.get("pattern") or {}).get("Regex"))
    return (str(kind), None)


def gguf_vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types, indexed by id (holes become unused pads)."""
    from gguf import TokenType

    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise LorakitError(
            f"GGUF export: the tokenizer has token id {max(by_id)} but the model's vocab_size "
            f"is {vocab_size}"
        )
    added = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    return tokens, types


# --- SentencePiece-style -------------------------------------------------------------------------


def sentencepiece_space_prefix(spec: dict[str, Any]) -> bool:
    """Whether the tokenizer puts `▁` before the text, in llama.cpp's terms (`add_space_prefix`).

    The pipelines transformers builds for SentencePiece models: a normalizer that prepends `▁` and
    replaces spaces (Llama 2 style, legacy), a normalizer that only replaces spaces (Gemma), or a
    Metaspace pre-tokenizer (Llama/Mistral in transformers 5) whose `prepend_scheme` is `always`,
    `first` or `never`. llama.cpp has one switch: a space before the text and after every special
    token. `first` (before the text only) is written as llama.cpp's converter writes it, from
    SentencePiece's add_dummy_prefix: on; a prompt with text right after a special token then
    tokenizes differently, which `verify_gguf` reports."""
    normalizers = _steps(spec.get("normalizer"), "normalizers")
    pre_tokenizers = _steps(spec.get("pre_tokenizer"), "pretokenizers")
    prepend = False
    replaces_spaces = False
    for step in normalizers:
        kind = step.get("type")
        if kind == "Prepend" and step.get("prepend") == SPACE:
            prepend = True
        elif kind == "Replace" and step.get("pattern", {}).get("String") == " ":
            replaces_spaces = step.get("content") == SPACE
        else:
            _refuse_sentencepiece(f"normalizer {kind}")
    metaspace = None
    for step in pre_tokenizers:
        kind = step.get("type")
        if kind == "Metaspace" and step.get("replacement") == SPACE:
            metaspace = step
        elif kind == "Split" and replaces_spaces and step.get("pattern", {}).get("String") == " ":
            continue  # Gemma's: no spaces are left to split on once they are `▁`
        else:
            _refuse_sentencepiece(f"pre-tokenizer {kind}")
    if metaspace is not None:
        if metaspace.get("split", False) and _spans_spaces(spec):
            _refuse_sentencepiece("Metaspace splitting words apart while tokens span `▁`")
        return metaspace.get("prepend_scheme", "always") in ("always", "first")
    if not replaces_spaces:
        _refuse_sentencepiece("no step that turns spaces into `▁`")
    return prepend


def _steps(node: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    if not node:
        return []
    return node.get(key, []) if node.get("type") == "Sequence" else [node]


def _spans_spaces(spec: dict[str, Any]) -> bool:
    """A token with `▁` after its first character: splitting at each `▁` would change how words
    merge (without such tokens, splitting or not tokenizes alike)."""
    return any(SPACE in token[1:] for token in spec["model"]["vocab"])


def _refuse_sentencepiece(what: str) -> None:
    raise LorakitError(
        f"GGUF export: the SentencePiece-style tokenizer has {what}, which llama.cpp's tokenizer "
        "does not reproduce (supported: spaces replaced by `▁`, with or without a `▁` before the "
        "text, as Llama 2, Mistral, Gemma and Phi-3 ship)"
    )


def sentencepiece_vocab(
    tokenizer, spec: dict[str, Any], vocab_size: int
) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and llama.cpp token types, indexed by id, as llama.cpp's converter writes
    a SentencePiece vocabulary: `<0x..>` byte tokens BYTE, the unknown token UNKNOWN, special
    added tokens CONTROL, other added tokens USER_DEFINED (their `▁` back to spaces), holes
    UNUSED pads. Scores: minus the rank of the first merge that makes the token (single
    characters, which no merge makes and llama.cpp never scores, get the lowest)."""
    from gguf import TokenType

    tokens, types = gguf_vocab(tokenizer, vocab_size)
    rank: dict[str, int] = {}
    for number, merge in enumerate(spec["model"].get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, number)
    unknown = spec["model"].get("unk_token")
    added = tokenizer.added_tokens_decoder
    # A token no merge makes is never built by transformers; llama.cpp builds it last.
    never = -1e9
    scores: list[float] = []
    for i, token in enumerate(tokens):
        if i in added:
            scores.append(-1000.0)
        else:
            scores.append(-float(rank[token]) if token in rank else never)
        if token == unknown and types[i] != TokenType.UNUSED:
            types[i] = TokenType.UNKNOWN  # also when listed among the added special tokens
        elif types[i] == TokenType.USER_DEFINED:
            tokens[i] = token.replace(SPACE, " ")
        elif types[i] == TokenType.NORMAL and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            types[i] = TokenType.BYTE
    present = set(tokens)
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in present]
    if missing:
        raise LorakitError(
            f"GGUF export: the tokenizer falls back to bytes but has no {missing[0]} token "
            f"({len(missing)} of the 256 byte tokens are missing)"
        )
    return tokens, scores, types


# --- both ----------------------------------------------------------------------------------------


def _adds_special_tokens(tokenizer) -> dict[str, bool]:
    """Whether the tokenizer puts BOS/EOS around plain text, as measured on a probe."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    start = full[:1] == [tokenizer.bos_token_id] and full[1 : 1 + len(bare)] == bare
    end = full[-1:] == [tokenizer.eos_token_id] and full[-1 - len(bare) : -1] == bare
    return {"bos": len(full) > len(bare) and start, "eos": len(full) > len(bare) and end}


def write_tokenizer(writer, tokenizer, location: str, vocab_size: int) -> GgufTokenizer:
    """Tokens, the tokenizer's rules, special tokens and the chat template, into the file."""
    import gguf

    spec = _backend_spec(tokenizer)
    sentencepiece = is_sentencepiece_style(spec)
    if sentencepiece:
        if (spec.get("model") or {}).get("type") != "BPE":
            gguf_pre_tokenizer(tokenizer)  # raises: says which kinds are supported
        space_prefix: bool | None = sentencepiece_space_prefix(spec)
        tokens, scores, types = sentencepiece_vocab(tokenizer, spec, vocab_size)
        model, pre = "llama", "default"
    else:
        space_prefix, pre = None, gguf_pre_tokenizer(tokenizer)
        tokens, types = gguf_vocab(tokenizer, vocab_size)
        model = "gpt2"
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    if sentencepiece:
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(space_prefix)
    writer.add_token_types(types)
    # gguf-py reads merges and special token ids from the folder's tokenizer files; whether BOS
    # and EOS are added, and the chat template, come from the tokenizer transformers loaded.
    special = gguf.SpecialVocab(location, load_merges=not sentencepiece, n_vocab=vocab_size)
    if not sentencepiece and not special.merges:
        raise LorakitError(f"GGUF export: no BPE merges found in {location}/tokenizer.json")
    special.add_special_token = _adds_special_tokens(tokenizer)
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = [{"name": k, "template": v} for k, v in template.items()]
    special.chat_template = template
    special.add_to_gguf(writer, quiet=True)
    return GgufTokenizer(model, pre, space_prefix, template is not None)


# llama.cpp gives models whose general.name contains one of these Phi-3's whitespace rules: every
# added token but these three swallows the whitespace after it, and it looks up "</s>" by name
# (src/llama-vocab.cpp; GGUF has no per-token flag for it).
_PHI3_NAMES = ("phi-3", "phi3")
_PHI3_KEEPS_WHITESPACE = ("<unk>", "<s>", "<|endoftext|>")


def llama_cpp_model_name(name: str, tokenizer) -> str:
    """The model's name for general.name, such that llama.cpp applies Phi-3's whitespace rules
    exactly when this tokenizer's added tokens follow them (transformers keeps the rule as an
    `rstrip` flag per token)."""
    added = tokenizer.added_tokens_decoder.values()
    vocab = tokenizer.get_vocab()
    follows = (
        bool(added)
        and all(t.rstrip == (t.content not in _PHI3_KEEPS_WHITESPACE) for t in added)
        and all(token in vocab for token in ("</s>", *_PHI3_KEEPS_WHITESPACE))
    )
    named = any(key in name.lower() for key in _PHI3_NAMES)
    if follows and not named:
        return f"{name} (phi-3 tokenizer)"
    if named and not follows:
        for key in _PHI3_NAMES:
            name = re.sub(re.escape(key), key.replace("3", " 3"), name, flags=re.IGNORECASE)
    return name
