"""Text metrics for generated answers: exact match, contains, regex, chrF; with normalization.

Every metric scores one (prediction, reference) pair in [0, 1], except chrF, which is reported
as sacreBLEU reports it: 0-100, corpus-level (n-gram statistics summed over all pairs, then one
F-score), so short answers do not dominate the average.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lorakit.errors import LorakitError

LOSS_METRICS = ("loss", "perplexity")
GENERATION_METRICS = ("exact_match", "contains", "regex", "chrf")
PREFERENCE_METRICS = ("preference_accuracy",)
"""On preference rows: the share of pairs whose chosen answer gets the higher mean log-prob per
token (length-normalized, so a shorter answer is not preferred for its length alone)."""
METRICS = LOSS_METRICS + GENERATION_METRICS + PREFERENCE_METRICS
NORMALIZERS = ("strip", "lowercase", "whitespace", "punctuation")

CHRF_CHAR_ORDER = 6
CHRF_BETA = 2.0
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def parse_metrics(spec: str) -> list[str]:
    """`loss,exact_match` → ["loss", "exact_match"]; an unknown name is a one-line error."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise LorakitError(f"--metrics: no metric named (choose from {', '.join(METRICS)})")
    for name in names:
        if name not in METRICS:
            raise LorakitError(
                f"--metrics: unknown metric {name!r} (choose from {', '.join(METRICS)})"
            )
    return list(dict.fromkeys(names))


def parse_normalizers(spec: str) -> list[str]:
    names = [name.strip() for name in spec.split(",") if name.strip() and name.strip() != "none"]
    for name in names:
        if name not in NORMALIZERS:
            raise LorakitError(
                f"--normalize: unknown option {name!r} (choose from {', '.join(NORMALIZERS)}, "
                "or none)"
            )
    return list(dict.fromkeys(names))


def normalize(text: str, options: Sequence[str]) -> str:
    if "lowercase" in options:
        text = text.lower()
    if "punctuation" in options:
        text = text.translate(_PUNCTUATION)
    if "whitespace" in options:
        text = " ".join(text.split())
    if "strip" in options:
        text = text.strip()
    return text


def compile_regex(pattern: str | None) -> re.Pattern[str]:
    if pattern is None:
        raise LorakitError("--metrics regex: give the pattern with --regex PATTERN")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise LorakitError(f"--regex: invalid pattern {pattern!r}: {exc}") from None


def exact_match(prediction: str, reference: str) -> float:
    return float(prediction == reference)


def contains(prediction: str, reference: str) -> float:
    return float(reference in prediction)


def regex_match(pattern: re.Pattern[str], prediction: str, reference: str) -> float:
    """The pattern extracts the answer from the prediction (its first group if it has one),
    which must then equal the reference; no match scores 0."""
    found = pattern.search(prediction)
    if found is None:
        return 0.0
    answer = found.group(1) if pattern.groups else found.group(0)
    return float(answer == reference)


@dataclass
class ChrfStats:
    """Per n-gram order: n-grams in the hypothesis, in the reference, and in both."""

    hyp: list[int]
    ref: list[int]
    match: list[int]

    @classmethod
    def empty(cls, order: int = CHRF_CHAR_ORDER) -> ChrfStats:
        return cls([0] * order, [0] * order, [0] * order)

    def __add__(self, other: ChrfStats) -> ChrfStats:
        return ChrfStats(
            [a + b for a, b in zip(self.hyp, other.hyp, strict=True)],
            [a + b for a, b in zip(self.ref, other.ref, strict=True)],
            [a + b for a, b in zip(self.match, other.match, strict=True)],
        )


def _char_ngrams(text: str, n: int) -> Counter[str]:
    return Counter(text[i : i + n] for i in range(len(text) - n + 1))


def chrf_stats(hypothesis: str, reference: str, order: int = CHRF_CHAR_ORDER) -> ChrfStats:
    # chrF ignores whitespace: n-grams run over the characters with all whitespace removed.
    hyp, ref = "".join(hypothesis.split()), "".join(reference.split())
    stats = ChrfStats.empty(order)
    for i in range(order):
        hyp_grams, ref_grams = _char_ngrams(hyp, i + 1), _char_ngrams(ref, i + 1)
        stats.hyp[i] = sum(hyp_grams.values())
        stats.ref[i] = sum(ref_grams.values())
        stats.match[i] = sum((hyp_grams & ref_grams).values())
    return stats


def chrf_score(stats: ChrfStats, beta: float = CHRF_BETA) -> float:
    """chrF (Popović 2015) as sacreBLEU computes it by default: precision and recall averaged
    over the n-gram orders both sides have, then the F-beta score, on a 0-100 scale."""
    precision = recall = 0.0
    orders = 0
    for hyp, ref, match in zip(stats.hyp, stats.ref, stats.match, strict=True):
        if hyp > 0 and ref > 0:
            precision += match / hyp
            recall += match / ref
            orders += 1
    if orders == 0:
        return 0.0
    precision, recall = precision / orders, recall / orders
    if precision + recall == 0:
        return 0.0
    factor = beta**2
    return 100.0 * (1 + factor) * precision * recall / (factor * precision + recall)


def sentence_chrf(hypothesis: str, reference: str) -> float:
    return chrf_score(chrf_stats(hypothesis, reference))


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    total = ChrfStats.empty()
    for hypothesis, reference in zip(hypotheses, references, strict=True):
        total = total + chrf_stats(hypothesis, reference)
    return chrf_score(total)


PairMetric = Callable[[str, str], float]


def score_generations(
    predictions: Sequence[str],
    references: Sequence[str],
    metrics: Sequence[str],
    normalizers: Sequence[str],
    pattern: re.Pattern[str] | None = None,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Aggregate scores (means; corpus chrF) and per-example scores for the generation
    metrics among `metrics`."""
    pair: dict[str, PairMetric] = {"exact_match": exact_match, "contains": contains}
    if pattern is not None:
        pair["regex"] = lambda p, r: regex_match(pattern, p, r)
    pair["chrf"] = sentence_chrf
    wanted = [m for m in metrics if m in GENERATION_METRICS]
    preds = [normalize(p, normalizers) for p in predictions]
    refs = [normalize(r, normalizers) for r in references]
    per_example = [
        {name: pair[name](p, r) for name in wanted} for p, r in zip(preds, refs, strict=True)
    ]
    totals: dict[str, float] = {}
    for name in wanted:
        if name == "chrf":
            totals[name] = corpus_chrf(preds, refs)
        else:
            totals[name] = sum(s[name] for s in per_example) / max(len(per_example), 1)
    return totals, per_example
