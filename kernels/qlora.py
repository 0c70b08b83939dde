"""Triton kernel of LoRA over a 4-bit base (QLoRA): the fused GEMM of kernels/lora.py with the
frozen weight W [out, in] kept in bitsandbytes' 4-bit layout and dequantized tile by tile in registers.

  _qlora_gemm_kernel  forward (TRANSPOSE_W):  out[M, out] = x[M, in]·deq(W)ᵀ (+bias) + c·(T·U) ⊙ keep
                      dx:                     out[M, in]  = dy[M, out]·deq(W)  + c·(T·U) ⊙ keep

deq(W) is reference/qlora.dequantize_rows, bit for bit: element e = row·in + col of the flattened weight is
code[nibble] · absmax[e // blocksize] in fp32 (the byte e // 2 holds two codes, the even element in the high
nibble), rounded to the weight's dtype, then to the activation's. Only the packed bytes (n/2), the absmax
(n/blocksize fp32) and the 16-entry code table are read; no dense weight is ever written to global memory.
The rank-r term, the dropout mask and the bias are _lora_gemm_kernel's (kernels/blocks.lora_prologue), as the
accumulator's initial value.

Index arithmetic: n = out·in may exceed 2**31, so the flat index is int64, per element (one int64 start per
weight row, plus the int32 column). Splitting each row's start once into int32 parts (byte, parity, absmax
block, offset) saves the per-element int64 adds, but keeps four values per row live across the K loop for every
row a thread covers (16 in the forward tile), and spilled more (sm_90, forward, 128x64 on 4 warps: 84 B
against 4 B).
The forward tile is read in W's orientation, [BLOCK_N, BLOCK_K] with neighbouring lanes on neighbouring bytes of
one row (coalesced), and transposed for the MMA (it goes through shared memory either way).

Roofline (forward, M = 8192 tokens, in = out = 4096, bf16, blocksize 64, BLOCK_M = 128): 2·M·in·out =
275 GFLOP (0.34 ms at ~800 TFLOP/s); bytes: x 64 MiB + y 64 MiB + packed 8 MiB + absmax 1 MiB, ~0.05 ms at
3 TB/s. x and y pass once; the 4-bit weight is read (from L2, mostly) once per BLOCK_M rows of tokens, as a
dense W is by any tiled GEMM. The cost a dense GEMM does not have is the dequantization: every program
dequantizes each [BLOCK_K, BLOCK_N] tile it uses, M/BLOCK_M times the weight's 16.8 M elements in all
(~1.1 G element dequantizations, an estimated ~20 integer/load/convert instructions each), comparable to
the MMA time at BLOCK_M = 128 (not yet measured on a GPU), which is why the configs favour BLOCK_M = 128.
"""
import torch
import triton
import triton.language as tl

from . import _launch, blocks, registry
from ._launch import dot_precision, dropout_args
from .blocks import acc_per_thread, gemm_grid, grouped_tile, lora_prologue, store_tile
from .tf32 import dot_prec


@triton.jit
def _mul_unfused(a, b, UNFUSED_MUL: tl.constexpr):
    """a·b (fp32) rounded on its own. UNFUSED_MUL "ptx": PTX's mul.rn, which is never contracted with a following
    add into an FMA (Triton fuses a*b+c by default, rounding once where bitsandbytes rounds twice). "python": the
    interpreter's numpy, which never fuses (and cannot run PTX)."""
    if UNFUSED_MUL == "ptx":
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return a * b


@triton.jit
def _dequant_tile(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, row_start, cols, mask,
                  BLOCKSIZE: tl.constexpr, W_DTYPE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                  UNFUSED_MUL: tl.constexpr):
    """[rows, cols] of deq(W) in W_DTYPE, W's own orientation. row_start: int64 [rows], flat index of each
    weight row's first element (row·in); cols: int32 [cols], column indices; masked elements are 0.
    DOUBLE_QUANT: absmax holds uint8 codes of the absmax, resolved here as bitsandbytes resolves them:
    code2[q]·absmax2[block // 256] rounded, then + offset rounded."""
    e = row_start[:, None] + cols[None, :]  # int64 flat index
    byte = tl.load(packed_ptr + (e >> 1), mask=mask, other=0).to(tl.int32)
    nibble = (byte >> ((1 - (e & 1).to(tl.int32)) * 4)) & 0xF  # even element: high nibble
    value = tl.load(code_ptr + nibble)  # 16 floats: every program's gathers hit the same L1 line
    block = e // BLOCKSIZE
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)  # uint8: always inside code2's 256
        scale = tl.load(absmax2_ptr + block // 256, mask=mask, other=0.0)
        absmax = _mul_unfused(tl.load(code2_ptr + q), scale, UNFUSED_MUL) + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    value = value * absmax  # fp32, as bitsandbytes computes it (a lone multiply: nothing to contract)
    if W_DTYPE == "float16":
        value = value.to(tl.float16)  # round to nearest even, as torch's .to()
    elif W_DTYPE == "bfloat16":
        value = value.to(tl.bfloat16)
    elif W_DTYPE == "bfloat16_by_hand":  # the interpreter's fp32 -> bf16 cast truncates: round in integers first
        value = _round_to_bfloat16(value).to(tl.bfloat16)  # exact: the value is a bf16 value already
    return value


@triton.jit
def _round_to_bfloat16(v):
    """v (fp32, finite) rounded to the nearest bfloat16 value, ties to even, still in fp32: what cvt.rn.bf16.f32
    (and torch's .to(torch.bfloat16)) computes. Add just under half of the 16 dropped bits' range, plus the
    kept part's lowest bit (so a tie goes to the even neighbour), then clear them; a carry into the exponent is
    the correct rounding up to the next binade (or to infinity past bf16's largest value)."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536 == 0xFFFF0000 as int32
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _qlora_gemm_kernel(
    a_ptr, packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, t_ptr, u_ptr, bias_ptr, out_ptr,
    M, N, K, R, in_features,
    stride_am, stride_ak, stride_tm, stride_tr, stride_ur, stride_un, stride_om, stride_on,
    seed, threshold, low_scale,
    BLOCKSIZE: tl.constexpr, W_DTYPE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, UNFUSED_MUL: tl.constexpr,
    TRANSPOSE_W: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    MAIN_PRECISION: tl.constexpr, RANK_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, M_BUCKET: tl.constexpr,  # autotuning key only
):
    # out[M, N] = a[M, K]·B[K, N] + ..., B = deq(W)ᵀ (TRANSPOSE_W: N = out, K = in) or deq(W) (N = in, K = out)
    # grouped ordering (kernels/blocks.tile_position): neighbouring programs share a's row-blocks in L2
    _, pid_n, offs_m, offs_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    # the rank-r term (and the bias) first, as the accumulator's initial value (kernels/blocks.lora_prologue: its
    # registers are free again before the main loop's tiles, and here the dequantization's, are live); rows/cols
    # past the edge re-read a valid one (% M, % N) so the loads need only the K mask
    acc = lora_prologue(t_ptr, u_ptr, bias_ptr, offs_m, offs_n, pid_n * BLOCK_N, M, N, R,
                        stride_tm, stride_tr, stride_ur, stride_un, seed, threshold, low_scale,
                        HAS_BIAS, HAS_DROPOUT, RANK_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)

    a_ptrs = a_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    if TRANSPOSE_W:
        # the tile is read as W's rows offs_n (fixed) x columns k (contiguous in the packed bytes), then transposed
        w_rows = (offs_n % N).to(tl.int64) * in_features
    else:
        w_cols = offs_n % N
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        if TRANSPOSE_W:
            w = tl.trans(_dequant_tile(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, w_rows,
                                       k0 + offs_k, k_ok[None, :], BLOCKSIZE, W_DTYPE, DOUBLE_QUANT,
                                       UNFUSED_MUL))
        else:
            w = _dequant_tile(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                              (k0 + offs_k).to(tl.int64) * in_features, w_cols, k_ok[:, None], BLOCKSIZE, W_DTYPE,
                              DOUBLE_QUANT, UNFUSED_MUL)
        if a.dtype != tl.float32:
            w = w.to(a.dtype)  # deq(W) in the activation's dtype, as bitsandbytes' matmul_4bit rounds it
        # fp32 a: a 16-bit weight is exact in fp32 and stays 16-bit, so 3xTF32 needs two products, not three
        acc = dot_prec(a, w, acc, MAIN_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
    store_tile(out_ptr, acc, offs_m, offs_n, M, N, stride_om, stride_on)


# ----------------------------------------------------------------------------------------------
# launcher: tensors in, tensors out; shapes are checked by peftkern/lora/op.py before this point
# ----------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). Beside the accumulator, every element of the dequantized
# [BLOCK_K, BLOCK_N] tile holds its int64 flat index, three gather pointers and their loads while the tile is
# built, so the tiles are spread over 8 warps and BLOCK_K is 32 (64 only without epilogue state); BLOCK_M is as
# large as that allows, since each dequantized tile serves BLOCK_M rows of activations.
# Measured with ptxas -v (triton 3.9) for sm_80 and sm_90, both directions, with and without dropout + bias +
# fp32 adapters, bf16 activations with bf16 or fp32 weights, fp32 activations (3xTF32 or TF32) with fp32 or
# bf16 weights: after prune_configs, none of these spills. Spilled and left out: every 4-warp tile over 64x64,
# 256x128 (8 and 16 warps) and 128x256.
_TILES_16 = [(128, 128, 32, 8, 3), (128, 128, 32, 8, 4), (128, 128, 64, 8, 3), (128, 64, 32, 8, 3),
             (64, 128, 32, 8, 3), (64, 64, 32, 4, 3)]
_TILES_FP32 = [(128, 128, 32, 8, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 32, 4, 3)]
# With the dropout mask's Philox state, a 3xTF32 product or the bias live too: kernels/lora.py's accumulator
# budget, and at most 16 dequantized elements per thread (128x128x64, 32 per thread: dx spilled 8 B on sm_90).
_MAX_ACC_PER_THREAD_HEAVY = 64
_MAX_W_PER_THREAD_HEAVY = 16
# An fp32 weight under 3xTF32 is split into hi/lo tiles in registers as well (three products): 128-wide tiles
# spilled (sm_80 128x128: ~1 KB; sm_90 64x128: 8 B).
_MAX_BLOCK_N_SPLIT_WEIGHT = 64
# resolving a double-quantized absmax on chip (two more gathers per element) in dx with a heavy epilogue: 128x128
# on 8 warps (64 accumulator fp32 per thread) spilled 16-24 B (sm_80 and sm_90); 32 per thread do not
_MAX_ACC_PER_THREAD_DOUBLE_QUANT_DX = 32
_W_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _w_dtype(weight_dtype: torch.dtype) -> str:
    """W_DTYPE of the kernel. Triton's interpreter rounds fp32 -> bf16 by truncation (the GPU's cvt rounds to
    nearest even), so there the rounding is spelled out in integer ops; read at call time from the launch
    configuration, so that a launch recorded for the GPU (scripts/aot_check.py) compiles the GPU's branch."""
    name = _W_DTYPES[weight_dtype]
    return "bfloat16_by_hand" if _launch.interpreting() and name == "bfloat16" else name


def gemm_configs():
    """Tile shapes the GEMM autotunes over on GPU (pruned per call by prune_configs); the interpreter gets one
    small tile."""
    return blocks.gemm_configs(_TILES_16 + _TILES_FP32)  # a tile both lists hold, once


def _w_per_thread(config) -> int:
    return config.kwargs["BLOCK_K"] * config.kwargs["BLOCK_N"] // (32 * config.num_warps)


def prune_configs(configs, named_args, **kwargs):
    """early_config_prune: the tile list of a's dtype, less the configs that spilled registers in that setting."""
    if len(configs) == 1:  # the interpreter's
        return list(configs)
    arg, wide, kept = blocks.by_operand_dtype(configs, named_args, kwargs, "a_ptr", _TILES_FP32, _TILES_16)
    heavy = arg("HAS_DROPOUT") or arg("HAS_BIAS") or "tf32x3" in (arg("RANK_PRECISION"), arg("MAIN_PRECISION"))
    if heavy:
        kept = [c for c in kept if acc_per_thread(c) <= _MAX_ACC_PER_THREAD_HEAVY
                and _w_per_thread(c) <= _MAX_W_PER_THREAD_HEAVY] or kept
    if arg("MAIN_PRECISION") == "tf32x3" and arg("W_DTYPE") == "float32":
        kept = [c for c in kept if c.kwargs["BLOCK_N"] <= _MAX_BLOCK_N_SPLIT_WEIGHT] or kept
    double_quant = arg("DOUBLE_QUANT", False)
    if heavy and double_quant and not arg("TRANSPOSE_W"):
        kept = [c for c in kept if acc_per_thread(c) <= _MAX_ACC_PER_THREAD_DOUBLE_QUANT_DX] or kept
        # fp32 with the dropout mask: the 64-row tiles sat at 255 registers and spilled 4-12 B under Triton 3.6's
        # ptxas (12.8, sm_80); 128x64 on 8 warps does not
        if wide and arg("HAS_DROPOUT"):
            kept = [c for c in kept if c.kwargs["BLOCK_M"] >= 128] or kept
    return kept


# tuned per (power-of-two bucket of M, N, K, R, dropout, direction, precisions, the weight's dtype, double
# quantization, block size; Triton adds the tensors' dtypes): a new token count does not re-tune, forward (W read
# along its rows, transposed) and dx do not share a tile, and what prune_configs keeps depends on the rest
_qlora_gemm_tuned = registry.autotuned(
    _qlora_gemm_kernel, configs=gemm_configs, prune=prune_configs,
    key=["M_BUCKET", "N", "K", "R", "HAS_DROPOUT", "TRANSPOSE_W", "MAIN_PRECISION", "RANK_PRECISION", "W_DTYPE",
         "DOUBLE_QUANT", "BLOCKSIZE"],
)


def qlora_gemm(a: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, t: torch.Tensor,
               u: torch.Tensor, bias, *, out_features: int, in_features: int, blocksize: int,
               weight_dtype: torch.dtype, transpose_w: bool, lora_scale: float = 1.0, seed: int = 0,
               dropout_p: float = 0.0, out_dtype=None, absmax2=None, code2=None, offset=None) -> torch.Tensor:
    """transpose_w: out[M, out_features] = a·deq(W)ᵀ (+bias) + lora_scale·(t·u) ⊙ keep/(1-p), a [M, in_features];
    else out[M, in_features] = a·deq(W) + lora_scale·(t·u) ⊙ keep/(1-p), a [M, out_features]. t [M, R],
    u [R, out's columns]; W [out_features, in_features] is (packed uint8 [ceil(n/2)], absmax fp32
    [ceil(n/blocksize)], code fp32 [16]; all three contiguous) in bitsandbytes' 4-bit layout, its dense dtype
    `weight_dtype` (float32, float16 or bfloat16); blocksize is a compile-time constant of the kernel.
    Double quantization: absmax is uint8 [ceil(n/blocksize)] codes with absmax2 fp32 [ceil(nblocks/256)], code2
    fp32 [256] and offset (a one-element fp32 tensor), all contiguous, resolved in the kernel."""
    M = a.shape[0]
    N, K = (out_features, in_features) if transpose_w else (in_features, out_features)
    R = t.shape[1]
    out = _launch.empty((M, N), a.device, out_dtype or a.dtype)
    if M == 0 or N == 0:
        return out
    seed_v, threshold, drop_scale = dropout_args(seed, dropout_p)
    double_quant = absmax.dtype == torch.uint8
    _qlora_gemm_tuned[gemm_grid(M, N)](
        a, packed, absmax, code,
        absmax2 if double_quant else code, code2 if double_quant else code,  # unread without double quantization
        offset.reshape(1) if double_quant else code,
        t, u, bias.contiguous() if bias is not None else out, out,  # bias: unit stride
        M, N, K, R, in_features,
        a.stride(0), a.stride(1), t.stride(0), t.stride(1), u.stride(0), u.stride(1), out.stride(0), out.stride(1),
        seed_v, threshold, lora_scale * drop_scale,
        BLOCKSIZE=blocksize, W_DTYPE=_w_dtype(weight_dtype), DOUBLE_QUANT=double_quant,
        UNFUSED_MUL="python" if _launch.interpreting() else "ptx",  # read at call time, like _w_dtype
        TRANSPOSE_W=transpose_w,
        HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0.0,
        MAIN_PRECISION=dot_precision(a.dtype == torch.float32), RANK_PRECISION=dot_precision(u.dtype == torch.float32),
        BLOCK_R=16, M_BUCKET=triton.next_power_of_2(M),
    )
    return out
