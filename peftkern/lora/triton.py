"""lora_linear on the Triton backend. All variants compute S = dropout(x)·Aᵀ, dS = s·dy·B, dA and dBᵀ with the rank-r
kernels of kernels/rank.py and the same mask, so they agree up to the summation order of the main GEMM;
core/dispatch.py picks one per call shape.

Dense base weight:
  fused              y = x·Wᵀ + bias + s·S·Bᵀ in one GEMM (kernels/lora.py), the rank-r term in its epilogue;
                     dx = dy·W + mask ⊙ (dS·A)/(1-p) likewise
  composite          the big GEMM by the library (cuBLAS through F.linear / mm), then rank_up_add_ adds the rank-r
                     term in place: one more read and write of y (or dx) than fused, but cuBLAS's GEMM
  fused_persistent   fused, with the Hopper TMA + persistent GEMM (kernels/lora_persistent.py): sm_90 and newer,
                     16-bit x and W
4-bit base weight (never a dense [out, in] copy):
  fused_4bit         the GEMM dequantizes W's 4-bit tiles in registers (kernels/qlora.py), the rank-r term as its
                     accumulator's initial value, forward and dx
  composite_4bit     the fast torch path (lora/cpu.py): blocks of W dequantized by torch, the library GEMM on each
"""
import torch

from ..core import backend as _backend, dispatch
from . import cpu


def _kernels():
    return _backend.kernels("lora"), _backend.kernels("rank")


def _s_down(a):
    _, rank = _kernels()
    return rank.rank_down(a.x, a.lora_a, scale=1.0, seed=a.seed, dropout_p=a.dropout_p)


def rank_products(dy, x, lora_a, lora_b, s_down, scaling, dropout_p, seed, need_a, need_b, need_bias):
    """The backward's rank-r part, whatever the base weight (dora_linear's Triton backward runs it on its own
    gradient): (dS, dA, dB, dbias), the unneeded ones as distinct empty tensors (custom-op outputs must not
    alias)."""
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


def rank_backward(a):
    return rank_products(a.dy, a.x, a.lora_a, a.lora_b, a.s_down, a.scaling, a.dropout_p, a.seed, a.need_lora_a,
                         a.need_lora_b, a.need_bias)


def _backward(dx_fn):
    """The backward of a variant whose dx = dy·W + mask ⊙ (dS·A)/(1-p) is dx_fn(a, dS)."""
    def backward(a):
        ds, da, db, dbias = rank_backward(a)
        dx, dw = a.x.new_empty(0), a.x.new_empty(0)
        if a.need_x:
            dx = dx_fn(a, ds)
        if a.need_weight and isinstance(a.weight, torch.Tensor):
            dw = torch.mm(a.dy.t(), a.x)
        return dx, dw, da, db, dbias
    return backward


# ---- dense base ---------------------------------------------------------------------------------------

def forward_fused(a):
    gemm, _ = _kernels()
    s_down = _s_down(a)
    # Wᵀ and Bᵀ are strided views, never copies
    return gemm.lora_gemm(a.x, a.weight.t(), s_down, a.lora_b.t(), a.bias, lora_scale=a.scaling), s_down


def _dx_fused(a, ds):
    gemm, _ = _kernels()
    return gemm.lora_gemm(a.dy, a.weight, ds, a.lora_a, None, seed=a.seed, dropout_p=a.dropout_p)


def forward_composite(a):
    _, rank = _kernels()
    s_down = _s_down(a)
    y = torch.nn.functional.linear(a.x, a.weight, a.bias)
    rank.rank_up_add_(y, s_down, a.lora_b.t(), scale=a.scaling, exact=a.lora_b.dtype == torch.float32)
    return y, s_down


def _dx_composite(a, ds):
    _, rank = _kernels()
    dx = torch.mm(a.dy, a.weight)
    return rank.rank_up_add_(dx, ds, a.lora_a, scale=1.0, exact=a.lora_a.dtype == torch.float32, seed=a.seed,
                             dropout_p=a.dropout_p)


def forward_persistent(a):
    s_down = _s_down(a)
    y = _backend.kernels("lora_persistent").lora_gemm_persistent(a.x, a.weight.t(), s_down, a.lora_b.t(), a.bias,
                                                                 lora_scale=a.scaling)
    return y, s_down


def _dx_persistent(a, ds):
    return _backend.kernels("lora_persistent").lora_gemm_persistent(a.dy, a.weight, ds, a.lora_a, None, seed=a.seed,
                                                                    dropout_p=a.dropout_p)


def _dense_only(phase, a):
    if isinstance(a.weight, torch.Tensor):
        return None
    return dispatch.NotApplicable("the base weight is 4-bit (the *_4bit variants run it)")


def _persistent_unsupported(phase, a):
    """Why the persistent TMA kernel cannot run this call (kernels/lora_persistent.unsupported: sm_90+, CUDA,
    16-bit x and W, TMA-compatible layouts), or None. The rank-r factor T (S, dS) is made inside the call; it is
    always a fresh [M, r] tensor, so only its absence is passed."""
    why = _dense_only(phase, a)
    if why is not None:
        return why
    check = _backend.kernels("lora_persistent").unsupported
    if phase == "forward":
        return check(a.x, a.weight.t(), None, a.lora_b.t(), a.bias, None)
    if not a.need_x:
        return "dx is not needed: the backward has no big GEMM for it (the fused variant runs the rest)"
    return check(a.dy, a.weight, None, a.lora_a, None, None)


# ---- 4-bit base -------------------------------------------------------------------------------------

def _qgemm(a, lhs, t, u, bias, transpose_w, **dropout):
    """kernels/qlora.qlora_gemm over the 4-bit weight of `a` (double quantization resolved in the kernel)."""
    w = a.weight
    nested = {}
    if w.double_quant:
        nested = dict(absmax2=w.absmax2.contiguous(), code2=w.code2.contiguous(), offset=w.offset.contiguous())
    return _backend.kernels("qlora").qlora_gemm(
        lhs, w.packed.contiguous(), w.absmax.contiguous(), w.code.contiguous(), t, u, bias,
        out_features=w.out_features, in_features=w.in_features, blocksize=w.blocksize, weight_dtype=w.dtype,
        transpose_w=transpose_w, **dropout, **nested)


def forward_fused_4bit(a):
    s_down = _s_down(a)
    return _qgemm(a, a.x, s_down, a.lora_b.t(), a.bias, True, lora_scale=a.scaling), s_down


def _dx_fused_4bit(a, ds):
    return _qgemm(a, a.dy, ds, a.lora_a, None, False, seed=a.seed, dropout_p=a.dropout_p)


def _fused_4bit_unsupported(phase, a):
    """The kernel dequantizes into fp16, bf16 or fp32 (a float64 QuantizedWeight runs on the composite path)."""
    if isinstance(a.weight, torch.Tensor):
        return dispatch.NotApplicable("the base weight is dense (the dense variants run it)")
    if a.weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the 4-bit GEMM dequantizes to float16, bfloat16 or float32, not the weight's {a.weight.dtype}"
    return None


def _four_bit_only(phase, a):
    if isinstance(a.weight, torch.Tensor):
        return dispatch.NotApplicable("the base weight is dense (the dense variants run it)")
    return None


dispatch.register("lora_linear", "triton", "fused", forward=forward_fused, backward=_backward(_dx_fused),
                  unsupported=_dense_only)
dispatch.register("lora_linear", "triton", "composite", forward=forward_composite,
                  backward=_backward(_dx_composite), unsupported=_dense_only)
dispatch.register("lora_linear", "triton", "fused_persistent", forward=forward_persistent,
                  backward=_backward(_dx_persistent), unsupported=_persistent_unsupported)
dispatch.register("lora_linear", "triton", "fused_4bit", forward=forward_fused_4bit,
                  backward=_backward(_dx_fused_4bit), unsupported=_fused_4bit_unsupported)
dispatch.register("lora_linear", "triton", "composite_4bit", forward=cpu.forward, backward=cpu.backward,
                  unsupported=_four_bit_only)
