"""How `lorakit merge` combines several adapters: PEFT's `add_weighted_adapter` combination types,
one entry each, from which the command's checks and its help are built.

Light on purpose (no torch, no peft), so the command line can list them without loading either.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MergeMethod:
    name: str
    summary: str
    factorwise: bool = False
    """Combines the A and B factors entry by entry, which only lines up when every adapter has
    the same rank on the same modules."""
    density: bool = False
    """Prunes each update to `--density` of its entries first (needs --density)."""


MERGE_METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        # `cat` stacks the factors, so the merged delta is exactly sum(w_i * scale_i * B_i @ A_i):
        # the plain weighted sum, with no approximation, which is what merging into weights wants.
        MergeMethod("cat", "the exact weighted sum of the updates (stacked factors)"),
        MergeMethod("linear", "weighted sum of the A and B factors", factorwise=True),
        MergeMethod("svd", "weighted sum of the updates, refactored to one rank by SVD"),
        MergeMethod("ties", "TIES: trim, elect signs, merge", factorwise=True, density=True),
        MergeMethod("dare_ties", "DARE pruning, then TIES", factorwise=True, density=True),
        MergeMethod("dare_linear", "DARE pruning, then linear", factorwise=True, density=True),
        MergeMethod(
            "magnitude_prune", "magnitude pruning, then linear", factorwise=True, density=True
        ),
    )
}
DEFAULT_METHOD = "cat"
