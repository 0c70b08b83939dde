"""Many LoRA adapters over one base: grouped skinny products, each row with its own adapter.

Rows are grouped by adapter on the device (peftkern/multi_lora/triton.py: a stable sort of the ids and a
histogram, no host synchronisation): `order` lists the rows adapter by adapter, `seg_start[i]`/`seg_len[i]` say
where adapter i's rows are in it. The adapters reach the kernels through device tables of data pointers (one
int64 per adapter), so no adapter is copied or padded per call: a segment reads only its own adapter's r_i rows.
The tables' whole extra traffic is 8·n bytes copied host-to-device per launch (pinned, asynchronous) and one 8-byte
load per program; concatenating the adapters instead would copy every adapter (2·Σr_i·4096 elements) per call and
split the gradients back.
Program (tile, i) works on adapter i's segment and exits at once when the segment is shorter than its tile:
the grid grows with n·cdiv(M, BLOCK_M), the work with the rows each adapter serves.

  _multi_lora_rank_down_kernel    S[t, :r_i] = scale_i·(keep ⊙ X)[t, :]·P_iᵀ        S = dropout(x)·A_iᵀ; dS = s_i·dy·B_i
  _multi_lora_rank_up_add_kernel  out[t, :] += scale_i·keep ⊙ (T[t, :r_i]·U_i)    y += s_i·S·B_iᵀ; dx += keep ⊙ dS·A_i
  _multi_lora_rank_grad_kernel    G_i = scale_i·Σ_{t of adapter i} T[t, :r_i]ᵀ·(keep ⊙ V)[t, :] dA_i; dB_iᵀ (no atomics)
  _multi_lora_gemm_kernel         y = x·Wᵀ + bias + s_i·S[t, :r_i]·B_iᵀ, rows in adapter order     the fused forward

P_i / U_i / G_i are each adapter's own [r_i, C] matrix (A_i, or B_i read transposed: TRANS, element (r, c) at
c·r_i + r). `keep` is lora_linear's dropout mask of the row's original position (kernels/dropout.py).

Rooflines at the headline prefill shape (M=8192 rows, K=N=4096, 8 adapters of r=16 serving 1024 rows each, bf16,
H100 ~800 TFLOP/s, ~3 TB/s); each rank-r product is 2·M·r·4096 = 1.1 GFLOP (~1.3 µs), so all are memory-bound:
  rank_down reads x (or dy) once, 64 MiB, + each adapter once from DRAM (8 · 128 KiB; again per row tile from L2),
           writes S 0.5 MiB: ~22 µs, the minimum (one pass over x). Programs: 8 · 128 row tiles, 7/8 exit at once.
  rank_up  reads and writes y (or dx) once, 2 × 64 MiB, + S: ~45 µs (fused saves this pass; composite pays it for
           cuBLAS's GEMM).
  grad     reads V (x or dy) once per rank tile (once for r <= 64), 64 MiB, + T: ~22 µs; writes G_i (1 MiB).
  gemm     the base GEMM: 2·M·N·K = 275 GFLOP (~0.35 ms at peak), x 64 + W 32 + y 64 MiB: compute-bound; the
           rank-r term adds 1.1 GFLOP and S (0.5 MiB) + each B_j per row tile (L2).
So the composite forward adds ~10-20% to cuBLAS's x·Wᵀ (0.35-0.45 ms), the fused ~6%.
Decode (64 rows over 32 adapters, BLOCK_M 16): every adapter is read once (32 · 2 · 16 · 4096 · 2 B = 8 MiB,
~3 µs), beside W's 32 MiB that the base product reads anyway; the small row tile keeps programs from idling on
segments of a row or two (64-row tiles would do 4x the masked work per program).
"""
import torch
import triton
import triton.language as tl

from peftkern.core import rules

from . import _launch, blocks, registry
from ._launch import dot_precision, dropout_args, pow2_at_least_16
from .blocks import add_to_tile, bias_row, gemm_grid, grouped_tile, k_loop, load_kept, tile
from .dropout import keep_tile
from .tf32 import dot_prec


@triton.jit
def _segment_rows(order_ptr, seg_start_ptr, seg_len_ptr, i, m0, BLOCK_M: tl.constexpr):
    """Rows m0 .. m0 + BLOCK_M of adapter i's segment: (row indices in x, mask, segment length)."""
    start = tl.load(seg_start_ptr + i)
    length = tl.load(seg_len_ptr + i)
    offs = m0 + tl.arange(0, BLOCK_M)
    ok = offs < length
    rows = tl.load(order_ptr + start + offs, mask=ok, other=0)
    return rows, ok, length


@triton.jit
def _tile_and_adapter(inner, BLOCK: tl.constexpr):
    """(outer tile, inner tile, adapter) of this program: grid axis 0 holds the (outer, inner) tile pairs, inner
    fastest (cdiv(inner, BLOCK) of them per outer tile), axis 1 the adapter."""
    pid = tl.program_id(0)
    num_inner = tl.cdiv(inner, BLOCK)
    return pid // num_inner, pid % num_inner, tl.program_id(1)


@triton.jit
def _adapter_matrix(table, ref, i):
    """Adapter i's matrix: its data pointer from the device table, typed as `ref`'s."""
    return tl.load(table + i).to(tl.pointer_type(ref.dtype.element_ty))


@triton.jit
def _element(r, c, rank, width, TRANS: tl.constexpr):
    """Offset of element (r, c) of adapter i's matrix P_i [r_i, width] (A_i), or, TRANS, of P_i = B_iᵀ read from
    B_i [width, r_i] (element (r, c) at c·r_i + r). r and c are index tensors broadcast to the tile's shape."""
    if TRANS:
        off = c.to(tl.int64) * rank + r
    else:
        off = r.to(tl.int64) * width + c
    return off


@triton.jit
def _scale(scale_ptr, i, drop_scale, PER_ADAPTER_SCALE: tl.constexpr):
    """drop_scale, times adapter i's scaling when PER_ADAPTER_SCALE."""
    scale = drop_scale
    if PER_ADAPTER_SCALE:
        scale = scale * tl.load(scale_ptr + i)
    return scale


@registry.kernel
@triton.jit
def _multi_lora_rank_down_kernel(
    x_ptr, out_ptr, p_table, p_ref, rank_ptr, scale_ptr, order_ptr, seg_start_ptr, seg_len_ptr,
    C, R_MAX,
    stride_xm, stride_xc, stride_om, stride_or,
    seed, threshold, drop_scale,
    TRANS: tl.constexpr, PER_ADAPTER_SCALE: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m, pid_r, i = _tile_and_adapter(R_MAX, BLOCK_R)
    rows, row_ok, length = _segment_rows(order_ptr, seg_start_ptr, seg_len_ptr, i, pid_m * BLOCK_M, BLOCK_M)
    rank = tl.load(rank_ptr + i)
    if pid_m * BLOCK_M < length and pid_r * BLOCK_R < rank:
        p_ptr = _adapter_matrix(p_table, p_ref, i)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < rank
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            c_ok = offs_c < C
            x = load_kept(x_ptr, rows, offs_c, row_ok[:, None] & c_ok[None, :], stride_xm, stride_xc, c0, C, seed,
                          threshold, HAS_DROPOUT, BLOCK_C)
            # P_i = A_i [r_i, C], or B_iᵀ of B_i [C, r_i] (TRANS), read as a [BLOCK_C, BLOCK_R] tile
            p = tl.load(p_ptr + _element(offs_r[None, :], offs_c[:, None], rank, C, TRANS),
                        mask=c_ok[:, None] & r_ok[None, :], other=0.0)
            acc = dot_prec(x, p, acc, PRECISION)
        scale = _scale(scale_ptr, i, drop_scale, PER_ADAPTER_SCALE)
        # columns r_i .. R_MAX of the row stay as the caller zeroed them
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + offs_r[None, :] * stride_or, acc * scale,
                 mask=row_ok[:, None] & r_ok[None, :])


@registry.kernel
@triton.jit
def _multi_lora_rank_up_add_kernel(
    out_ptr, t_ptr, u_table, u_ref, rank_ptr, scale_ptr, order_ptr, seg_start_ptr, seg_len_ptr,
    N,
    stride_om, stride_on, stride_tm, stride_tr,
    seed, threshold, drop_scale,
    TRANS: tl.constexpr, PER_ADAPTER_SCALE: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # axis 0: (row tile, column tile), column tiles fastest so neighbouring programs share T's rows; axis 1: adapter
    pid_m, pid_n, i = _tile_and_adapter(N, BLOCK_N)
    rows, row_ok, length = _segment_rows(order_ptr, seg_start_ptr, seg_len_ptr, i, pid_m * BLOCK_M, BLOCK_M)
    if pid_m * BLOCK_M < length:
        rank = tl.load(rank_ptr + i)
        u_ptr = _adapter_matrix(u_table, u_ref, i)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_ok = offs_r < rank
            t = tl.load(t_ptr + rows.to(tl.int64)[:, None] * stride_tm + offs_r[None, :] * stride_tr,
                        mask=row_ok[:, None] & r_ok[None, :], other=0.0)
            # U_i = A_i [r_i, N], or B_iᵀ of B_i [N, r_i] (TRANS)
            u = tl.load(u_ptr + _element(offs_r[:, None], offs_n[None, :], rank, N, TRANS),
                        mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            acc = dot_prec(t, u, acc, PRECISION)
        scale = _scale(scale_ptr, i, drop_scale, PER_ADAPTER_SCALE)
        if HAS_DROPOUT:
            acc = tl.where(keep_tile(seed, rows, pid_n * BLOCK_N, N, threshold, BLOCK_N), acc, 0.0)
        # segments are disjoint and a row appears once in its segment: no two programs touch one element
        add_to_tile(out_ptr + rows.to(tl.int64)[:, None] * stride_om + offs_n.to(tl.int64)[None, :] * stride_on,
                    acc * scale, row_ok[:, None] & n_ok[None, :])


@registry.kernel
@triton.jit
def _multi_lora_rank_grad_kernel(
    t_ptr, v_ptr, g_table, g_ref, rank_ptr, scale_ptr, order_ptr, seg_start_ptr, seg_len_ptr,
    C, R_MAX,
    stride_tm, stride_tr, stride_vm, stride_vc,
    seed, threshold, drop_scale,
    TRANS: tl.constexpr, PER_ADAPTER_SCALE: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # program (column tile x rank tile, adapter) walks its adapter's whole segment in order: a deterministic sum
    # with no atomics and no partial buffers; an adapter no row uses gets zeros (its loop is empty)
    pid_c, pid_r, i = _tile_and_adapter(R_MAX, BLOCK_R)
    rank = tl.load(rank_ptr + i)
    if pid_r * BLOCK_R < rank:
        start = tl.load(seg_start_ptr + i)
        length = tl.load(seg_len_ptr + i)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        c_ok = offs_c < C
        r_ok = offs_r < rank
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for m0 in range(0, length, BLOCK_M):
            offs = m0 + tl.arange(0, BLOCK_M)
            row_ok = offs < length
            rows = tl.load(order_ptr + start + offs, mask=row_ok, other=0)
            t_t = tl.load(t_ptr + rows.to(tl.int64)[None, :] * stride_tm + offs_r[:, None] * stride_tr,
                          mask=row_ok[None, :] & r_ok[:, None], other=0.0)
            v = load_kept(v_ptr, rows, offs_c, row_ok[:, None] & c_ok[None, :], stride_vm, stride_vc, pid_c * BLOCK_C,
                          C, seed, threshold, HAS_DROPOUT, BLOCK_C)
            acc = dot_prec(t_t, v, acc, PRECISION)
        scale = _scale(scale_ptr, i, drop_scale, PER_ADAPTER_SCALE)
        # g_i [r_i, C], or its transpose [C, r_i] stored (TRANS)
        tl.store(_adapter_matrix(g_table, g_ref, i) + _element(offs_r[:, None], offs_c[None, :], rank, C, TRANS),
                 (acc * scale).to(g_ref.dtype.element_ty), mask=r_ok[:, None] & c_ok[None, :])


# ---- launchers ----------------------------------------------------------------------------------------------

class Groups:
    """Rows grouped by adapter, on the device: `order` (int64 [M], the rows adapter by adapter, rows ascending
    within one), `seg_start`/`seg_len` (int64 [n]: where adapter i's rows are in `order`). Built with torch ops
    on the device, no host synchronisation. `ranks`/`scalings`: the adapters' ranks (int32 [n]) and scalings
    (fp32 [n]) on the device; `r_max` the largest rank (a host int, known from the shapes)."""

    def __init__(self, row_ids: torch.Tensor, ranks: list[int], scalings: list[float]):
        n = len(ranks)
        device = row_ids.device
        ids = row_ids.to(torch.int64)
        # an id outside [-1, n) selects no adapter here, so no kernel (nor the scatter below) reads out of bounds
        # whatever the caller checked: on a GPU the caller's check is an asynchronous assert, not an exception
        ids = torch.where((ids >= -1) & (ids < n), ids, -1)
        self.order = torch.argsort(ids, stable=True)  # −1 rows first: segment i starts after them
        self.sorted_ids = ids[self.order]
        # a scatter-add, not torch.bincount: on CUDA bincount reads the ids' maximum back to the host to size its output
        counts = torch.zeros(n + 1, dtype=torch.int64, device=device).scatter_add_(0, ids + 1, torch.ones_like(ids))
        ends = torch.cumsum(counts, 0)
        self.seg_start = (ends - counts)[1:].contiguous()
        self.seg_len = counts[1:].contiguous()
        self.ranks = device_table(ranks, torch.int32, device)
        self.scalings = device_table(scalings, torch.float32, device)
        self.n, self.r_max, self.rank_list = n, max(ranks), list(ranks)


def device_table(values, dtype, device) -> torch.Tensor:
    """A small host list as a device tensor without a host synchronisation: through pinned memory with a
    non-blocking copy on CUDA (a copy from pageable memory would wait for the stream)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host


def pointer_table(tensors, device) -> torch.Tensor:
    """int64 [n]: each (contiguous) tensor's data pointer, for the kernels' per-adapter matrices."""
    return device_table([t.data_ptr() for t in tensors], torch.int64, device)


def _check_adapters(n: int) -> None:
    if n > rules.MAX_GRID_YZ:
        raise ValueError(f"multi_lora_linear's Triton kernels take at most {rules.MAX_GRID_YZ} adapters (CUDA's grid "
                         f"limit on the adapter axis), got {n}")


def _block_m(groups: Groups, m: int) -> int:
    """Small tiles when adapters serve few rows each (decode: a row or two per adapter), full ones otherwise."""
    if _launch.interpreting():
        return 16
    return 16 if m <= 16 * groups.n else 64


def rank_down(x: torch.Tensor, mats, groups: Groups, *, trans: bool, per_adapter_scale: bool, exact: bool,
           seed: int = 0, dropout_p: float = 0.0) -> torch.Tensor:
    """S [M, r_max] fp32: row t of adapter i gets scale·(keep ⊙ x_t)·P_iᵀ in its first r_i columns, zeros after
    (rows of no adapter: zeros). P_i = mats[i] ([r_i, C]), or mats[i]ᵀ with `trans` (mats[i] [C, r_i]).
    scale = scalings[i] with `per_adapter_scale`, else 1 (times 1/(1-p) with dropout)."""
    _check_adapters(groups.n)
    M, C = x.shape
    out = torch.zeros((M, groups.r_max), device=x.device, dtype=torch.float32)
    if M == 0 or C == 0:
        return out
    seed_v, threshold, drop_scale = dropout_args(seed, dropout_p)
    precision = dot_precision(exact)
    block_m = _block_m(groups, M)
    block_r = pow2_at_least_16(groups.r_max, 64)
    # 3xTF32 splits the fp32 operand tiles into hi/lo halves; with the Philox state of the mask beside them the
    # narrower column tile keeps registers in bounds (the same rule as kernels/rank.py's rank_down)
    if precision == "tf32x3" and (dropout_p > 0.0 or x.dtype == torch.float32):
        block_c = 32
    else:
        block_c = 64 if block_r <= 32 else 32
    if block_r > 32 and dropout_p > 0.0:
        block_m = min(block_m, 32)  # rank 64 with the mask: [64, 64] spilled 4 B (sm_80, bf16 x), [32, 64] fits
    block_c = 32 if _launch.interpreting() else block_c
    grid = (triton.cdiv(M, block_m) * triton.cdiv(groups.r_max, block_r), groups.n)
    _multi_lora_rank_down_kernel[grid](
        x, out, pointer_table(mats, x.device), mats[0], groups.ranks, groups.scalings, groups.order,
        groups.seg_start, groups.seg_len,
        C, groups.r_max,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        seed_v, threshold, drop_scale,
        TRANS=trans, PER_ADAPTER_SCALE=per_adapter_scale, HAS_DROPOUT=dropout_p > 0.0, PRECISION=precision,
        BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_R=block_r, num_warps=4,
    )
    return out


def rank_up_add_(out: torch.Tensor, t: torch.Tensor, mats, groups: Groups, *, trans: bool, per_adapter_scale: bool,
                exact: bool, seed: int = 0, dropout_p: float = 0.0) -> torch.Tensor:
    """out[t, :] += scale·keep ⊙ (T[t, :r_i]·U_i), in place, summed in fp32 and rounded once to out's dtype.
    U_i = mats[i] ([r_i, N]), or mats[i]ᵀ with `trans` (mats[i] [N, r_i]). Returns out."""
    _check_adapters(groups.n)
    M, N = out.shape
    if M == 0 or N == 0:
        return out
    seed_v, threshold, drop_scale = dropout_args(seed, dropout_p)
    block_m = _block_m(groups, M)
    # rows are gathered, so the tile's addresses are a full [BLOCK_M, BLOCK_N] int64 tensor (kernels/rank.py's
    # rank_up_add_ computes them from a contiguous range): [64, 128] spilled up to 420 B (sm_80, fp32 3xTF32;
    # scripts/aot_check.py), [64, 64] fits
    block_n = 32 if _launch.interpreting() else 64
    block_r = pow2_at_least_16(groups.r_max, 32)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n), groups.n)
    _multi_lora_rank_up_add_kernel[grid](
        out, t, pointer_table(mats, out.device), mats[0], groups.ranks, groups.scalings, groups.order,
        groups.seg_start, groups.seg_len,
        N,
        out.stride(0), out.stride(1), t.stride(0), t.stride(1),
        seed_v, threshold, drop_scale,
        TRANS=trans, PER_ADAPTER_SCALE=per_adapter_scale, HAS_DROPOUT=dropout_p > 0.0,
        PRECISION=dot_precision(exact),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=4,
    )
    return out


def rank_grad(t: torch.Tensor, v: torch.Tensor, outs, groups: Groups, *, trans: bool, per_adapter_scale: bool,
         exact: bool, seed: int = 0, dropout_p: float = 0.0, need=None) -> None:
    """outs[i] = scale · Σ_{rows of adapter i} T[t, :r_i]ᵀ · (keep ⊙ V)[t, :] for each adapter, written in place into
    the contiguous tensors `outs` (outs[i] [r_i, C], or its transpose [C, r_i] with `trans`), in their dtype.
    `need` (bools, one per adapter): only those are computed; the others' programs exit at once (their rank is 0
    in the table the kernel gets) and their `outs` entries (any tensor of the dtype) are not touched."""
    _check_adapters(groups.n)
    M, C = v.shape
    if C == 0:
        return
    seed_v, threshold, drop_scale = dropout_args(seed, dropout_p)
    precision = dot_precision(exact)
    block_m = 16 if _launch.interpreting() else 32
    block_r = pow2_at_least_16(groups.r_max, 64)
    # the [BLOCK_R, BLOCK_C] fp32 accumulator beside the V tile (and 3xTF32's hi/lo halves, the mask's Philox
    # state): kernels/rank.py's rank_grad rules
    if precision == "tf32x3" and (dropout_p > 0.0 or groups.r_max % 16):
        block_c = 32
    elif precision == "tf32x3" or dropout_p > 0.0 or block_r > 32:
        block_c = 64
    else:
        block_c = 128
    block_c = 32 if _launch.interpreting() else block_c
    ranks = groups.ranks
    if need is not None and not all(need):
        ranks = device_table([r if k else 0 for r, k in zip(groups.rank_list, need)], torch.int32, v.device)
    grid = (triton.cdiv(C, block_c) * triton.cdiv(groups.r_max, block_r), groups.n)
    _multi_lora_rank_grad_kernel[grid](
        t, v, pointer_table(outs, v.device), outs[0], ranks, groups.scalings, groups.order,
        groups.seg_start, groups.seg_len,
        C, groups.r_max,
        t.stride(0), t.stride(1), v.stride(0), v.stride(1),
        seed_v, threshold, drop_scale,
        TRANS=trans, PER_ADAPTER_SCALE=per_adapter_scale, HAS_DROPOUT=dropout_p > 0.0, PRECISION=precision,
        # 128 columns on 4 warps spilled 4 B under Triton 3.6's ptxas (12.8, sm_90, fp32); 8 warps hold 60 registers
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8 if block_c >= 128 else 4,
    )


# ---- fused forward: the base GEMM with each row's own rank-r term in its accumulator ----------------------------

@triton.jit
def _multi_lora_gemm_kernel(
    x_ptr, w_ptr, t_ptr, u_table, u_ref, bias_ptr, out_ptr, rank_ptr, scale_ptr, order_ptr, sorted_ids_ptr,
    M, N, L,
    stride_xm, stride_xl, stride_wl, stride_wn, stride_tm, stride_tr, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, MAIN_PRECISION: tl.constexpr, RANK_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, M_BUCKET: tl.constexpr,  # autotuning key only
):
    # y[rows] = x[rows]·Wᵀ + bias + s_i·S[rows, :r_i]·B_iᵀ over rows taken adapter by adapter (`order`), so a row
    # tile holds one adapter's rows, or the ends of a few neighbouring segments: the rank-r term loops over the
    # adapters from the tile's first row's to its last row's (sorted ids), each adapter's rows selected by mask.
    # Grouped program ordering (kernels/blocks.tile_position); the rank-r term is the accumulator's initial value,
    # as in kernels/lora.py (its registers are free again before the main loop's pipelined tiles are live).
    pid_m, _, offs, offs_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m_ok = offs < M
    rows = tl.load(order_ptr + offs % M)  # past the edge: a valid row, masked at the store
    ids = tl.load(sorted_ids_ptr + offs % M)
    first_id = tl.load(sorted_ids_ptr + pid_m * BLOCK_M)
    last_id = tl.load(sorted_ids_ptr + tl.minimum(pid_m * BLOCK_M + BLOCK_M, M) - 1)
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j in range(tl.maximum(first_id, 0), last_id + 1):  # −1 rows (sorted first) have no rank-r term
        rank = tl.load(rank_ptr + j)
        scale = tl.load(scale_ptr + j)
        u_ptr = _adapter_matrix(u_table, u_ref, j)
        mine = m_ok & (ids == j)
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_ok = offs_r < rank
            t = tl.load(t_ptr + rows.to(tl.int64)[:, None] * stride_tm + offs_r[None, :] * stride_tr,
                        mask=mine[:, None] & r_ok[None, :], other=0.0)
            # U = B_jᵀ of B_j [N, r_j]: element (r, n) at n·r_j + r
            u = tl.load(u_ptr + (offs_n % N).to(tl.int64)[None, :] * rank + offs_r[:, None],
                        mask=r_ok[:, None], other=0.0)
            acc = dot_prec(t * scale, u, acc, RANK_PRECISION)
    if HAS_BIAS:
        acc += bias_row(bias_ptr, offs_n, N)

    acc = k_loop(x_ptr, w_ptr, rows, offs_n % N, stride_xm, stride_xl, stride_wl, stride_wn, L, acc, MAIN_PRECISION,
                 BLOCK_K)

    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + offs_n.to(tl.int64)[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): kernels/lora.py's tiles with at most 64 fp32 accumulator elements per
# thread (that file's limit for an epilogue with loops and masked factor loads: beyond it sm_80 spilled), as the
# rank-r loop here always has masked, gathered loads. Measured with scripts/aot_check.py: 128x128x32 on 8 warps
# spilled 8 B (sm_80, bf16 x, fp32 adapters); for fp32 x (3xTF32 main loop) 64x128 spilled up to 148 B and 128x64
# 44 B (sm_80), 64x64 fits
_GEMM_TILES_16 = [(128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (128, 64, 32, 4, 4)]
_GEMM_TILES_FP32 = [(64, 64, 32, 4, 4), (64, 64, 32, 4, 3)]


def _gemm_configs():
    return blocks.gemm_configs(_GEMM_TILES_16 + _GEMM_TILES_FP32, interpreter_tile=(16, 32, 32, 4, 1))


def _prune_gemm_configs(configs, named_args, **kwargs):
    """The tile list of the input dtype (fp32 tiles fit fp32's pipeline in shared memory)."""
    if len(configs) == 1:
        return list(configs)
    arg, _, kept = blocks.by_operand_dtype(configs, named_args, kwargs, "x_ptr", _GEMM_TILES_FP32)
    # a 16-bit GEMM with a bias beside a 3xTF32 rank product (fp32 adapters): 128x128x64 on 8 warps sat at 255 registers
    # and spilled 4 B under Triton 3.6's ptxas (12.8, sm_80)
    if arg("HAS_BIAS") and arg("RANK_PRECISION") == "tf32x3":
        kept = [c for c in kept if tile(c) != (128, 128, 64, 8, 4)] or kept
    return kept


_multi_lora_gemm_tuned = registry.autotuned(
    _multi_lora_gemm_kernel, configs=_gemm_configs, prune=_prune_gemm_configs,
    key=["M_BUCKET", "N", "L", "HAS_BIAS", "MAIN_PRECISION", "RANK_PRECISION"],
)


def gemm(x: torch.Tensor, weight: torch.Tensor, s_down: torch.Tensor, lora_b, groups: Groups, bias, *,
         exact: bool) -> torch.Tensor:
    """y [M, N] = x·weightᵀ + bias + s_i·S[t, :r_i]·B_iᵀ for each row t of adapter i (none for −1 rows), one GEMM;
    lora_b: contiguous [N, r_i] tensors. Roofline: the base GEMM's (2·M·N·K FLOPs, x and W read once per tile row /
    column, y written once) plus S (M·r_max fp32) and each B_i once per row tile of its segment."""
    _check_adapters(groups.n)
    M, L = x.shape
    N = weight.shape[0]
    out = _launch.empty((M, N), x.device, x.dtype)
    if M == 0 or N == 0:
        return out
    sorted_ids = groups.sorted_ids
    wt = weight.t()  # a strided view, never a copy
    _multi_lora_gemm_tuned[gemm_grid(M, N)](
        x, wt, s_down, pointer_table(lora_b, x.device), lora_b[0],
        bias.contiguous() if bias is not None else out, out, groups.ranks, groups.scalings, groups.order, sorted_ids,
        M, N, L,
        x.stride(0), x.stride(1), wt.stride(0), wt.stride(1), s_down.stride(0), s_down.stride(1),
        out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, MAIN_PRECISION=dot_precision(x.dtype == torch.float32),
        RANK_PRECISION=dot_precision(exact), BLOCK_R=16, M_BUCKET=triton.next_power_of_2(M),
    )
    return out
