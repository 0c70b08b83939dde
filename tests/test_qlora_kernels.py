"""kernels/qlora.py: the fused LoRA GEMM over a 4-bit base, dequantized tile by tile.

What is tested (in Triton's CPU interpreter here; on a GPU machine the same tests run on CUDA tensors):
- deq(W) bit for bit: with an identity activation and no rank-r term the GEMM's output is deq(W) (forward: its
  transpose) exactly as peftkern/quant/fourbit.dequantize_rows defines it, rounded to the weight's dtype and then the
  activation's: fp32/fp16/bf16 weights, blocksize 64 and 128 with blocks straddling rows, odd element counts;
- forward and dx against the float64 oracle on that dequantized weight, within the project's error bound
  (tests/conftest.py: 2x the error PyTorch makes in the working dtypes, plus the dtype's floor): fp32 and fp16
  activations, fp32 and fp16 adapters, dropout on and off (core/dropout.py's mask), bias on and off, several tiles per
  dimension, odd shapes, NaN-poisoned outputs; the dropout mask lands on the output's coordinates;
- flat indices past 2**31 (the dequantized tile alone, through base pointers shifted back by the same amount);
- M == 0 and N == 0 launch nothing; the pruning of configs; a 1-D grid under 2**31 at lm_head / 200k-token sizes.
bf16 activations are a GPU test: the interpreter's bf16 tl.dot is wrong (triton-lang/triton#11584).
"""
import pytest
import torch
import triton
import triton.language as tl

from peftkern.core import dropout as ref_dropout
from peftkern.kernels import INTERPRET, interpreter_scope
from peftkern.quant.fourbit import dequantize_rows

from .conftest import DEVICE, ERROR_FLOOR, rel_err

with interpreter_scope():  # decorated (and, below, launched) as peftkern's own kernels are
    from peftkern.kernels import blocks, qlora as kq

    @triton.jit
    def _tile_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, in_features, shift,
                     ROWS: tl.constexpr, COLS: tl.constexpr, BLOCKSIZE: tl.constexpr, W_DTYPE: tl.constexpr):
        # rows of a weight whose flat indices start `shift` elements further on: the pointers are moved back by
        # the bytes and absmax blocks of `shift`, so the same elements are read through int64 indices past 2**31
        rows = tl.arange(0, ROWS)
        cols = tl.arange(0, COLS)
        mask = cols[None, :] < in_features
        w = kq._dequant_tile(packed_ptr - shift // 2, absmax_ptr - shift // BLOCKSIZE, code_ptr, code_ptr, code_ptr,
                             code_ptr, rows.to(tl.int64) * in_features + shift, cols, mask, BLOCKSIZE, W_DTYPE,
                             False, "python")
        tl.store(out_ptr + rows[:, None] * in_features + cols[None, :], w, mask=mask)

    @triton.jit
    def _round_kernel(x_ptr, out_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(out_ptr + offs, kq._round_to_bfloat16(tl.load(x_ptr + offs)))


# bitsandbytes' NF4 code table (its 16 sorted values)
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]

ACT_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
W_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _quantized(out_features, in_features, blocksize):
    """(packed, absmax, code): random codes, positive block scales ~ 1/sqrt(in) (outputs of order one)."""
    n = out_features * in_features
    packed = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8)
    absmax = (torch.rand(-(-n // blocksize)) + 0.5) / max(1, in_features) ** 0.5
    code = torch.tensor(NF4)
    return packed.to(DEVICE), absmax.to(DEVICE), code.to(DEVICE)


def _dense(q, out_features, in_features, blocksize, weight_dtype, act_dtype):
    """deq(W) as bitsandbytes' matmul_4bit makes it: the weight's dtype, then the activation's."""
    packed, absmax, code = q
    return dequantize_rows(packed, absmax, code, in_features, blocksize, 0, out_features, weight_dtype).to(act_dtype)


def _gemm(a, q, t, u, bias, **kw):
    with interpreter_scope():
        return kq.qlora_gemm(a, *q, t, u, bias, **kw)


# ---- the dequantization, bit for bit --------------------------------------------------------------------

@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("weight_dtype", W_DTYPES, ids=str)
@pytest.mark.parametrize("act_dtype", ACT_DTYPES, ids=str)
@pytest.mark.parametrize("transpose_w", [True, False], ids=["forward", "dx"])
def test_dequantization_is_bit_exact(transpose_w, act_dtype, weight_dtype, blocksize):
    if DEVICE.type == "cuda" and act_dtype == weight_dtype == torch.float32:
        pytest.skip("on tensor cores 3xTF32 drops the lo·lo term of an fp32 weight: close, not bit exact "
                    "(test_matches_float64_oracle bounds it)")
    out_f, in_f = 37, 45  # 1665 elements: the last byte holds one code; 64- and 128-blocks straddle rows
    q = _quantized(out_f, in_f, blocksize)
    rows = in_f if transpose_w else out_f
    eye = torch.eye(rows, dtype=act_dtype, device=DEVICE)
    t, u = torch.randn(rows, 2, device=DEVICE), torch.randn(2, out_f if transpose_w else in_f, device=DEVICE)
    got = _gemm(eye, q, t, u, None, out_features=out_f, in_features=in_f, blocksize=blocksize,
                weight_dtype=weight_dtype, transpose_w=transpose_w, lora_scale=0.0)
    want = _dense(q, out_f, in_f, blocksize, weight_dtype, act_dtype)
    assert torch.equal(got, want.t() if transpose_w else want)


@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("weight_dtype", W_DTYPES, ids=str)
def test_flat_indices_past_2_31(weight_dtype, blocksize):
    out_f, in_f, shift = 16, 45, 2**33 + 2**31  # shift: a multiple of 2 and of the block size
    q = _quantized(out_f, in_f, blocksize)
    got = torch.empty(out_f, in_f, dtype=weight_dtype, device=DEVICE)
    with interpreter_scope():
        _tile_kernel[(1,)](*q, got, in_f, shift, ROWS=out_f, COLS=64, BLOCKSIZE=blocksize,
                           W_DTYPE=kq._w_dtype(weight_dtype))
    assert torch.equal(got, _dense(q, out_f, in_f, blocksize, weight_dtype, weight_dtype))


def test_bfloat16_rounding_by_hand_is_torchs():
    """The interpreter's spelling of fp32 -> bf16 (kernels/qlora._round_to_bfloat16): nearest, ties to even."""
    n = 4096
    x = torch.randn(n) * torch.exp2(torch.randint(-100, 100, (n,)).float())
    bits = torch.tensor([0x3F808000, 0x3F818000, 0xBF808000, 0x3F7FFFFF, 0x3F7F8000, 0x7F7FFFFF, 0x7F7F7FFF,
                         0x00008000, 0x00018000, 0x80000000, 0x00000000, 0x007FFFFF], dtype=torch.int64)
    x[:len(bits)] = bits.to(torch.int32).view(torch.float32)  # ties (even and odd), carries, bf16's max, subnormals
    x = x.to(DEVICE)
    out = torch.empty_like(x)
    with interpreter_scope():
        _round_kernel[(1,)](x, out, N=n)
    assert torch.equal(out.view(torch.int32), x.to(torch.bfloat16).float().view(torch.int32))


# ---- numerics against float64 -----------------------------------------------------------------------------

def _oracle(a, w, t, u, bias, scale, seed, p):
    """float64: a·w + bias + scale·(t·u) ⊙ keep/(1-p); w is deq(W)ᵀ (forward) or deq(W) (dx)."""
    low = t.double() @ u.double()
    if p > 0:
        low = low * ref_dropout.multiplier(a.shape[0], w.shape[1], seed, p, dtype=torch.float64, device=a.device)
    y = a.double() @ w.double() + scale * low
    return y + bias.double() if bias is not None else y


def _eager(a, w, t, u, bias, scale, seed, p, out_dtype):
    """What PyTorch computes in the working dtypes: the base GEMM in a's dtype, the rank-r term in fp32."""
    low = t.float() @ u.float()
    if p > 0:
        low = low * ref_dropout.multiplier(a.shape[0], w.shape[1], seed, p, dtype=torch.float32, device=a.device)
    y = (a @ w).float() + scale * low
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


# (M, in, out, R): several 32x32 interpreter tiles in each dimension of both directions and a partial GROUP_M
# group; odd sizes with an odd element count and absmax blocks straddling rows; a small one with rank 1
SHAPES = [(70, 96, 104, 5), (33, 45, 37, 3), (17, 40, 24, 1)]
# (activation, adapters, weight, dropout p, bias, blocksize): every dtype, dropout and bias on and off, both
# block sizes (dx has no bias)
VARIANTS = [
    (torch.float32, torch.float32, torch.bfloat16, 0.0, True, 64),
    (torch.float32, torch.float32, torch.float32, 0.25, False, 128),
    (torch.float16, torch.float32, torch.float32, 0.25, False, 128),
    (torch.float16, torch.float16, torch.float16, 0.25, True, 64),
    (torch.float16, torch.float32, torch.bfloat16, 0.0, False, 64),
]


def _variant_id(v):
    short = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
    return f"x{short[v[0]]}-ad{short[v[1]]}-w{short[v[2]]}-p{v[3]}-{'bias' if v[4] else 'nobias'}-bs{v[5]}"


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
@pytest.mark.parametrize("transpose_w", [True, False], ids=["forward", "dx"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}in{}out{}r{}".format(*s))
def test_matches_float64_oracle(shape, transpose_w, variant, poisoned):
    M, in_f, out_f, R = shape
    act_dtype, adapter_dtype, weight_dtype, p, has_bias, blocksize = variant
    q = _quantized(out_f, in_f, blocksize)
    dense = _dense(q, out_f, in_f, blocksize, weight_dtype, act_dtype)  # [out, in]
    if transpose_w:  # y = x·deq(W)ᵀ + bias + s·(S·Bᵀ) ⊙ keep: u = Bᵀ, a transposed view as the op passes it
        a = torch.randn(M, in_f, device=DEVICE).to(act_dtype)
        w, u = dense.t(), torch.randn(out_f, R, device=DEVICE).to(adapter_dtype).t()
        bias = torch.randn(out_f, device=DEVICE).to(act_dtype) if has_bias else None
    else:  # dx = dy·deq(W) + (dS·A) ⊙ keep/(1-p)
        a = torch.randn(M, out_f, device=DEVICE).to(act_dtype)
        w, u = dense, torch.randn(R, in_f, device=DEVICE).to(adapter_dtype)
        bias = None
    t = torch.randn(M, R, device=DEVICE)
    scale, seed = 0.75, 4321
    got = _gemm(a, q, t, u, bias, out_features=out_f, in_features=in_f, blocksize=blocksize,
                weight_dtype=weight_dtype, transpose_w=transpose_w, lora_scale=scale, seed=seed, dropout_p=p)
    assert got.dtype == act_dtype and got.shape == (M, w.shape[1])
    oracle = _oracle(a, w, t, u, bias, scale, seed, p)
    torch_err = rel_err(_eager(a, w, t, u, bias, scale, seed, p, act_dtype), oracle)
    assert rel_err(got, oracle) <= 2 * torch_err + ERROR_FLOOR[act_dtype]


@pytest.mark.parametrize("transpose_w", [True, False], ids=["forward", "dx"])
def test_dropout_mask_is_on_the_outputs_coordinates(transpose_w):
    """Where the mask drops, only a·w remains; where it keeps, the rank-r term is scaled by 1/(1-p)."""
    M, in_f, out_f, R, p, seed, bs = 40, 48, 40, 3, 0.5, 99, 64
    q = _quantized(out_f, in_f, bs)
    dense = _dense(q, out_f, in_f, bs, torch.float32, torch.float32)
    w = dense.t() if transpose_w else dense
    a = torch.randn(M, w.shape[0], device=DEVICE)
    t = torch.randn(M, R, device=DEVICE) * 50  # the rank-r term dominates: kept and dropped entries separate
    u = torch.randn(R, w.shape[1], device=DEVICE)
    y = _gemm(a, q, t, u, None, out_features=out_f, in_features=in_f, blocksize=bs, weight_dtype=torch.float32,
              transpose_w=transpose_w, seed=seed, dropout_p=p).double()
    base = a.double() @ w.double()
    keep = ref_dropout.keep_mask(M, w.shape[1], seed, p, device=DEVICE)
    assert 0 < keep.sum() < keep.numel()
    low = (t.double() @ u.double()) / (1 - p)
    torch.testing.assert_close(y[~keep], base[~keep], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y[keep], (base + low)[keep], rtol=1e-5, atol=1e-3)


# ---- empty inputs, configs, grid ----------------------------------------------------------------------------

@pytest.mark.parametrize("M,out_f,in_f,transpose_w", [(0, 24, 40, True), (0, 24, 40, False), (5, 0, 40, True),
                                                       (5, 24, 0, False)])
def test_empty_output_launches_nothing(monkeypatch, M, out_f, in_f, transpose_w):
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("launched a kernel for an empty output")

    monkeypatch.setattr(kq, "_qlora_gemm_tuned", NoLaunch())
    q = _quantized(out_f, in_f, 64)
    rows, cols = (in_f, out_f) if transpose_w else (out_f, in_f)
    a = torch.randn(M, rows, dtype=torch.float16, device=DEVICE)
    out = kq.qlora_gemm(a, *q, torch.randn(M, 4, device=DEVICE), torch.randn(4, cols, device=DEVICE), None,
                        out_features=out_f, in_features=in_f, blocksize=64, weight_dtype=torch.float16,
                        transpose_w=transpose_w)
    assert out.shape == (M, cols) and out.dtype == torch.float16


def _gpu_configs():
    """The GPU autotuner's configs (kq.gemm_configs() gives the interpreter's one where it is on)."""
    return [blocks.config(t) for t in dict.fromkeys(kq._TILES_16 + kq._TILES_FP32)]


class _A:
    def __init__(self, dtype):
        self.dtype = dtype


@pytest.mark.parametrize("w_dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("a_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("heavy", ["none", "dropout", "bias", "rank_tf32x3", "main_tf32x3"])
def test_pruning_keeps_the_configs_that_compiled_without_spills(a_dtype, w_dtype, heavy):
    """kernels/qlora.py's budget comment: what ptxas spilled with in each setting is left out, nothing else."""
    configs = _gpu_configs()
    flags = dict(HAS_DROPOUT=heavy == "dropout", HAS_BIAS=heavy == "bias", W_DTYPE=w_dtype,
                 RANK_PRECISION="tf32x3" if heavy == "rank_tf32x3" else "tf32",
                 MAIN_PRECISION="tf32x3" if heavy == "main_tf32x3" else "tf32")
    kept = {blocks.tile(c) for c in kq.prune_configs(configs, {"a_ptr": _A(a_dtype)}, **flags)}
    tiles = set(kq._TILES_FP32 if a_dtype == torch.float32 else kq._TILES_16)
    if heavy == "none":
        assert kept == tiles
    elif heavy == "main_tf32x3" and w_dtype == "float32":  # the weight's hi/lo tiles too
        assert kept == tiles - {(128, 128, 32, 8, 3), (64, 128, 32, 8, 3), (128, 128, 32, 8, 4), (128, 128, 64, 8, 3)}
    else:
        assert kept == tiles - {(128, 128, 64, 8, 3)}
    # flags passed by name (positional arguments, as the autotuner passes them) prune the same
    assert kq.prune_configs(configs, {"a_ptr": _A(a_dtype), **flags}) == kq.prune_configs(
        configs, {"a_ptr": _A(a_dtype)}, **flags)
    # the interpreter's single config passes through
    one = configs[:1]
    assert kq.prune_configs(one, {"a_ptr": _A(a_dtype)}, **flags) == one


@pytest.mark.parametrize("a_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_pruning_double_quant_dx_with_a_heavy_epilogue(a_dtype):
    """The on-chip absmax resolution in dx beside dropout spilled at 64 accumulator fp32 per thread: only tiles
    with at most 32 stay; forward, or dx without the heavy epilogue, keeps the usual set."""
    configs = _gpu_configs()
    base = dict(HAS_BIAS=False, W_DTYPE="bfloat16", RANK_PRECISION="tf32", MAIN_PRECISION="tf32", DOUBLE_QUANT=True)
    dx_heavy = kq.prune_configs(configs, {"a_ptr": _A(a_dtype)}, HAS_DROPOUT=True, TRANSPOSE_W=False, **base)
    assert dx_heavy and all(blocks.acc_per_thread(c) <= 32 for c in dx_heavy)
    fwd_heavy = kq.prune_configs(configs, {"a_ptr": _A(a_dtype)}, HAS_DROPOUT=True, TRANSPOSE_W=True, **base)
    assert any(blocks.acc_per_thread(c) == 64 for c in fwd_heavy)
    dx_plain = kq.prune_configs(configs, {"a_ptr": _A(a_dtype)}, HAS_DROPOUT=False, TRANSPOSE_W=False, **base)
    assert any(blocks.acc_per_thread(c) == 64 for c in dx_plain)


@pytest.mark.skipif(not INTERPRET, reason="the interpreter's config list; a GPU machine autotunes over _TILES_*")
def test_interpreter_runs_one_small_config():
    (config,) = kq.gemm_configs()
    assert (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]) == (32, 32, 32)


@pytest.mark.parametrize("M,in_f,out_f", [(200_000, 4096, 128_256), (200_000, 128_256, 4096), (1, 64, 8)])
@pytest.mark.parametrize("transpose_w", [True, False], ids=["forward", "dx"])
def test_grid_is_1d_and_under_2_31(monkeypatch, M, in_f, out_f, transpose_w):
    """lm_head-sized layers and 200k-token batches: the grid of every GPU config, recorded, never executed."""
    grids = []

    class Recorder:
        def __getitem__(self, grid_fn):
            def run(*args, **kwargs):
                for c in _gpu_configs():
                    grids.append((c.kwargs, grid_fn(dict(kwargs, **c.kwargs))))
                assert kwargs["TRANSPOSE_W"] == transpose_w and kwargs["M_BUCKET"] == triton.next_power_of_2(M)
            return run

    monkeypatch.setattr(kq, "_qlora_gemm_tuned", Recorder())
    n = out_f * in_f
    meta = dict(device="meta")
    cols = out_f if transpose_w else in_f
    a = torch.empty(M, in_f if transpose_w else out_f, dtype=torch.bfloat16, **meta)
    out = kq.qlora_gemm(a, torch.empty((n + 1) // 2, dtype=torch.uint8, **meta),
                        torch.empty(-(-n // 64), **meta), torch.empty(16, **meta), torch.empty(M, 16, **meta),
                        torch.empty(16, cols, **meta), None, out_features=out_f, in_features=in_f, blocksize=64,
                        weight_dtype=torch.bfloat16, transpose_w=transpose_w, dropout_p=0.1)
    assert out.shape == (M, cols)
    assert grids
    for kw, g in grids:
        assert len(g) == 1 and g[0] == -(-M // kw["BLOCK_M"]) * -(-cols // kw["BLOCK_N"]) and g[0] < 2**31
