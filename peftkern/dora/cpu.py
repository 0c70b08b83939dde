"""dora_linear's fast torch path (the "cpu" backend, for dense and 4-bit bases; the Triton backend's 4-bit
composite runs it too).

With c = magnitude / n, n_j = ‖W_j + s·(B·A)_j‖₂ (a constant in backward), d = dropout(x), S = d·Aᵀ, R = s·S·Bᵀ:

    p = 0 (or eval):  z = x·Wᵀ + R                y = c ⊙ z + bias
    p > 0:            z = d·Wᵀ + R                y = x·Wᵀ + bias + (c − 1) ⊙ (d·Wᵀ) + c ⊙ R

(PEFT's DoRA Linear; the second form is the first when d = x.) A row with n_j = 0 has c_j = 0 (column_scale). z is
what the magnitude's gradient needs, dmag = Σ_m dy ⊙ z / n; it is kept only when the magnitude requires grad. The
rest of the backward is LoRA's on gc = dy ⊙ c (lora/cpu.py's own code), plus, with dropout, the base path's two
products: dx = dy·W + mask ⊙ ((gc − dy)·W + dS·A) / (1 − p).

The weight may be a dense tensor or a fourbit.PackedWeight (anything with `row_blocks()`, `linear()` and
`grad_input()`). Neither W + ΔW nor ΔW is ever formed whole: the norm is taken a block of rows at a time (at most
16 MiB of float32 and at most half the rows), in the accumulation dtype, as PEFT's dense formula computes it (no
expansion whose terms could cancel). With dropout, dropout(x) is made a block of rows at a time from the
regenerated mask, as in lora/cpu.py: keep ⊙ x exactly (no rounding) times 1/(1 − p) in float32.

column_scale and magnitude_grad are the zero-norm convention every fast path (this one, the Triton variants,
peftkern.nn's merge) computes c and dmag through.
"""
from __future__ import annotations

import torch

from ..core import cpu, dispatch, rules
from ..lora import cpu as lora_cpu


def _weight_rows(weight, dtype: torch.dtype):
    """(r0, r1, rows [r1 - r0, in]) blocks of the frozen weight, in `dtype` where the weight is packed."""
    if not isinstance(weight, torch.Tensor):
        yield from weight.row_blocks()
        return
    out_features, in_features = weight.shape
    step = max(1, min(cpu.BLOCK_BYTES // max(1, 4 * in_features), -(-out_features // 2)))
    for r0 in range(0, out_features, step):
        r1 = min(out_features, r0 + step)
        yield r0, r1, weight[r0:r1]


def weight_norm(weight, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, acc: torch.dtype,
                device) -> torch.Tensor:
    """n [out] in `acc`: the L2 norm of each row of W + scaling·lora_b·lora_a, one block of rows at a time."""
    out_features = lora_b.shape[0]
    n = torch.empty(out_features, device=device, dtype=acc)
    a = lora_a.to(acc)
    for r0, r1, rows in _weight_rows(weight, acc):
        block = torch.addmm(rows.to(acc), lora_b[r0:r1].to(acc), a, alpha=scaling)
        torch.linalg.vector_norm(block, dim=1, out=n[r0:r1])
    return n


def column_scale(magnitude: torch.Tensor, n: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """c = magnitude / n in `acc`, with c_j = 0 where n_j == 0: a zero row of W + ΔW (every row when in_features
    is 0) has no direction, and its DoRA row m·V/‖V‖ is taken as zero (F.normalize's convention), so the column
    is its bias and the base linear, not NaN from 0/0. A NaN or infinite magnitude still gives NaN there
    (m·0), and a NaN n gives NaN, as before. Every backend computes c (and dmag's 1/n) through this."""
    m = magnitude.to(acc)
    return torch.where(n == 0, m * 0, m / n)


def magnitude_grad(colsum: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """dmag = Σ_m dy ⊙ z / n, and 0 where n == 0 (there c is the constant 0: z is zero and y does not depend on
    the magnitude); a NaN column sum stays NaN."""
    return torch.where(n == 0, colsum * 0, colsum / n)


def _row_steps(m: int, n: int, element_size: int, device):
    """Row blocks of an [m, n] epilogue: one on accelerators, 16 MiB blocks on CPU."""
    step = m if device.type != "cpu" else max(1, cpu.BLOCK_BYTES // max(1, n * element_size))
    for r0 in range(0, m, max(1, step)):
        yield r0, min(m, r0 + step)


def _scale_columns(z: torch.Tensor, c: torch.Tensor, bias, out: torch.Tensor) -> torch.Tensor:
    """out = c ⊙ z + bias, computed in c's (accumulation) dtype and rounded once to out's; out may be z."""
    if z.dtype == c.dtype:
        if out is z:
            z.mul_(c)
            return z.add_(bias) if bias is not None else z
        return torch.addcmul(bias, z, c, out=out) if bias is not None else torch.mul(z, c, out=out)
    for r0, r1 in _row_steps(z.shape[0], z.shape[1], 4, z.device):
        block = z[r0:r1].to(c.dtype).mul_(c)
        if bias is not None:
            block.add_(bias)
        out[r0:r1] = block
    return out


def _keep_x(x: torch.Tensor, r0: int, r1: int, seed: int, p: float) -> torch.Tensor:
    """keep ⊙ x for rows r0:r1, in x's dtype and exact (the 1/(1 − p) is applied later, in the wide dtype)."""
    multiplier = cpu.mask(x, r0, r1, seed, p, rules.acc_dtype(x.dtype))
    return torch.where(multiplier != 0, x[r0:r1], 0)


def dora_fwd(x, weight, lora_a, lora_b, magnitude, bias, weight_norm_in, scaling: float, dropout_p: float,
             seed: int, keep_z: bool):
    """x [M, K] -> (y [M, N], z [M, N] or empty, S [M, r] in the accumulation dtype, n [N] in it)."""
    acc = rules.acc_dtype(x.dtype)
    n = (weight_norm(weight, lora_a, lora_b, scaling, acc, x.device) if weight_norm_in is None
         else weight_norm_in.to(acc).clone())
    c = column_scale(magnitude, n, acc)
    if dropout_p == 0.0:
        z, s_down = lora_cpu.lora_forward(x, weight, lora_a, lora_b, None, scaling, 0.0, 0)
        if not keep_z:  # y takes z's memory
            return _scale_columns(z, c, bias, out=z), x.new_empty(0), s_down, n
        return _scale_columns(z, c, bias, out=torch.empty_like(z)), z, s_down, n
    y = cpu.base_linear(x, weight, bias)
    z = torch.empty_like(y) if keep_z else x.new_empty(0)
    s_down = torch.empty((x.shape[0], lora_a.shape[0]), device=x.device, dtype=acc)
    a_t, b_t = lora_a.t().to(acc), lora_b.t().to(acc)
    wide = x.dtype == acc  # float32/float64 x: dropout(x) and every product in x's own dtype, in place
    for r0, r1 in cpu.row_blocks(x):
        if wide:
            d = cpu.mask(x, r0, r1, seed, dropout_p, acc).mul_(x[r0:r1])  # dropout(x), one block
            torch.mm(d, a_t, out=s_down[r0:r1])
            zb = cpu.base_linear(d, weight, None)  # d·Wᵀ
        else:  # half x: keep ⊙ x is exact in x's dtype; 1/(1 − p) is applied to the wide product
            kept = _keep_x(x, r0, r1, seed, dropout_p)
            torch.mm(kept.to(acc), a_t, out=s_down[r0:r1]).mul_(1.0 / (1.0 - dropout_p))
            zb = cpu.base_linear(kept, weight, None).to(acc).mul_(1.0 / (1.0 - dropout_p))
        zb.addmm_(s_down[r0:r1], b_t, alpha=scaling)  # z = d·Wᵀ + R
        if keep_z:
            z[r0:r1] = zb
        # y += (c − 1) ⊙ z + R  (= (c − 1) ⊙ d·Wᵀ + c ⊙ R), in the wide dtype, rounded once
        if wide:
            y[r0:r1].addcmul_(zb, c - 1.0).addmm_(s_down[r0:r1], b_t, alpha=scaling)
        else:
            zb.mul_(c - 1.0).addmm_(s_down[r0:r1], b_t, alpha=scaling).add_(y[r0:r1])
            y[r0:r1] = zb
    return y, z, s_down, n


def _column_dot(g: torch.Tensor, z: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """Σ_m g ⊙ z per column, in `acc`, a block of rows at a time (the product is never whole)."""
    out = torch.zeros(g.shape[1], device=g.device, dtype=acc)
    for r0, r1 in _row_steps(g.shape[0], g.shape[1], 4, g.device):
        out += (g[r0:r1].to(acc) * z[r0:r1].to(acc)).sum(dim=0)
    return out


def _scaled_grad(dy: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """gc = dy ⊙ c in dy's dtype (computed in c's, rounded once)."""
    if dy.dtype == c.dtype:
        return dy * c
    out = torch.empty_like(dy)
    return _scale_columns(dy, c, None, out=out)


def dora_bwd(dy, x, weight, lora_a, lora_b, magnitude, n, s_down, z, scaling: float, dropout_p: float, seed: int,
             need_x: bool, need_weight: bool, need_a: bool, need_b: bool, need_magnitude: bool, need_bias: bool):
    """(dx, dweight, dA, dB, dmagnitude, dbias); entries not needed are distinct empty tensors. z is kept (an
    [M, N] tensor) when need_magnitude: the op's prepare refuses the call otherwise."""
    acc = rules.acc_dtype(x.dtype)
    c = column_scale(magnitude, n, acc)
    dx, dw, da, db, dmag, dbias = (x.new_empty(0) for _ in range(6))
    if need_magnitude:
        dmag = magnitude_grad(_column_dot(dy, z, acc), n).to(magnitude.dtype)
    if need_bias:
        dbias = dy.sum(dim=0, dtype=acc).to(x.dtype)
    if not (need_x or need_weight or need_a or need_b):
        return dx, dw, da, db, dmag, dbias
    gc = _scaled_grad(dy, c)
    if dropout_p == 0.0:
        dx, dw, da, db, _ = lora_cpu.lora_backward(gc, x, weight, lora_a, lora_b, s_down, scaling, 0.0, 0,
                                          need_x, need_weight, need_a, need_b, False)
        return dx, dw, da, db, dmag, dbias
    # dropout: one pass over x's row blocks, each block's mask made once and used for dx, dA and dweight
    rank = rules.rank_dtype(x.dtype, lora_a, lora_b)
    ds = cpu.mm(gc, lora_b, rank).to(acc).mul_(scaling)  # dS = s·gc·B
    if need_b:
        db = (cpu.mm(gc.t(), s_down, acc) * scaling).to(lora_b.dtype)
    g_extra = _scaled_grad(dy, c - 1.0) if (need_x or need_weight) else None  # dy ⊙ (c − 1)
    if need_x:
        dx = cpu.base_grad_input(dy, weight)
        extra = cpu.base_grad_input(g_extra, weight).to(acc)  # fresh unless x is half: then a wide copy
        a_acc = lora_a.to(acc)
    if need_weight:
        dw = torch.mm(dy.t(), x)
    da_acc = torch.zeros(lora_a.shape, device=x.device, dtype=acc) if need_a else None
    for r0, r1 in cpu.row_blocks(x):
        multiplier = cpu.mask(x, r0, r1, seed, dropout_p, acc)
        if need_x:  # dx += mask ⊙ ((gc − dy)·W + dS·A) / (1 − p), the sum in the wide dtype, rounded once
            block = extra[r0:r1].addmm_(ds[r0:r1], a_acc).mul_(multiplier)
            if dx.dtype == acc:
                dx[r0:r1].add_(block)
            else:
                dx[r0:r1] = block.add_(dx[r0:r1])
        if need_a or need_weight:
            d = multiplier.mul_(x[r0:r1])  # last use of the mask: it becomes dropout(x) in place
            if need_a:
                da_acc.addmm_(ds[r0:r1].t(), d)
            if need_weight:
                dw.addmm_(g_extra[r0:r1].t(), d.to(x.dtype))
    if need_a:
        da = da_acc.to(lora_a.dtype)
    return dx, dw, da, db, dmag, dbias


# ---- the implementations, named arguments -------------------------------------------------------------

def _base(a):
    """The weight dora_fwd / dora_bwd take: the dense tensor, or the 4-bit one's blocked products in x's dtype."""
    return a.weight if isinstance(a.weight, torch.Tensor) else a.weight.packed_weight(a.x.dtype)


def forward(a):
    return dora_fwd(a.x, _base(a), a.lora_a, a.lora_b, a.magnitude, a.bias, a.weight_norm, a.scaling, a.dropout_p,
                    a.seed, a.keep_z)


def backward(a):
    need_weight = a.need_weight and isinstance(a.weight, torch.Tensor)  # a 4-bit base is frozen
    return dora_bwd(a.dy, a.x, _base(a), a.lora_a, a.lora_b, a.magnitude, a.n, a.s_down, a.z, a.scaling,
                    a.dropout_p, a.seed, a.need_x, need_weight, a.need_lora_a, a.need_lora_b, a.need_magnitude,
                    a.need_bias)


dispatch.register("dora_linear", "cpu", forward=forward, backward=backward)
