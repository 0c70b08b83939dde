"""Building blocks shared by the GEMM-shaped kernels (lora, qlora, dora, multi_lora, lora_persistent) and their
autotune configs: one definition each, as vLLM's lora/ops/triton_ops/kernel_utils.py does for its kernels.

Device side (`@triton.jit`, inlined into each kernel by Triton's compiler, so a kernel compiles to the code it had
with the lines written out):
  tile_position   grouped program order (Triton tutorial 03): GROUP_M row blocks advance together, so the
                  programs running at one time share A row blocks and B column blocks in L2; grouped_tile:
                  this program's tile in that order; row_major_tile: column tiles fastest (element-wise passes)
  rank_term       acc + Σ_r T[m, r]·U[r, n] over 16-wide rank slices, in fp32 (kernels/tf32.dot_prec); rows and
                  columns past the edge either re-read a valid one (WRAP: the GEMM prologues, whose stores are
                  masked) or load zeros (the element-wise epilogues, which read and write at the same place)
  lora_prologue   the fused LoRA GEMMs' accumulator before their main loop: the rank-r term, scaled, masked by
                  the dropout mask of kernels/dropout.py, plus the bias
  k_loop          acc + A[m, :]·B[:, n] over K, one A tile and one B tile per step; k_loop_pair: two A operands
                  sharing each B tile (DoRA's two accumulators)
  bias_row, store_tile, add_to_tile   the bias as a [1, BLOCK_N] fp32 row; the masked store of an fp32 tile,
                  rounded once; an in-place fp32 add to a tile

Host side: the autotune configs of a tile list (`gemm_configs`), a config's tile and per-thread accumulator size
(what the kernels' early_config_prune functions read), an argument of a prune call (`arg`), the 1-D grid of a
GEMM and the layout key of its B operand.
"""
import torch
import triton
import triton.language as tl

from . import _launch
from .dropout import keep_tile
from .tf32 import dot_prec

# ----------------------------------------------------------------------------------------------
# device side
# ----------------------------------------------------------------------------------------------


@triton.jit
def tile_position(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid` in the grouped order over num_m x num_n output tiles."""
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows
    pid_n = (pid % width) // rows
    return pid_m, pid_n


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n, offs_m, offs_n) of this program's [BLOCK_M, BLOCK_N] output tile in the grouped order of a
    1-D grid over the tiles of [M, N]."""
    pid_m, pid_n = tile_position(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    return pid_m, pid_n, pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def row_major_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(pid_n, offs_m, offs_n) of this program's tile in a 1-D grid over the tiles of [M, N], column tiles fastest
    (neighbouring programs share rows; CUDA allows 2**31 - 1 programs on the grid's first axis, 65535 on the
    others)."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_n = pid % num_n
    return pid_n, (pid // num_n) * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def split_program(per_split, n, BLOCK_A: tl.constexpr, BLOCK_R: tl.constexpr):
    """A split reduction's program (a, r, z) on grid axes 0, 1, 2: output tile a (BLOCK_A wide) by rank tile r
    (BLOCK_R wide), part z of the reduction over n. Returns (pid_a, offs_a, offs_r, pid_z, begin, end)."""
    pid_a = tl.program_id(0)
    pid_z = tl.program_id(2)
    begin, end = split_range(pid_z, per_split, n)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    return pid_a, pid_a * BLOCK_A + tl.arange(0, BLOCK_A), offs_r, pid_z, begin, end


@triton.jit
def split_range(pid_z, per_split, n):
    """[begin, end) of part pid_z of a split reduction over n elements, per_split elements a part (the launchers'
    _launch.split_reduction)."""
    begin = pid_z * per_split
    return begin, tl.minimum(begin + per_split, n)


@triton.jit
def rank_term(t_ptr, u_ptr, offs_m, offs_n, M, N, R, stride_tm, stride_tr, stride_ur, stride_un, acc, scale,
              WRAP: tl.constexpr, SCALE_T: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc + (scale·)T[offs_m, :R]·U[:R, offs_n]. SCALE_T: T's [BLOCK_M, BLOCK_R] slice is scaled in fp32 before
    the product (cheaper than scaling the [BLOCK_M, BLOCK_N] result). WRAP: rows/columns past M/N re-read a valid
    one (% M, % N), so only the rank is masked; else they are masked off (zeros). Row offsets are int64, so that
    tensors over 2**31 elements address correctly."""
    if WRAP:
        t_rows = t_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_tm
        u_cols = u_ptr + (offs_n % N).to(tl.int64)[None, :] * stride_un
    else:
        t_rows = t_ptr + offs_m.to(tl.int64)[:, None] * stride_tm
        u_cols = u_ptr + offs_n.to(tl.int64)[None, :] * stride_un
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        if WRAP:
            t = tl.load(t_rows + offs_r[None, :] * stride_tr, mask=offs_r[None, :] < R, other=0.0)
            u = tl.load(u_cols + offs_r[:, None] * stride_ur, mask=offs_r[:, None] < R, other=0.0)
        else:
            t = tl.load(t_rows + offs_r[None, :] * stride_tr, mask=(offs_m < M)[:, None] & (offs_r[None, :] < R),
                        other=0.0)
            u = tl.load(u_cols + offs_r[:, None] * stride_ur, mask=(offs_r[:, None] < R) & (offs_n < N)[None, :],
                        other=0.0)
        if SCALE_T:
            t = t.to(tl.float32) * scale
        acc = dot_prec(t, u, acc, PRECISION)
    return acc


@triton.jit
def load_kept(x_ptr, rows, cols, mask, stride_xm, stride_xc, c0, C, seed, threshold, HAS_DROPOUT: tl.constexpr,
              BLOCK_C: tl.constexpr):
    """keep ⊙ x[rows, cols] in x's dtype (masked elements 0): a tile of x [., C] whose columns cols = c0 + arange(
    BLOCK_C) start at a multiple of 8, with, HAS_DROPOUT, the dropout mask of kernels/dropout.py at those
    coordinates (unscaled: the caller's scale carries 1/(1-p)). Row offsets are int64."""
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :] * stride_xc, mask=mask, other=0.0)
    if HAS_DROPOUT:
        x = tl.where(keep_tile(seed, rows, c0, C, threshold, BLOCK_C), x, 0.0).to(x.dtype)
    return x


@triton.jit
def rank_epilogue_tile(t_ptr, u_ptr, M, N, R, stride_tm, stride_tr, stride_ur, stride_un, scale,
                       SCALE_T: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_R: tl.constexpr):
    """This program's tile of an element-wise pass over [M, N] (row_major_tile) and the rank-r term on it:
    (pid_n, offs_m, offs_n, rows, cols, mask, (scale·)T·U), rows / cols int64 [BLOCK_M, 1] / [1, BLOCK_N] to
    address any [M, N] operand, rows and columns past the edge masked off (rank_term without WRAP)."""
    pid_n, offs_m, offs_n = row_major_tile(M, N, BLOCK_M, BLOCK_N)
    acc = rank_term(t_ptr, u_ptr, offs_m, offs_n, M, N, R, stride_tm, stride_tr, stride_ur, stride_un,
                    tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), scale, False, SCALE_T, PRECISION, BLOCK_R)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    return pid_n, offs_m, offs_n, offs_m.to(tl.int64)[:, None], offs_n.to(tl.int64)[None, :], mask, acc


@triton.jit
def bias_row(bias_ptr, offs_n, N):
    """bias[offs_n] as a [1, BLOCK_N] fp32 row (0 past N)."""
    return tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]


@triton.jit
def lora_prologue(t_ptr, u_ptr, bias_ptr, offs_m, offs_n, n0, M, N, R, stride_tm, stride_tr, stride_ur, stride_un,
                  seed, threshold, low_scale, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                  PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """The fused LoRA GEMMs' initial accumulator: low_scale·(T·U) ⊙ keep (+ bias) on the [BLOCK_M, BLOCK_N] tile
    whose first column is n0. Computed before the main loop, its factors, the mask's Philox state and the bias are
    dead before the loop's pipelined tiles are live, so it adds no registers to the loop's peak (as an epilogue
    after the loop it spilled on sm_80/90). Without dropout T is scaled, not the tile."""
    acc = rank_term(t_ptr, u_ptr, offs_m, offs_n, M, N, R, stride_tm, stride_tr, stride_ur, stride_un,
                    tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), low_scale, True, not HAS_DROPOUT, PRECISION,
                    BLOCK_R)
    if HAS_DROPOUT:
        acc = tl.where(keep_tile(seed, offs_m, n0, N, threshold, BLOCK_N), acc * low_scale, 0.0)
    if HAS_BIAS:
        acc += bias_row(bias_ptr, offs_n, N)
    return acc


@triton.jit
def k_loop(a_ptr, b_ptr, a_rows, b_cols, stride_am, stride_ak, stride_bk, stride_bn, L, acc,
           PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + Σ_k A[a_rows, k]·B[k, b_cols] over L in BLOCK_K steps. a_rows / b_cols index valid rows / columns
    (past the tile's edge the caller passes a valid one, % M or % N, and masks its store), so only K is masked;
    row and column offsets are int64."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + b_cols.to(tl.int64)[None, :] * stride_bn
    for k0 in range(0, L, BLOCK_K):
        k_ok = offs_k < L - k0
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        acc = dot_prec(a, b, acc, PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def k_loop_pair(a_ptr, a2_ptr, b_ptr, a_rows, b_cols, stride_am, stride_ak, stride_a2m, stride_a2k, stride_bk,
                stride_bn, L, acc, acc2, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """(acc + Σ_k A·B, acc2 + Σ_k A2·B): k_loop with a second A operand (the same rows) sharing each B tile."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    a2_ptrs = a2_ptr + a_rows.to(tl.int64)[:, None] * stride_a2m + offs_k[None, :] * stride_a2k
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + b_cols.to(tl.int64)[None, :] * stride_bn
    for k0 in range(0, L, BLOCK_K):
        k_ok = offs_k < L - k0
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        acc = dot_prec(a, b, acc, PRECISION)
        a2 = tl.load(a2_ptrs, mask=k_ok[None, :], other=0.0)
        acc2 = dot_prec(a2, b, acc2, PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        a2_ptrs += BLOCK_K * stride_a2k
        b_ptrs += BLOCK_K * stride_bk
    return acc, acc2


@triton.jit
def add_to_tile(ptrs, value, mask):
    """*ptrs += value in place, the sum in fp32 and rounded once to the pointee's dtype."""
    cur = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, (cur + value).to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def store_tile(out_ptr, acc, offs_m, offs_n, M, N, stride_om, stride_on):
    """out[offs_m, offs_n] = acc rounded once to out's dtype, masked to [M, N]."""
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n.to(tl.int64)[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


# ----------------------------------------------------------------------------------------------
# host side: autotune configs and their pruning
# ----------------------------------------------------------------------------------------------

# the interpreter's one config: small tiles (it runs every program in numpy), a few tiles per group
INTERPRETER_TILE = (32, 32, 32, 4, 1)
INTERPRETER_GROUP_M = 4


def config(tile, group_m: int = 8, pre_hook=None) -> triton.Config:
    """The autotune config of tile (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)."""
    bm, bn, bk, warps, stages = tile
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m), num_warps=warps,
                         num_stages=stages, pre_hook=pre_hook)


def gemm_configs(tiles, interpreter_tile=INTERPRETER_TILE, interpreter_group_m=INTERPRETER_GROUP_M,
                 pre_hook=None) -> list:
    """What a GEMM autotunes over: on a GPU every tile of `tiles` once, in order; when the launchers size for the
    interpreter (kernels/_launch.LaunchConfig) one small tile."""
    if _launch.interpreting():
        return [config(interpreter_tile, interpreter_group_m, pre_hook)]
    return [config(t, pre_hook=pre_hook) for t in dict.fromkeys(tiles)]


def tile(cfg) -> tuple:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) of a config: the tile lists' entries."""
    kw = cfg.kwargs
    return kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], cfg.num_warps, cfg.num_stages


def acc_per_thread(cfg) -> int:
    """fp32 accumulator elements each thread holds for one [BLOCK_M, BLOCK_N] tile."""
    return cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] // (32 * cfg.num_warps)


def rows_per_warp(cfg) -> int:
    """Rows of a [BLOCK_M, ·] factor tile each warp holds."""
    return cfg.kwargs["BLOCK_M"] // cfg.num_warps


def arg(named_args: dict, kwargs: dict, name: str, *default):
    """An argument of an early_config_prune call: Triton passes the launch's keyword arguments (the launchers'
    constexprs) as **kwargs and the positional ones by name."""
    if name in kwargs:
        return kwargs[name]
    if default:
        return named_args.get(name, default[0])
    return named_args[name]


def by_operand_dtype(configs, named_args: dict, kwargs: dict, operand: str, fp32_tiles, tiles_16=None):
    """The start of a GEMM's early_config_prune: (arg, wide, kept), where arg(name[, default]) reads the call's
    arguments, `wide` says the operand is fp32 and `kept` are the configs of its dtype's tile list (fp32_tiles,
    or tiles_16 / every other tile for 16-bit operands)."""
    def get(name, *default):
        return arg(named_args, kwargs, name, *default)

    wide = get(operand).dtype == torch.float32
    if wide or tiles_16 is None:
        kept = [c for c in configs if (tile(c) in fp32_tiles) == wide]
    else:
        kept = [c for c in configs if tile(c) in tiles_16]
    return get, wide, kept


def gemm_grid(M: int, N: int):
    """The 1-D grid of a GEMM over [M, N] output tiles of the config's BLOCK_M x BLOCK_N."""
    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    return grid


def b_layout(b) -> str:
    """How a GEMM's B operand [L, N] is laid out (an autotuning key: the best tile depends on which way B is read)."""
    return "row" if b.stride(1) == 1 else "col" if b.stride(0) == 1 else "strided"
