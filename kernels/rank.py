"""Skinny products with one small dimension R (a LoRA rank, an adapter bottleneck), memory-bound:

  _rank_down_kernel  out[M, R] = scale · (keep ⊙ X)[M, C] · P[R, C]ᵀ          one pass over X
  _rank_grad_kernel  part[z, R, C] = Σ_{m in split z} G[m, R]ᵀ · (keep ⊙ X)[m, C]   split-M reduction
  _rank_up_add_kernel  out[M, N] += scale · keep ⊙ (T[M, R] · U[R, N])         in place, one pass over out
        the composite LoRA path's epilogue, after a library GEMM wrote out (y = x·Wᵀ, dx = dy·W)

`keep` is the optional dropout mask of kernels/dropout.py, regenerated from the seed on chip. The
split-M partial sums are added in a fixed order afterwards (no atomics, so results are deterministic).
The products run in fp32 (tf32, or fp32-accurate 3xTF32 for fp32 parameters): they are memory-bound, and
fp32 keeps small trainable parameters' gradients as accurate as an fp32 eager computation.
"""
import torch
import triton
import triton.language as tl

from . import _launch, registry
from ._launch import dot_precision, dropout_args, pow2_at_least_16, split_reduction
from .blocks import add_to_tile, load_kept, rank_epilogue_tile, split_program
from .dropout import keep_tile
from .tf32 import dot_prec


@registry.kernel
@triton.jit
def _rank_down_kernel(
    x_ptr, p_ptr, out_ptr,
    M, C, R, cols_per_split,
    stride_xm, stride_xc, stride_pr, stride_pc, stride_oz, stride_om, stride_or,
    seed, threshold, scale,
    HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # x and p go to the dot in their own dtypes (kernels/tf32.dot_prec): two 16-bit tiles on the native MMA
    # (exact products, twice the work per instruction of tf32), an fp32 one through 3xTF32 when exact
    # program (m, r, z) sums columns [z·cols_per_split, (z+1)·cols_per_split) into out[z] (split-C
    # partials, added in a fixed order by the launcher: small batches still fill the GPU)
    _, offs_m, offs_r, pid_z, c_begin, c_end = split_program(cols_per_split, C, BLOCK_M, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for c0 in range(c_begin, c_end, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        x = load_kept(x_ptr, offs_m, offs_c, (offs_m[:, None] < M) & (offs_c[None, :] < c_end), stride_xm, stride_xc,
                      c0, C, seed, threshold, HAS_DROPOUT, BLOCK_C)
        p = tl.load(p_ptr + offs_r[None, :] * stride_pr + offs_c.to(tl.int64)[:, None] * stride_pc,
                    mask=(offs_r[None, :] < R) & (offs_c[:, None] < c_end), other=0.0)
        acc = dot_prec(x, p, acc, PRECISION)
    tl.store(out_ptr + pid_z.to(tl.int64) * stride_oz + offs_m.to(tl.int64)[:, None] * stride_om
             + offs_r[None, :] * stride_or, acc * scale, mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))


@registry.kernel
@triton.jit
def _rank_grad_kernel(
    g_ptr, x_ptr, part_ptr,
    M, R, C, rows_per_split,
    stride_gm, stride_gr, stride_xm, stride_xc, stride_pz, stride_pr, stride_pc,
    seed, threshold, scale,
    HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # program (c, r, z) sums rows [z·rows_per_split, (z+1)·rows_per_split) into part[z]
    pid_c, offs_c, offs_r, pid_z, m_begin, m_end = split_program(rows_per_split, M, BLOCK_C, BLOCK_R)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for m0 in range(m_begin, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < m_end
        g_t = tl.load(g_ptr + offs_m.to(tl.int64)[None, :] * stride_gm + offs_r[:, None] * stride_gr,
                      mask=row_ok[None, :] & (offs_r[:, None] < R), other=0.0)
        x = load_kept(x_ptr, offs_m, offs_c, row_ok[:, None] & (offs_c[None, :] < C), stride_xm, stride_xc,
                      pid_c * BLOCK_C, C, seed, threshold, HAS_DROPOUT, BLOCK_C)
        acc = dot_prec(g_t, x, acc, PRECISION)
    tl.store(part_ptr + pid_z.to(tl.int64) * stride_pz + offs_r[:, None] * stride_pr + offs_c[None, :] * stride_pc,
             acc * scale, mask=(offs_r[:, None] < R) & (offs_c[None, :] < C))


@registry.kernel
@triton.jit
def _rank_up_add_kernel(
    out_ptr, t_ptr, u_ptr,
    M, N, R,
    stride_om, stride_on, stride_tm, stride_tr, stride_ur, stride_un,
    seed, threshold, scale,
    HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # one grid axis (CUDA allows 2**31 - 1 programs there, 65535 on the others); column tiles vary
    # fastest, so neighbouring programs share T's rows
    pid_n, offs_m, _, rows, cols, ok, acc = rank_epilogue_tile(t_ptr, u_ptr, M, N, R, stride_tm, stride_tr,
                                                               stride_ur, stride_un, 1.0, False, PRECISION, BLOCK_M,
                                                               BLOCK_N, BLOCK_R)
    if HAS_DROPOUT:
        acc = tl.where(keep_tile(seed, offs_m, pid_n * BLOCK_N, N, threshold, BLOCK_N), acc, 0.0)
    add_to_tile(out_ptr + rows * stride_om + cols * stride_on, acc * scale, ok)


def rank_down(x: torch.Tensor, p_rc: torch.Tensor, *, scale: float, seed: int = 0, dropout_p: float = 0.0
              ) -> torch.Tensor:
    """out[M, R] = scale · (dropout(x) · p_rcᵀ) for x [M, C] and p_rc [R, C] (any strides), fp32 result.
    Exact fp32 products when p_rc (a parameter) is fp32 (see _launch.dot_precision)."""
    M, C = x.shape
    R = p_rc.shape[0]
    out = _launch.empty((M, R), x.device, torch.float32)
    if M == 0 or C == 0:  # nothing to launch: an empty batch, or a zero-width input
        return out.zero_()
    seed_v, threshold, drop_scale = dropout_args(seed, dropout_p)
    block_m = 32 if _launch.interpreting() else 64
    block_r = pow2_at_least_16(R, 64)
    # a [BLOCK_C, 64] fp32 operand tile per pipeline stage: 128 columns overflow sm_90's shared memory (and
    # sm_80's) at three stages (scripts/aot_check.py), 64 fit. 3xTF32 with the dropout mask keeps hi/lo
    # halves of both operand tiles beside the Philox state: 32 columns, or sm_80 spills
    precision = dot_precision(p_rc.dtype == torch.float32)
    if precision == "tf32x3" and dropout_p > 0.0:
        block_c = 32
    elif precision == "tf32x3" and x.dtype == torch.float32:
        # both operands split hi/lo (DoRA's masked copy and fp32 inputs reach this without the mask): 128 columns
        # spilled at R=16 (sm_80 and sm_90) and 64 at R=64 (124 B, sm_80)
        block_c = 64 if block_r <= 32 else 32
    else:
        block_c = 128 if block_r <= 32 else 64
    block_c = 32 if _launch.interpreting() else block_c
    tiles = triton.cdiv(M, block_m) * triton.cdiv(R, block_r)
    # fewer row tiles than the GPU wants (M=2048 is 32 tiles, a quarter of an H100): split C as well; the columns
    # per split are a multiple of BLOCK_C (and of 8: the mask)
    splits, cols_per_split = split_reduction(C, block_c, tiles, x.device)
    part = out.unsqueeze(0) if splits == 1 else _launch.empty((splits, M, R), x.device, torch.float32)
    grid = (triton.cdiv(M, block_m), triton.cdiv(R, block_r), splits)
    _rank_down_kernel[grid](
        x, p_rc, part, M, C, R, cols_per_split,
        x.stride(0), x.stride(1), p_rc.stride(0), p_rc.stride(1), part.stride(0), part.stride(1), part.stride(2),
        seed_v, threshold, scale * drop_scale,
        HAS_DROPOUT=dropout_p > 0.0, PRECISION=precision,
        BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_R=block_r, num_warps=4,
    )
    if splits > 1:
        torch.sum(part, dim=0, out=out)
    return out


def rank_grad(g: torch.Tensor, x: torch.Tensor, *, scale: float, exact: bool, seed: int = 0,
              dropout_p: float = 0.0) -> torch.Tensor:
    """out[R, C] = scale · g[M, R]ᵀ · dropout(x)[M, C] in fp32, as split-M partials summed in a fixed order.
    `exact`: the result is the gradient of an fp32 parameter, so the products keep fp32 precision."""
    M, R = g.shape
    C = x.shape[1]
    if M == 0 or C == 0:
        return torch.zeros((R, C), device=x.device, dtype=torch.float32)
    seed_v, threshold, drop_scale = dropout_args(seed, dropout_p)
    precision = dot_precision(exact or x.dtype == torch.float32)
    block_m = 32 if _launch.interpreting() else 64
    block_r = pow2_at_least_16(R, 64)
    # the [BLOCK_R, BLOCK_C] accumulator (64 fp32 per thread at R=64, C=128) beside the x tile: at R=64, 3xTF32's
    # hi/lo halves of x, or an fp32 product (an fp32 g or x) with the dropout mask's Philox state, spilled at 128
    # columns (sm_80, and sm_90 for 3xTF32; scripts/aot_check.py), 64 fit; 3xTF32 with the mask needs 32. At
    # R <= 32 without the mask 3xTF32 fits at 128 (and at 64 columns sm_80 spilled 8 B: R=16, fp32 g, fp16 x)
    exact, dropout = precision == "tf32x3", dropout_p > 0.0
    if exact and dropout:
        block_c = 32
    elif exact and R % 16:
        # a rank off 16 (e.g. 8) leaves g's rows unaligned: 3xTF32 spilled 12-20 B at 128 columns and 4-8 B at 64
        # (sm_80, R=8, fp32 g, fp16 x)
        block_c = 32
    elif (exact and block_r > 32) or (dropout and torch.float32 in (g.dtype, x.dtype)):
        block_c = 64
    else:
        block_c = 128
    block_c = 32 if _launch.interpreting() else block_c
    tiles = triton.cdiv(C, block_c) * triton.cdiv(R, block_r)
    splits, rows_per_split = split_reduction(M, block_m, tiles, x.device)
    part = _launch.empty((splits, R, C), x.device, torch.float32)
    grid = (triton.cdiv(C, block_c), triton.cdiv(R, block_r), splits)
    _rank_grad_kernel[grid](
        g, x, part, M, R, C, rows_per_split,
        g.stride(0), g.stride(1), x.stride(0), x.stride(1), part.stride(0), part.stride(1), part.stride(2),
        seed_v, threshold, scale * drop_scale,
        HAS_DROPOUT=dropout_p > 0.0, PRECISION=precision,
        # a 16-bit x on 8 warps: on 4, Triton 3.6's ptxas (12.8, sm_80) spilled 8 B at 64 columns (R=16, fp32 g, fp16
        # x, dropout) and at 128 (R=32, bf16 x, 3xTF32), on 8 they hold 79 and 146 registers; an fp32 x stays on 4
        # (on 8 it spilled 8 B at 128 registers: R=16, 128 columns, 3xTF32)
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=8 if not _launch.interpreting() and x.dtype != torch.float32 else 4,
    )
    return part[0] if splits == 1 else part.sum(dim=0)


def rank_up_add_(out: torch.Tensor, t: torch.Tensor, u: torch.Tensor, *, scale: float, exact: bool, seed: int = 0,
                 dropout_p: float = 0.0) -> torch.Tensor:
    """out[M, N] += scale · keep ⊙ (t[M, R] · u[R, N]) / (1 - p), in place, the sum in fp32 and rounded once
    to out's dtype; `keep` is the dropout mask of an [M, N] input (kernels/dropout.py). Returns out.
    `exact`: a factor is an fp32 parameter, so the products keep fp32 precision.

    Roofline (M=8192, N=4096, R=16, bf16 out, H100): one read and one write of out (2 × 64 MiB) plus
    t (0.5 MiB) ≈ 134 MB ≈ 45 µs at 3 TB/s; 2·M·N·R = 1.1 GFLOP is noise. That is what the composite
    LoRA path pays beyond the library GEMM (x·Wᵀ: 275 GFLOP ≈ 0.35–0.45 ms): about 10–13%, against a
    fused Triton GEMM that may trail cuBLAS by a similar margin, hence measured dispatch."""
    M, N = out.shape
    R = t.shape[1]
    if M == 0 or N == 0 or R == 0:
        return out
    seed_v, threshold, drop_scale = dropout_args(seed, dropout_p)
    # memory-bound: a [64, 128] fp32 tile is 64 registers per thread at 4 warps, the mask tile as many
    # again; the interpreter gets small tiles (it runs every program in numpy)
    block_m, block_n = (32, 32) if _launch.interpreting() else (64, 128)
    block_r = pow2_at_least_16(R, 32)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _rank_up_add_kernel[grid](
        out, t, u, M, N, R,
        out.stride(0), out.stride(1), t.stride(0), t.stride(1), u.stride(0), u.stride(1),
        seed_v, threshold, scale * drop_scale,
        HAS_DROPOUT=dropout_p > 0.0, PRECISION=dot_precision(exact),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=4,
    )
    return out
