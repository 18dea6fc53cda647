"""Text metrics (`lorakit.metrics`): chrF equals sacreBLEU's published values; normalization and
the pair metrics."""

import pytest

from lorakit.metrics import (
    compile_regex,
    corpus_chrf,
    normalize,
    parse_metrics,
    regex_match,
    score_generations,
    sentence_chrf,
)


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
