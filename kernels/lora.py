"""Triton kernels of fused LoRA:  y = x·Wᵀ + bias + s·(dropout(x)·Aᵀ)·Bᵀ.

Three kernels cover forward and backward (see `peftkern/lora/op.py` for how they are wired); the
two skinny ones are shared with other families and live in kernels/rank.py:
  rank_down          out[M, R] = scale · (keep ⊙ X)[M, C] · P[R, C]ᵀ     S = drop(x)·Aᵀ, dS = s·dy·B
  rank_grad          out[R, C] = Σ_m G[m, R]ᵀ · (keep ⊙ X)[m, C]          dA, dBᵀ
  _lora_gemm_kernel  out[M, N] = A[M, L]·B[L, N] (+bias) + c·(T[M, R]·U[R, N]) ⊙ keep
                     forward y (T = S, U = Bᵀ, c = s) and dx (T = dS, U = A, with the dropout mask)
The dropout mask is regenerated from the seed wherever it is needed (kernels/dropout.py); neither the
mask nor dropout(x) is ever written. Split-M partial sums replace atomics, so every result is
deterministic. The rank-r products run in fp32, fp32-accurate (3xTF32 on tensor cores, kernels/tf32.py)
when the adapters are fp32 (kernels/_launch.dot_precision): they are memory-bound, and this keeps fp32
adapters' gradients as accurate as PEFT's own.
The main GEMM runs in the input dtype on the tensor cores (3xTF32 for fp32 inputs unless TF32 is allowed),
accumulating in fp32. The rank-r term (with its mask, and the bias) is that fp32 accumulator's initial value,
computed before the main loop so that its registers are free again when the loop's are needed; the sum is
rounded once to the output dtype: with float32 adapters beside a float16/bfloat16 x (PEFT's default) no
factor of the rank-r product (S, Bᵀ; dS, A in backward) is ever rounded to 16 bits, and the sum is rounded
once where PEFT rounds the base result and the sum each once.
"""
import torch
import triton
import triton.language as tl

from . import _launch, blocks, registry
from ._launch import dot_precision, dropout_args
from .blocks import (
    acc_per_thread,
    b_layout,
    gemm_configs,
    gemm_grid,
    grouped_tile,
    k_loop,
    lora_prologue,
    rows_per_warp,
    store_tile,
    tile,
)


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
    GROUP_M: tl.constexpr, M_BUCKET: tl.constexpr, B_LAYOUT: tl.constexpr,  # autotuning key only
):
    # grouped ordering (kernels/blocks.tile_position): neighbouring programs share A row-blocks in L2
    _, pid_n, offs_m, offs_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # the rank-r term (and the bias) first, as the accumulator's initial value (kernels/blocks.lora_prologue)
    acc = lora_prologue(t_ptr, u_ptr, bias_ptr, offs_m, offs_n, pid_n * BLOCK_N, M, N, R,
                        stride_tm, stride_tr, stride_ur, stride_un, seed, threshold, low_scale,
                        HAS_BIAS, HAS_DROPOUT, RANK_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)
    # rows/cols past the edge re-read a valid one (% M, % N) so the loads need only the K mask
    acc = k_loop(a_ptr, b_ptr, offs_m % M, offs_n % N, stride_am, stride_al, stride_bl, stride_bn, L, acc,
                 MAIN_PRECISION, BLOCK_K)
    store_tile(out_ptr, acc, offs_m, offs_n, M, N, stride_om, stride_on)


# ----------------------------------------------------------------------------------------------
# launcher: tensors in, tensors out; shapes are checked by peftkern/lora/op.py before this point
# ----------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). 16-bit inputs: the Hopper/Ampere bf16 favourites of Triton
# tutorial 03. fp32 inputs: tiles whose fp32 pipeline fits in shared memory and whose 3xTF32 main loop (three
# products per step, hi/lo splits in registers) does not spill.
_TILES_16 = [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
             (128, 128, 32, 4, 4), (64, 128, 64, 4, 4), (128, 64, 32, 4, 4)]
_TILES_FP32 = [(64, 128, 32, 4, 3), (128, 64, 32, 4, 3), (64, 64, 32, 4, 4)]
# Register budget (ptxas -v through scripts/aot_check.py, sm_80 and sm_90): the dropout mask's Philox state,
# the 3xTF32 rank product's splits and the bias live beside the accumulator before the main loop; with more
# than 64 fp32 accumulator elements per thread (128x256 and 256x128 on 8 warps, 128x128 on 4) they spilled
# (sm_80). With dropout and 3xTF32 together, the hi/lo halves of T's [BLOCK_M, 16] slice must be small too:
# 128x64 on 4 warps (32 rows of T per warp) spilled, 16 rows per warp do not.
_MAX_ACC_PER_THREAD_HEAVY = 64
_MAX_T_ROWS_PER_WARP_DROPOUT_AND_EXACT = 16


def _gemm_configs():
    """Tile shapes the GEMM autotunes over on GPU (pruned per call by _prune_configs); the interpreter gets
    one small tile."""
    return gemm_configs(_TILES_16 + _TILES_FP32)


def _prune_configs(configs, named_args, **kwargs):
    """early_config_prune: the tile list of the input dtype, less the configs whose epilogue spills."""
    if len(configs) == 1:  # the interpreter's
        return list(configs)
    arg, wide, kept = blocks.by_operand_dtype(configs, named_args, kwargs, "a_ptr", _TILES_FP32)
    dropout, exact = arg("HAS_DROPOUT"), arg("RANK_PRECISION") == "tf32x3"
    # a rank off 16 (e.g. 8): T's and U's rows are unaligned and their masked loads need registers too (128x128 on 4
    # warps and 256x128 on 8 spilled 60-116 B on sm_80 at R=8, 16-bit x, no bias or dropout)
    if dropout or exact or arg("HAS_BIAS") or arg("R") % 16:
        kept = [c for c in kept if acc_per_thread(c) <= _MAX_ACC_PER_THREAD_HEAVY] or kept
    if dropout and exact:
        kept = [c for c in kept if rows_per_warp(c) <= _MAX_T_ROWS_PER_WARP_DROPOUT_AND_EXACT] or kept
    # Triton 3.6's ptxas (12.8, sm_80): an fp32 GEMM under 3xTF32 with a bias spilled 4 B at 128x64 on 4 warps (32 rows
    # of T per warp) and a 16-bit GEMM beside a 3xTF32 rank product spilled 4 B at 64x128x64 on 4 warps, 4 stages
    if arg("MAIN_PRECISION") == "tf32x3" and arg("HAS_BIAS"):
        kept = [c for c in kept if rows_per_warp(c) <= _MAX_T_ROWS_PER_WARP_DROPOUT_AND_EXACT] or kept
    if exact and not wide:
        kept = [c for c in kept if tile(c) != (64, 128, 64, 4, 4)] or kept
    # and an fp32 GEMM with everything under 3xTF32 and a bias spilled 16 B at 64x64x32 on 4 warps, 4 stages (sm_80)
    if wide and exact and arg("MAIN_PRECISION") == "tf32x3" and arg("HAS_BIAS"):
        kept = [c for c in kept if tile(c) != (64, 64, 32, 4, 4)] or kept
    return kept


# tuned per (power-of-two bucket of M, N, L, R, dropout, B's layout, precisions; Triton adds the dtypes): training
# with varying token counts does not re-tune at every new M, and forward (B = Wᵀ, a transposed view) and dx
# (B = W, row-major) do not share one tile choice, since the best tile depends on which way B is read; the
# precisions change which configs _prune_configs keeps
_lora_gemm_tuned = registry.autotuned(
    _lora_gemm_kernel, configs=_gemm_configs, prune=_prune_configs,
    key=["M_BUCKET", "N", "L", "R", "HAS_DROPOUT", "B_LAYOUT", "MAIN_PRECISION", "RANK_PRECISION"],
)


def lora_gemm(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, u: torch.Tensor, bias, *,
              lora_scale: float = 1.0, seed: int = 0, dropout_p: float = 0.0, out_dtype=None) -> torch.Tensor:
    """out[M, N] = a·b (+bias) + lora_scale·(t·u) ⊙ keep/(1-p) at (m, n); a [M, L], b [L, N], t [M, R], u [R, N]."""
    M, L = a.shape
    N = b.shape[1]
    R = t.shape[1]
    out = _launch.empty((M, N), a.device, out_dtype or a.dtype)
    if M == 0 or N == 0:
        return out
    seed_v, threshold, drop_scale = dropout_args(seed, dropout_p)
    _lora_gemm_tuned[gemm_grid(M, N)](
        a, b, t, u, bias.contiguous() if bias is not None else out, out,  # bias is read with unit stride
        M, N, L, R,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), t.stride(0), t.stride(1),
        u.stride(0), u.stride(1), out.stride(0), out.stride(1),
        seed_v, threshold, lora_scale * drop_scale,
        HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0.0,
        MAIN_PRECISION=dot_precision(a.dtype == torch.float32), RANK_PRECISION=dot_precision(u.dtype == torch.float32),
        # R is looped over in 16-wide slices: small factor tiles beside the accumulator
        BLOCK_R=16, M_BUCKET=triton.next_power_of_2(M),
        B_LAYOUT=b_layout(b),
    )
    return out
