"""Skinny products with one small dimension R (a LoRA rank, an adapter bottleneck), memory-bound:

  _rank_down_kernel  out[M, R] = scale · (keep ⊙ X)[M, C] · P[R, C]ᵀ          one pass over X
  _rank_grad_kernel  part[z, R, C] = Σ_{m in split z} G[m, R]ᵀ · (keep ⊙ X)[m, C]   split-M reduction

`keep` is the optional dropout mask of kernels/dropout.py, regenerated from the seed on chip. The
split-M partial sums are added in a fixed order afterwards (no atomics, so results are deterministic).
The products run in fp32 (tf32 unless fp32 matmuls are asked to be exact): they are memory-bound, and
fp32 keeps small trainable parameters' gradients as accurate as an fp32 eager computation.
"""
import torch
import triton
import triton.language as tl

from . import INTERPRET
from . import _launch
from ._launch import dot_precision, dropout_args, pow2_at_least_16, target_programs
from .dropout import keep_tile


@triton.jit
def _rank_down_kernel(
    x_ptr, p_ptr, out_ptr,
    M, C, R,
    stride_xm, stride_xc, stride_pr, stride_pc, stride_om, stride_or,
    seed, threshold, scale,
    HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_c[None, :] * stride_xc,
                    mask=(offs_m[:, None] < M) & (offs_c[None, :] < C), other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            x = tl.where(keep_tile(seed, offs_m, c0, C, threshold, BLOCK_C), x, 0.0)
        p = tl.load(p_ptr + offs_r[None, :] * stride_pr + offs_c.to(tl.int64)[:, None] * stride_pc,
                    mask=(offs_r[None, :] < R) & (offs_c[:, None] < C), other=0.0).to(tl.float32)
        acc = tl.dot(x, p, acc, input_precision=PRECISION)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_r[None, :] * stride_or, acc * scale,
             mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))


@triton.jit
def _rank_grad_kernel(
    g_ptr, x_ptr, part_ptr,
    M, R, C, rows_per_split,
    stride_gm, stride_gr, stride_xm, stride_xc, stride_pz, stride_pr, stride_pc,
    seed, threshold, scale,
    HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_z = tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_begin = pid_z * rows_per_split
    m_end = tl.minimum(m_begin + rows_per_split, M)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for m0 in range(m_begin, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < m_end
        g_t = tl.load(g_ptr + offs_m.to(tl.int64)[None, :] * stride_gm + offs_r[:, None] * stride_gr,
                      mask=row_ok[None, :] & (offs_r[:, None] < R), other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_c[None, :] * stride_xc,
                    mask=row_ok[:, None] & (offs_c[None, :] < C), other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            x = tl.where(keep_tile(seed, offs_m, pid_c * BLOCK_C, C, threshold, BLOCK_C), x, 0.0)
        acc = tl.dot(g_t, x, acc, input_precision=PRECISION)
    tl.store(part_ptr + pid_z.to(tl.int64) * stride_pz + offs_r[:, None] * stride_pr + offs_c[None, :] * stride_pc,
             acc * scale, mask=(offs_r[:, None] < R) & (offs_c[None, :] < C))



def rank_down(x: torch.Tensor, p_rc: torch.Tensor, *, scale: float, seed: int = 0, dropout_p: float = 0.0,
              out_dtype=torch.float32) -> torch.Tensor:
    """out[M, R] = scale · (dropout(x) · p_rcᵀ) for x [M, C] and p_rc [R, C] (any strides), fp32 result.
    Exact fp32 products when p_rc (a parameter) is fp32 (see _launch.dot_precision)."""
    M, C = x.shape
    R = p_rc.shape[0]
    out = _launch.empty((M, R), x.device, out_dtype)
    if M == 0 or C == 0:  # nothing to launch: an empty batch, or a zero-width input
        return out.zero_()
    seed_v, threshold, drop_scale = dropout_args(seed, dropout_p)
    block_m = 32 if INTERPRET else 64
    block_c = 32 if INTERPRET else 128
    block_r = pow2_at_least_16(R, 64)
    grid = (triton.cdiv(M, block_m), triton.cdiv(R, block_r))
    _rank_down_kernel[grid](
        x, p_rc, out, M, C, R,
        x.stride(0), x.stride(1), p_rc.stride(0), p_rc.stride(1), out.stride(0), out.stride(1),
        seed_v, threshold, scale * drop_scale,
        HAS_DROPOUT=dropout_p > 0.0, PRECISION=dot_precision(p_rc.dtype == torch.float32),
        BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_R=block_r, num_warps=4,
    )
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
    block_m = 32 if INTERPRET else 64
    block_c = 32 if INTERPRET else 128
    block_r = pow2_at_least_16(R, 64)
    tiles = triton.cdiv(C, block_c) * triton.cdiv(R, block_r)
    m_blocks = triton.cdiv(M, block_m)
    splits = max(1, min(m_blocks, triton.cdiv(target_programs(x.device), tiles)))
    rows_per_split = triton.cdiv(m_blocks, splits) * block_m
    splits = triton.cdiv(M, rows_per_split)
    part = _launch.empty((splits, R, C), x.device, torch.float32)
    grid = (triton.cdiv(C, block_c), triton.cdiv(R, block_r), splits)
    _rank_grad_kernel[grid](
        g, x, part, M, R, C, rows_per_split,
        g.stride(0), g.stride(1), x.stride(0), x.stride(1), part.stride(0), part.stride(1), part.stride(2),
        seed_v, threshold, scale * drop_scale,
        HAS_DROPOUT=dropout_p > 0.0, PRECISION=dot_precision(exact or x.dtype == torch.float32),
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
    )
    return part[0] if splits == 1 else part.sum(dim=0)
