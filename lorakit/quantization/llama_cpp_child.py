"""What runs in the child process that loads llama.cpp (`lorakit.isolated`): only numpy and
llama_cpp are imported here, so the child starts in a fraction of a second instead of the
seconds that torch and transformers take to import."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def llama_cpp_scores(
    gguf_file: str,
    texts: list[str],
    sequences: list[list[int]],
    starts: list[int],
    workdir: str,
) -> list[dict[str, Any]]:
    """In the child process: llama.cpp's tokens for each text, and its logits at positions
    `start - 1 …` of each token sequence (those that predict the continuation), saved as
    .npy files in `workdir`."""
    import numpy as np
    from llama_cpp import Llama

    # One thread: ggml's worker threads spin while they wait, which on a busy 2-core machine
    # made a 60-token pass take seconds instead of milliseconds.
    llm = Llama(
        model_path=gguf_file,
        n_ctx=max(len(sequence) for sequence in sequences) + 8,
        logits_all=True,
        verbose=False,
        n_threads=1,
        n_threads_batch=1,
    )
    results = []
    for number, (text, sequence, start) in enumerate(zip(texts, sequences, starts, strict=True)):
        prompt_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        llm.reset()
        llm.eval(sequence)
        logits = np.asarray(llm.scores[start - 1 : len(sequence) - 1], dtype=np.float32)
        name = f"logits-{number}.npy"
        np.save(Path(workdir) / name, logits)
        results.append({"prompt_ids": list(prompt_ids), "logits": name})
    llm.close()
    return results


def llama_cpp_tokenize(gguf_file: str, text: str, workdir: str) -> list[int]:
    """In the child process: the ids llama.cpp's tokenizer gives `text` (BOS as it adds it)."""
    from llama_cpp import Llama

    llm = Llama(model_path=gguf_file, vocab_only=True, verbose=False)
    return list(llm.tokenize(text.encode("utf-8")))
