"""Hopper variant of the fused LoRA GEMM: a persistent kernel whose main loop reads A and B through TMA.

    out[M, N] = A[M, L]·B[L, N] (+bias) + c·(T[M, R]·U[R, N]) ⊙ keep

What: the same computation, contract and numerics as kernels/lora.py's `lora_gemm` (its docstring says how
forward y and backward dx map onto it): the main GEMM on the tensor cores in the 16-bit input dtype with
an fp32 accumulator; the rank-r term from T and U in fp32 with `_launch.dot_precision(u.dtype ==
torch.float32)`, scaled, masked by kernels/dropout.py `keep_tile` at the same (row, column) coordinates,
and used as that accumulator's initial value (one fp32 tile live, no second one to spill); the bias; one
rounding to the output dtype. Only the mainloop and the tile schedule differ, so results agree with
`lora_gemm` up to the fp32 summation order.

Why: the classic kernel is tutorial 03's GEMM (pointer loads, one program per tile),
which cuBLAS typically beats by 10-25% at 8192x4096x4096 on an H100. On sm_90 this variant
  - loads A and B tiles with TMA (host-built tensor descriptors: one instruction per tile, no address
    arithmetic or masks in the mainloop, out-of-range rows/columns zero-filled by the hardware), which lets
    Triton's Hopper pipeliner use asynchronous copies and wgmma;
  - is persistent: min(#SMs, #tiles) programs each walk tiles tile, tile + #SMs, ... in the grouped order
    (GROUP_M row-blocks share B column-blocks in L2), so one program's epilogue overlaps the next tile's
    loads and there is no tail wave of short-lived programs.
Roofline at the headline shape (M=8192, L=N=4096, r=16, bf16): 2·M·N·L = 275 GFLOP (~0.34 ms at ~800
TFLOP/s) against 64 MB of A+B+out traffic at best (~0.02 ms at 3 TB/s): compute-bound, so the mainloop's
tensor-core efficiency is what matters; the epilogue reads T (M·r) and U (r·N) once per tile-row/column.

How it is chosen: not here. kernels/lora.py's `lora_gemm` keeps the classic kernel; where `unsupported()`
returns None (CUDA, sm_90+, a Triton with tensor descriptors, 16-bit A and B laid out for TMA) the lead's
measured dispatch may time this kernel against it and keep the faster one per shape bucket.

What is verified without a GPU: the kernel compiles for sm_90 (Triton's compiler and ptxas, ahead of
time, registers and spills per autotune config) on Triton 3.9 and 3.6, and its numerics run in Triton's
CPU interpreter on small fp16 tiles (tests/test_lora_persistent.py). Nothing here has run on a GPU.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _launch, blocks, registry
from ._launch import dot_precision, dropout_args, pow2_at_least_16
from .blocks import acc_per_thread, bias_row, store_tile, tile_position
from .dropout import keep_tile

try:  # host-side tensor descriptors (Triton >= 3.4): no device-side allocator, no process-global state
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # older Triton: unsupported() says so and nothing below is launched
    TensorDescriptor = None

HAS_TENSOR_DESCRIPTORS = TensorDescriptor is not None and hasattr(tl, "make_tensor_descriptor")
MIN_CAPABILITY = (9, 0)  # TMA and wgmma: Hopper and later
_AB_DTYPES = (torch.float16, torch.bfloat16)  # wgmma from shared memory at 2 bytes/element; fp32 A/B stay classic
_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TMA_ALIGN = 16  # bytes: TMA needs a 16-byte aligned base and 16-byte multiples for every non-last stride


@triton.jit
def _lora_gemm_persistent_kernel(
    a_desc, b_desc, t_ptr, u_ptr, bias_ptr, out_ptr,
    M, N, L, R,
    stride_tm, stride_tr, stride_ur, stride_un, stride_om, stride_on,
    seed, threshold, low_scale,
    NUM_SMS: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, B_TRANSPOSED: tl.constexpr,
    RANK_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    M_BUCKET: tl.constexpr, AB_DTYPE: tl.constexpr,  # autotuning key only
):
    # a_desc: A [M, L] row-major, blocks [BLOCK_M, BLOCK_K]. b_desc: B [L, N] row-major with blocks
    # [BLOCK_K, BLOCK_N], or, B_TRANSPOSED, the row-major [N, L] tensor B is a transposed view of (forward's
    # W for B = Wᵀ) with blocks [BLOCK_N, BLOCK_K], transposed on chip as wgmma reads it from shared memory
    start = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(L, BLOCK_K)
    num_tiles = num_m * num_n
    # flatten: the pipeliner overlaps the next tile's first TMA loads with this tile's epilogue
    for tile in tl.range(start, num_tiles, NUM_SMS, flatten=True):
        pid_m, pid_n = tile_position(tile, num_m, num_n, GROUP_M)  # grouped order (kernels/blocks.py)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        # The rank-r term comes first and is the accumulator the mainloop adds to: one [BLOCK_M, BLOCK_N] fp32
        # tile is live at a time. (As an epilogue after the mainloop, the masked term needed a second fp32
        # tile, and fp32 adapters' tf32x3 operand splits sat beside a full accumulator: both spilled on
        # sm_90 at every tile above 64 accumulator elements per thread.) The sum is formed in fp32 and
        # rounded once.
        # rows/cols past the edge re-read a valid one (% M, % N) so the loads need only the R mask;
        # row offsets are int64 so that tensors over 2**31 elements address correctly
        t_rows = t_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_tm
        u_cols = u_ptr + (offs_n % N).to(tl.int64)[None, :] * stride_un
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            t = tl.load(t_rows + offs_r[None, :] * stride_tr, mask=offs_r[None, :] < R, other=0.0).to(tl.float32)
            u = tl.load(u_cols + offs_r[:, None] * stride_ur, mask=offs_r[:, None] < R, other=0.0).to(tl.float32)
            if HAS_DROPOUT:
                acc = tl.dot(t, u, acc, input_precision=RANK_PRECISION)
            else:  # T scaled before the product (as lora_gemm's no-dropout path): a [BLOCK_M, BLOCK_R] multiply
                # rather than [BLOCK_M, BLOCK_N], and 128x64 on 4 warps with fp32 adapters stays spill-free
                acc = tl.dot(t * low_scale, u, acc, input_precision=RANK_PRECISION)
        if HAS_DROPOUT:  # the mask applies to the rank-r term only: before the main product joins it
            acc = tl.where(keep_tile(seed, offs_m, off_n, N, threshold, BLOCK_N), acc * low_scale, 0.0)

        for ki in range(k_tiles):
            off_k = ki * BLOCK_K
            a = a_desc.load([off_m, off_k])  # past M or L: zeros (TMA's out-of-bounds fill)
            if B_TRANSPOSED:
                b = b_desc.load([off_n, off_k]).T
            else:
                b = b_desc.load([off_k, off_n])
            acc = tl.dot(a, b, acc)

        if HAS_BIAS:
            acc += bias_row(bias_ptr, offs_n, N)
        # a plain masked store, not TMA: `out` may be fp32 or have a row stride TMA cannot take, and the
        # store is one write of out against L/BLOCK_K tile loads in the mainloop
        store_tile(out_ptr, acc, offs_m, offs_n, M, N, stride_om, stride_on)


# ----------------------------------------------------------------------------------------------
# configs: tile shapes, the descriptors' block shapes, pruning
# ----------------------------------------------------------------------------------------------

def set_block_shapes(nargs: dict) -> None:
    """Autotune pre_hook: give the host descriptors the block shapes of the config about to run (the block
    shape is part of a descriptor's type, so each config needs its own)."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bm, bk]
    nargs["b_desc"].block_shape = [bn, bk] if nargs["B_TRANSPOSED"] else [bk, bn]


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): tutorial 09's Hopper favourites (BLOCK_M 128, BLOCK_N 128/256,
# BLOCK_K 64/128, 3-4 stages, 4/8 warps), trimmed to those whose mainloop fits in shared memory on sm_90
# (227 KB); prune_configs drops those that spill for a call's epilogue (the register budget below)
_TILES = [
    (128, 256, 64, 8, 3),
    (128, 256, 64, 8, 4),
    (128, 128, 64, 8, 4),
    (128, 128, 128, 8, 3),
    (128, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
]
# Register budget, measured with ptxas -v for sm_90 (Triton 3.9 and 3.6, scripts/aot_check.py): every config is
# spill-free with 16-bit adapters and no dropout. The dropout mask (Philox state beside the accumulator) and
# fp32 adapters (tf32x3: hi/lo splits of the T and U tiles beside the accumulator) each spill once the
# accumulator exceeds 64 fp32 per thread (128x256 on 8 warps: 84-2200 B; 128x128 on 4 warps: 200-1550 B);
# with both, 128x64 on 4 warps also spills (116 B), its larger per-thread share of the T and U tiles.
_MAX_ACC_PER_THREAD_HEAVY_EPILOGUE = 64
_MIN_WARPS_DROPOUT_AND_EXACT = 8


def gpu_configs():
    """The autotuner's configs on a GPU."""
    with _launch.launch_config(interpret=False):
        return _configs()


def _configs():
    # the interpreter runs each program in numpy: one small tile, several tiles per program
    return blocks.gemm_configs(_TILES, interpreter_group_m=2, pre_hook=set_block_shapes)


def prune_configs(configs, named_args, **kwargs):
    """early_config_prune: drop the configs that spill registers for this call's epilogue (see the budget
    above); never all of them (the one with the fewest accumulator registers per thread stays)."""
    def arg(name, default):
        return kwargs.get(name, named_args.get(name, default))

    dropout = bool(arg("HAS_DROPOUT", False))
    exact = arg("RANK_PRECISION", "tf32") == "tf32x3"
    if not (dropout or exact):
        return list(configs)
    kept = [c for c in configs if acc_per_thread(c) <= _MAX_ACC_PER_THREAD_HEAVY_EPILOGUE
            and (not (dropout and exact) or c.num_warps >= _MIN_WARPS_DROPOUT_AND_EXACT)]
    return kept or [min(configs, key=acc_per_thread)]


# tuned per (power-of-two bucket of M, N, L, R, dropout, B's orientation, rank precision, A/B dtype, SM count):
# the descriptors carry no dtype the autotuner could add to its key by itself, hence AB_DTYPE; the rank
# precision (tf32 or tf32x3, which follows torch.backends.cuda.matmul.allow_tf32) changes which configs
# prune_configs keeps, so a choice made under one must not be reused under the other
_lora_gemm_persistent_tuned = registry.autotuned(
    _lora_gemm_persistent_kernel, configs=_configs, prune=prune_configs, min_capability=MIN_CAPABILITY,
    key=["M_BUCKET", "N", "L", "R", "HAS_DROPOUT", "B_TRANSPOSED", "RANK_PRECISION", "AB_DTYPE", "NUM_SMS"],
)


# ----------------------------------------------------------------------------------------------
# eligibility and launch
# ----------------------------------------------------------------------------------------------

def _tma_view(x: torch.Tensor, name: str, allow_transposed: bool):
    """(tensor, shape, strides, transposed) for a TMA descriptor over 2-D `x`, or a reason string.

    Row-major (unit last stride): the descriptor covers x itself. A transposed view of a row-major tensor
    (unit first stride), when allowed: the descriptor covers x.T, as tutorial 09 reads B. A size-1 dimension's
    stride never addresses anything, so it is replaced by one TMA accepts."""
    rows, cols = x.shape
    if x.stride(1) == 1 or cols == 1:
        view, transposed = x, False
    elif allow_transposed and (x.stride(0) == 1 or rows == 1):
        view, transposed = x.t(), True
    else:
        return f"{name} has strides {tuple(x.stride())}: TMA needs a unit stride in its inner dimension"
    outer, inner = view.shape
    item = x.element_size()
    step = _TMA_ALIGN // item
    stride0 = view.stride(0) if outer > 1 else -(-inner // step) * step
    if x.data_ptr() % _TMA_ALIGN:
        return f"{name}'s data pointer is not {_TMA_ALIGN}-byte aligned (TMA)"
    if (stride0 * item) % _TMA_ALIGN:
        return f"{name}'s row stride ({stride0} elements) is not a multiple of {_TMA_ALIGN} bytes (TMA)"
    return view, [outer, inner], [stride0, 1], transposed


def _layout_unsupported(a, b, t, u, bias, out_dtype) -> Optional[str]:
    """The reasons that do not depend on the device: dtypes, shapes, TMA layout. `t` may be None: the
    dispatcher asks before it computes T (a fresh [M, R] tensor, never a reason to decline)."""
    if not HAS_TENSOR_DESCRIPTORS:
        return f"triton {triton.__version__} has no host tensor descriptors (triton.tools.tensor_descriptor)"
    if a.dim() != 2 or b.dim() != 2 or u.dim() != 2 or (t is not None and t.dim() != 2):
        return "a, b, t and u must be 2-D"
    if a.dtype not in _AB_DTYPES or b.dtype != a.dtype:
        return f"a and b must share a 16-bit dtype (fp16/bf16), got {a.dtype} and {b.dtype}"
    if (out_dtype or a.dtype) not in _OUT_DTYPES:
        return f"out_dtype {out_dtype} is not fp16, bf16 or fp32"
    M, L = a.shape
    N = b.shape[1]
    if b.shape[0] != L or u.shape[1] != N or (t is not None and tuple(t.shape) != (M, u.shape[0])):
        t_shape = tuple(t.shape) if t is not None else None
        return f"shapes do not chain: a {tuple(a.shape)}, b {tuple(b.shape)}, t {t_shape}, u {tuple(u.shape)}"
    if bias is not None and tuple(bias.shape) != (N,):
        return f"bias must have shape ({N},), got {tuple(bias.shape)}"
    if M == 0 or N == 0:
        return None  # nothing to compute: lora_gemm_persistent returns the empty output without a launch
    if L == 0:
        return "a has no columns (L == 0): a TMA descriptor needs nonempty dimensions"
    for x, name, allow_t in ((a, "a", False), (b, "b", True)):
        view = _tma_view(x, name, allow_t)
        if isinstance(view, str):
            return view
    return None


def unsupported(a, b, t, u, bias, out_dtype) -> Optional[str]:
    """None when the persistent kernel can run this call on this machine's GPU, else a short reason.

    Never touches CUDA for CPU tensors (the device check comes before any CUDA query)."""
    devices = {x.device for x in (a, b, t, u, bias) if x is not None}
    if any(d.type != "cuda" for d in devices):
        return "not CUDA tensors"
    if len(devices) != 1:
        return "tensors on more than one device"
    reason = _layout_unsupported(a, b, t, u, bias, out_dtype)
    if reason is not None:
        return reason
    cap = _launch.capability(a.device)
    if cap < MIN_CAPABILITY:
        return f"compute capability {cap[0]}.{cap[1]} < {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (no TMA)"
    return None


def grid(num_tiles: int, num_sms: int) -> tuple:
    """One program per SM at most; each walks tiles start, start + NUM_SMS, ... (x < 2**31 for any shape)."""
    return (max(1, min(num_sms, num_tiles)),)


def launch(a, b, t, u, bias, out, *, lora_scale: float, seed: int, dropout_p: float, num_sms: int) -> None:
    """Build the descriptors and launch on `out` [M, N]; layouts must have passed _layout_unsupported and
    M, N, L must be positive. Separate from lora_gemm_persistent so that the ahead-of-time check's recording
    (peftkern/lora/examples.py, run_aot_call) can launch it on CPU tensors with an explicit SM count."""
    M, L = a.shape
    N = b.shape[1]
    R = t.shape[1]
    a_base, a_shape, a_strides, _ = _tma_view(a, "a", False)
    b_base, b_shape, b_strides, b_transposed = _tma_view(b, "b", True)
    # block shapes are placeholders until the autotuner's pre_hook (set_block_shapes) sets each config's
    a_desc = TensorDescriptor(a_base, a_shape, a_strides, [16, 16])
    b_desc = TensorDescriptor(b_base, b_shape, b_strides, [16, 16])
    seed_v, threshold, drop_scale = dropout_args(seed, dropout_p)

    def grid_of(meta):
        return grid(triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), num_sms)

    _lora_gemm_persistent_tuned[grid_of](
        a_desc, b_desc, t, u, bias.contiguous() if bias is not None else out, out,  # bias: unit stride
        M, N, L, R,
        t.stride(0), t.stride(1), u.stride(0), u.stride(1), out.stride(0), out.stride(1),
        seed_v, threshold, lora_scale * drop_scale,
        NUM_SMS=num_sms,
        HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0.0, B_TRANSPOSED=b_transposed,
        RANK_PRECISION=dot_precision(u.dtype == torch.float32),
        BLOCK_R=pow2_at_least_16(R, 32), M_BUCKET=triton.next_power_of_2(M), AB_DTYPE=str(a.dtype),
    )


# how many programs the interpreter runs: fewer than the tiles of a test shape, so each walks several
_INTERPRETER_SMS = 3


def lora_gemm_persistent(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, u: torch.Tensor, bias, *,
                         lora_scale: float = 1.0, seed: int = 0, dropout_p: float = 0.0,
                         out_dtype=None) -> torch.Tensor:
    """out[M, N] = a·b (+bias) + lora_scale·(t·u) ⊙ keep/(1-p) at (m, n); a [M, L], b [L, N], t [M, R],
    u [R, N]: kernels/lora.py's lora_gemm, with the persistent TMA kernel. Raises ValueError with the
    reason when unsupported() (or, on CPU tensors under the interpreter, the layout checks) refuse it."""
    on_cpu_interpreted = _launch.interpreting() and all(x.device.type == "cpu" for x in (a, b, t, u))
    reason = _layout_unsupported(a, b, t, u, bias, out_dtype) if on_cpu_interpreted else \
        unsupported(a, b, t, u, bias, out_dtype)
    if reason is not None:
        raise ValueError(f"lora_gemm_persistent: {reason}")
    M, N = a.shape[0], b.shape[1]
    out = _launch.empty((M, N), a.device, out_dtype or a.dtype)
    if M == 0 or N == 0:
        return out
    if on_cpu_interpreted:
        num_sms = _INTERPRETER_SMS
    else:
        num_sms = _launch.num_sms(a.device)
    # under the interpreter, kernels/__init__.py's _scope_launches runs the launch inside interpreter_scope()
    launch(a, b, t, u, bias, out, lora_scale=lora_scale, seed=seed, dropout_p=dropout_p, num_sms=num_sms)
    return out
