"""The dropout mask of every peftkern backend, in plain torch.

One definition serves the reference path, the C++ extension (csrc/dropout.cpp) and the Triton
kernels (kernels/dropout.py), so a seed gives the same mask on every backend and the tests can
compare backends bit for bit with dropout on.

The mask of a 2-D view x[M, K] (row-major logical order, whatever the strides) is:
  - columns are taken in groups of eight: group j of row m has counter  m * ceil(K / 8) + j  (64-bit);
  - Philox4x32-10 with key (seed & 0xffffffff, seed >> 32) and counter (lo32, hi32, 0, 0) gives four
    32-bit words r0..r3; column 8j + 2w + h uses u = the 16-bit half h of word r_w (h = 0: the low
    half), so one Philox call feeds eight elements;
  - the element is kept iff u >= threshold, threshold = round(p * 2**16), and kept elements are scaled
    by 1 / (1 - p). So p takes effect at a resolution of 2**-16 (p = 0.1 keeps each element with
    probability 0.899994; a p below 2**-17 keeps everything).
Philox is `tl.philox` of Triton with those arguments; here it is spelled out with int64 torch ops,
which is exact but slow, which is why the CPU path prefers the C++ version when it is built.
"""
from __future__ import annotations

import torch

from .rules import COLS_PER_CALL, UNIFORM_BITS, keep_threshold  # noqa: F401  (UNIFORM_BITS: tests)

_MASK32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
N_ROUNDS = 10


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi32, lo32) of a * b for a 32-bit constant a and a tensor b of 32-bit values in int64.

    int64 cannot hold a 64-bit product, so b is split in 16-bit halves; every partial fits.
    """
    p_lo = a * (b & 0xFFFF)  # < 2**48
    p_hi = a * (b >> 16)  # < 2**48
    mid = ((p_hi & 0xFFFF) << 16) + p_lo  # < 2**49
    lo = mid & _MASK32
    hi = (p_hi >> 16) + (mid >> 32)
    return hi & _MASK32, lo


def philox4x32(counter: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of the 64-bit counters `counter` (int64 tensor) under `seed`."""
    c0 = counter & _MASK32
    c1 = (counter >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(N_ROUNDS):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def keep_mask(rows: int, cols: int, seed: int, p: float, device=None, row_offset: int = 0) -> torch.Tensor:
    """Bool [rows, cols]: True where dropout keeps element (row_offset + m, k) of an input with `cols` columns."""
    groups = (cols + COLS_PER_CALL - 1) // COLS_PER_CALL
    counter = torch.arange(row_offset * groups, (row_offset + rows) * groups, device=device, dtype=torch.int64)
    words = torch.stack(philox4x32(counter, seed), dim=-1)  # [rows * groups, 4]
    halves = torch.stack((words & 0xFFFF, words >> 16), dim=-1)  # [rows * groups, 4, 2]: column 2w + h
    uniforms = halves.view(rows, groups * COLS_PER_CALL)[:, :cols]
    return uniforms >= keep_threshold(p)


def multiplier(rows: int, cols: int, seed: int, p: float, *, dtype, device, row_offset: int = 0) -> torch.Tensor:
    """[rows, cols] of keep / (1 - p): multiply a block of rows of the input by it to apply dropout.

    Uses the compiled extension when it is built for the device (one pass), else the torch spelling above."""
    from . import backend as _backend

    device = torch.device(device) if device is not None else torch.device("cpu")
    ext = _backend.extension()
    compiled = ext is not None and (
        (device.type == "cpu" and dtype in (torch.float32, torch.float64)) or (device.type == "cuda" and ext.with_cuda))
    if compiled:
        out = torch.empty((rows, cols), dtype=dtype, device=device)
        _backend.call_extension("dropout_multiplier", device, out, row_offset, seed, keep_threshold(p), 1.0 / (1.0 - p))
        return out
    keep = keep_mask(rows, cols, seed, p, device=device, row_offset=row_offset)
    return keep.to(dtype) * (1.0 / (1.0 - p))


def plain_multiplier(x: torch.Tensor, seed: int, p: float, dtype: torch.dtype) -> torch.Tensor:
    """keep / (1 - p) for every element of x [M, K] in `dtype` (all ones without dropout), in plain torch only
    (never the extension): what the oracles multiply x by to apply dropout."""
    if p == 0.0:
        return torch.ones(x.shape, dtype=dtype, device=x.device)
    return keep_mask(x.shape[0], x.shape[1], seed, p, device=x.device).to(dtype) / (1.0 - p)
