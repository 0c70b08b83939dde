"""The sparse_diff family's bench op `sparse`: sparse_diff_apply_ and sparse_diff_linear.

What each row times:
Sparse diff, apply (into a 4096x4096 weight)
- eager:    index_put_(accumulate=True) into a copy of the weight (how a diff is applied without peftkern)
- eager_inplace: the in-place update a user writes by hand with the same result as sparse_diff_apply_:
            backup = w.view(-1)[idx] (a gather, for restoring later), then w.view(-1).index_add_(0, idx, v)
- peftkern: sparse_diff_apply_ in place, returning the backup; the duplicate check is remembered after the
            first call (the kernel's range check runs in every call)
- peftkern_fresh: the same with indices never seen before, so validation runs in the timed call
- floor:    index_put_(accumulate=True) in place: the library's cheapest call making the same update
Sparse diff, linear (forward + backward, x and values requiring grad)
- eager:    the SpIEL-style computation: clone W, scatter the values in, F.linear, dense weight gradient
- peftkern: sparse_diff_linear
- floor:    the bare frozen F.linear, forward and backward
On CUDA the linear rows also time peftkern_fused and peftkern_composite (bench/providers.py's with_variants).

Not imported by the family's __init__: only the bench reads it.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

from ..bench.declare import BenchOp, Case, dtype_name
from ..bench.providers import with_variants


@dataclasses.dataclass(frozen=True)
class SparseCase(Case):
    kind: str  # "apply" (sparse_diff_apply_) or "linear" (sparse_diff_linear forward + backward)
    n_out: int
    n_in: int
    density: float
    dtype: torch.dtype
    m: int = 0  # tokens, for "linear"

    @property
    def family(self) -> str:
        return "sparse_diff_apply" if self.kind == "apply" else "sparse_diff_linear"

    @property
    def label(self) -> str:
        tokens = f"M={self.m} " if self.kind == "linear" else ""
        return f"{self.kind} {tokens}{self.n_out}x{self.n_in} {100 * self.density:g}% {dtype_name(self.dtype)}"


def sparse_cases(device: torch.device, quick: bool = False) -> list[SparseCase]:
    """apply into 4096x4096 at 0.1%, 1%, 5%; sparse_diff_linear at 1% (GPU bf16 M=8192, CPU fp32 M=512)."""
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    if quick:
        return [SparseCase("apply", 1024, 1024, 0.01, dtype), SparseCase("linear", 1024, 1024, 0.01, dtype, m=128)]
    return ([SparseCase("apply", 4096, 4096, d, dtype) for d in (0.001, 0.01, 0.05)]
            + [SparseCase("linear", 4096, 4096, 0.01, dtype, m=8192 if gpu else 512)])


def _apply_providers(weight, idx, values) -> tuple[dict[str, Callable[[], None]], str]:
    import peftkern

    flat = weight.view(-1)

    def eager():
        weight.clone().view(-1).index_put_((idx,), values, accumulate=True)

    def eager_inplace():
        flat[idx]  # the backup a reversible apply keeps (advanced indexing copies)
        flat.index_add_(0, idx, values)

    def fused():
        peftkern.sparse_diff_apply_(weight, idx, values)

    def fused_fresh():
        peftkern.sparse_diff_apply_(weight, idx.clone(), values)

    def floor():
        flat.index_put_((idx,), values, accumulate=True)

    return ({"eager": eager, "eager_inplace": eager_inplace, "peftkern": fused, "peftkern_fresh": fused_fresh,
             "floor": floor},
            "index_put_(accumulate=True) into a copy")


def sparse_providers(case, device: torch.device) -> tuple[dict[str, Callable[[], None]], str]:
    import peftkern

    gen = torch.Generator(device="cpu").manual_seed(0)
    numel = case.n_out * case.n_in
    nnz = max(1, round(case.density * numel))
    weight = torch.randn(case.n_out, case.n_in, generator=gen).to(device=device, dtype=case.dtype)
    idx = torch.randperm(numel, generator=gen)[:nnz].sort().values.to(device)
    values = (torch.randn(nnz, generator=gen) * 1e-3).to(device=device, dtype=case.dtype)
    if case.kind == "apply":
        return _apply_providers(weight, idx, values)

    x = torch.randn(case.m, case.n_in, generator=gen).to(device=device, dtype=case.dtype).requires_grad_()
    dy = torch.randn(case.m, case.n_out, generator=gen).to(device=device, dtype=case.dtype)
    values.requires_grad_()

    def zero():
        x.grad = None
        values.grad = None

    def eager():
        w = weight.clone().view(-1).scatter_add(0, idx, values).view(weight.shape)
        F.linear(x, w).backward(dy)
        zero()

    def fused():
        peftkern.sparse_diff_linear(x, weight, idx, values).backward(dy)
        zero()

    def floor():
        F.linear(x, weight).backward(dy)
        zero()

    return (with_variants({"eager": eager, "peftkern": fused, "floor": floor}, device),
            "SpIEL-style eager (clone, scatter, dense grad)")


OPS = [
    BenchOp("sparse", 60, SparseCase, sparse_cases, sparse_providers, help="sparse_diff_apply_ and sparse_diff_linear",
            floor="apply: in-place index_put_(accumulate=True); linear: bare F.linear fwd+bwd",
            legend="sparse apply, second row: the in-place update written by hand with sparse_diff_apply_'s result "
                   "(backup = w.view(-1)[idx]; w.view(-1).index_add_(0, idx, v))"),
]
