"""dora_linear on the Triton backend.

Dense base weight, two variants that share the norm, the scaled gradient and the rank-r kernels:
  fused           y (and z) in one GEMM (kernels/dora.py) with the rank-r term as the accumulator's initial value and
                  the column scale, bias and z in its epilogue; with dropout the two products x·Wᵀ and (keep ⊙ x)·Wᵀ
                  share every W tile. dx: kernels/lora.lora_gemm on gc = dy ⊙ c without dropout, kernels/dora's
                  two-accumulator GEMM with it
  composite       the big GEMMs by the library (cuBLAS through F.linear / torch.mm), then one skinny epilogue kernel
                  (forward: y and z from x·Wᵀ, (keep ⊙ x)·Wᵀ and the rank-r term; dx with dropout: the masked sum;
                  dx without: kernels/rank.rank_up_add_)
4-bit base weight (never a dense [out, in] copy):
  composite_4bit  the fast torch path (dora/cpu.py): blocks of W dequantized by torch, the library GEMM on each,
                  torch's rank-r products and column scales (on a GPU these are cuBLAS and CUDA kernels). A fused
                  4-bit DoRA kernel would need kernels/qlora.py's GEMM with the DoRA epilogue; until it exists this
                  is the one 4-bit variant, and measured dispatch has nothing to choose between.

The dense variants compute n (kernels/dora.dora_weight_norm: one pass over W, no [out, in] tensor), S, gc = dy ⊙ c
with Σ dy ⊙ z (dora_grad_scale) and LoRA's rank-r backward on gc (lora/triton.py's rank_products) with the same
kernels and the same mask, so they agree up to the summation order of the main GEMMs. core/dispatch.py picks one
per call shape. With dropout the masked copy keep ⊙ x (dora_keep_x) feeds both the GEMM and rank_down, which then
needs no mask of its own (the 1/(1 − p) is applied to its fp32 result).
"""
import torch

from ..core import backend as _backend, dispatch
from ..lora.triton import rank_products
from . import cpu


def _kernels():
    return _backend.kernels("dora"), _backend.kernels("rank")


def _norm(a):
    """n as a fresh float32 tensor: custom-op outputs may not alias an input (the eval cache passes n in)."""
    if a.weight_norm is not None:
        return a.weight_norm.to(torch.float32, copy=True)
    return _kernels()[0].dora_weight_norm(a.weight, a.lora_a, a.lora_b, a.scaling)


def _drop_scale(dropout_p: float) -> float:
    return 1.0 / (1.0 - dropout_p)


def _down(a):
    """(keep ⊙ x or None, S = dropout(x)·Aᵀ [M, r] fp32)."""
    dora, rank = _kernels()
    if a.dropout_p == 0.0:
        return None, rank.rank_down(a.x, a.lora_a, scale=1.0)
    masked = dora.dora_keep_x(a.x, seed=a.seed, dropout_p=a.dropout_p)
    return masked, rank.rank_down(masked, a.lora_a, scale=_drop_scale(a.dropout_p))


def forward_fused(a):
    dora, _ = _kernels()
    n = _norm(a)
    c = cpu.column_scale(a.magnitude, n, torch.float32)
    masked, s_down = _down(a)
    # Wᵀ and Bᵀ are strided views, never copies
    y, z = dora.dora_forward_gemm(a.x, a.weight.t(), s_down, a.lora_b.t(), a.bias, c, lora_scale=a.scaling,
                                  masked_x=masked, drop_scale=_drop_scale(a.dropout_p), write_z=a.keep_z)
    return y, z if a.keep_z else a.x.new_empty(0), s_down, n


def forward_composite(a):
    dora, _ = _kernels()
    n = _norm(a)
    c = cpu.column_scale(a.magnitude, n, torch.float32)
    masked, s_down = _down(a)
    xw = torch.nn.functional.linear(a.x, a.weight)
    dw = torch.nn.functional.linear(masked, a.weight) if masked is not None else None
    y, z = dora.dora_forward_epilogue_(xw, s_down, a.lora_b.t(), a.bias, c, lora_scale=a.scaling, dw=dw,
                                       drop_scale=_drop_scale(a.dropout_p), write_z=a.keep_z)
    return y, z if a.keep_z else a.x.new_empty(0), s_down, n


def _dx_fused(a, gc, gm, ds):
    if a.dropout_p == 0.0:  # dx = gc·W + dS·A: LoRA's dx on gc
        return _backend.kernels("lora").lora_gemm(gc, a.weight, ds, a.lora_a, None)
    return _kernels()[0].dora_dx_gemm(a.dy, gm, a.weight, ds, a.lora_a, seed=a.seed, dropout_p=a.dropout_p)


def _dx_composite(a, gc, gm, ds):
    dora, rank = _kernels()
    exact = a.lora_a.dtype == torch.float32
    if a.dropout_p == 0.0:
        return rank.rank_up_add_(torch.mm(gc, a.weight), ds, a.lora_a, scale=1.0, exact=exact)
    return dora.dora_dx_combine_(torch.mm(a.dy, a.weight), torch.mm(gm, a.weight), ds, a.lora_a, seed=a.seed,
                                 dropout_p=a.dropout_p)


def _backward(dx_fn):
    """The backward of a dense variant whose dx is dx_fn(a, gc, gm, dS)."""
    def backward(a):
        dora, _ = _kernels()
        x, dy, p = a.x, a.dy, a.dropout_p
        # outputs must not alias one another (custom-op rule), so each unused one is its own empty tensor
        dx, dw, da, db, dmag, dbias = (x.new_empty(0) for _ in range(6))
        n = a.n.float()
        c = cpu.column_scale(a.magnitude, n, torch.float32)
        # gm = dy ⊙ (c − 1), the operand of dropout's base-path products (dx, dweight)
        need_gm = p > 0.0 and (a.need_x or a.need_weight)
        gc, colsum, gm = dora.dora_grad_scale(dy, c, a.z if a.need_magnitude else None, with_gm=need_gm)
        if a.need_magnitude:  # dmag = Σ_m dy ⊙ z / n
            dmag = cpu.magnitude_grad(colsum, n).to(a.magnitude.dtype)
        if a.need_bias:
            dbias = dy.sum(dim=0, dtype=torch.float32).to(x.dtype)
        if a.need_x or a.need_lora_a or a.need_lora_b:  # LoRA's rank-r backward on gc: dS, dBᵀ = s·Sᵀ·gc, dA
            ds, da, db, _ = rank_products(gc, x, a.lora_a, a.lora_b, a.s_down, a.scaling, p, a.seed,
                                          a.need_lora_a, a.need_lora_b, False)
            if a.need_x:
                dx = dx_fn(a, gc, gm, ds)
        if a.need_weight:  # rare (a frozen base is the rule): library GEMMs
            if p == 0.0:
                dw = torch.mm(gc.t(), x)
            else:  # dyᵀ·x + gmᵀ·dropout(x)
                masked = dora.dora_keep_x(x, seed=a.seed, dropout_p=p)
                dw = torch.mm(dy.t(), x).addmm_(gm.t(), masked, alpha=_drop_scale(p))
        return dx, dw, da, db, dmag, dbias
    return backward


def _dense_only(phase, a):
    if isinstance(a.weight, torch.Tensor):
        return None
    return dispatch.NotApplicable("the base weight is 4-bit (composite_4bit runs it)")


def _four_bit_only(phase, a):
    if isinstance(a.weight, torch.Tensor):
        return dispatch.NotApplicable("the base weight is dense (the dense variants run it)")
    return None


dispatch.register("dora_linear", "triton", "fused", forward=forward_fused, backward=_backward(_dx_fused),
                  unsupported=_dense_only)
dispatch.register("dora_linear", "triton", "composite", forward=forward_composite,
                  backward=_backward(_dx_composite), unsupported=_dense_only)
dispatch.register("dora_linear", "triton", "composite_4bit", forward=cpu.forward, backward=cpu.backward,
                  unsupported=_four_bit_only)
