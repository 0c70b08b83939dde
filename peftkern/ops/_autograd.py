"""What every family's autograd wiring shares (peftkern/ops/*: a forward op, a backward op, and
register_autograd between them)."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor


def grads_or_none(ctx, grads: Sequence[Optional[Tensor]]) -> tuple:
    """One entry per forward input: the gradient where autograd asked for it, None elsewhere (including
    the non-tensor inputs after the last gradient). The backward ops return an empty tensor for every
    gradient not asked for (custom ops may not return None, and their outputs may not alias each other)."""
    need = ctx.needs_input_grad
    return tuple(grads[i] if i < len(grads) and need[i] else None for i in range(len(need)))
