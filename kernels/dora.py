"""Triton kernels of fused DoRA, beside LoRA's (kernels/lora.py, kernels/rank.py).

With n_j = ‖W_j + s·(B·A)_j‖₂ (a constant in backward), c = magnitude / n, S = dropout(x)·Aᵀ, R = s·S·Bᵀ:
  p = 0:  z = x·Wᵀ + R,  y = c ⊙ z + bias
  p > 0:  z = d·Wᵀ + R (d = dropout(x)),  y = x·Wᵀ + R + (c − 1) ⊙ z + bias
backward, g = dy:  gc = g ⊙ c,  dmag = Σ_m g ⊙ z / n;  the rank-r part is LoRA's on gc;
  p = 0:  dx = gc·W + dS·A (kernels/lora.lora_gemm)
  p > 0:  dx = g·W + keep/(1 − p) ⊙ (gm·W + dS·A),  gm = g ⊙ (c − 1)

  _dora_weight_norm_kernel       n² partials: Σ_k (W + s·B·A)² per row, split-K          one pass over W
  _dora_grad_scale_kernel        gc = g ⊙ c (and gm = g ⊙ (c − 1)), Σ_m g ⊙ z partials  one pass over g (and z)
  _dora_keep_x_kernel            keep ⊙ x (unscaled, exact, x's dtype)                    one pass over x
  _dora_fwd_kernel               y (and z) in one GEMM; with dropout two accumulators share each Wᵀ tile
  _dora_dx_kernel                dx with dropout: two accumulators (g·W, gm·W + dS·A) share each W tile
  kernels/dora_epilogue.py       the composite path's epilogues after library GEMMs (y, z; the dropout dx), in place

gm = g ⊙ (c − 1) is its own operand rather than gc − g: c is near 1 (the magnitude starts at n), and a 16-bit gc
minus g would cancel away the small (c − 1) ⊙ g term to a few bits. Every reduction is split into partials
summed in a fixed order by the launcher (no atomics: deterministic). Accumulation is fp32 everywhere; the
rank-r products and the norm's B·A are fp32-accurate (3xTF32) when an adapter is fp32 (_launch.dot_precision).

Roofline at the headline shape (M = 8192 tokens, K = N = 4096, r = 16, bf16, H100 ~800 TFLOP/s, ~3 TB/s): each
launcher's docstring gives its own; the forward GEMM is 275 GFLOP (0.34 ms) without dropout and 550 GFLOP
(0.69 ms, the two products PEFT also runs) with it, and everything else here is memory-bound and small beside it.
"""
import torch
import triton
import triton.language as tl

from . import _launch, blocks, registry
from ._launch import dot_precision, dropout_args, split_reduction
from .blocks import (
    acc_per_thread,
    b_layout,
    gemm_grid,
    grouped_tile,
    k_loop,
    k_loop_pair,
    rank_term,
    row_major_tile,
    split_range,
    store_tile,
)
from .dora_epilogue import dora_dx_combine_, dora_forward_epilogue_
from .dropout import keep_tile
from .tf32 import dot_prec

__all__ = ["dora_dx_combine_", "dora_dx_gemm", "dora_forward_epilogue_", "dora_forward_gemm", "dora_grad_scale",
           "dora_keep_x", "dora_weight_norm"]

# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------

@registry.kernel
@triton.jit
def _dora_weight_norm_kernel(
    w_ptr, a_ptr, b_ptr, part_ptr,
    N, K, R, cols_per_split,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br, stride_pz,
    scaling,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # program (n, z): Σ over columns [z·cols_per_split, (z+1)·cols_per_split) of v², v = W + s·(B·A) on the tile
    # (PEFT's dense formula: the sum is formed, then squared; no ‖W‖² + 2s⟨W, BA⟩ + … expansion that cancels)
    pid_n = tl.program_id(0)
    pid_z = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    b_rows = b_ptr + offs_n.to(tl.int64)[:, None] * stride_bn
    k_begin, k_end = split_range(pid_z, cols_per_split, K)
    sq = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_end
        w = tl.load(w_rows + offs_k[None, :] * stride_wk, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        delta = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            b = tl.load(b_rows + offs_r[None, :] * stride_br, mask=n_ok[:, None] & (offs_r[None, :] < R), other=0.0)
            a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k.to(tl.int64)[None, :] * stride_ak,
                        mask=(offs_r[:, None] < R) & k_ok[None, :], other=0.0)
            delta = dot_prec(b, a, delta, PRECISION)
        v = w.to(tl.float32) + scaling * delta
        sq += v * v
    tl.store(part_ptr + pid_z.to(tl.int64) * stride_pz + offs_n, tl.sum(sq, axis=1), mask=n_ok)


@registry.kernel
@triton.jit
def _dora_grad_scale_kernel(
    g_ptr, c_ptr, z_ptr, gc_ptr, gm_ptr, part_ptr,
    M, N, rows_per_split,
    stride_gm, stride_gn, stride_zm, stride_zn, stride_om, stride_on, stride_pz,
    HAS_Z: tl.constexpr, HAS_GM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # program (n, z): rows [z·rows_per_split, (z+1)·rows_per_split) of BLOCK_N columns; gc (and gm) are written
    # there, and the column sums of g ⊙ z over those rows go to part[z] (summed in a fixed order afterwards)
    pid_n = tl.program_id(0)
    pid_z = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    c = tl.load(c_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    if HAS_GM:
        c_minus_one = c - 1.0
    m_begin, m_end = split_range(pid_z, rows_per_split, M)
    cols_g = offs_n.to(tl.int64)[None, :] * stride_gn
    cols_o = offs_n.to(tl.int64)[None, :] * stride_on
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for m0 in range(m_begin, m_end, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        ok = (offs_m < m_end)[:, None] & n_ok[None, :]
        g = tl.load(g_ptr + offs_m[:, None] * stride_gm + cols_g, mask=ok, other=0.0).to(tl.float32)
        out = offs_m[:, None] * stride_om + cols_o
        tl.store(gc_ptr + out, (g * c).to(gc_ptr.dtype.element_ty), mask=ok)  # fp32 product, rounded once
        if HAS_GM:
            tl.store(gm_ptr + out, (g * c_minus_one).to(gm_ptr.dtype.element_ty), mask=ok)
        if HAS_Z:
            z = tl.load(z_ptr + offs_m[:, None] * stride_zm + offs_n.to(tl.int64)[None, :] * stride_zn, mask=ok,
                        other=0.0)
            acc += g * z.to(tl.float32)
    if HAS_Z:
        tl.store(part_ptr + pid_z.to(tl.int64) * stride_pz + offs_n, tl.sum(acc, axis=0), mask=n_ok)


@registry.kernel
@triton.jit
def _dora_keep_x_kernel(
    x_ptr, out_ptr,
    M, K,
    stride_xm, stride_xk, stride_om, stride_ok,
    seed, threshold,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # one grid axis over [BLOCK_M, BLOCK_K] tiles, column tiles fastest
    pid_k, offs_m, offs_k = row_major_tile(M, K, BLOCK_M, BLOCK_K)
    ok = (offs_m < M)[:, None] & (offs_k < K)[None, :]
    x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k.to(tl.int64)[None, :] * stride_xk,
                mask=ok, other=0.0)
    keep = keep_tile(seed, offs_m, pid_k * BLOCK_K, K, threshold, BLOCK_K)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_k.to(tl.int64)[None, :] * stride_ok,
             tl.where(keep, x, 0.0).to(x.dtype), mask=ok)


@triton.jit
def _dora_fwd_kernel(
    x_ptr, xm_ptr, w_ptr, t_ptr, u_ptr, bias_ptr, c_ptr, y_ptr, z_ptr,
    M, N, L, R,
    stride_xm, stride_xl, stride_km, stride_kl, stride_wl, stride_wn, stride_tm, stride_tr, stride_ur, stride_un,
    stride_om, stride_on,
    low_scale, drop_scale,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, WRITE_Z: tl.constexpr,
    MAIN_PRECISION: tl.constexpr, RANK_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, M_BUCKET: tl.constexpr, B_LAYOUT: tl.constexpr,  # autotuning key only
):
    # y [M, N], z [M, N] (same strides) from x [M, L], w = Wᵀ [L, N], t = S [M, R], u = Bᵀ [R, N]; xm = keep ⊙ x
    # (HAS_DROPOUT). Grouped ordering (kernels/blocks.tile_position): neighbouring programs share x's row blocks in L2.
    _, _, offs_m, offs_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # rows/cols past the edge re-read a valid one (% M, % N) so the loads need only the K mask; row offsets int64

    # R = s·S·Bᵀ first, as the initial value (kernels/blocks.lora_prologue: its factors are dead before the main
    # loop's pipelined tiles are live). Without dropout one accumulator: z = R + x·Wᵀ. With dropout two, sharing each
    # Wᵀ tile: acc = R + x·Wᵀ and acc_z = R·(1 − p) + (keep ⊙ x)·Wᵀ, so that z = acc_z/(1 − p) = R + d·Wᵀ
    acc = rank_term(t_ptr, u_ptr, offs_m, offs_n, M, N, R, stride_tm, stride_tr, stride_ur, stride_un,
                    tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), low_scale, True, True, RANK_PRECISION, BLOCK_R)
    if HAS_DROPOUT:
        acc, acc_z = k_loop_pair(x_ptr, xm_ptr, w_ptr, offs_m % M, offs_n % N, stride_xm, stride_xl, stride_km,
                                 stride_kl, stride_wl, stride_wn, L, acc, acc * (1.0 / drop_scale), MAIN_PRECISION,
                                 BLOCK_K)
    else:
        acc = k_loop(x_ptr, w_ptr, offs_m % M, offs_n % N, stride_xm, stride_xl, stride_wl, stride_wn, L, acc,
                     MAIN_PRECISION, BLOCK_K)

    c = tl.load(c_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
    if HAS_DROPOUT:
        z = acc_z * drop_scale
        y = acc + (c - 1.0) * z
    else:
        z = acc
        y = acc * c
    if HAS_BIAS:
        y += blocks.bias_row(bias_ptr, offs_n, N)
    if WRITE_Z:
        store_tile(z_ptr, z, offs_m, offs_n, M, N, stride_om, stride_on)
    store_tile(y_ptr, y, offs_m, offs_n, M, N, stride_om, stride_on)


@triton.jit
def _dora_dx_kernel(
    g_ptr, h_ptr, w_ptr, t_ptr, u_ptr, out_ptr,
    M, N, L, R,
    stride_gm, stride_gl, stride_hm, stride_hl, stride_wl, stride_wn, stride_tm, stride_tr, stride_ur, stride_un,
    stride_om, stride_on,
    seed, threshold, drop_scale,
    MAIN_PRECISION: tl.constexpr, RANK_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, M_BUCKET: tl.constexpr, B_LAYOUT: tl.constexpr,  # autotuning key only
):
    # dx [M, N = in] from g [M, L = out], h = gm [M, L], w = W [L, N], t = dS [M, R], u = A [R, N]:
    # acc = g·W, acc_h = dS·A + gm·W (initial value first, as in _dora_fwd_kernel), dx = acc + keep/(1−p) ⊙ acc_h
    _, pid_n, offs_m, offs_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc_h = rank_term(t_ptr, u_ptr, offs_m, offs_n, M, N, R, stride_tm, stride_tr, stride_ur, stride_un,
                      tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), 1.0, True, False, RANK_PRECISION, BLOCK_R)
    acc, acc_h = k_loop_pair(g_ptr, h_ptr, w_ptr, offs_m % M, offs_n % N, stride_gm, stride_gl, stride_hm, stride_hl,
                             stride_wl, stride_wn, L, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), acc_h,
                             MAIN_PRECISION, BLOCK_K)

    # the mask of x's element (m, n): dx has x's coordinates
    keep = keep_tile(seed, offs_m, pid_n * BLOCK_N, N, threshold, BLOCK_N)
    acc += tl.where(keep, acc_h * drop_scale, 0.0)
    store_tile(out_ptr, acc, offs_m, offs_n, M, N, stride_om, stride_on)


# ----------------------------------------------------------------------------------------------
# GEMM configs
# ----------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), per kernel and activation dtype (16-bit, fp32). Measured with ptxas -v
# through scripts/aot_check.py (triton 3.9) for sm_80 and sm_90 in its six dtype settings (bf16/fp16 activations with
# adapters in their dtype or fp32, fp32 with and without TF32), rank 16 and 64, bias, z and dropout on and off:
# after the pruning below, nothing spills.
# Forward without dropout: kernels/lora.py's GEMM with another epilogue (column scale, bias, z after the loop, where
# the pipelined tiles' registers are free) and its tile lists, less 128x128x64 on 4 warps (128 accumulator fp32 per
# thread: the column scale alone spilled 8-24 B on sm_80). With 3xTF32 adapters, the bias or z, at most 64
# accumulator fp32 per thread (kernels/lora.py's budget: 128 spilled 40-836 B). fp32: 128x64 on 8 warps, not on 4
# (3xTF32 main products with the bias spilled 8 B on sm_80).
_TILES_16 = [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 32, 4, 4),
             (64, 128, 64, 4, 4), (128, 64, 32, 4, 4)]
_TILES_FP32 = [(64, 128, 32, 4, 3), (128, 64, 32, 8, 3), (64, 64, 32, 4, 4)]
_MAX_ACC_PER_THREAD_HEAVY = 64
# Forward with dropout: two accumulators and two activation tiles per stage. 128x128 on 4 warps and 128x256 on 8
# spilled kilobytes in every setting; 128x128 on 8 warps spilled 56-80 B on sm_80 with 3xTF32 adapters (the rank-r
# factors' hi/lo halves beside both accumulators before the loop): with those, tiles of at most 128x64. fp32 (3xTF32
# main products): 8 warps from 64x64 up (64x64 on 4 warps spilled 24 B on sm_80, 64x128 on 8 68 B on sm_90).
_TILES_16_FWD_DROPOUT = [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3),
                         (128, 64, 32, 4, 4), (64, 64, 64, 4, 4)]
_TILES_FP32_FWD_DROPOUT = [(128, 64, 32, 8, 3), (64, 64, 32, 8, 3), (64, 32, 32, 4, 4)]
_MAX_TILE_FWD_DROPOUT_EXACT_RANK = 128 * 64
# dx with dropout: two accumulators, the mask's Philox after the loop. 128x128x64 on 8 warps spilled 92 B on sm_80
# (128x128x32 with four stages did not), 128x128 on 4 warps and 128x256 kilobytes; fp32 (3xTF32 main products):
# 8 warps for 128x64, at most 64x64 on 4 (128x64 and 64x128 on 4 warps spilled 392-1192 B). Every tile listed
# compiled without spills in every setting, so nothing is pruned.
# (64, 64, 64) on 4 warps, 4 stages left out: with the dropout mask it spilled 8 B at 168 registers under Triton 3.6's
# ptxas (12.8, sm_80, bf16 and fp16)
_TILES_16_DX = [(128, 128, 32, 8, 4), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 64, 32, 4, 4)]
_TILES_FP32_DX = [(128, 64, 32, 8, 3), (64, 64, 32, 4, 3), (64, 32, 32, 4, 4)]


def gemm_configs():
    """Tile shapes the GEMMs autotune over on GPU: every list, once (prune_fwd_configs / prune_dx_configs keep the
    ones of each call's setting); the interpreter gets one small tile."""
    return blocks.gemm_configs(_TILES_16 + _TILES_FP32 + _TILES_16_FWD_DROPOUT + _TILES_FP32_FWD_DROPOUT
                               + _TILES_16_DX + _TILES_FP32_DX)


def prune_fwd_configs(configs, named_args, **kwargs):
    """early_config_prune of the forward GEMM: the tile list of x's dtype with one accumulator or two (dropout),
    less the configs whose registers spilled in that setting."""
    if len(configs) == 1:  # the interpreter's
        return list(configs)
    dropout = blocks.arg(named_args, kwargs, "HAS_DROPOUT")
    lists = (_TILES_FP32_FWD_DROPOUT, _TILES_16_FWD_DROPOUT) if dropout else (_TILES_FP32, _TILES_16)
    arg, _, kept = blocks.by_operand_dtype(configs, named_args, kwargs, "x_ptr", *lists)
    exact_rank = arg("RANK_PRECISION") == "tf32x3"
    if dropout:
        if exact_rank:
            kept = [c for c in kept
                    if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= _MAX_TILE_FWD_DROPOUT_EXACT_RANK] or kept
        return kept
    if exact_rank or arg("MAIN_PRECISION") == "tf32x3" or arg("HAS_BIAS") or arg("WRITE_Z"):
        kept = [c for c in kept if acc_per_thread(c) <= _MAX_ACC_PER_THREAD_HEAVY] or kept
    return kept


def prune_dx_configs(configs, named_args, **kwargs):
    """early_config_prune of the dropout dx GEMM: the tile list of g's dtype."""
    if len(configs) == 1:  # the interpreter's
        return list(configs)
    return blocks.by_operand_dtype(configs, named_args, kwargs, "g_ptr", _TILES_FP32_DX, _TILES_16_DX)[2]


# tuned per (power-of-two bucket of M, N, L, R, flags, the weight's layout, precisions; Triton adds the dtypes), as
# kernels/lora.py's GEMM is: a new token count does not re-tune, and what the pruning keeps depends on the rest
_dora_fwd_tuned = registry.autotuned(
    _dora_fwd_kernel, configs=gemm_configs, prune=prune_fwd_configs,
    key=["M_BUCKET", "N", "L", "R", "HAS_BIAS", "HAS_DROPOUT", "WRITE_Z", "B_LAYOUT", "MAIN_PRECISION",
         "RANK_PRECISION"],
)

_dora_dx_tuned = registry.autotuned(
    _dora_dx_kernel, configs=gemm_configs, prune=prune_dx_configs,
    key=["M_BUCKET", "N", "L", "R", "B_LAYOUT", "MAIN_PRECISION", "RANK_PRECISION"],
)


def _aligned(v: torch.Tensor) -> torch.Tensor:
    """v [rows, cols] (a row-major or a transposed view), or a copy of it whose stride other than 1 is a multiple of
    16 elements. Triton specializes strides by divisibility by 16: a rank-r factor whose rows are r = 8 apart (S
    [M, r], Bᵀ a view of B [N, r]) loses the vectorized loads of its tiles, and the GEMMs' rank-r prologue then
    spilled 16-208 B beside the accumulator(s) on sm_80 (scripts/aot_check.py --full) where r = 16 did not. The copy
    is [M, 16] fp32 at r = 8 (0.5 MiB at 8192 tokens); its padding is never read (the kernels mask r >= R)."""
    if all(n <= 1 or st == 1 or st % 16 == 0 for n, st in zip(v.shape, v.stride())):
        return v
    rows, cols = v.shape
    if v.stride(0) == 1 and rows > 1:  # a transposed view (Bᵀ): pad the rows of the tensor it views
        buf = torch.empty((cols, triton.cdiv(rows, 16) * 16), device=v.device, dtype=v.dtype).t()[:rows]
    else:
        buf = torch.empty((rows, triton.cdiv(cols, 16) * 16), device=v.device, dtype=v.dtype)[:, :cols]
    return buf.copy_(v)


# ----------------------------------------------------------------------------------------------
# launchers: tensors in, tensors out; shapes are checked by peftkern/dora/op.py before this point
# ----------------------------------------------------------------------------------------------

def dora_weight_norm(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """n [N] float32: ‖weight_j + scaling·(lora_b·lora_a)_j‖₂ per row, weight [N, K], lora_a [r, K], lora_b [N, r]
    (any strides). One pass over the weight, a tile at a time: W + s·B·A is formed in fp32 on chip (B·A
    fp32-accurate when an adapter is fp32) and never written; split-K partials of Σv² are summed in a fixed order.

    Roofline (N = K = 4096, r = 16, bf16): reads W once, 32 MiB (~11 µs at 3 TB/s); 2·N·K·r = 0.5 GFLOP of
    tensor-core work and three fp32 operations per element: memory-bound, at the minimum of one pass over W."""
    N, K = weight.shape
    R = lora_a.shape[0]
    out = _launch.empty((N,), weight.device, torch.float32)
    if N == 0:
        return out
    if K == 0:
        return out.zero_()
    # [64, 64] tiles at 4 warps, rank in 16-wide slices: with 32-wide slices the 3xTF32 splits of an fp32 B·A
    # spilled 16 B (sm_80)
    block_n, block_k = (32, 32) if _launch.interpreting() else (64, 64)
    n_tiles = triton.cdiv(N, block_n)
    # N = 4096 is 64 row tiles, an eighth of an H100's 4 × 132 programs: split K as well
    splits, cols_per_split = split_reduction(K, block_k, n_tiles, weight.device)
    part = out.unsqueeze(0) if splits == 1 else _launch.empty((splits, N), weight.device, torch.float32)
    _dora_weight_norm_kernel[(n_tiles, splits)](
        weight, lora_a, lora_b, part,
        N, K, R, cols_per_split,
        weight.stride(0), weight.stride(1), lora_a.stride(0), lora_a.stride(1), lora_b.stride(0), lora_b.stride(1),
        part.stride(0),
        float(scaling),
        PRECISION=dot_precision(torch.float32 in (lora_a.dtype, lora_b.dtype)),
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=16, num_warps=4,
    )
    if splits > 1:
        torch.sum(part, dim=0, out=out)
    return out.sqrt_()


def dora_grad_scale(g: torch.Tensor, col_scale: torch.Tensor, z=None, *, with_gm: bool = False):
    """(gc, colsum, gm) for g [M, N] (any strides) and col_scale c [N] float32:
    gc = g ⊙ c in g's dtype (the product in fp32, rounded once); colsum [N] float32 = Σ_m g ⊙ z (z [M, N], or None:
    then colsum is None), as split-M partials summed in a fixed order; gm = g ⊙ (c − 1) like gc when with_gm, else
    None (the dropout dx's operand; see the module docstring for why it is not gc − g). One pass over g and z.

    Roofline (M = 8192, N = 4096, bf16): reads g (and z) 64 MiB each, writes gc (and gm) 64 MiB each: 134 to
    268 MB, 45–90 µs at 3 TB/s, a few fp32 operations per element. The minimum for what it makes."""
    M, N = g.shape
    gc = _launch.empty((M, N), g.device, g.dtype)
    gm = _launch.empty((M, N), g.device, g.dtype) if with_gm else None
    colsum = _launch.empty((N,), g.device, torch.float32) if z is not None else None
    if N == 0:
        return gc, colsum, gm
    if M == 0:
        return gc, (colsum.zero_() if colsum is not None else None), gm
    # [32, 128] tiles at 4 warps: 32 fp32 per thread for each of g, z and the g ⊙ z accumulator
    block_m, block_n = (32, 32) if _launch.interpreting() else (32, 128)
    n_tiles = triton.cdiv(N, block_n)
    splits, rows_per_split = split_reduction(M, block_m, n_tiles, g.device)
    if colsum is None:
        part = gc  # never written (HAS_Z is off)
    else:
        part = colsum.unsqueeze(0) if splits == 1 else _launch.empty((splits, N), g.device, torch.float32)
    zz = z if z is not None else g
    _dora_grad_scale_kernel[(n_tiles, splits)](
        g, col_scale, zz, gc, gm if gm is not None else gc, part,
        M, N, rows_per_split,
        g.stride(0), g.stride(1), zz.stride(0), zz.stride(1), gc.stride(0), gc.stride(1), part.stride(0),
        HAS_Z=z is not None, HAS_GM=with_gm,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
    )
    if colsum is not None and splits > 1:
        torch.sum(part, dim=0, out=colsum)
    return gc, colsum, gm


def dora_keep_x(x: torch.Tensor, *, seed: int, dropout_p: float) -> torch.Tensor:
    """keep ⊙ x [M, K] in x's dtype, exact (kept elements copied, dropped ones 0; the 1/(1 − p) is applied by the
    consumers in fp32), with the mask of kernels/dropout.py for x's coordinates. dropout_p > 0.

    Why a copy: the dropout forward needs (keep ⊙ x)·Wᵀ beside x·Wᵀ. Regenerating the mask in the GEMM would
    run Philox for every [BLOCK_M, BLOCK_K] tile of x once per N tile: N/BLOCK_N = 32 times the M·K/8 = 4.2 M
    calls at the headline shape (M = 8192, K = N = 4096), ~13 G integer instructions, ~0.5 ms of an H100's
    integer throughput inside a 0.7 ms GEMM. The copy costs one read and one write of M·K (128 MiB in bf16,
    ~45 µs at 3 TB/s) plus the mask once (4.2 M Philox calls); rank_down reads the copy instead of x."""
    M, K = x.shape
    out = _launch.empty((M, K), x.device, x.dtype)
    if M == 0 or K == 0:
        return out
    seed_v, threshold, _ = dropout_args(seed, dropout_p)
    # [64, 128] at 4 warps: 64 elements per thread, 8 Philox calls
    block_m, block_k = (32, 32) if _launch.interpreting() else (64, 128)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(K, block_k),)
    _dora_keep_x_kernel[grid](
        x, out, M, K, x.stride(0), x.stride(1), out.stride(0), out.stride(1), seed_v, threshold,
        BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4,
    )
    return out


def dora_forward_gemm(x: torch.Tensor, w_t: torch.Tensor, t: torch.Tensor, u: torch.Tensor, bias,
                      col_scale: torch.Tensor, *, lora_scale: float, masked_x=None, drop_scale: float = 1.0,
                      write_z: bool):
    """(y, z or None), both [M, N] in x's dtype, for x [M, K], w_t = Wᵀ [K, N] (a view), t = S [M, R] (fp32,
    1/(1 − p) included), u = Bᵀ [R, N], bias [N] or None, col_scale c [N] float32:
      masked_x None:        z = x·Wᵀ + lora_scale·t·u,   y = c ⊙ z + bias
      masked_x = keep ⊙ x:  z = drop_scale·(masked_x·Wᵀ) + R,   y = x·Wᵀ + R + (c − 1) ⊙ z + bias
    (R = lora_scale·t·u), one fp32 accumulator per product, each result rounded once. z is written when write_z.

    Roofline (M = 8192, K = N = 4096, r = 16, bf16, BLOCK_M = 128): 2·M·K·N = 275 GFLOP (0.34 ms at 800 TFLOP/s)
    without dropout, twice that with it (the two products share every W tile: 0.69 ms, PEFT runs the same two);
    x (and masked_x) read once, y (and z) written once, 64 MiB each; W (32 MiB) read once per BLOCK_M rows of
    tokens, from L2 mostly. Compute-bound: at the minimum of passes over every large operand."""
    M, L = x.shape
    N = w_t.shape[1]
    R = t.shape[1]
    y = _launch.empty((M, N), x.device, x.dtype)
    z = _launch.empty((M, N), x.device, x.dtype) if write_z else None
    if M == 0 or N == 0:
        return y, z
    dropout = masked_x is not None
    xm = masked_x if dropout else x
    t, u = _aligned(t), _aligned(u)
    _dora_fwd_tuned[gemm_grid(M, N)](
        x, xm, w_t, t, u, bias.contiguous() if bias is not None else y, col_scale.contiguous(), y,
        z if z is not None else y,
        M, N, L, R,
        x.stride(0), x.stride(1), xm.stride(0), xm.stride(1), w_t.stride(0), w_t.stride(1), t.stride(0), t.stride(1),
        u.stride(0), u.stride(1), y.stride(0), y.stride(1),
        float(lora_scale), float(drop_scale),
        HAS_BIAS=bias is not None, HAS_DROPOUT=dropout, WRITE_Z=write_z,
        MAIN_PRECISION=dot_precision(x.dtype == torch.float32), RANK_PRECISION=dot_precision(u.dtype == torch.float32),
        BLOCK_R=16, M_BUCKET=triton.next_power_of_2(M), B_LAYOUT=b_layout(w_t),
    )
    return y, z


def dora_dx_gemm(g: torch.Tensor, gm: torch.Tensor, w: torch.Tensor, ds: torch.Tensor, a: torch.Tensor, *,
                 seed: int, dropout_p: float) -> torch.Tensor:
    """dx [M, K] in g's dtype = g·W + keep/(1 − p) ⊙ (gm·W + ds·a), for g, gm = g ⊙ (c − 1) [M, N], w = W [N, K],
    ds = dS [M, R] (fp32), a = A [R, K]; keep is the dropout mask of x [M, K] (dropout_p > 0). Two fp32
    accumulators share every W tile; the mask is made once per output tile, after the loop.

    Roofline (M = 8192, K = N = 4096, r = 16, bf16): 2 × 275 GFLOP (0.69 ms at 800 TFLOP/s, the two products PEFT
    runs for the same gradient); g and gm read once (64 MiB each), dx written once, W once per BLOCK_M rows."""
    M, L = g.shape
    N = w.shape[1]
    R = ds.shape[1]
    out = _launch.empty((M, N), g.device, g.dtype)
    if M == 0 or N == 0:
        return out
    seed_v, threshold, drop_scale = dropout_args(seed, dropout_p)
    ds, a = _aligned(ds), _aligned(a)
    _dora_dx_tuned[gemm_grid(M, N)](
        g, gm, w, ds, a, out,
        M, N, L, R,
        g.stride(0), g.stride(1), gm.stride(0), gm.stride(1), w.stride(0), w.stride(1), ds.stride(0), ds.stride(1),
        a.stride(0), a.stride(1), out.stride(0), out.stride(1),
        seed_v, threshold, drop_scale,
        MAIN_PRECISION=dot_precision(g.dtype == torch.float32), RANK_PRECISION=dot_precision(a.dtype == torch.float32),
        BLOCK_R=16, M_BUCKET=triton.next_power_of_2(M), B_LAYOUT=b_layout(w),
    )
    return out
