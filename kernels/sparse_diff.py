"""Triton kernels of sparse_diff_linear:  y = x·(W + Δ)ᵀ with Δ sparse, never dense.

  _spmm_tiles_kernel   out[m, j] += Σ_{z in segment j} val[z] · src[m, col[z]]
        forward: out = y (after the dense GEMM x·Wᵀ), segments = Δ's rows (CSR), src = x
        backward: out = dx (after dy·W), segments = Δ's columns (CSC), src = dy
  _sddmm_tiles_kernel  part[s, z] = Σ_{m in split s} dy[m, row[z]] · x[m, col[z]]
        the gradient of the values as a sampled dense-dense product: only the diff's positions are
        computed, and split-M partial sums are added in a fixed order.
The dense x·Wᵀ and dy·W stay with the library GEMM (cuBLAS); no [out, in] tensor is ever allocated.

How they read memory. Both kernels work on a tokens-contiguous copy of their dense operands (srcᵀ, dyᵀ, xᵀ:
[features, tokens] row-major), made once per call by the launcher (a view, no copy, when the caller's tensor
already is tokens-contiguous, i.e. `t.stride(0) == 1`). A nonzero at column c then reads the contiguous
row srcᵀ[c, m0:m0+BLOCK_M] (256 B in bf16 at BLOCK_M=128: whole cache lines), not BLOCK_M elements
K apart (one 32-byte sector per element, what the previous kernels did).
- spmm: a program owns a [BLOCK_M tokens × BLOCK_J outputs] tile of out. For each of its BLOCK_J outputs it
  walks that output's segment in chunks of BLOCK_Z nonzeros, accumulating val · srcᵀ[col, tokens] in a
  [BLOCK_Z, BLOCK_M] fp32 register tile (elementwise FMAs, no reduction per chunk), reduces it once per
  output, and puts the column into the [BLOCK_M, BLOCK_J] fp32 accumulator. The tile is added to out once,
  row by row: BLOCK_J contiguous elements per row (32 B in bf16, a whole sector), so the read-modify-write
  of out is coalesced. Programs are numbered with outputs fastest, so the programs running at one time
  share a token block and their gathers hit the same K × BLOCK_M slice of srcᵀ in L2 (1 MiB at K = 4096).
- sddmm: a program owns BLOCK_Z nonzeros and one token split; per BLOCK_M tokens it reads the two rows
  dyᵀ[row, tokens] and xᵀ[col, tokens] of each nonzero and accumulates their product elementwise in a
  [BLOCK_Z, BLOCK_M] fp32 tile, reduced once at the end. Splits are the slow program index and are sized
  so that one split's slices of dyᵀ and xᵀ fit in L2 (L2_WINDOW_BYTES): every nonzero of a split reads
  rows that the split's other programs have brought into L2, and dyᵀ and xᵀ come from HBM about once.
Both: fp32 accumulation, a fixed summation order (no atomics: the same inputs give the same bits), one
program index that is folded onto grid axes (0, 1) so that axis 0 stays below 2**31 and axis 1 at most
65535 for any shape (`_grid`; CUDA caps axes 1 and 2 at 65535, which an lm_head's 128256 outputs on axis 1
used to exceed).

Memory safety: the positions come from a layout built in the same call from range-checked indices
(peftkern/sparse_diff/op.py), and the kernels still mask every gathered position against the size of the
tensor it addresses (segment entries against nnz, columns/rows against src's/dy's/x's feature count,
output columns against out's), one compare per position, so no position can ever address memory outside
its tensor. Programs past the last tile (the fold's rounding) have every store masked off.

Roofline (estimates from byte counts, not measurements; H100 SXM: HBM ~3 TB/s, L2 ~6 TB/s read (~2× HBM,
an estimate), 800 TFLOP/s bf16 tensor, ~60 TFLOP/s fp32 FMA). Headline: 1% of a 4096×4096 weight
(nnz = 167,772), 8192 tokens, bf16.
- The dense GEMM x·Wᵀ both paths run: 2·8192·4096² = 275 GFLOP ≈ 0.34 ms at peak (~0.4 ms in practice).
- Previous spmm: 8192 · 167,772 = 1.37 G gathered elements, one 32 B sector each = 44 GB of sector traffic,
  mostly L2 hits: 5–10 ms.
- spmm here, forward: xᵀ copy 2·8192·4096·2 B = 134 MB (45 µs); gathered rows nnz·M·2 B = 2.75 GB from L2
  (≈ 0.46 ms; the token block's slice of xᵀ is 1 MiB, so HBM sees xᵀ about once, 67 MB); out read+write
  134 MB (45 µs); 2·nnz·M = 2.75 GFLOP of fp32 FMA (≈ 46 µs, overlapped); indices and values
  8 B · nnz · (M / BLOCK_M) = 86 MB from L2. ≈ 0.55–0.6 ms, L2-bound: ~10× the previous kernel, still more
  than the GEMM itself. Not in that figure: (M / BLOCK_M) · N = 262k per-output reductions of a [16, 128]
  tile (cross-warp, ~0.1 ms of issue slots if nothing overlaps them), and chunk padding (segments average
  41 nonzeros at 1%: 48 lanes issued; at 0.1%, 4 of 16: masked lanes load nothing but still issue).
  The backward dx += dy·Δ is the same product with dyᵀ.
- sddmm: dyᵀ and xᵀ copies 268 MB (90 µs); 2·nnz·M·2 B = 5.5 GB of row reads from L2 (≈ 0.9 ms), about
  half that when the nonzeros come sorted by row (CSR order: a program's BLOCK_Z nonzeros then share a few
  rows of dyᵀ, served by L1; sorting is the caller's choice). Composite and fused
  paths both run it.
- Composite (in-place apply → the same cuBLAS GEMM with W + Δ → bit-exact restore): per nonzero, apply
  reads and writes a random 32 B sector of W and streams index, value and backup, restore writes the sector
  again: ≈ 160 B (APPLY_RESTORE_BYTES_PER_NNZ) → 27 MB ≈ 9 µs plus two launches, ≈ 20 µs in all.
So the composite adds O(nnz) bytes while the fused product adds O(tokens·(in + out)) + O(nnz·tokens): per
nonzero the fused path moves tokens·2 B from L2 against the composite's 160 B from HBM, so above
COMPOSITE_MIN_TOKENS tokens (160 in 16-bit; every training batch) the composite is estimated faster at
every density, and below it the fused product is faster except for tiny diffs (where both are a few
launches). The deciding quantity is the token count, not the density: COMPOSITE_DENSITY is therefore 0 at
the headline shape, and `composite_estimated_faster` gives the model's answer for any shape. The fused
path stays the choice for decode-sized batches and whenever the weight cannot be written in place
(an inference tensor, overlapping memory, concurrent readers); peftkern.dispatch measures the rest.
"""
import math

import torch
import triton
import triton.language as tl

from peftkern.core import rules

from . import _launch, registry
from ._launch import target_programs
from .blocks import split_range

# ---- the roofline model of the module docstring (H100 SXM estimates, not measurements) -------------------
HBM_BYTES_PER_S = 3.0e12
L2_BYTES_PER_S = 6.0e12  # L2 → SM read bandwidth, ~2× HBM (an estimate; no GPU here to measure it)
LAUNCH_S = 5e-6  # one small kernel launch, as seen by the stream
# apply + restore per nonzero: two reads and two writes of a random 32 B sector of W, plus the index
# (8 B), value (2–4 B) and backup (2 B, written then read) streams
APPLY_RESTORE_BYTES_PER_NNZ = 160
# Above this many tokens the composite path (apply → library GEMM → restore) is estimated faster than the
# fused product at every density, for 16-bit activations (fp32 halves it): per nonzero the fused product
# gathers tokens · 2 B from L2 where the composite moves APPLY_RESTORE_BYTES_PER_NNZ from HBM, and its
# fixed cost (a pass over src and one over out) is larger too.
COMPOSITE_MIN_TOKENS = math.ceil(APPLY_RESTORE_BYTES_PER_NNZ * L2_BYTES_PER_S / HBM_BYTES_PER_S / 2)
# The density above which the composite is estimated to win at the headline shape (8192 tokens, 4096²,
# bf16): 0, i.e. every density. The composite's extra cost grows with nnz alone (scattered bytes), the
# fused product's with nnz × tokens, so at training batch sizes no density favours the fused product; the
# crossover is a token count (COMPOSITE_MIN_TOKENS), and `composite_estimated_faster` answers other shapes.
COMPOSITE_DENSITY = 0.0


def fused_extra_seconds(tokens: int, out_features: int, in_features: int, nnz: int, elem_size: int) -> float:
    """Estimated time the fused sparse product adds to the library GEMM (forward; dx is the same with the
    feature counts swapped): the tokens-contiguous copy of src, the read-modify-write of out, the gathers."""
    if nnz == 0:
        return 0.0  # the launcher returns before launching anything
    passes = 2 * tokens * (in_features + out_features) * elem_size / HBM_BYTES_PER_S
    gathers = nnz * tokens * elem_size / L2_BYTES_PER_S
    return passes + gathers + 2 * LAUNCH_S


def composite_extra_seconds(nnz: int) -> float:
    """Estimated time the composite path adds to the library GEMM: apply and restore."""
    return nnz * APPLY_RESTORE_BYTES_PER_NNZ / HBM_BYTES_PER_S + 2 * LAUNCH_S


def composite_estimated_faster(tokens: int, out_features: int, in_features: int, nnz: int, elem_size: int) -> bool:
    """The roofline model's choice (a prior, not a measurement: peftkern.dispatch measures on the GPU)."""
    return composite_extra_seconds(nnz) < fused_extra_seconds(tokens, out_features, in_features, nnz, elem_size)


# ---- kernels ------------------------------------------------------------------------------------------

@registry.kernel
@triton.jit
def _spmm_tiles_kernel(
    src_t_ptr, seg_ptr, col_ptr, val_ptr, out_ptr,
    M, J, K, NNZ, J_TILES,
    stride_tk, stride_tm, stride_om, stride_oj,
    BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_Z: tl.constexpr,
):
    # one program index folded over grid axes 0 and 1 (see _grid); outputs fastest, so that the programs
    # running together share a token block (its slice of srcᵀ stays in L2)
    pid = tl.program_id(1).to(tl.int64) * tl.num_programs(0) + tl.program_id(0)
    pid_j = pid % J_TILES
    pid_m = pid // J_TILES  # past the last tile (the fold's rounding): every token masked off
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    lanes = tl.arange(0, BLOCK_J)
    acc = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
    for jj in range(0, BLOCK_J):
        j = pid_j * BLOCK_J + jj
        j_ok = j < J  # seg has J + 1 entries
        start = tl.load(seg_ptr + j, mask=j_ok, other=0)
        end = tl.load(seg_ptr + j + 1, mask=j_ok, other=0)
        # per nonzero lane, summed over the segment's chunks in order; reduced once per output
        part = tl.zeros((BLOCK_Z, BLOCK_M), dtype=tl.float32)
        for z0 in range(start, end, BLOCK_Z):
            offs_z = z0 + tl.arange(0, BLOCK_Z)
            # segment bounds come from the layout; still, no entry outside cols/vals is read
            z_ok = (offs_z < end) & (offs_z >= 0) & (offs_z < NNZ)
            cols = tl.load(col_ptr + offs_z, mask=z_ok, other=0).to(tl.int64)
            z_ok = z_ok & (cols >= 0) & (cols < K)  # masked positions add 0
            vals = tl.load(val_ptr + offs_z, mask=z_ok, other=0.0).to(tl.float32)
            # row `col` of srcᵀ: BLOCK_M contiguous tokens, a coalesced read
            src = tl.load(src_t_ptr + cols[:, None] * stride_tk + offs_m[None, :] * stride_tm,
                          mask=z_ok[:, None] & m_ok[None, :], other=0.0)
            part += src.to(tl.float32) * vals[:, None]
        acc = tl.where(lanes[None, :] == jj, tl.sum(part, axis=0)[:, None], acc)
    offs_j = pid_j * BLOCK_J + lanes
    ptrs = out_ptr + offs_m[:, None] * stride_om + offs_j[None, :] * stride_oj
    ok = m_ok[:, None] & (offs_j < J)[None, :]
    cur = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    tl.store(ptrs, (cur + acc).to(out_ptr.dtype.element_ty), mask=ok)


@registry.kernel
@triton.jit
def _sddmm_tiles_kernel(
    dy_t_ptr, x_t_ptr, row_ptr, col_ptr, part_ptr,
    M, N, K, NNZ, Z_BLOCKS, SPLITS, rows_per_split,
    stride_dn, stride_dm, stride_xk, stride_xm, stride_ps,
    BLOCK_Z: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # one program index folded over grid axes 0 and 1 (see _grid); nonzero blocks fastest, so that the
    # programs running together read the same token split of dyᵀ and xᵀ (kept in L2)
    pid = tl.program_id(1).to(tl.int64) * tl.num_programs(0) + tl.program_id(0)
    pid_z = pid % Z_BLOCKS
    pid_s = pid // Z_BLOCKS
    offs_z = pid_z * BLOCK_Z + tl.arange(0, BLOCK_Z)
    z_ok = offs_z < NNZ
    r = tl.load(row_ptr + offs_z, mask=z_ok, other=0).to(tl.int64)
    c = tl.load(col_ptr + offs_z, mask=z_ok, other=0).to(tl.int64)
    pos_ok = z_ok & (r >= 0) & (r < N) & (c >= 0) & (c < K)  # masked positions sum to 0
    m_begin, m_end = split_range(pid_s, rows_per_split, M)
    acc = tl.zeros((BLOCK_Z, BLOCK_M), dtype=tl.float32)
    for m0 in range(m_begin, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        ok = pos_ok[:, None] & (offs_m < m_end)[None, :]
        # rows of dyᵀ and xᵀ: BLOCK_M contiguous tokens each, coalesced
        g = tl.load(dy_t_ptr + r[:, None] * stride_dn + offs_m[None, :] * stride_dm, mask=ok, other=0.0)
        xv = tl.load(x_t_ptr + c[:, None] * stride_xk + offs_m[None, :] * stride_xm, mask=ok, other=0.0)
        acc += g.to(tl.float32) * xv.to(tl.float32)
    # programs past the last split (the fold's rounding) store nothing: part has SPLITS rows
    s_ok = (pid_s + tl.zeros((BLOCK_Z,), dtype=tl.int64)) < SPLITS
    tl.store(part_ptr + pid_s * stride_ps + offs_z, tl.sum(acc, axis=1), mask=z_ok & s_ok)


# ---- launchers ----------------------------------------------------------------------------------------

def _grid(programs: int) -> tuple:
    """Grid for `programs` programs numbered by one folded index: axis 0 below 2**31, axis 1 at most 65535.
    The kernels rebuild the index as program_id(1) · num_programs(0) + program_id(0) and mask off the few
    programs past `programs` (axis 1 is used only above 2**31 - 1 programs)."""
    if programs <= rules.MAX_GRID_X:  # CUDA's grid limits (peftkern.core.rules): x < 2**31, y and z <= 65535
        return (programs,)
    rows = triton.cdiv(programs, rules.MAX_GRID_X)
    if rows > rules.MAX_GRID_YZ:
        raise ValueError(f"{programs} programs exceed CUDA's grid ({rules.MAX_GRID_X} x {rules.MAX_GRID_YZ})")
    return (triton.cdiv(programs, rows), rows)


def _tokens_contiguous(t: torch.Tensor) -> torch.Tensor:
    """tᵀ ([features, tokens]) with tokens contiguous: a view when t already is (t.stride(0) == 1, or one
    token), else one copy. One pass over t, cheap next to gathering with a stride of t's width."""
    if t.shape[0] <= 1 or t.stride(0) == 1:
        return t.t()
    return t.t().contiguous()


def _spmm_blocks(src_dtype: torch.dtype):
    """(BLOCK_M, BLOCK_J, BLOCK_Z, num_warps).
    GPU: 128 tokens = 256 B rows in bf16 (512 B in fp32) per gathered nonzero; 16 outputs = a 32 B sector per
    row of out in bf16. Registers per thread at 4 warps (128 threads): the [BLOCK_Z, BLOCK_M] = [16, 128]
    fp32 lane sums 16, the loaded src tile 16 (8 packed in 16-bit), the [128, 16] fp32 accumulator 16,
    plus addresses and indices: well under 128, no spills (the AOT check verifies).
    Interpreter: small tiles (it runs every program in numpy), BLOCK_Z < a typical test segment so that
    segments span several chunks."""
    if _launch.interpreting():
        return (16, 8, 4, 4)
    # an fp32 source at 16 outputs spilled 4 B at 64 registers under Triton 3.6's ptxas (12.8, sm_80); 8 fit
    return (128, 8, 16, 4) if src_dtype == torch.float32 else (128, 16, 16, 4)


def _sddmm_blocks():
    """(BLOCK_Z, BLOCK_M, num_warps). GPU: 16 nonzeros × 128 tokens; per thread at 4 warps the fp32
    accumulator is 16 registers and the two loaded tiles 16 each. Interpreter: small tiles."""
    return (16, 8, 4) if _launch.interpreting() else (16, 128, 4)


# one sddmm split's slices of dyᵀ and xᵀ should fit in L2 with room to spare (H100 50 MB, A100 40 MB)
L2_WINDOW_BYTES = 16 * 2**20
# ...but the split partials ([splits, nnz] fp32) stay small next to the activations
PART_BYTES_CAP = 64 * 2**20


def spmm_add_(out: torch.Tensor, src: torch.Tensor, seg: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor) -> None:
    """out[:, j] += src[:, cols[seg[j]:seg[j+1]]] · vals[seg[j]:seg[j+1]] for every column j of out, in place.

    out [M, J] and src [M, K] any strides (src tokens-contiguous, `src.stride(0) == 1`, avoids a copy);
    seg [J + 1] int32/int64 segment starts, cols [nnz] column of src per entry, vals [nnz] float. The sum is
    in fp32, added to out once and rounded once."""
    M, J = out.shape
    if src.dim() != 2 or src.shape[0] != M:
        raise ValueError(f"src must be [{M}, K] (out's rows), got {tuple(src.shape)}")
    if seg.numel() != J + 1:
        raise ValueError(f"seg must have out's column count + 1 = {J + 1} entries, got {seg.numel()}")
    if cols.numel() != vals.numel():
        raise ValueError(f"cols and vals must have one entry per nonzero, got {cols.numel()} and {vals.numel()}")
    nnz = cols.numel()
    if M == 0 or J == 0 or nnz == 0:
        return
    # the kernel reads seg, cols and vals with unit stride
    seg, cols, vals = seg.contiguous(), cols.contiguous(), vals.contiguous()
    src_t = _tokens_contiguous(src)
    block_m, block_j, block_z, warps = _spmm_blocks(src.dtype)
    j_tiles = triton.cdiv(J, block_j)
    _spmm_tiles_kernel[_grid(triton.cdiv(M, block_m) * j_tiles)](
        src_t, seg, cols, vals, out, M, J, src.shape[1], nnz, j_tiles,
        src_t.stride(0), src_t.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_J=block_j, BLOCK_Z=block_z, num_warps=warps,
    )


def sddmm(dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """g[z] = Σ_m dy[m, rows[z]] · x[m, cols[z]] in fp32, for dy [M, N] and x [M, K] (any strides;
    tokens-contiguous ones avoid a copy). Nonzeros in any order; sorted by row they share reads of dyᵀ."""
    if dy.dim() != 2 or x.dim() != 2 or x.shape[0] != dy.shape[0]:
        raise ValueError(f"dy [M, N] and x [M, K] must have the same token count, got {tuple(dy.shape)} and "
                         f"{tuple(x.shape)}")
    if rows.numel() != cols.numel():
        raise ValueError(f"rows and cols must have one entry per nonzero, got {rows.numel()} and {cols.numel()}")
    M, N = dy.shape
    K = x.shape[1]
    nnz = rows.numel()
    if nnz == 0 or M == 0:
        return torch.zeros(nnz, device=dy.device, dtype=torch.float32)
    rows, cols = rows.contiguous(), cols.contiguous()
    dy_t, x_t = _tokens_contiguous(dy), _tokens_contiguous(x)
    block_z, block_m, warps = _sddmm_blocks()
    z_blocks = triton.cdiv(nnz, block_z)
    m_blocks = triton.cdiv(M, block_m)
    # enough programs to fill the device when there are few nonzeros...
    splits = triton.cdiv(target_programs(dy.device), z_blocks)
    # ...and token windows whose slices of dyᵀ and xᵀ fit in L2, while the partials stay small
    window = max(block_m, L2_WINDOW_BYTES // max(1, (N + K) * dy.element_size()))
    splits = max(splits, min(triton.cdiv(M, window), PART_BYTES_CAP // (4 * nnz)))
    splits = max(1, min(m_blocks, splits))
    rows_per_split = triton.cdiv(m_blocks, splits) * block_m
    splits = triton.cdiv(M, rows_per_split)
    part = _launch.empty((splits, nnz), dy.device, torch.float32)
    _sddmm_tiles_kernel[_grid(z_blocks * splits)](
        dy_t, x_t, rows, cols, part, M, N, K, nnz, z_blocks, splits, rows_per_split,
        dy_t.stride(0), dy_t.stride(1), x_t.stride(0), x_t.stride(1), part.stride(0),
        BLOCK_Z=block_z, BLOCK_M=block_m, num_warps=warps,
    )
    return part[0] if splits == 1 else part.sum(dim=0)  # partials added in a fixed order
