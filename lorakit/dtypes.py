"""The floating-point types recipes and commands name: one table, from which the recipe schema,
the command-line choices and the torch dtypes are all taken.

Light on purpose (torch is imported only to turn a name into a dtype), so the command line can
list the choices without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
"""The dtypes matmuls, merged weights and unquantized tensors may take."""
AUTO = "auto"
"""Chosen from the hardware (`peft_setup.choose_compute_dtype`) or from the stored model."""
DTYPE_CHOICES = (AUTO, *COMPUTE_DTYPES)


def torch_dtype(name: str) -> torch.dtype:
    """`bfloat16` → torch.bfloat16 (any name in COMPUTE_DTYPES, or a storage dtype)."""
    import torch

    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 → `bfloat16`."""
    return str(dtype).removeprefix("torch.")
