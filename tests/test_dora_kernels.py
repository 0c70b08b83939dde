"""kernels/dora.py and the Triton backend's two dense dora_linear variants (peftkern/dora/triton.py).

What is tested (in Triton's CPU interpreter here; on a GPU machine the same tests run on CUDA tensors), against
float64 oracles of the math written here, within the project's bound (2x the error PyTorch makes in the working
dtypes, plus the dtype's floor), with every kernel output NaN-poisoned before the kernels write it:
- dora_weight_norm: fp32 and fp16 weights with fp32 and fp16 adapters, ranks 1, 3 and 20 (two 16-wide slices),
  strided views, split-K partials; a weight that cancels s·B·A to a few ulps (PEFT's dense formula, no expansion);
- dora_grad_scale: gc = g ⊙ c and gm = g ⊙ (c − 1) bit for bit (one fp32 product, rounded once); Σ g ⊙ z against
  the oracle and bit-identical across runs with several split-M partials;
- dora_keep_x: keep ⊙ x exactly, core/dropout.py's mask, strided x;
- dora_forward_gemm (one accumulator, or two with the masked copy), dora_dx_gemm, and the composite's epilogues:
  fp32 and fp16 activations, fp32 and fp16 adapters, dropout on and off, bias on and off, z written or not, odd
  shapes with several interpreter tiles per dimension;
- (the registered variants as a whole, and the public op through each: tests/test_dora_variants.py);
- empty inputs launch nothing; config pruning keeps what compiled without spills (scripts/aot_check.py);
  CUDA's grid limits at lm_head sizes with 1 and 200k tokens (grids recorded, nothing run).
bf16 activations are a GPU test: the interpreter's bf16 tl.dot is wrong (triton-lang/triton#11584).
"""
import pytest
import torch

from peftkern.core import dropout as ref_dropout
from peftkern.kernels import INTERPRET, interpreter_scope

from .conftest import DEVICE, ERROR_FLOOR, rel_err

with interpreter_scope():  # decorated as peftkern's own kernels are (and launched in the scope, below)
    from peftkern.dora import triton as dora_triton  # noqa: F401  (registers dora_linear's Triton variants)
    from peftkern.kernels import _launch, blocks, dora as kd

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
ACT_DTYPES = [F32, F16] + ([BF16] if DEVICE.type == "cuda" else [])
# (activations, adapters): fp32 throughout, PEFT's default (half x, fp32 adapters), half throughout
DTYPE_PAIRS = [(F32, F32), (F16, F32), (F16, F16)] + ([(BF16, F32), (BF16, BF16)] if DEVICE.type == "cuda" else [])
SHORT = {F32: "f32", F16: "f16", BF16: "bf16"}
# (M, K, N, r): several 32-wide interpreter tiles in every dimension of both directions, odd sizes, rank 1, and a
# rank over 16 (the GEMMs' rank-r loop takes 16-wide slices)
SHAPES = [(33, 40, 50, 3), (17, 45, 24, 1), (70, 96, 72, 20)]
SCALE, SEED, P = 0.75, 4321, 0.25


def _pair_id(pair):
    return f"x{SHORT[pair[0]]}-ad{SHORT[pair[1]]}"


def _shape_id(s):
    return "M{}K{}N{}r{}".format(*s)


def _launch_in_scope(fn, *args, **kwargs):
    with interpreter_scope():
        return fn(*args, **kwargs)


def _randn(*shape, dtype=F32, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a column-major layout (a transposed view of a contiguous tensor)."""
    return t.t().contiguous().t()


def _multiplier(M, K, p, dtype):
    return ref_dropout.multiplier(M, K, SEED, p, dtype=dtype, device=DEVICE)


def _keep(M, K, p):
    return ref_dropout.keep_mask(M, K, SEED, p, device=DEVICE)


def _check(got, oracle, eager, floor_dtype, name=""):
    err, bound = rel_err(got, oracle), 2 * rel_err(eager, oracle) + ERROR_FLOOR[floor_dtype]
    assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"


# ---- the weight norm ------------------------------------------------------------------------------------

@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("N,K,r", [(50, 40, 3), (24, 45, 1), (72, 96, 20)])
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=_pair_id)
def test_weight_norm_matches_float64_oracle(pair, N, K, r, strided, poisoned):
    w_dtype, ad_dtype = pair
    w = _randn(N, K, dtype=w_dtype, scale=K ** -0.5)
    a, b = _randn(r, K, dtype=ad_dtype, scale=K ** -0.5), _randn(N, r, dtype=ad_dtype)
    if strided:
        w, a, b = _strided(w), _strided(a), _strided(b)
    got = _launch_in_scope(kd.dora_weight_norm, w, a, b, SCALE)
    assert got.dtype == F32 and got.shape == (N,)
    oracle = (w.double() + SCALE * b.double() @ a.double()).norm(dim=1)
    eager = torch.linalg.vector_norm(w.float() + SCALE * (b.float() @ a.float()), dim=1)
    _check(got, oracle, eager, F32)
    assert torch.equal(got, _launch_in_scope(kd.dora_weight_norm, w, a, b, SCALE))  # fixed-order split-K sum


@pytest.mark.parametrize("ad_dtype", [F32, F16], ids=str)
def test_weight_norm_forms_the_sum_before_squaring(ad_dtype, poisoned):
    """W = −s·B·A + e with exact small integers: v = W + s·B·A is e exactly, as PEFT's dense formula makes it.
    The expansion ‖W‖² + 2s⟨W, B·A⟩ + s²‖B·A‖² would lose e's ~1e-7 share of the sum to fp32 rounding."""
    N, K, r, s = 40, 72, 3, 0.5
    a = torch.randint(-4, 5, (r, K), device=DEVICE).to(ad_dtype)
    b = torch.randint(-4, 5, (N, r), device=DEVICE).to(ad_dtype)
    e = torch.randint(-3, 4, (N, K), device=DEVICE).double() * 2.0 ** -10
    w = (-s * (b.double() @ a.double()) + e).float()  # exact in fp32: |B·A| <= 48, e a multiple of 2^-10
    got = _launch_in_scope(kd.dora_weight_norm, w, a, b, s)
    assert rel_err(got, e.norm(dim=1)) <= 1e-6


# ---- the scaled gradient and the magnitude's column sums -------------------------------------------------

@pytest.mark.parametrize("with_gm", [False, True], ids=["gc", "gc+gm"])
@pytest.mark.parametrize("with_z", [False, True], ids=["no_z", "z"])
@pytest.mark.parametrize("M,N,strided", [(33, 50, False), (130, 40, True)])
@pytest.mark.parametrize("dtype", ACT_DTYPES, ids=str)
def test_grad_scale(dtype, M, N, strided, with_z, with_gm, poisoned):
    g = _randn(M, N, dtype=dtype)
    z = _randn(M, N, dtype=dtype)
    if strided:
        g, z = _strided(g), _strided(z)
    c = torch.rand(N, device=DEVICE) + 0.5
    c[::7] = 1.0  # c − 1 = 0 exactly: gm must be 0 there
    gc, colsum, gm = _launch_in_scope(kd.dora_grad_scale, g, c, z if with_z else None, with_gm=with_gm)
    assert gc.dtype == dtype and gc.shape == (M, N)
    assert torch.equal(gc, (g.float() * c).to(dtype))  # the fp32 product, rounded once
    if with_gm:
        assert torch.equal(gm, (g.float() * (c - 1.0)).to(dtype))
    else:
        assert gm is None
    if with_z:
        assert colsum.dtype == F32 and colsum.shape == (N,)
        _check(colsum, (g.double() * z.double()).sum(0), (g.float() * z.float()).sum(0), F32)
    else:
        assert colsum is None


def test_grad_scale_column_sums_are_deterministic(monkeypatch, poisoned):
    """Several split-M partials (a larger program target), summed in a fixed order: identical bits every run."""
    sizes = []
    empty = _launch.empty

    def recording_empty(shape, device, dtype):
        sizes.append(tuple(shape))
        return empty(shape, device, dtype)

    monkeypatch.setattr(_launch, "empty", recording_empty)
    monkeypatch.setattr(_launch, "_CONFIG", _launch.LaunchConfig(programs=64))  # split reductions aim for 64
    M, N = 200, 40
    g, z = _randn(M, N, dtype=F16), _randn(M, N, dtype=F16)
    c = torch.rand(N, device=DEVICE) + 0.5
    first = _launch_in_scope(kd.dora_grad_scale, g, c, z)[1]
    assert any(len(s) == 2 and s[0] > 1 and s[1] == N for s in sizes), f"no split-M partials were made: {sizes}"
    for _ in range(2):
        assert torch.equal(_launch_in_scope(kd.dora_grad_scale, g, c, z)[1], first)
    _check(first, (g.double() * z.double()).sum(0), (g.float() * z.float()).sum(0), F32)


# ---- the masked copy ------------------------------------------------------------------------------------

@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", ACT_DTYPES, ids=str)
def test_keep_x_is_exact_with_the_reference_mask(dtype, strided, poisoned):
    M, K = 70, 45
    x = _randn(M, K, dtype=dtype)
    if strided:
        x = _strided(x)
    got = _launch_in_scope(kd.dora_keep_x, x, seed=SEED, dropout_p=P)
    keep = _keep(M, K, P)
    assert 0 < keep.sum() < keep.numel()
    assert got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got, torch.where(keep, x, torch.zeros_like(x)))


# ---- the GEMMs -------------------------------------------------------------------------------------------

# (activations, adapters, dropout, bias, write z): every dtype pair, dropout and bias on and off, z on and off
GEMM_VARIANTS = [
    (F32, F32, 0.0, True, True),
    (F32, F32, P, False, True),
    (F16, F32, 0.0, False, False),
    (F16, F32, P, True, True),
    (F16, F16, 0.0, True, True),
    (F16, F16, P, True, False),
] + ([(BF16, F32, P, True, True), (BF16, BF16, 0.0, True, True)] if DEVICE.type == "cuda" else [])


def _gemm_id(v):
    return f"x{SHORT[v[0]]}-ad{SHORT[v[1]]}-p{v[2]}-{'bias' if v[3] else 'nobias'}-{'z' if v[4] else 'noz'}"


def _fwd_math(xw, dw, t, b_t, bias, c, p, dtype):
    """(y, z) in `dtype` from the base products xw = x·Wᵀ and dw = (keep ⊙ x)·Wᵀ (already in `dtype`)."""
    low = SCALE * (t.to(dtype) @ b_t.to(dtype))
    c = c.to(dtype)
    if p > 0:
        z = dw / (1 - p) + low
        y = xw + low + (c - 1) * z
    else:
        z = xw + low
        y = c * z
    return (y + bias.to(dtype) if bias is not None else y), z


@pytest.mark.parametrize("variant", GEMM_VARIANTS, ids=_gemm_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_forward_gemm_matches_float64_oracle(shape, variant, poisoned):
    M, K, N, r = shape
    dtype, ad_dtype, p, has_bias, write_z = variant
    x, w = _randn(M, K, dtype=dtype), _randn(N, K, dtype=dtype, scale=K ** -0.5)
    t, b = _randn(M, r), _randn(N, r, dtype=ad_dtype)
    bias = _randn(N, dtype=dtype) if has_bias else None
    c = torch.rand(N, device=DEVICE) + 0.5
    masked = torch.where(_keep(M, K, p), x, torch.zeros_like(x)) if p > 0 else None
    y, z = _launch_in_scope(kd.dora_forward_gemm, x, w.t(), t, b.t(), bias, c, lora_scale=SCALE, masked_x=masked,
                            drop_scale=1 / (1 - p), write_z=write_z)
    assert y.dtype == dtype and y.shape == (M, N)
    assert (z is None) != write_z
    # the oracle in float64; PyTorch in the working dtypes: base products in x's dtype, the rest in float32
    d = masked if masked is not None else x
    oracle = _fwd_math(x.double() @ w.double().t(), d.double() @ w.double().t(), t, b.t(), bias, c, p, torch.float64)
    eager = [o.to(dtype) for o in _fwd_math((x @ w.t()).float(), (d @ w.t()).float(), t, b.t(), bias, c, p, F32)]
    _check(y, oracle[0], eager[0], dtype, "y")
    if write_z:
        assert z.dtype == dtype
        _check(z, oracle[1], eager[1], dtype, "z")


def _dx_math(g, gm, w, ds, a, mult, dtype, base=None):
    """g·W + mult ⊙ (gm·W + dS·A) in `dtype`, the two base products in `base` (default: `dtype`)."""
    base = base or dtype
    return ((g.to(base) @ w.to(base)).to(dtype)
            + mult.to(dtype) * ((gm.to(base) @ w.to(base)).to(dtype) + ds.to(dtype) @ a.to(dtype)))


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=_pair_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_dx_gemm_matches_float64_oracle(shape, pair, poisoned):
    """dx = dy·W + keep/(1 − p) ⊙ (gm·W + dS·A): the mask of x's coordinates (dx's own)."""
    M, K, N, r = shape
    dtype, ad_dtype = pair
    g, gm = _randn(M, N, dtype=dtype), _randn(M, N, dtype=dtype, scale=0.1)
    w, a = _randn(N, K, dtype=dtype, scale=N ** -0.5), _randn(r, K, dtype=ad_dtype)
    ds = _randn(M, r)
    dx = _launch_in_scope(kd.dora_dx_gemm, g, gm, w, ds, a, seed=SEED, dropout_p=P)
    assert dx.dtype == dtype and dx.shape == (M, K)
    mult = _multiplier(M, K, P, torch.float64)
    oracle = _dx_math(g, gm, w, ds, a, mult, torch.float64)
    eager = _dx_math(g, gm, w, ds, a, mult, F32, base=dtype).to(dtype)
    _check(dx, oracle, eager, dtype, "dx")


def test_dropout_mask_of_dx_is_on_x_coordinates(poisoned):
    """Where the mask drops, only g·W remains; where it keeps, the rest is scaled by 1/(1 − p)."""
    M, K, N, r, p = 40, 48, 40, 3, 0.5
    g, gm = _randn(M, N), _randn(M, N)
    w, a, ds = _randn(N, K), _randn(r, K), _randn(M, r) * 50  # the masked part dominates
    dx = _launch_in_scope(kd.dora_dx_gemm, g, gm, w, ds, a, seed=SEED, dropout_p=p).double()
    keep = _keep(M, K, p)
    base = g.double() @ w.double()
    rest = (gm.double() @ w.double() + ds.double() @ a.double()) / (1 - p)
    torch.testing.assert_close(dx[~keep], base[~keep], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dx[keep], (base + rest)[keep], rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("variant", GEMM_VARIANTS, ids=_gemm_id)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=_shape_id)
def test_forward_epilogue_matches_float64_oracle(shape, variant, poisoned):
    """The composite forward after its library GEMMs: y over xw, z over dw (or a new tensor)."""
    M, K, N, r = shape
    dtype, ad_dtype, p, has_bias, write_z = variant
    xw, dw = _randn(M, N, dtype=dtype), _randn(M, N, dtype=dtype) if p > 0 else None
    t, b = _randn(M, r), _randn(N, r, dtype=ad_dtype)
    bias = _randn(N, dtype=dtype) if has_bias else None
    c = torch.rand(N, device=DEVICE) + 0.5
    oracle = _fwd_math(xw.double(), dw.double() if dw is not None else None, t, b.t(), bias, c, p, torch.float64)
    eager = [o.to(dtype) for o in _fwd_math(xw.float(), dw.float() if dw is not None else None, t, b.t(), bias, c, p,
                                            F32)]
    xw_ptr, dw_ptr = xw.data_ptr(), dw.data_ptr() if dw is not None else None
    y, z = _launch_in_scope(kd.dora_forward_epilogue_, xw, t, b.t(), bias, c, lora_scale=SCALE, dw=dw,
                            drop_scale=1 / (1 - p), write_z=write_z)
    assert y.data_ptr() == xw_ptr and y.dtype == dtype
    _check(y, oracle[0], eager[0], dtype, "y")
    assert (z is None) != write_z
    if write_z:
        if dw is not None:
            assert z.data_ptr() == dw_ptr
        _check(z, oracle[1], eager[1], dtype, "z")


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=_pair_id)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=_shape_id)
def test_dx_combine_matches_float64_oracle(shape, pair, poisoned):
    """The composite dropout dx: dx += keep/(1 − p) ⊙ (e + dS·A) in place, dx = dy·W and e = gm·W given."""
    M, K, N, r = shape
    dtype, ad_dtype = pair
    dx, e = _randn(M, K, dtype=dtype), _randn(M, K, dtype=dtype, scale=0.1)
    a, ds = _randn(r, K, dtype=ad_dtype), _randn(M, r)
    mult = _multiplier(M, K, P, torch.float64)
    oracle = dx.double() + mult * (e.double() + ds.double() @ a.double())
    eager = (dx.float() + mult.float() * (e.float() + ds @ a.float())).to(dtype)
    ptr = dx.data_ptr()
    out = _launch_in_scope(kd.dora_dx_combine_, dx, e, ds, a, seed=SEED, dropout_p=P)
    assert out.data_ptr() == ptr
    _check(out, oracle, eager, dtype, "dx")


# ---- empty inputs, configs, grids ------------------------------------------------------------------------

_KERNELS = ["dora._dora_weight_norm_kernel", "dora._dora_grad_scale_kernel", "dora._dora_keep_x_kernel",
            "dora._dora_fwd_tuned", "dora._dora_dx_tuned", "dora_epilogue._dora_fwd_epilogue_kernel",
            "dora_epilogue._dora_dx_combine_kernel"]


def _modules():
    """The DoRA family's kernel modules: the fused GEMMs and shared kernels, and the composite's epilogues."""
    from peftkern.kernels import dora_epilogue
    return kd, dora_epilogue


def test_empty_inputs_launch_nothing(monkeypatch):
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("launched a kernel for an empty output")

    from peftkern.kernels import registry
    patched = set()
    for module in _modules():
        for kernel in registry.kernels(module.__name__):
            patched.add(f"{module.__name__.rsplit('.', 1)[1]}.{kernel.attr}")
            monkeypatch.setattr(module, kernel.attr, NoLaunch())
    assert patched == set(_KERNELS)
    r, K, N = 3, 40, 24
    x0, w, a, b = _randn(0, K, dtype=F16), _randn(N, K, dtype=F16), _randn(r, K), _randn(N, r)
    c = torch.rand(N, device=DEVICE)
    y, z = kd.dora_forward_gemm(x0, w.t(), _randn(0, r), b.t(), None, c, lora_scale=1.0, write_z=True)
    assert y.shape == z.shape == (0, N) and y.dtype == F16
    gc, colsum, gm = kd.dora_grad_scale(_randn(0, N, dtype=F16), c, _randn(0, N, dtype=F16), with_gm=True)
    assert gc.shape == gm.shape == (0, N) and torch.equal(colsum, torch.zeros(N, device=DEVICE))
    assert kd.dora_keep_x(x0, seed=1, dropout_p=0.5).shape == (0, K)
    assert kd.dora_dx_gemm(_randn(0, N, dtype=F16), _randn(0, N, dtype=F16), w, _randn(0, r), a, seed=1,
                           dropout_p=0.5).shape == (0, K)
    assert torch.equal(kd.dora_weight_norm(_randn(N, 0), _randn(r, 0), b, 1.0), torch.zeros(N, device=DEVICE))
    assert kd.dora_weight_norm(_randn(0, K), a, _randn(0, r), 1.0).shape == (0,)
    y, z = kd.dora_forward_epilogue_(_randn(0, N, dtype=F16), _randn(0, r), b.t(), None, c, lora_scale=1.0,
                                     write_z=True)
    assert y.shape == z.shape == (0, N)
    assert kd.dora_dx_combine_(_randn(0, K, dtype=F16), _randn(0, K, dtype=F16), _randn(0, r), a, seed=1,
                               dropout_p=0.5).shape == (0, K)


def _gpu_configs():
    return [blocks.config(t) for t in dict.fromkeys(kd._TILES_16 + kd._TILES_FP32 + kd._TILES_16_FWD_DROPOUT
                                                    + kd._TILES_FP32_FWD_DROPOUT + kd._TILES_16_DX
                                                    + kd._TILES_FP32_DX)]


class _Dtype:
    def __init__(self, dtype):
        self.dtype = dtype


def _tiles(configs):
    return {blocks.tile(c) for c in configs}


@pytest.mark.parametrize("wide", [False, True], ids=["16bit", "fp32"])
@pytest.mark.parametrize("flags", ["none", "bias", "z", "rank_tf32x3", "main_tf32x3"])
def test_forward_pruning_keeps_the_configs_that_compiled_without_spills(wide, flags):
    configs = _gpu_configs()
    x = _Dtype(F32 if wide else BF16)
    kw = dict(HAS_BIAS=flags == "bias", WRITE_Z=flags == "z", RANK_PRECISION="tf32x3" if flags == "rank_tf32x3" else
              "tf32", MAIN_PRECISION="tf32x3" if flags == "main_tf32x3" else "tf32")
    # one accumulator: kernels/lora.py's lists and budget
    single = set(kd._TILES_FP32 if wide else kd._TILES_16)
    kept = _tiles(kd.prune_fwd_configs(configs, {"x_ptr": x}, HAS_DROPOUT=False, **kw))
    if flags == "none":
        assert kept == single
    else:
        assert kept == {t for t in single if t[0] * t[1] // (32 * t[3]) <= 64}
    # two accumulators: the dropout list, tiles of at most 128x64 beside 3xTF32 adapters
    double = set(kd._TILES_FP32_FWD_DROPOUT if wide else kd._TILES_16_FWD_DROPOUT)
    kept = _tiles(kd.prune_fwd_configs(configs, {"x_ptr": x}, HAS_DROPOUT=True, **kw))
    if flags == "rank_tf32x3":
        assert kept == {t for t in double if t[0] * t[1] <= 128 * 64}
    else:
        assert kept == double
    # arguments passed by name (as the autotuner passes positional ones) prune the same
    assert kd.prune_fwd_configs(configs, {"x_ptr": x, "HAS_DROPOUT": True, **kw}) == kd.prune_fwd_configs(
        configs, {"x_ptr": x}, HAS_DROPOUT=True, **kw)
    one = configs[:1]  # the interpreter's single config passes through
    assert kd.prune_fwd_configs(one, {"x_ptr": x}, HAS_DROPOUT=True, **kw) == one


@pytest.mark.parametrize("wide", [False, True], ids=["16bit", "fp32"])
def test_dx_pruning_keeps_its_list(wide):
    kept = kd.prune_dx_configs(_gpu_configs(), {"g_ptr": _Dtype(F32 if wide else F16)}, RANK_PRECISION="tf32x3",
                               MAIN_PRECISION="tf32")
    assert _tiles(kept) == set(kd._TILES_FP32_DX if wide else kd._TILES_16_DX)


@pytest.mark.parametrize("r", [1, 8, 16, 20])
def test_gemms_get_rank_factors_with_strides_divisible_by_16(monkeypatch, r):
    """The rank-r factors reach the GEMMs with every stride 1 or a multiple of 16 (what the AOT check compiled
    without spills; see kd._aligned), holding the same values."""
    seen = []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(args)
            return launch

    monkeypatch.setattr(kd, "_dora_fwd_tuned", Recorder())
    monkeypatch.setattr(kd, "_dora_dx_tuned", Recorder())
    M, K, N = 33, 40, 50
    s_down, b, a, ds = _randn(M, r), _randn(N, r), _randn(r, K), _randn(M, r)
    kd.dora_forward_gemm(_randn(M, K), _randn(N, K).t(), s_down, b.t(), None, torch.ones(N, device=DEVICE),
                         lora_scale=1.0, write_z=False)
    kd.dora_dx_gemm(_randn(M, N), _randn(M, N), _randn(N, K), ds, a, seed=1, dropout_p=0.5)
    (fwd, dx) = seen
    for t, u, want_t, want_u in ((fwd[3], fwd[4], s_down, b.t()), (dx[3], dx[4], ds, a)):
        for v, want in ((t, want_t), (u, want_u)):
            assert torch.equal(v, want)
            assert all(n <= 1 or st == 1 or st % 16 == 0 for n, st in zip(v.shape, v.stride())), (v.shape, v.stride())
    if r % 16 == 0:  # already aligned: no copy
        assert fwd[3] is s_down and dx[3] is ds


@pytest.mark.skipif(not INTERPRET, reason="the interpreter's config list; a GPU machine autotunes over _TILES_*")
def test_interpreter_runs_one_small_config():
    (config,) = kd.gemm_configs()
    assert (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]) == (32, 32, 32)


VOCAB, HIDDEN, RANK = 128256, 4096, 16


@pytest.fixture
def grids(monkeypatch):
    """Every launch of kernels/dora.py records its grid (for the GEMMs, for every GPU config) and runs nothing;
    the launchers pick their GPU tiles and an H100's 4 x 132 program target (tests/test_grid_limits.py's set-up)."""
    from .test_grid_limits import record_grids

    log = record_grids(monkeypatch, _modules())
    assert log.kernels == set(_KERNELS)
    return log


@pytest.mark.parametrize("m", [1, 200_000])
def test_every_launcher_keeps_cuda_grid_limits(grids, m):
    from .test_grid_limits import check, meta

    f32 = dict(dtype=F32)
    for out_f, in_f in ((VOCAB, HIDDEN), (HIDDEN, VOCAB)):  # lm_head, and its transpose's sizes
        kd.dora_weight_norm(meta(out_f, in_f), meta(RANK, in_f, **f32), meta(out_f, RANK, **f32), 2.0)
        kd.dora_grad_scale(meta(m, out_f), meta(out_f, **f32), meta(m, out_f), with_gm=True)
        kd.dora_keep_x(meta(m, in_f), seed=1, dropout_p=0.1)
        w = meta(out_f, in_f)
        for masked in (None, meta(m, in_f)):
            kd.dora_forward_gemm(meta(m, in_f), w.t(), meta(m, RANK, **f32), meta(out_f, RANK).t(), meta(out_f),
                                 meta(out_f, **f32), lora_scale=2.0, masked_x=masked, drop_scale=1.1, write_z=True)
            kd.dora_forward_epilogue_(meta(m, out_f), meta(m, RANK, **f32), meta(out_f, RANK).t(), meta(out_f),
                                      meta(out_f, **f32), lora_scale=2.0, dw=None if masked is None else meta(m, out_f),
                                      drop_scale=1.1, write_z=True)
        kd.dora_dx_gemm(meta(m, out_f), meta(m, out_f), w, meta(m, RANK, **f32), meta(RANK, in_f), seed=1,
                        dropout_p=0.1)
        kd.dora_dx_combine_(meta(m, in_f), meta(m, in_f), meta(m, RANK, **f32), meta(RANK, in_f), seed=1,
                            dropout_p=0.1)
    check(grids)
    assert {name for name, _, _ in grids} == grids.kernels
    gemm = [g for name, g, mt in grids if name == "dora._dora_fwd_tuned"]
    assert len(gemm) == 4 * len(_gpu_configs())
    # the norm of a [4096, in] weight has 64 row tiles, an eighth of an H100's programs: K is split
    norm = [g for name, g, _ in grids if name == "dora._dora_weight_norm_kernel"]
    assert norm[0] == (-(-VOCAB // 64), 1) and norm[1][0] == HIDDEN // 64 and norm[1][1] > 1


def test_launchers_are_gpu_tiled_off_the_interpreter(grids):
    """Under a launch configuration that sizes for the GPU the launchers pick their GPU tiles, not the interpreter's
    32x32 (what the AOT check and the grid test rely on)."""
    kd.dora_keep_x(torch.empty(300, 300, device="meta"), seed=1, dropout_p=0.1)
    ((_, _, launch_meta),) = list(grids)
    assert (launch_meta["BLOCK_M"], launch_meta["BLOCK_K"]) == (64, 128)

