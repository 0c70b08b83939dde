"""dora_linear on the Triton backend, two variants that share the norm, the scaled gradient and the rank-r kernels:

  fused      y (and z) in one GEMM (kernels/dora.py) with the rank-r term as the accumulator's initial value and
             the column scale, bias and z in its epilogue; with dropout the two products x·Wᵀ and (keep ⊙ x)·Wᵀ
             share every W tile. dx: kernels/lora.lora_gemm on gc = dy ⊙ c without dropout, kernels/dora's
             two-accumulator GEMM with it
  composite  the big GEMMs by the library (cuBLAS through F.linear / torch.mm), then one skinny epilogue kernel
             (forward: y and z from x·Wᵀ, (keep ⊙ x)·Wᵀ and the rank-r term; dx with dropout: the masked sum;
             dx without: kernels/rank.rank_up_add_)

Both compute n (kernels/dora.dora_weight_norm: one pass over W, no [out, in] tensor), S, gc = dy ⊙ c with
Σ dy ⊙ z (dora_grad_scale) and LoRA's rank-r backward on gc (lora/triton.py's rank_products) with the same kernels and
the same mask, so they agree up to the summation order of the main GEMMs. peftkern.core.dispatch picks one per call
shape. With dropout the masked copy keep ⊙ x (dora_keep_x) feeds both the GEMM and rank_down, which then needs no
mask of its own (the 1/(1 − p) is applied to its fp32 result).
"""
import torch

from ..core import backend as _backend, dispatch
from ..lora.triton import rank_products
from ..reference import dora as ref_dora


def _kernels():
    return _backend.kernels("dora"), _backend.kernels("rank")


def _norm(weight, lora_a, lora_b, weight_norm, scaling):
    """n as a fresh float32 tensor: custom-op outputs may not alias an input (the eval cache passes n in)."""
    if weight_norm is not None:
        return weight_norm.to(torch.float32, copy=True)
    return _kernels()[0].dora_weight_norm(weight, lora_a, lora_b, scaling)


def _drop_scale(dropout_p: float) -> float:
    return 1.0 / (1.0 - dropout_p)


def _down(x, lora_a, dropout_p, seed):
    """(keep ⊙ x or None, S = dropout(x)·Aᵀ [M, r] fp32)."""
    dora, rank = _kernels()
    if dropout_p == 0.0:
        return None, rank.rank_down(x, lora_a, scale=1.0)
    masked = dora.dora_keep_x(x, seed=seed, dropout_p=dropout_p)
    return masked, rank.rank_down(masked, lora_a, scale=_drop_scale(dropout_p))


def forward_fused(x, weight, lora_a, lora_b, magnitude, bias, weight_norm, scaling, dropout_p, seed, keep_z):
    dora, _ = _kernels()
    n = _norm(weight, lora_a, lora_b, weight_norm, scaling)
    c = ref_dora.column_scale(magnitude, n, torch.float32)
    masked, s_down = _down(x, lora_a, dropout_p, seed)
    # Wᵀ and Bᵀ are strided views, never copies
    y, z = dora.dora_forward_gemm(x, weight.t(), s_down, lora_b.t(), bias, c, lora_scale=scaling, masked_x=masked,
                                  drop_scale=_drop_scale(dropout_p), write_z=keep_z)
    return y, z if keep_z else x.new_empty(0), s_down, n


def forward_composite(x, weight, lora_a, lora_b, magnitude, bias, weight_norm, scaling, dropout_p, seed, keep_z):
    dora, _ = _kernels()
    n = _norm(weight, lora_a, lora_b, weight_norm, scaling)
    c = ref_dora.column_scale(magnitude, n, torch.float32)
    masked, s_down = _down(x, lora_a, dropout_p, seed)
    xw = torch.nn.functional.linear(x, weight)
    dw = torch.nn.functional.linear(masked, weight) if masked is not None else None
    y, z = dora.dora_forward_epilogue_(xw, s_down, lora_b.t(), bias, c, lora_scale=scaling, dw=dw,
                                       drop_scale=_drop_scale(dropout_p), write_z=keep_z)
    return y, z if keep_z else x.new_empty(0), s_down, n


def _dx_fused(dy, gc, gm, weight, ds, lora_a, dropout_p, seed):
    if dropout_p == 0.0:  # dx = gc·W + dS·A: LoRA's dx on gc
        return _backend.kernels("lora").lora_gemm(gc, weight, ds, lora_a, None)
    return _kernels()[0].dora_dx_gemm(dy, gm, weight, ds, lora_a, seed=seed, dropout_p=dropout_p)


def _dx_composite(dy, gc, gm, weight, ds, lora_a, dropout_p, seed):
    dora, rank = _kernels()
    exact = lora_a.dtype == torch.float32
    if dropout_p == 0.0:
        return rank.rank_up_add_(torch.mm(gc, weight), ds, lora_a, scale=1.0, exact=exact)
    return dora.dora_dx_combine_(torch.mm(dy, weight), torch.mm(gm, weight), ds, lora_a, seed=seed,
                                 dropout_p=dropout_p)


def _backward(dx_fn):
    def backward(dy, x, weight, lora_a, lora_b, magnitude, weight_norm, s_down, z, scaling, dropout_p, seed,
                 need_x, need_weight, need_a, need_b, need_magnitude, need_bias):
        dora, _ = _kernels()
        # outputs must not alias one another (custom-op rule), so each unused one is its own empty tensor
        dx, dw, da, db, dmag, dbias = (x.new_empty(0) for _ in range(6))
        if need_magnitude and z.numel() != dy.numel():
            raise RuntimeError("dora_linear_bwd: the magnitude's gradient needs z, which the forward did not keep "
                               "(keep_z=False)")
        n = weight_norm.float()
        c = ref_dora.column_scale(magnitude, n, torch.float32)
        # gm = dy ⊙ (c − 1), the operand of dropout's base-path products (dx, dweight)
        need_gm = dropout_p > 0.0 and (need_x or need_weight)
        gc, colsum, gm = dora.dora_grad_scale(dy, c, z if need_magnitude else None, with_gm=need_gm)
        if need_magnitude:  # dmag = Σ_m dy ⊙ z / n
            dmag = ref_dora.magnitude_grad(colsum, n).to(magnitude.dtype)
        if need_bias:
            dbias = dy.sum(dim=0, dtype=torch.float32).to(x.dtype)
        if need_x or need_a or need_b:  # LoRA's rank-r backward on gc: dS = s·gc·B, dBᵀ = s·Sᵀ·gc, dA = dSᵀ·d
            ds, da, db, _ = rank_products(gc, x, lora_a, lora_b, s_down, scaling, dropout_p, seed,
                                                      need_a, need_b, False)
            if need_x:
                dx = dx_fn(dy, gc, gm, weight, ds, lora_a, dropout_p, seed)
        if need_weight:  # rare (a frozen base is the rule): library GEMMs
            if dropout_p == 0.0:
                dw = torch.mm(gc.t(), x)
            else:  # dyᵀ·x + gmᵀ·dropout(x)
                masked = dora.dora_keep_x(x, seed=seed, dropout_p=dropout_p)
                dw = torch.mm(dy.t(), x).addmm_(gm.t(), masked, alpha=_drop_scale(dropout_p))
        return dx, dw, da, db, dmag, dbias
    return backward


dispatch.register("dora_linear", "triton", "fused", forward=forward_fused, backward=_backward(_dx_fused))
dispatch.register("dora_linear", "triton", "composite", forward=forward_composite,
                  backward=_backward(_dx_composite))
