"""multi_lora_linear's fast torch path (the "cpu" backend; the GPU composite of a 4-bit base runs it too).

Row t of x [M, K] uses adapter i = row_ids[t] (-1: none); reference.py states the math. Rows are grouped by adapter
once per call (a stable sort of the ids: one host read of the group sizes, which on CPU costs nothing), and each
adapter's rows run as BLAS products of their own rank: a group whose rows are contiguous in x (one adapter per
sequence) is a view, never a copy; a scattered group is gathered and its result added back with index_add_. The work
grows with the rows each adapter serves; an adapter no row uses costs nothing but a zero gradient. Few rows per
adapter (decode: each group a row or two) make the per-group BLAS calls dominate; there the compiled extension's row
kernel (csrc/multi_lora.cpp), when built, does the whole rank-r term in one pass over the rows (see `_rows_kernel`).
With dropout, x is walked in blocks of rows (core/cpu.py), each block's mask made once. A 4-bit base is dequantized
a block of output rows at a time (fourbit.PackedWeight), never whole.

S = dropout(x)·Aᵀ comes back as one [M, R] tensor (R = the largest rank; row t's first r_i columns hold its S,
the rest zero) in the accumulation dtype: the activation backward needs, like lora_linear's S.
The rank-r branch runs in the adapters' dtype when wider than x's (float32 adapters beside a half x, PEFT's
default), meeting the base result in one rounded add, as lora/cpu.py does.

The ids are checked where they are used: check_ids (IndexError) before any product reads an adapter through one.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

from ..core import backend as _backend, dispatch
from ..core.cpu import (
    base_grad_input as _base_grad_input,
    base_linear as _base_linear,
    mask as _mask,
    mm as _mm,
    row_blocks as _row_blocks,
)
from ..core.rules import acc_dtype, rank_dtype

Rows = Union[slice, Tensor]


def check_ids(row_ids: Tensor, n: int) -> None:
    """IndexError unless every id is in [-1, n): the one host synchronisation of a call, made where the ids are
    used (each implementation calls it before any kernel reads an adapter through an id)."""
    if row_ids.numel() == 0:
        return
    low, high = torch.aminmax(row_ids)
    low, high = int(low), int(high)
    if low < -1 or high >= n:
        bad = low if low < -1 else high
        raise IndexError(f"adapter_ids holds {bad}, outside [-1, {n}) for {n} adapter(s) (-1 selects no adapter)")


def groups(row_ids: Tensor, n: int) -> list[tuple[int, Rows]]:
    """[(adapter, rows)] for every adapter that some row uses, rows ascending: a slice when the group's rows are
    contiguous, else an int64 index tensor. Ids must be checked already (check_ids)."""
    m = row_ids.numel()
    if m == 0 or n == 0:
        return []
    ids = row_ids.to(torch.int64)
    order = torch.argsort(ids, stable=True)  # −1 first, then adapter 0, 1, ...; rows ascending in each
    counts = torch.bincount(ids + 1, minlength=n + 1)
    ends = counts.cumsum(0)
    starts = ends - counts
    first = order[starts.clamp(max=m - 1)]
    last = order[(ends - 1).clamp(min=0)]
    table = torch.stack((counts, starts, first, last)).tolist()  # one host read of 4·(n+1) integers
    out = []
    for i in range(n):
        count, start, lo, hi = (col[i + 1] for col in table)
        if count == 0:
            continue
        out.append((i, slice(lo, hi + 1) if hi - lo + 1 == count else order[start:start + count]))
    return out


def _take(t: Tensor, rows: Rows) -> Tensor:
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)


def _put(out: Tensor, rows: Rows, value: Tensor) -> None:
    """out[rows] = value."""
    if isinstance(rows, slice):
        out[rows].copy_(value)
    else:
        out.index_copy_(0, rows, value.to(out.dtype))


def _add_product_(out: Tensor, rows: Rows, t: Tensor, u: Tensor, scale: float, dtype: torch.dtype,
                  mask: Tensor | None = None) -> None:
    """out[rows] += scale·(t·u) [⊙ mask[rows]], t·u computed in `dtype` and the sum rounded once to out's dtype."""
    if isinstance(rows, slice) and dtype == out.dtype and mask is None:
        out[rows].addmm_(t.to(dtype), u.to(dtype), alpha=scale)  # in place: no temporary beyond t·u's
        return
    low = _mm(t, u, dtype)
    if scale != 1.0:
        low.mul_(scale)
    if mask is not None:
        low.mul_(_take(mask, rows))
    if dtype == out.dtype and not isinstance(rows, slice):
        out.index_add_(0, rows, low)
    else:
        _put(out, rows, low.add_(_take(out, rows).to(dtype)))


def _ranks(lora_a: Sequence[Tensor]) -> list[int]:
    return [a.shape[0] for a in lora_a]


def _dtypes(x: Tensor, lora_a, lora_b):
    rank = rank_dtype(x.dtype, lora_a[0], lora_b[0]) if len(lora_a) else x.dtype
    return acc_dtype(x.dtype), rank


def multi_forward(x, weight, lora_a, lora_b, row_ids, bias, scalings, dropout_p: float, seed: int):
    """x [M, K] -> (y [M, N] in x's dtype, S [M, max rank] in the accumulation dtype). `weight` is dense or a
    fourbit.PackedWeight."""
    n = len(lora_a)
    check_ids(row_ids, n)
    acc, rank = _dtypes(x, lora_a, lora_b)
    ranks = _ranks(lora_a)
    s_down = x.new_zeros((x.shape[0], max(ranks, default=0)), dtype=acc)
    found = None
    # the segment path needs long contiguous groups, the row kernel few rows per adapter: only one can apply, and the
    # grouping (a host read) is made here only where segments are possible
    if (dropout_p == 0.0 and isinstance(weight, torch.Tensor) and rank == x.dtype and x.device.type == "cpu"
            and x.shape[0] >= SEGMENT_MIN_ROWS and x.shape[0] > ROWS_KERNEL_MAX_ROWS_PER_ADAPTER * n):
        found = groups(row_ids, n)
        if found and all(isinstance(rows, slice) and rows.stop - rows.start >= SEGMENT_MIN_ROWS for _, rows in found):
            return _by_segment(x, weight, lora_a, lora_b, bias, scalings, found, s_down), s_down
    y = _base_linear(x, weight, bias)
    if dropout_p == 0.0 and _rows_kernel(x, y, lora_a, lora_b, row_ids, scalings, s_down):
        return y, s_down
    if dropout_p > 0.0:  # S block by block, each block's mask made once (no [M, K] mask or dropout(x))
        for r0, r1 in _row_blocks(x):
            xd = _mask(x, r0, r1, seed, dropout_p, rank).mul_(x[r0:r1])
            for i, rows in groups(row_ids[r0:r1], n):
                _put(s_down[r0:r1, :ranks[i]], rows, _mm(_take(xd, rows), lora_a[i].t(), rank))
    found = groups(row_ids, n) if found is None else found
    for i, rows in found:
        if dropout_p == 0.0:
            s = _mm(_take(x, rows), lora_a[i].t(), rank)
            _put(s_down[:, :ranks[i]], rows, s)
        else:
            s = _take(s_down, rows)[:, :ranks[i]]
        _add_product_(y, rows, s, lora_b[i].t(), float(scalings[i]), rank)
    return y, s_down


# segments shorter than this run as one base product over all rows: a short segment gains little from cache, and
# small-M products may be summed in another order by the BLAS, so results would depend on how rows are grouped
SEGMENT_MIN_ROWS = 256


def _by_segment(x, weight, lora_a, lora_b, bias, scalings, found, s_down):
    """The forward when every adapter's rows are contiguous (one adapter per sequence, prefill) on CPU: segment by
    segment, the base product into y's rows, then that segment's S and rank-r term while its x and y rows are still
    in cache, rather than one base product over all rows followed by passes over x and y from memory (measured at
    4096 rows over 8 adapters, K=N=1024, 2 threads: 1.25x against 1.50x the bare base product on a busy machine).
    Rows of no adapter (−1) get the base product alone. One dtype throughout (x's); dense weight."""
    m = x.shape[0]
    y = torch.empty((m, weight.shape[0]), dtype=x.dtype, device=x.device)
    wt = weight.t()

    def base_into(sl):
        if bias is not None:
            torch.addmm(bias, x[sl], wt, out=y[sl])
        else:
            torch.mm(x[sl], wt, out=y[sl])

    covered = 0
    for i, rows in sorted(found, key=lambda item: item[1].start):
        if rows.start > covered:
            base_into(slice(covered, rows.start))
        base_into(rows)
        s = torch.mm(x[rows], lora_a[i].t())
        s_down[rows, :s.shape[1]] = s
        y[rows].addmm_(s, lora_b[i].t(), alpha=float(scalings[i]))
        covered = rows.stop
    if covered < m:
        base_into(slice(covered, m))
    return y


def multi_backward(dy, x, weight, lora_a, lora_b, row_ids, s_down, scalings, dropout_p: float, seed: int,
                   need_x: bool, need_weight: bool, need_a: Sequence[bool], need_b: Sequence[bool], need_bias: bool):
    """Gradients (dx, dweight, [dA_i], [dB_i], dbias); entries not needed are empty tensors (distinct ones: custom
    op outputs must not alias). dA_i, dB_i of an adapter no row uses are zeros."""
    n = len(lora_a)
    acc, rank = _dtypes(x, lora_a, lora_b)
    ranks = _ranks(lora_a)
    dx, dw, dbias = (x.new_empty(0) for _ in range(3))
    da = [a.new_zeros(a.shape, dtype=acc) if need else a.new_empty(0) for a, need in zip(lora_a, need_a)]
    db = [b.new_zeros(b.shape, dtype=acc) if need else b.new_empty(0) for b, need in zip(lora_b, need_b)]
    found = groups(row_ids, n)
    # dS_t = s_i·dy_t·B_i: the gradient reaching row t's S
    ds = x.new_zeros(s_down.shape, dtype=acc)
    if need_x or any(need_a):
        for i, rows in found:
            if need_x or need_a[i]:
                _put(ds[:, :ranks[i]], rows, _mm(_take(dy, rows), lora_b[i], rank).mul_(float(scalings[i])))
    for i, rows in found:
        if need_b[i]:  # dB_i = s_i·dy_rowsᵀ·S_rows
            db[i].addmm_(_take(dy, rows).t().to(acc), _take(s_down, rows)[:, :ranks[i]], alpha=float(scalings[i]))
    if need_x:
        dx = _base_grad_input(dy, weight)
    if dropout_p > 0.0 and (need_x or any(need_a)):
        for r0, r1 in _row_blocks(x):
            mask = _mask(x, r0, r1, seed, dropout_p, rank)  # made once, for dx and then dA
            block = groups(row_ids[r0:r1], n)
            if need_x:
                for i, rows in block:
                    _add_product_(dx[r0:r1], rows, _take(ds[r0:r1], rows)[:, :ranks[i]], lora_a[i], 1.0, rank, mask)
            if any(need_a):
                xd = mask.mul_(x[r0:r1]).to(acc)  # last use of the mask: it becomes dropout(x) in place
                for i, rows in block:
                    if need_a[i]:
                        da[i].addmm_(_take(ds[r0:r1], rows)[:, :ranks[i]].t(), _take(xd, rows))
    else:
        for i, rows in found:
            if need_a[i]:  # dA_i = dS_rowsᵀ·x_rows
                da[i].addmm_(_take(ds, rows)[:, :ranks[i]].t(), _take(x, rows).to(acc))
            if need_x:
                _add_product_(dx, rows, _take(ds, rows)[:, :ranks[i]], lora_a[i], 1.0, rank)
    if need_weight:
        dw = torch.mm(dy.t(), x)
    if need_bias:
        dbias = dy.sum(dim=0, dtype=acc).to(x.dtype)
    da = [g.to(a.dtype) if need else g for g, a, need in zip(da, lora_a, need_a)]
    db = [g.to(b.dtype) if need else g for g, b, need in zip(db, lora_b, need_b)]
    return dx, dw, da, db, dbias


# The row kernel wins while an adapter serves few rows: at 64 rows over 32 adapters (K=N=1024, r=16, float32,
# 2 cores) it adds ~0.1 ms to the base product where the grouped BLAS path adds ~0.7 ms; from a few dozen rows per
# adapter on, BLAS's blocked products win (prefill: 4096 rows over 8 adapters).
ROWS_KERNEL_MAX_ROWS_PER_ADAPTER = 16


def _rows_kernel(x, y, lora_a, lora_b, row_ids, scalings, s_down) -> bool:
    """The decode shape (few rows per adapter) on CPU through the compiled extension (csrc/multi_lora.cpp): S and
    y's rank-r term in one pass over the rows. Returns False (nothing done) where it does not apply or would not
    win: not CPU, not float32/float64, adapters in another dtype than x, non-contiguous tensors, or many rows per
    adapter."""
    if x.device.type != "cpu" or x.shape[0] > ROWS_KERNEL_MAX_ROWS_PER_ADAPTER * len(lora_a):
        return False
    ext = _backend.extension()
    if ext is None or not hasattr(ext, "multi_lora_rows"):
        return False
    # the kernel itself refuses (returns False) dtypes and layouts it does not take: non-contiguous tensors,
    # adapters in another dtype than x, half precision
    return ext.multi_lora_rows(y, s_down, x.contiguous(), row_ids if row_ids.dtype == torch.int64 else row_ids.long(),
                               list(lora_a), list(lora_b), [float(v) for v in scalings])


# ---- the registered variant: the op's named arguments -----------------------------------------------------

def _base(a):
    """The weight multi_forward / multi_backward take: the dense tensor, or the 4-bit one's blocked products."""
    return a.weight if isinstance(a.weight, torch.Tensor) else a.weight.packed_weight(a.x.dtype)


def forward(a):
    return multi_forward(a.x, _base(a), a.lora_a, a.lora_b, a.row_ids, a.bias, a.scalings, a.dropout_p, a.seed)


def backward(a):
    need_weight = a.need_weight and isinstance(a.weight, torch.Tensor)  # a 4-bit base is frozen
    return multi_backward(a.dy, a.x, _base(a), a.lora_a, a.lora_b, a.row_ids, a.s_down, a.scalings, a.dropout_p,
                          a.seed, a.need_x, need_weight, a.need_lora_a, a.need_lora_b, a.need_bias)


dispatch.register("multi_lora_linear", "cpu", forward=forward, backward=backward)
