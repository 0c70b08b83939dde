"""lora_linear on the Triton backend, three variants that share the rank-r kernels (kernels/rank.py):

  fused      y = x·Wᵀ + bias + s·S·Bᵀ in one GEMM (kernels/lora.py), the rank-r term in its epilogue;
             dx = dy·W + mask ⊙ (dS·A)/(1-p) likewise
  composite  the big GEMM by the library (cuBLAS through F.linear / mm), then rank_up_add_ adds the
             rank-r term in place: one more read and write of y (or dx) than fused, but cuBLAS's GEMM,
             which is often faster than a Triton GEMM at large shapes
  fused_persistent   fused, with the Hopper TMA + persistent GEMM (kernels/lora_persistent.py): sm_90 and
             newer, 16-bit x and W; measured against the others where it can run

All three compute S = dropout(x)·Aᵀ, dS = s·dy·B, dA and dBᵀ with the same kernels and the same mask, so
they agree up to the summation order of the main GEMM. peftkern.core.dispatch picks one per call shape.
"""
import torch

from ..core import backend as _backend, dispatch


def _kernels():
    return _backend.kernels("lora"), _backend.kernels("rank")


def forward_fused(x, weight, lora_a, lora_b, bias, scaling, dropout_p, seed):
    gemm, rank = _kernels()
    s_down = rank.rank_down(x, lora_a, scale=1.0, seed=seed, dropout_p=dropout_p)
    # Wᵀ and Bᵀ are strided views, never copies
    return gemm.lora_gemm(x, weight.t(), s_down, lora_b.t(), bias, lora_scale=scaling), s_down


def forward_composite(x, weight, lora_a, lora_b, bias, scaling, dropout_p, seed):
    _, rank = _kernels()
    s_down = rank.rank_down(x, lora_a, scale=1.0, seed=seed, dropout_p=dropout_p)
    y = torch.nn.functional.linear(x, weight, bias)
    rank.rank_up_add_(y, s_down, lora_b.t(), scale=scaling, exact=lora_b.dtype == torch.float32)
    return y, s_down


def _dx_fused(dy, weight, ds, lora_a, dropout_p, seed):
    gemm, _ = _kernels()
    return gemm.lora_gemm(dy, weight, ds, lora_a, None, seed=seed, dropout_p=dropout_p)


def _dx_composite(dy, weight, ds, lora_a, dropout_p, seed):
    _, rank = _kernels()
    dx = torch.mm(dy, weight)
    return rank.rank_up_add_(dx, ds, lora_a, scale=1.0, exact=lora_a.dtype == torch.float32, seed=seed,
                             dropout_p=dropout_p)


def forward_persistent(x, weight, lora_a, lora_b, bias, scaling, dropout_p, seed):
    _, rank = _kernels()
    s_down = rank.rank_down(x, lora_a, scale=1.0, seed=seed, dropout_p=dropout_p)
    y = _backend.kernels("lora_persistent").lora_gemm_persistent(x, weight.t(), s_down, lora_b.t(), bias,
                                                                 lora_scale=scaling)
    return y, s_down


def _dx_persistent(dy, weight, ds, lora_a, dropout_p, seed):
    return _backend.kernels("lora_persistent").lora_gemm_persistent(dy, weight, ds, lora_a, None, seed=seed,
                                                                    dropout_p=dropout_p)


def _persistent_unsupported(phase, *args):
    """Why the persistent TMA kernel cannot run this call (kernels/lora_persistent.unsupported: sm_90+, CUDA,
    16-bit x and W, TMA-compatible layouts), or None. The rank-r factor T (S, dS) is made inside the call;
    it is always a fresh [M, r] tensor, so only its absence is passed."""
    check = _backend.kernels("lora_persistent").unsupported
    if phase == "forward":
        x, weight, _, lora_b, bias = args[:5]
        return check(x, weight.t(), None, lora_b.t(), bias, None)
    dy, _, weight, lora_a = args[:4]
    need_x = args[9]
    if not need_x:
        return "dx is not needed: the backward has no big GEMM for it (the fused variant runs the rest)"
    return check(dy, weight, None, lora_a, None, None)


def rank_backward(dy, x, lora_a, lora_b, s_down, scaling, dropout_p, seed, need_a, need_b, need_bias):
    """The backward's rank-r part, whatever the base weight (dense here, 4-bit in triton_qlora.py):
    (dS, dA, dB, dbias), the unneeded ones as distinct empty tensors (custom-op outputs must not alias)."""
    _, rank = _kernels()
    da, db, dbias = (x.new_empty(0) for _ in range(3))
    # dS = s·dy·B: the gradient reaching S, [M, r] in fp32
    ds = rank.rank_down(dy, lora_b.t(), scale=scaling)
    if need_b:  # dBᵀ = s·Sᵀ·dy
        db = rank.rank_grad(s_down, dy, scale=scaling,
                            exact=lora_b.dtype == torch.float32).t().contiguous().to(lora_b.dtype)
    if need_a:  # dA = dSᵀ·dropout(x), the mask regenerated on chip
        da = rank.rank_grad(ds, x, scale=1.0, exact=lora_a.dtype == torch.float32, seed=seed,
                            dropout_p=dropout_p).to(lora_a.dtype)
    if need_bias:
        dbias = dy.sum(dim=0, dtype=torch.float32).to(x.dtype)
    return ds, da, db, dbias


def _backward(dx_fn):
    def backward(dy, x, weight, lora_a, lora_b, s_down, scaling, dropout_p, seed,
                 need_x, need_weight, need_a, need_b, need_bias):
        ds, da, db, dbias = rank_backward(dy, x, lora_a, lora_b, s_down, scaling, dropout_p, seed,
                                          need_a, need_b, need_bias)
        dx, dw = x.new_empty(0), x.new_empty(0)
        if need_x:  # dx = dy·W + mask ⊙ (dS·A) / (1 - p)
            dx = dx_fn(dy, weight, ds, lora_a, dropout_p, seed)
        if need_weight:
            dw = torch.mm(dy.t(), x)
        return dx, dw, da, db, dbias
    return backward


dispatch.register("lora_linear", "triton", "fused", forward=forward_fused, backward=_backward(_dx_fused))
dispatch.register("lora_linear", "triton", "composite", forward=forward_composite, backward=_backward(_dx_composite))
dispatch.register("lora_linear", "triton", "fused_persistent", forward=forward_persistent,
                  backward=_backward(_dx_persistent), unsupported=_persistent_unsupported)
