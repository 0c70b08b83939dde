"""The composite DoRA path's epilogues, after its library GEMMs (kernels/dora.py holds the fused GEMMs and the
kernels both paths share; its docstring gives the formulas):

  _dora_fwd_epilogue_kernel   y, z from xw = x·Wᵀ (and dw = (keep ⊙ x)·Wᵀ) with the rank-r term, in place
  _dora_dx_combine_kernel     the dropout dx: dx += keep/(1 − p) ⊙ (e + dS·A), in place

Both are memory-bound element-wise passes with a rank-r product per tile (kernels/blocks.rank_term, rows and
columns past the edge masked off: each element is read by the program that writes it).
"""
import torch
import triton
import triton.language as tl

from . import _launch, registry
from ._launch import dot_precision, dropout_args
from .blocks import add_to_tile, bias_row, rank_epilogue_tile
from .dropout import keep_tile


@registry.kernel
@triton.jit
def _dora_fwd_epilogue_kernel(
    xw_ptr, dw_ptr, t_ptr, u_ptr, bias_ptr, c_ptr, y_ptr, z_ptr,
    M, N, R,
    stride_am, stride_an, stride_dm, stride_dn, stride_tm, stride_tr, stride_ur, stride_un, stride_ym, stride_yn,
    stride_zm, stride_zn,
    low_scale, drop_scale,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, WRITE_Z: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # xw = x·Wᵀ and (HAS_DROPOUT) dw = (keep ⊙ x)·Wᵀ from the library GEMM, in x's dtype; one grid axis, column
    # tiles fastest (neighbouring programs share t's rows). y may be xw and z may be dw (each element is read
    # by the program that writes it, before it writes it).
    _, _, offs_n, rows, cols, ok, low = rank_epilogue_tile(t_ptr, u_ptr, M, N, R, stride_tm, stride_tr, stride_ur,
                                                           stride_un, low_scale, True, PRECISION, BLOCK_M, BLOCK_N,
                                                           BLOCK_R)
    base = tl.load(xw_ptr + rows * stride_am + cols * stride_an, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
    if HAS_DROPOUT:
        dropped = tl.load(dw_ptr + rows * stride_dm + cols * stride_dn, mask=ok, other=0.0).to(tl.float32)
        z = dropped * drop_scale + low
        y = base + low + (c - 1.0) * z
    else:
        z = base + low
        y = z * c
    if HAS_BIAS:
        y += bias_row(bias_ptr, offs_n, N)
    if WRITE_Z:
        tl.store(z_ptr + rows * stride_zm + cols * stride_zn, z.to(z_ptr.dtype.element_ty), mask=ok)
    tl.store(y_ptr + rows * stride_ym + cols * stride_yn, y.to(y_ptr.dtype.element_ty), mask=ok)


@registry.kernel
@triton.jit
def _dora_dx_combine_kernel(
    dx_ptr, e_ptr, t_ptr, u_ptr,
    M, N, R,
    stride_dm, stride_dn, stride_em, stride_en, stride_tm, stride_tr, stride_ur, stride_un,
    seed, threshold, drop_scale,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # dx += keep/(1 − p) ⊙ (e + t·u) in place; dx = g·W and e = gm·W from the library GEMM, t = dS, u = A
    pid_n, offs_m, _, rows, cols, ok, acc = rank_epilogue_tile(t_ptr, u_ptr, M, N, R, stride_tm, stride_tr,
                                                               stride_ur, stride_un, 1.0, False, PRECISION, BLOCK_M,
                                                               BLOCK_N, BLOCK_R)
    acc += tl.load(e_ptr + rows * stride_em + cols * stride_en, mask=ok, other=0.0).to(tl.float32)
    keep = keep_tile(seed, offs_m, pid_n * BLOCK_N, N, threshold, BLOCK_N)
    add_to_tile(dx_ptr + rows * stride_dm + cols * stride_dn, tl.where(keep, acc * drop_scale, 0.0), ok)


# ----------------------------------------------------------------------------------------------
# launchers: tensors in, tensors out; shapes are checked by the callers before this point
# ----------------------------------------------------------------------------------------------

def _epilogue_blocks():
    """(BLOCK_M, BLOCK_N, BLOCK_R, warps) of the composite's epilogues: memory-bound, [64, 128] tiles on 8 warps (32
    fp32 per thread per tile: on 4 warps the forward's xw, dw, rank-r term, z and y spilled 152 B on sm_90 for fp32
    x with bias and 3xTF32 adapters), the rank in 16-wide slices."""
    return ((32, 32) if _launch.interpreting() else (64, 128)) + (16, 8)


def dora_forward_epilogue_(xw: torch.Tensor, t: torch.Tensor, u: torch.Tensor, bias, col_scale: torch.Tensor, *,
                           lora_scale: float, dw=None, drop_scale: float = 1.0, write_z: bool):
    """The composite forward after its library GEMMs: xw = x·Wᵀ [M, N] and, with dropout, dw = (keep ⊙ x)·Wᵀ, both
    in x's dtype. With R = lora_scale·t·u: z = xw + R, y = c ⊙ z + bias (dw None), or z = drop_scale·dw + R,
    y = xw + R + (c − 1) ⊙ z + bias; in fp32, each rounded once. y is written over xw, and z over dw (with
    dropout; else into a new tensor) when write_z. Returns (y, z or None).

    Roofline (M = 8192, N = 4096, r = 16, bf16): reads xw (and dw), writes y (and z): 128 to 256 MiB, 45–90 µs at
    3 TB/s, beside the library GEMMs' 0.34–0.69 ms; what the composite pays beyond the fused forward."""
    M, N = xw.shape
    R = t.shape[1]
    dropout = dw is not None
    z = (dw if dropout else _launch.empty((M, N), xw.device, xw.dtype)) if write_z else None
    if M == 0 or N == 0:
        return xw, z
    block_m, block_n, block_r, warps = _epilogue_blocks()
    src = dw if dropout else xw
    zz = z if z is not None else xw
    _dora_fwd_epilogue_kernel[(triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)](
        xw, src, t, u, bias.contiguous() if bias is not None else xw, col_scale.contiguous(), xw, zz,
        M, N, R,
        xw.stride(0), xw.stride(1), src.stride(0), src.stride(1), t.stride(0), t.stride(1), u.stride(0), u.stride(1),
        xw.stride(0), xw.stride(1), zz.stride(0), zz.stride(1),
        float(lora_scale), float(drop_scale),
        HAS_BIAS=bias is not None, HAS_DROPOUT=dropout, WRITE_Z=write_z,
        PRECISION=dot_precision(u.dtype == torch.float32),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=warps,
    )
    return xw, z


def dora_dx_combine_(dx: torch.Tensor, e: torch.Tensor, ds: torch.Tensor, a: torch.Tensor, *, seed: int,
                     dropout_p: float) -> torch.Tensor:
    """The composite dropout dx after its library GEMMs dx = g·W and e = gm·W [M, K]: dx += keep/(1 − p) ⊙
    (e + ds·a) in place (the sum in fp32, rounded once), keep the mask of x [M, K]. Returns dx.

    Roofline (M = 8192, K = 4096, bf16): reads dx and e, writes dx: 192 MiB, ~67 µs at 3 TB/s, plus the mask."""
    M, N = dx.shape
    R = ds.shape[1]
    if M == 0 or N == 0:
        return dx
    seed_v, threshold, drop_scale = dropout_args(seed, dropout_p)
    block_m, block_n, block_r, warps = _epilogue_blocks()
    _dora_dx_combine_kernel[(triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)](
        dx, e, ds, a,
        M, N, R,
        dx.stride(0), dx.stride(1), e.stride(0), e.stride(1), ds.stride(0), ds.stride(1), a.stride(0), a.stride(1),
        seed_v, threshold, drop_scale,
        PRECISION=dot_precision(a.dtype == torch.float32),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=warps,
    )
    return dx
