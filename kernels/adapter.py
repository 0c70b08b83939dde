"""Triton kernels of the bottleneck adapter:  out = residual + s·(act(h·W_downᵀ + b_down)·W_upᵀ + b_up).

Forward, one kernel, one pass: each program owns BLOCK_M rows. It streams h over d to build
pre = h·W_downᵀ + b_down ([BLOCK_M, k] in registers), applies the activation on chip, then streams
over d again to write out = residual + s·(z·W_upᵀ + b_up) - the up-projection's epilogue does the
scale, bias and residual add, and the second read of the block's h rows (the residual when none is
given) comes from L2. z never goes to memory; pre ([M, k], fp32) is written once for backward, which
recomputes act and act' from it.

Backward, one kernel per row block for the activations' side: dz = s·dy·W_up, dpre = dz ⊙ act'(pre),
dh = dpre·W_down (+ dy when the residual is h), writing dpre and z ([M, k] fp32) for the weight
gradients, which are split-M reductions of kernels/rank.py: dW_upᵀ = s·zᵀ·dy and dW_down = dpreᵀ·h.
b_up's gradient (s·Σ_m dy) comes from the first loop's read of dy as per-row-block column sums. Reads of
dy: the dz loop, the dh loop's residual add (when h is the residual) and rank_grad's dW_up; minimum 1.

Each product runs in its weight's dtype, accumulating in fp32: h's dtype on the tensor cores for
same-dtype adapters; fp32-accurate 3xTF32 on the tensor cores (plain TF32 if the user allows it) for fp32
adapter weights beside fp16/bf16 activations, within the error of an eager fp32 adapter. Bottleneck widths up
to MAX_K fit the register budget.
"""
import torch
import triton
import triton.language as tl

from . import _launch, registry
from ._launch import dot_precision, pow2_at_least_16
from .activations import activate, derivative
from .tf32 import dot_prec

MAX_K = 256


@triton.jit
def _row_block(M, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's BLOCK_M rows (int64, and their mask) and the bottleneck's BLOCK_K columns (and their mask)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    return offs_m.to(tl.int64), offs_m < M, offs_k, offs_k < K


@triton.jit
def _narrow(x_ptr, w_ptr, colsum_ptr, rows, m_ok, offs_k, k_ok, D, stride_xm, stride_xd, stride_wd, stride_wk,
            PRECISION: tl.constexpr, COLSUM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_K: tl.constexpr):
    """[BLOCK_M, BLOCK_K] fp32: Σ_d X[rows, d]·W[d, offs_k], streaming the row block of X over d once (W [d, k]
    read through its strides). COLSUM: the block's column sums of X, from the same read, stored at colsum_ptr."""
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_d[None, :] * stride_xd,
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptr + offs_d[:, None] * stride_wd + offs_k[None, :] * stride_wk,
                    mask=d_ok[:, None] & k_ok[None, :], other=0.0)
        acc = dot_prec(x, w, acc, PRECISION)
        if COLSUM:
            tl.store(colsum_ptr + offs_d, tl.sum(x.to(tl.float32), axis=0), mask=d_ok)
    return acc


@triton.jit
def _widen(a, w_ptr, bias_ptr, res_ptr, out_ptr, rows, m_ok, offs_k, k_ok, D, stride_wk, stride_wd,
           stride_rm, stride_rd, stride_om, stride_od, scaling, PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr,
           ADD_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[rows, :] = (a·W (+ bias))·scaling (+ res[rows, :]) over d in BLOCK_D tiles, each rounded once to out's
    dtype: a [BLOCK_M, BLOCK_K] in registers, W [k, d] read through its strides."""
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        w = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_d[None, :] * stride_wd,
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        o = dot_prec(a, w, tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32), PRECISION)
        if HAS_BIAS:
            o += tl.load(bias_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        tile = m_ok[:, None] & d_ok[None, :]
        o = o * scaling
        if ADD_RES:
            o += tl.load(res_ptr + rows[:, None] * stride_rm + offs_d[None, :] * stride_rd, mask=tile,
                         other=0.0).to(tl.float32)
        tl.store(out_ptr + rows[:, None] * stride_om + offs_d[None, :] * stride_od, o.to(out_ptr.dtype.element_ty),
                 mask=tile)


@registry.kernel
@triton.jit
def _adapter_fwd_kernel(
    h_ptr, res_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, out_ptr, pre_ptr,
    M, D, K,
    stride_hm, stride_hd, stride_rm, stride_rd, stride_wdk, stride_wdd, stride_wud, stride_wuk,
    stride_om, stride_od, stride_pm, stride_pk,
    scaling,
    HAS_RES: tl.constexpr, HAS_BD: tl.constexpr, HAS_BU: tl.constexpr, ACT: tl.constexpr,
    PREC_DOWN: tl.constexpr, PREC_UP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, m_ok, offs_k, k_ok = _row_block(M, K, BLOCK_M, BLOCK_K)
    acc = _narrow(h_ptr, wd_ptr, pre_ptr, rows, m_ok, offs_k, k_ok, D, stride_hm, stride_hd, stride_wdd, stride_wdk,
                  PREC_DOWN, False, BLOCK_M, BLOCK_D, BLOCK_K)
    if HAS_BD:
        acc += tl.load(bd_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(pre_ptr + rows[:, None] * stride_pm + offs_k[None, :] * stride_pk, acc,
             mask=m_ok[:, None] & k_ok[None, :])
    z = activate(acc, ACT).to(wu_ptr.dtype.element_ty)
    # the residual is h itself unless one is given: the block's rows of h come from L2
    if HAS_RES:
        _widen(z, wu_ptr, bu_ptr, res_ptr, out_ptr, rows, m_ok, offs_k, k_ok, D, stride_wuk, stride_wud,
               stride_rm, stride_rd, stride_om, stride_od, scaling, PREC_UP, HAS_BU, True, BLOCK_M, BLOCK_D)
    else:
        _widen(z, wu_ptr, bu_ptr, h_ptr, out_ptr, rows, m_ok, offs_k, k_ok, D, stride_wuk, stride_wud,
               stride_hm, stride_hd, stride_om, stride_od, scaling, PREC_UP, HAS_BU, True, BLOCK_M, BLOCK_D)


@registry.kernel
@triton.jit
def _adapter_bwd_kernel(
    dy_ptr, pre_ptr, wu_ptr, wd_ptr, dh_ptr, dpre_ptr, z_ptr, colsum_ptr,
    M, D, K,
    stride_dym, stride_dyd, stride_pm, stride_pk, stride_wud, stride_wuk, stride_wdk, stride_wdd,
    stride_dhm, stride_dhd, stride_cs,
    scaling,
    NEED_DH: tl.constexpr, ADD_DY: tl.constexpr, STORE_Z: tl.constexpr, COLSUM: tl.constexpr, ACT: tl.constexpr,
    PREC_DOWN: tl.constexpr, PREC_UP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, m_ok, offs_k, k_ok = _row_block(M, K, BLOCK_M, BLOCK_K)
    mk = m_ok[:, None] & k_ok[None, :]
    # dz = dy·W_up; COLSUM: b_up's gradient from the same read of dy, this row block's column sums
    dz = _narrow(dy_ptr, wu_ptr, colsum_ptr + tl.program_id(0).to(tl.int64) * stride_cs, rows, m_ok, offs_k, k_ok,
                 D, stride_dym, stride_dyd, stride_wud, stride_wuk, PREC_UP, COLSUM, BLOCK_M, BLOCK_D, BLOCK_K)
    pre = tl.load(pre_ptr + rows[:, None] * stride_pm + offs_k[None, :] * stride_pk, mask=mk, other=0.0)
    dpre = dz * scaling * derivative(pre, ACT)
    # dpre and z are [M, k] with the pre layout (fresh contiguous buffers)
    tl.store(dpre_ptr + rows[:, None] * stride_pm + offs_k[None, :] * stride_pk, dpre, mask=mk)
    if STORE_Z:
        tl.store(z_ptr + rows[:, None] * stride_pm + offs_k[None, :] * stride_pk, activate(pre, ACT), mask=mk)
    if NEED_DH:  # dh = dpre·W_down (+ dy when the residual is h)
        _widen(dpre.to(wd_ptr.dtype.element_ty), wd_ptr, wd_ptr, dy_ptr, dh_ptr, rows, m_ok, offs_k, k_ok, D,
               stride_wdk, stride_wdd, stride_dym, stride_dyd, stride_dhm, stride_dhd, 1.0, PREC_DOWN, False, ADD_DY,
               BLOCK_M, BLOCK_D)


# ----------------------------------------------------------------------------------------------
# launchers: shapes were checked by peftkern/adapter/op.py; k <= MAX_K
# ----------------------------------------------------------------------------------------------

def _stages(block_k: int) -> int:
    """Software-pipeline depth: the widest bottlenecks' [BLOCK_D, BLOCK_K] weight tiles take three stages
    past sm_80's shared memory (scripts/aot_check.py: 196 KB of 163 KB), two fit."""
    return 2 if block_k > 128 else 3


def _blocks(d: int, k: int, exact: bool, wide: bool):
    """(BLOCK_M, BLOCK_D, BLOCK_K, warps). `exact`: a product runs in 3xTF32 (fp32 weights); `wide`: an operand
    is fp32 (activations or weights)."""
    block_k = pow2_at_least_16(k, MAX_K)
    if _launch.interpreting():
        return 16, 32, block_k, 4
    # keep the [BLOCK_M, BLOCK_K] fp32 accumulator and a [BLOCK_M, BLOCK_D] tile within registers
    block_m = 64 if block_k <= 64 else 32
    block_d = 128 if block_k <= 128 else 64
    warps = 4 if block_k <= 64 else 8
    # fp32 streamed tiles are twice as large, and 3xTF32 holds hi/lo halves of them too: at the widths above
    # they spilled (scripts/aot_check.py, sm_80 and sm_90)
    if exact:
        block_m, block_d, warps = (32, 32, 4) if block_k <= 64 else (16, 32, 8)
    elif wide:
        block_d = min(block_d, 64)
    return block_m, block_d, block_k, warps


def _tiles(x, w_down, w_up):
    """_blocks for these operands."""
    exact = "tf32x3" in (dot_precision(w_down.dtype == torch.float32), dot_precision(w_up.dtype == torch.float32))
    wide = torch.float32 in (x.dtype, w_down.dtype, w_up.dtype)
    return _blocks(x.shape[1], w_down.shape[0], exact, wide)


def adapter_fwd(h, w_down, b_down, w_up, b_up, residual, code: int, scaling: float):
    """h [M, d] -> (out [M, d], pre [M, k] fp32)."""
    M, D = h.shape
    K = w_down.shape[0]
    out = _launch.empty((M, D), h.device, h.dtype)
    pre = _launch.empty((M, K), h.device, torch.float32)
    if M == 0:
        return out, pre
    block_m, block_d, block_k, warps = _tiles(h, w_down, w_up)
    res = residual if residual is not None else h
    _adapter_fwd_kernel[(triton.cdiv(M, block_m),)](
        # biases are read with unit stride: a strided view is copied (they are tiny)
        h, res, w_down, b_down.contiguous() if b_down is not None else w_down, w_up,
        b_up.contiguous() if b_up is not None else w_up,
        out, pre, M, D, K,
        h.stride(0), h.stride(1), res.stride(0), res.stride(1), w_down.stride(0), w_down.stride(1),
        w_up.stride(0), w_up.stride(1), out.stride(0), out.stride(1), pre.stride(0), pre.stride(1),
        scaling,
        HAS_RES=residual is not None, HAS_BD=b_down is not None, HAS_BU=b_up is not None, ACT=code,
        PREC_DOWN=dot_precision(w_down.dtype == torch.float32), PREC_UP=dot_precision(w_up.dtype == torch.float32),
        BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_K=block_k, num_warps=warps, num_stages=_stages(block_k),
    )
    return out, pre


def adapter_bwd_rows(dy, pre, w_up, w_down, code: int, scaling: float, *, need_dh: bool, add_dy: bool,
                     store_z: bool, col_sums: bool = False):
    """(dh [M, d] or None, dpre [M, k] fp32, z [M, k] fp32 or None, Σ_m dy[m, :] [d] fp32 or None) for one
    backward pass over dy. `col_sums`: also return dy's column sums (b_up's gradient before scaling),
    from the pass's own read of dy: per-row-block partials added in a fixed order, no extra read of dy."""
    M, D = dy.shape
    K = pre.shape[1]
    dh = _launch.empty((M, D), dy.device, dy.dtype) if need_dh else None
    dpre = _launch.empty((M, K), dy.device, torch.float32)
    z = _launch.empty((M, K), dy.device, torch.float32) if store_z else None
    if M == 0:
        return dh, dpre, z, (torch.zeros(D, device=dy.device, dtype=torch.float32) if col_sums else None)
    block_m, block_d, block_k, warps = _tiles(dy, w_down, w_up)
    programs = triton.cdiv(M, block_m)
    parts = _launch.empty((programs, D), dy.device, torch.float32) if col_sums else None
    _adapter_bwd_kernel[(programs,)](
        dy, pre, w_up, w_down, dh if dh is not None else dy, dpre, z if z is not None else dpre,
        parts if parts is not None else dpre,
        M, D, K,
        dy.stride(0), dy.stride(1), pre.stride(0), pre.stride(1), w_up.stride(0), w_up.stride(1),
        w_down.stride(0), w_down.stride(1),
        dh.stride(0) if dh is not None else 0, dh.stride(1) if dh is not None else 0,
        parts.stride(0) if parts is not None else 0,
        scaling,
        NEED_DH=need_dh, ADD_DY=add_dy, STORE_Z=store_z, COLSUM=col_sums, ACT=code,
        PREC_DOWN=dot_precision(w_down.dtype == torch.float32), PREC_UP=dot_precision(w_up.dtype == torch.float32),
        BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_K=block_k, num_warps=warps, num_stages=_stages(block_k),
    )
    return dh, dpre, z, (parts.sum(dim=0) if parts is not None else None)
