"""The numeric rules every backend follows, one definition each: the kernels, the ops, the references and
the C++ extension (which restates the dropout constants in csrc/philox.h, checked by tests) all read them
here. Plain Python and torch only: anything may import this module."""
from __future__ import annotations

import torch

# ---- dtypes ------------------------------------------------------------------------------------------

def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """What products accumulate in: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rank_dtype(x_dtype: torch.dtype, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.dtype:
    """The dtype of the rank-r branch: x's, or the adapters' when wider (float32 adapters beside half x)."""
    return torch.promote_types(torch.promote_types(x_dtype, lora_a.dtype), lora_b.dtype)


# ---- dropout -----------------------------------------------------------------------------------------
UNIFORM_BITS = 16  # each kept/dropped decision reads a 16-bit uniform
COLS_PER_CALL = 8  # one Philox4x32 call feeds eight columns (csrc/philox.h kColsPerCall, kernels/dropout.py)
SEED_LIMIT = 2**63  # seeds are in [0, 2**63)


def keep_threshold(p: float) -> int:
    """Integer threshold on the 16-bit uniform: an element is kept iff u >= threshold."""
    return int(round(p * (1 << UNIFORM_BITS)))


# ---- activations (bottleneck adapters) -----------------------------------------------------------------
# public name -> the code the kernels and the reference share; "swish" is an alias of "silu"
ACTIVATION_CODES = {"identity": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4, "swish": 4, "tanh": 5}
ACTIVATION_NAMES = ("relu", "gelu", "gelu_tanh", "silu", "swish", "tanh", "identity")

# ---- CUDA launch limits ------------------------------------------------------------------------------
MAX_GRID_X = 2**31 - 1  # programs on a grid's first axis
MAX_GRID_YZ = 65535  # programs on its second and third axes
