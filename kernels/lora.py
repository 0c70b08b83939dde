"""Triton kernels of fused LoRA:  y = x·Wᵀ + bias + s·(dropout(x)·Aᵀ)·Bᵀ.

Three kernels cover forward and backward (see `peftkern/ops/lora.py` for how they are wired); the
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

from . import INTERPRET, _launch
from ._launch import dot_precision, dropout_args
from .dropout import keep_tile
from .tf32 import dot_prec


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

    # the rank-r term (and the bias) first, as the accumulator's initial value: its factors, the dropout
    # mask's Philox state and the bias are dead before the main loop's pipelined tiles are live, so the
    # epilogue adds no registers to the main loop's peak (computed after the loop, they spilled on sm_80/90)
    t_rows = t_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_tm
    u_cols = u_ptr + (offs_n % N).to(tl.int64)[None, :] * stride_un
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        t = tl.load(t_rows + offs_r[None, :] * stride_tr, mask=offs_r[None, :] < R, other=0.0)
        u = tl.load(u_cols + offs_r[:, None] * stride_ur, mask=offs_r[:, None] < R, other=0.0)
        if not HAS_DROPOUT:
            t = t.to(tl.float32) * low_scale  # no mask: scale the [BLOCK_M, BLOCK_R] factor, not the tile
        acc = dot_prec(t, u, acc, RANK_PRECISION)
    if HAS_DROPOUT:
        keep = keep_tile(seed, offs_m, pid_n * BLOCK_N, N, threshold, BLOCK_N)
        acc = tl.where(keep, acc * low_scale, 0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]

    a_ptrs = a_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_al
    b_ptrs = b_ptr + offs_k[:, None] * stride_bl + (offs_n % N).to(tl.int64)[None, :] * stride_bn
    for k0 in range(0, L, BLOCK_K):
        k_ok = offs_k < L - k0
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        acc = dot_prec(a, b, acc, MAIN_PRECISION)
        a_ptrs += BLOCK_K * stride_al
        b_ptrs += BLOCK_K * stride_bl

    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n.to(tl.int64)[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------------------------
# launcher: tensors in, tensors out; shapes are checked by peftkern/ops/lora.py before this point
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


def _config(tile):
    bm, bn, bk, w, st = tile
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=w, num_stages=st)


def _gemm_configs():
    """Tile shapes the GEMM autotunes over on GPU (pruned per call by _prune_configs); the interpreter gets
    one small tile."""
    if INTERPRET:
        return [triton.Config(dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4), num_warps=4, num_stages=1)]
    return [_config(t) for t in _TILES_16 + _TILES_FP32]


def _tile(config) -> tuple:
    kw = config.kwargs
    return kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], config.num_warps, config.num_stages


def _acc_per_thread(config) -> int:
    return config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] // (32 * config.num_warps)


def _prune_configs(configs, named_args, **kwargs):
    """early_config_prune: the tile list of the input dtype, less the configs whose epilogue spills."""
    def arg(name):
        return kwargs[name] if name in kwargs else named_args[name]

    if len(configs) == 1:  # the interpreter's
        return list(configs)
    wide = arg("a_ptr").dtype == torch.float32
    kept = [c for c in configs if (_tile(c) in _TILES_FP32) == wide]
    dropout, exact = arg("HAS_DROPOUT"), arg("RANK_PRECISION") == "tf32x3"
    # a rank off 16 (e.g. 8): T's and U's rows are unaligned and their masked loads need registers too (128x128 on 4
    # warps and 256x128 on 8 spilled 60-116 B on sm_80 at R=8, 16-bit x, no bias or dropout)
    if dropout or exact or arg("HAS_BIAS") or arg("R") % 16:
        kept = [c for c in kept if _acc_per_thread(c) <= _MAX_ACC_PER_THREAD_HEAVY] or kept
    if dropout and exact:
        kept = [c for c in kept if c.kwargs["BLOCK_M"] // c.num_warps <= _MAX_T_ROWS_PER_WARP_DROPOUT_AND_EXACT] or kept
    # Triton 3.6's ptxas (12.8, sm_80): an fp32 GEMM under 3xTF32 with a bias spilled 4 B at 128x64 on 4 warps (32 rows
    # of T per warp) and a 16-bit GEMM beside a 3xTF32 rank product spilled 4 B at 64x128x64 on 4 warps, 4 stages
    if arg("MAIN_PRECISION") == "tf32x3" and arg("HAS_BIAS"):
        kept = [c for c in kept if c.kwargs["BLOCK_M"] // c.num_warps <= _MAX_T_ROWS_PER_WARP_DROPOUT_AND_EXACT] or kept
    if exact and not wide:
        kept = [c for c in kept if _tile(c) != (64, 128, 64, 4, 4)] or kept
    return kept


# tuned per (power-of-two bucket of M, N, L, R, dropout, B's layout, precisions; Triton adds the dtypes): training
# with varying token counts does not re-tune at every new M, and forward (B = Wᵀ, a transposed view) and dx
# (B = W, row-major) do not share one tile choice, since the best tile depends on which way B is read; the
# precisions change which configs _prune_configs keeps
_lora_gemm_tuned = triton.autotune(
    configs=_gemm_configs(),
    key=["M_BUCKET", "N", "L", "R", "HAS_DROPOUT", "B_LAYOUT", "MAIN_PRECISION", "RANK_PRECISION"],
    prune_configs_by={"early_config_prune": _launch.tuning_prune(_prune_configs)},
)(_lora_gemm_kernel)


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
    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _lora_gemm_tuned[grid](
        a, b, t, u, bias.contiguous() if bias is not None else out, out,  # bias is read with unit stride
        M, N, L, R,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), t.stride(0), t.stride(1),
        u.stride(0), u.stride(1), out.stride(0), out.stride(1),
        seed_v, threshold, lora_scale * drop_scale,
        HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0.0,
        MAIN_PRECISION=dot_precision(a.dtype == torch.float32), RANK_PRECISION=dot_precision(u.dtype == torch.float32),
        # R is looped over in 16-wide slices: small factor tiles beside the accumulator
        BLOCK_R=16, M_BUCKET=triton.next_power_of_2(M),
        B_LAYOUT="row" if b.stride(1) == 1 else "col" if b.stride(0) == 1 else "strided",
    )
    return out
