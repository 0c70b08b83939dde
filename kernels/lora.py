"""Triton kernels of fused LoRA:  y = x·Wᵀ + bias + s·(dropout(x)·Aᵀ)·Bᵀ.

Three kernels cover forward and backward (see `peftkern/ops/lora.py` for how they are wired):
  _rank_down_kernel  out[M, R] = scale · (keep ⊙ X)[M, C] · P[R, C]ᵀ     S = drop(x)·Aᵀ, dS = s·dy·B
  _rank_grad_kernel  part[z, R, C] = Σ_{m in split z} G[m, R]ᵀ · (keep ⊙ X)[m, C]   dA, dBᵀ
  _lora_gemm_kernel  out[M, N] = A[M, L]·B[L, N] (+bias) + c·(T[M, R]·U[R, N]) ⊙ keep
                     forward y (T = S, U = Bᵀ, c = s) and dx (T = dS, U = A, with the dropout mask)
The dropout mask is regenerated from the seed wherever it is needed (kernels/dropout.py); neither the
mask nor dropout(x) is ever written. Split-M partial sums replace atomics, so every result is
deterministic. The rank-r products run in fp32 (tf32 unless fp32 matmuls are asked to be exact):
they are memory-bound, and fp32 keeps the adapter gradients as accurate as PEFT's fp32 adapters.
"""
import functools

import torch
import triton
import triton.language as tl

from . import INTERPRET
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


@triton.jit
def _lora_gemm_kernel(
    a_ptr, b_ptr, t_ptr, u_ptr, bias_ptr, out_ptr,
    M, N, L, R,
    stride_am, stride_al, stride_bl, stride_bn, stride_tm, stride_tr, stride_ur, stride_un,
    stride_om, stride_on,
    seed, threshold, low_scale,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    MAIN_PRECISION: tl.constexpr, RANK_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, M_BUCKET: tl.constexpr,  # M_BUCKET: autotuning key only
):
    # grouped ordering (Triton tutorial 03): neighbouring programs share A row-blocks in L2
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    group_id = pid // width
    first_m = group_id * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    # rows/cols past the edge re-read a valid one (% M, % N) so the loads need only the K mask;
    # row offsets are int64 so that tensors over 2**31 elements address correctly
    a_ptrs = a_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_al
    b_ptrs = b_ptr + offs_k[:, None] * stride_bl + (offs_n % N).to(tl.int64)[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, L, BLOCK_K):
        k_ok = offs_k < L - k0
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=MAIN_PRECISION)
        a_ptrs += BLOCK_K * stride_al
        b_ptrs += BLOCK_K * stride_bl

    # epilogue: the rank-r term from the [M, R] and [R, N] factors, on chip
    t_rows = t_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_tm
    u_cols = u_ptr + (offs_n % N).to(tl.int64)[None, :] * stride_un
    if HAS_DROPOUT:
        # the mask applies to the rank-r term only, so it needs its own accumulator
        low = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            t = tl.load(t_rows + offs_r[None, :] * stride_tr, mask=offs_r[None, :] < R, other=0.0).to(tl.float32)
            u = tl.load(u_cols + offs_r[:, None] * stride_ur, mask=offs_r[:, None] < R, other=0.0).to(tl.float32)
            low = tl.dot(t, u, low, input_precision=RANK_PRECISION)
        keep = keep_tile(seed, offs_m, pid_n * BLOCK_N, N, threshold, BLOCK_N)
        acc += tl.where(keep, low * low_scale, 0.0)
    else:
        # no mask: accumulate straight into acc (no second [BLOCK_M, BLOCK_N] register tile)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            t = tl.load(t_rows + offs_r[None, :] * stride_tr, mask=offs_r[None, :] < R, other=0.0).to(tl.float32)
            u = tl.load(u_cols + offs_r[:, None] * stride_ur, mask=offs_r[:, None] < R, other=0.0).to(tl.float32)
            acc = tl.dot(t * low_scale, u, acc, input_precision=RANK_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n.to(tl.int64)[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------------------------
# launchers: tensors in, tensors out; shapes are checked by peftkern/ops/lora.py before this point
# ----------------------------------------------------------------------------------------------

def _empty(shape, device, dtype) -> torch.Tensor:
    """Every kernel output is allocated here (tests replace it with a NaN-filled allocation to prove
    that the kernels write every element)."""
    return torch.empty(shape, device=device, dtype=dtype)


def _pow2_at_least_16(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(n)))


def _fp32_precision(dtype: torch.dtype) -> str:
    """tl.dot precision for fp32 operands: exact ("ieee") unless the user allowed TF32 for fp32 matmuls."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    if INTERPRET or device.type != "cuda":
        return 4  # few programs: the interpreter runs each one in numpy, and >1 split still gets tested
    return 4 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def _gemm_configs():
    """Tile shapes the GEMM autotunes over on GPU (Hopper/Ampere bf16 favourites of Triton tutorial 03);
    the interpreter gets one small tile. Configs that do not fit in shared memory (fp32 with large tiles)
    are skipped by the autotuner."""
    if INTERPRET:
        return [triton.Config(dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4), num_warps=4, num_stages=1)]
    tiles = [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
             (128, 128, 32, 4, 4), (64, 128, 64, 4, 4), (128, 64, 32, 4, 4)]
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=w, num_stages=st)
            for bm, bn, bk, w, st in tiles]


# tuned per (power-of-two bucket of M, N, L, R, dropout, dtypes): training with varying token counts
# does not re-tune at every new M
_lora_gemm_tuned = triton.autotune(configs=_gemm_configs(), key=["M_BUCKET", "N", "L", "R", "HAS_DROPOUT"])(
    _lora_gemm_kernel)


def _seed_args(seed: int, p: float):
    from peftkern.reference.dropout import keep_threshold  # the one definition of the threshold
    if p > 0.0:
        return seed, keep_threshold(p), 1.0 / (1.0 - p)
    return 0, 0, 1.0


def rank_down(x: torch.Tensor, p_rc: torch.Tensor, *, scale: float, seed: int = 0, dropout_p: float = 0.0,
              out_dtype=torch.float32) -> torch.Tensor:
    """out[M, R] = scale · (dropout(x) · p_rcᵀ) for x [M, C] and p_rc [R, C] (any strides), fp32 result."""
    M, C = x.shape
    R = p_rc.shape[0]
    out = _empty((M, R), x.device, out_dtype)
    if M == 0 or C == 0:  # nothing to launch: an empty batch, or a zero-width input
        return out.zero_()
    seed_v, threshold, drop_scale = _seed_args(seed, dropout_p)
    block_m = 32 if INTERPRET else 64
    block_c = 32 if INTERPRET else 128
    block_r = _pow2_at_least_16(R, 64)
    grid = (triton.cdiv(M, block_m), triton.cdiv(R, block_r))
    _rank_down_kernel[grid](
        x, p_rc, out, M, C, R,
        x.stride(0), x.stride(1), p_rc.stride(0), p_rc.stride(1), out.stride(0), out.stride(1),
        seed_v, threshold, scale * drop_scale,
        HAS_DROPOUT=dropout_p > 0.0, PRECISION=_fp32_precision(x.dtype),
        BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_R=block_r, num_warps=4,
    )
    return out


def rank_grad(g: torch.Tensor, x: torch.Tensor, *, scale: float, seed: int = 0, dropout_p: float = 0.0
              ) -> torch.Tensor:
    """out[R, C] = scale · g[M, R]ᵀ · dropout(x)[M, C] in fp32, as split-M partials summed in a fixed order."""
    M, R = g.shape
    C = x.shape[1]
    if M == 0 or C == 0:
        return torch.zeros((R, C), device=x.device, dtype=torch.float32)
    seed_v, threshold, drop_scale = _seed_args(seed, dropout_p)
    block_m = 32 if INTERPRET else 64
    block_c = 32 if INTERPRET else 128
    block_r = _pow2_at_least_16(R, 64)
    tiles = triton.cdiv(C, block_c) * triton.cdiv(R, block_r)
    m_blocks = triton.cdiv(M, block_m)
    splits = max(1, min(m_blocks, triton.cdiv(_target_programs(x.device), tiles)))
    rows_per_split = triton.cdiv(m_blocks, splits) * block_m
    splits = triton.cdiv(M, rows_per_split)
    part = _empty((splits, R, C), x.device, torch.float32)
    grid = (triton.cdiv(C, block_c), triton.cdiv(R, block_r), splits)
    _rank_grad_kernel[grid](
        g, x, part, M, R, C, rows_per_split,
        g.stride(0), g.stride(1), x.stride(0), x.stride(1), part.stride(0), part.stride(1), part.stride(2),
        seed_v, threshold, scale * drop_scale,
        HAS_DROPOUT=dropout_p > 0.0, PRECISION=_fp32_precision(x.dtype),
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
    )
    return part[0] if splits == 1 else part.sum(dim=0)


def lora_gemm(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, u: torch.Tensor, bias, *,
              lora_scale: float = 1.0, seed: int = 0, dropout_p: float = 0.0, out_dtype=None) -> torch.Tensor:
    """out[M, N] = a·b (+bias) + lora_scale·(t·u) ⊙ keep/(1-p) at (m, n); a [M, L], b [L, N], t [M, R], u [R, N]."""
    M, L = a.shape
    N = b.shape[1]
    R = t.shape[1]
    out = _empty((M, N), a.device, out_dtype or a.dtype)
    if M == 0 or N == 0:
        return out
    seed_v, threshold, drop_scale = _seed_args(seed, dropout_p)
    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _lora_gemm_tuned[grid](
        a, b, t, u, bias.contiguous() if bias is not None else out, out,  # bias is read with unit stride
        M, N, L, R,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), t.stride(0), t.stride(1),
        u.stride(0), u.stride(1), out.stride(0), out.stride(1),
        seed_v, threshold, lora_scale * drop_scale,
        HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0.0,
        MAIN_PRECISION=_fp32_precision(a.dtype), RANK_PRECISION=_fp32_precision(a.dtype),
        BLOCK_R=_pow2_at_least_16(R, 32), M_BUCKET=triton.next_power_of_2(M),
    )
    return out
