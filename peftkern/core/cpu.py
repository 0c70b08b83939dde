"""Building blocks of peftkern's fast torch paths (the "cpu" backend of every family; the GPU composite of the
4-bit families runs them too): x walked in blocks of rows, each block's dropout multiplier made (by the C++
extension when built), used and dropped, so no [M, K] mask or dropout(x) exists at any time; products whose
float32 rank-r term meets a half-precision base result in one rounded add; the base weight dense or 4-bit.
"""
from __future__ import annotations

import torch

from . import dropout

# Rows per block: 16 MiB of x. Every block costs several parallel regions (mask, multiply, matmuls), and on
# a busy machine each region waits for its slowest thread, which may be descheduled for a whole time
# slice: many small blocks multiply that stall. Measured on the 2-core CI machine, LoRA fwd+bwd at
# M=2048 K=N=1024 r=16 fp32 p=0.1 with one busy background process: 1 MiB blocks 0.41x PEFT's eager
# speed, 4 MiB 0.92x, 16 MiB 1.13x; on the quiet machine peftkern's time was the same for all three
# (74 ms). The block's transient multiplier and dropout(x) stay bounded (2 x 16 MiB), however large M.
BLOCK_BYTES = 1 << 24
# the float32 block of the mixed-dtype add on an accelerator: big enough for full-speed GEMMs, small
# beside the [M, N] output
DEVICE_BLOCK_BYTES = 1 << 26


def row_blocks(x: torch.Tensor):
    m, k = x.shape
    if x.device.type != "cpu":  # elementwise kernels on accelerators want one big launch, not a loop
        yield 0, m
        return
    step = max(1, BLOCK_BYTES // max(1, k * x.element_size()))
    for r0 in range(0, m, step):
        yield r0, min(m, r0 + step)


def mask(x: torch.Tensor, r0: int, r1: int, seed: int, p: float, dtype: torch.dtype) -> torch.Tensor:
    return dropout.multiplier(r1 - r0, x.shape[1], seed, p, dtype=dtype, device=x.device, row_offset=r0)


def mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, out=None) -> torch.Tensor:
    """a·b computed in `dtype` (a float32 adapter beside half-precision activations runs in fp32, as in PEFT)."""
    return torch.mm(a.to(dtype), b.to(dtype), out=out)


def add_wide_product_(out: torch.Tensor, t: torch.Tensor, u: torch.Tensor, scale: float = 1.0,
                       mask_rows=None) -> None:
    """out += scale·(t·u) [⊙ mask], with t·u in t's (wider) dtype and the sum rounded once to out's dtype.

    out [M, N] (half precision), t [M, R] and u [R, N] float32. `mask_rows(r0, r1)` gives the dropout
    multiplier of rows r0:r1 in t's dtype, or None. Walks row blocks so the float32 temporary stays small."""
    m, n = out.shape
    budget = BLOCK_BYTES if out.device.type == "cpu" else DEVICE_BLOCK_BYTES
    step = max(1, budget // max(1, n * t.element_size()))
    for r0 in range(0, m, step):
        r1 = min(m, r0 + step)
        low = torch.mm(t[r0:r1], u)
        if scale != 1.0:
            low.mul_(scale)
        if mask_rows is not None:
            low.mul_(mask_rows(r0, r1))
        out[r0:r1].copy_(low.add_(out[r0:r1]))


def base_linear(x, weight, bias):
    """x·Wᵀ (+bias). `weight` is a dense tensor, or a frozen weight stored another way that computes its own
    products (a fourbit.PackedWeight, dequantized a block of rows at a time)."""
    if isinstance(weight, torch.Tensor):
        return torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
    return weight.linear(x, bias)


def base_grad_input(dy, weight):
    """dy·W, for either kind of weight (see base_linear)."""
    return torch.mm(dy, weight) if isinstance(weight, torch.Tensor) else weight.grad_input(dy)
