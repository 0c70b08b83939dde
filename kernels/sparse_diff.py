"""Triton kernels of sparse_diff_linear:  y = x·(W + Δ)ᵀ with Δ sparse, never dense.

  _spmm_segments_kernel  out[m, j] += Σ_{z in segment j} val[z] · src[m, col[z]]
        forward: out = y (after the dense GEMM x·Wᵀ), segments = Δ's rows (CSR), src = x
        backward: out = dx (after dy·W), segments = Δ's columns (CSC), src = dy
        Each program owns BLOCK_M tokens of one output column: it walks that column's segment,
        gathering from src rows that sit in L1/L2, accumulates in fp32, and adds once to out.
  _sddmm_kernel          part[s, z] = Σ_{m in split s} dy[m, row[z]] · x[m, col[z]]
        the gradient of the values as a sampled dense-dense product: only the diff's positions are
        computed, and split-M partial sums are added in a fixed order (no atomics, deterministic).
The dense x·Wᵀ and dy·W stay with the library GEMM (cuBLAS); no [out, in] tensor is ever allocated.
The positions come from a layout built in the same call from range-checked indices
(peftkern/ops/sparse_diff.py); the kernels still mask every gathered column/row against the size of
the tensor it addresses (one compare per position), so no position can ever address memory outside it.
"""
import torch
import triton
import triton.language as tl

from . import INTERPRET, _launch
from ._launch import target_programs


@triton.jit
def _spmm_segments_kernel(
    src_ptr, seg_ptr, col_ptr, val_ptr, out_ptr,
    M, K,
    stride_sm, stride_sk, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_Z: tl.constexpr,
):
    pid_m = tl.program_id(0)
    j = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    rows = offs_m.to(tl.int64)
    start = tl.load(seg_ptr + j)
    end = tl.load(seg_ptr + j + 1)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for z0 in range(start, end, BLOCK_Z):
        offs_z = z0 + tl.arange(0, BLOCK_Z)
        z_ok = offs_z < end
        cols = tl.load(col_ptr + offs_z, mask=z_ok, other=0).to(tl.int64)
        z_ok = z_ok & (cols >= 0) & (cols < K)
        vals = tl.load(val_ptr + offs_z, mask=z_ok, other=0.0).to(tl.float32)
        src = tl.load(src_ptr + rows[:, None] * stride_sm + cols[None, :] * stride_sk,
                      mask=m_ok[:, None] & z_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(src * vals[None, :], axis=1)
    out_ptrs = out_ptr + rows * stride_om + j * stride_on
    cur = tl.load(out_ptrs, mask=m_ok, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (cur + acc).to(out_ptr.dtype.element_ty), mask=m_ok)


@triton.jit
def _sddmm_kernel(
    dy_ptr, x_ptr, row_ptr, col_ptr, part_ptr,
    M, N, K, NNZ, rows_per_split,
    stride_dym, stride_dyn, stride_xm, stride_xk, stride_ps,
    BLOCK_M: tl.constexpr, BLOCK_Z: tl.constexpr,
):
    pid_z = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_z = pid_z * BLOCK_Z + tl.arange(0, BLOCK_Z)
    z_ok = offs_z < NNZ
    r = tl.load(row_ptr + offs_z, mask=z_ok, other=0).to(tl.int64)
    c = tl.load(col_ptr + offs_z, mask=z_ok, other=0).to(tl.int64)
    pos_ok = z_ok & (r >= 0) & (r < N) & (c >= 0) & (c < K)  # masked positions sum to 0
    m_begin = pid_s * rows_per_split
    m_end = tl.minimum(m_begin + rows_per_split, M)
    acc = tl.zeros((BLOCK_Z,), dtype=tl.float32)
    for m0 in range(m_begin, m_end, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        ok = (offs_m[:, None] < m_end) & pos_ok[None, :]
        g = tl.load(dy_ptr + offs_m[:, None] * stride_dym + r[None, :] * stride_dyn, mask=ok, other=0.0)
        xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + c[None, :] * stride_xk, mask=ok, other=0.0)
        acc += tl.sum(g.to(tl.float32) * xv.to(tl.float32), axis=0)
    tl.store(part_ptr + pid_s.to(tl.int64) * stride_ps + offs_z, acc, mask=z_ok)


def _blocks():
    return (16, 16) if INTERPRET else (32, 64)


def spmm_add_(out: torch.Tensor, src: torch.Tensor, seg: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor) -> None:
    """out[:, j] += src[:, cols[seg[j]:seg[j+1]]] · vals[seg[j]:seg[j+1]] for every column j of out, in place."""
    M, J = out.shape
    if M == 0 or J == 0 or cols.numel() == 0:
        return
    block_m, block_z = _blocks()
    _spmm_segments_kernel[(triton.cdiv(M, block_m), J)](
        src, seg, cols, vals, out, M, src.shape[1],
        src.stride(0), src.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_Z=block_z, num_warps=4,
    )


def sddmm(dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """g[z] = Σ_m dy[m, rows[z]] · x[m, cols[z]] in fp32."""
    M = dy.shape[0]
    nnz = rows.numel()
    if nnz == 0 or M == 0:
        return torch.zeros(nnz, device=dy.device, dtype=torch.float32)
    block_m, block_z = _blocks()
    z_blocks = triton.cdiv(nnz, block_z)
    m_blocks = triton.cdiv(M, block_m)
    splits = max(1, min(m_blocks, triton.cdiv(target_programs(dy.device), z_blocks)))
    rows_per_split = triton.cdiv(m_blocks, splits) * block_m
    splits = triton.cdiv(M, rows_per_split)
    part = _launch.empty((splits, nnz), dy.device, torch.float32)
    _sddmm_kernel[(z_blocks, splits)](
        dy, x, rows, cols, part, M, dy.shape[1], x.shape[1], nnz, rows_per_split,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), part.stride(0),
        BLOCK_M=block_m, BLOCK_Z=block_z, num_warps=4,
    )
    return part[0] if splits == 1 else part.sum(dim=0)
