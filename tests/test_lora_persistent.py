"""kernels/lora_persistent.py: the Hopper TMA + persistent variant of the fused LoRA GEMM.

No GPU runs here. What is tested:
- numerics in Triton's CPU interpreter (host tensor descriptors included), against the float64 oracle with the
  project's error bound (tests/conftest.py: 2x PyTorch's own error in the same dtype, plus the dtype's floor) and
  against the classic kernel (kernels/lora.py's lora_gemm), with several tiles per persistent program, both of B's
  orientations, dropout, bias, fp32 and fp16 adapters, NaN-poisoned outputs;
- eligibility (unsupported()): every refusal reason, without touching CUDA for CPU tensors;
- configs: shared memory on sm_90, pruning of the configs that spill, the descriptors' block shapes, and the grid of
  lm_head-sized and 200k-token calls (recorded, not executed).
Compilation for sm_90 (registers, spills) is scripts/aot_check.py's job.
"""
import pytest
import torch

from peftkern.core import dropout as ref_dropout
from peftkern.kernels import INTERPRET, interpreter_scope, lora as classic

from .conftest import ERROR_FLOOR, rel_err

with interpreter_scope():  # decorated as peftkern's other kernel modules are (kernels/__init__.py)
    from peftkern.kernels import lora_persistent as lp

# on a GPU machine these tests would need sm_90 and CUDA tensors; the lead's dispatch tests cover that path
needs_interpreter = pytest.mark.skipif(
    not (INTERPRET and lp.HAS_TENSOR_DESCRIPTORS),
    reason="runs the kernel in Triton's CPU interpreter, which is off here (a GPU machine) or lacks host "
           "tensor descriptors (this Triton)")


def _oracle(a, b, t, u, bias, scale, seed, p):
    """float64: a·b + bias + scale·(t·u) ⊙ keep/(1-p)."""
    low = t.double() @ u.double()
    if p > 0:
        low = low * ref_dropout.multiplier(a.shape[0], b.shape[1], seed, p, dtype=torch.float64, device=a.device)
    y = a.double() @ b.double() + scale * low
    return y + bias.double() if bias is not None else y


def _eager(a, b, t, u, bias, scale, seed, p, out_dtype):
    """What PyTorch computes in the working dtypes: the base GEMM in a's dtype, the rank-r term in fp32."""
    low = t.float() @ u.float()
    if p > 0:
        low = low * ref_dropout.multiplier(a.shape[0], b.shape[1], seed, p, dtype=torch.float32, device=a.device)
    y = (a @ b).float() + scale * low
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


# (M, L, N, R, B transposed): several 32x32 interpreter tiles per program (3 programs), a partial GROUP_M
# group, M and N off the tile size, N off 8 where B is a transposed view (W [N, L] needs only L % 8 == 0),
# one tile only (fewer tiles than programs), rank 1 and rank over one 32-wide rank block
SHAPES = [
    (70, 96, 104, 5, False),
    (70, 96, 45, 5, True),
    (33, 64, 72, 1, True),
    (17, 32, 24, 40, False),
    (130, 40, 64, 16, True),
]


@needs_interpreter
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("u_dtype,out_dtype", [(torch.float32, None), (torch.float16, torch.float32)],
                         ids=["fp32-adapter", "fp16-adapter-fp32-out"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"M{s[0]}L{s[1]}N{s[2]}r{s[3]}{'T' if s[4] else 'R'}")
def test_matches_float64_oracle_and_classic_kernel(shape, u_dtype, out_dtype, bias, p, poisoned):
    M, L, N, R, b_transposed = shape
    dtype = torch.float16  # the interpreter's bf16 tl.dot is wrong (triton-lang/triton#11584); bf16 is a GPU test
    a = torch.randn(M, L, dtype=dtype)
    # B as the ops pass it: forward's Wᵀ (a transposed view of W [N, L]) or dx's row-major W [L, N]
    b = (torch.randn(N, L, dtype=dtype) / L**0.5).t() if b_transposed else torch.randn(L, N, dtype=dtype) / L**0.5
    t = torch.randn(M, R, dtype=torch.float32)
    u = torch.randn(N, R, dtype=u_dtype).t()  # Bᵀ: a strided view, as in forward
    bias_t = torch.randn(N, dtype=dtype) if bias else None
    scale, seed = 0.75, 1234
    assert lp._layout_unsupported(a, b, t, u, bias_t, out_dtype) is None

    ours = lp.lora_gemm_persistent(a, b, t, u, bias_t, lora_scale=scale, seed=seed, dropout_p=p, out_dtype=out_dtype)
    ref_classic = classic.lora_gemm(a, b, t, u, bias_t, lora_scale=scale, seed=seed, dropout_p=p, out_dtype=out_dtype)
    want = out_dtype or dtype
    assert ours.dtype == want and ours.shape == (M, N)
    oracle = _oracle(a, b, t, u, bias_t, scale, seed, p)
    torch_err = rel_err(_eager(a, b, t, u, bias_t, scale, seed, p, want), oracle)
    bound = 2 * torch_err + ERROR_FLOOR[want]
    assert rel_err(ours, oracle) <= bound
    assert rel_err(ours, ref_classic.double()) <= bound


@needs_interpreter
def test_dropout_mask_is_keep_tile_at_the_same_coordinates():
    """Where the mask drops, only a·b + bias remains; where it keeps, the rank-r term is scaled by 1/(1-p)."""
    M, L, N, R, p, seed = 40, 32, 48, 3, 0.5, 99
    a = torch.randn(M, L, dtype=torch.float16)
    b = torch.randn(L, N, dtype=torch.float16)
    t = torch.randn(M, R) * 50  # the rank-r term dominates, so kept and dropped entries separate clearly
    u = torch.randn(R, N)
    y = lp.lora_gemm_persistent(a, b, t, u, None, seed=seed, dropout_p=p, out_dtype=torch.float32).double()
    base = a.double() @ b.double()
    keep = ref_dropout.keep_mask(M, N, seed, p)
    assert 0 < keep.sum() < keep.numel()
    low = (t.double() @ u.double()) / (1 - p)
    assert torch.allclose(y[~keep], base[~keep], rtol=1e-3, atol=1e-2)
    assert torch.allclose(y[keep], (base + low)[keep], rtol=1e-3, atol=1e-1)


@needs_interpreter
def test_empty_batch_launches_nothing():
    a = torch.randn(0, 32, dtype=torch.float16)
    b = torch.randn(32, 16, dtype=torch.float16)
    out = lp.lora_gemm_persistent(a, b, torch.randn(0, 4), torch.randn(4, 16), None)
    assert out.shape == (0, 16) and out.dtype == torch.float16


# ---- eligibility ---------------------------------------------------------------------------------------

def _ok_inputs(M=64, L=64, N=48, R=4, dtype=torch.float16):
    return (torch.randn(M, L, dtype=dtype), torch.randn(N, L, dtype=dtype).t(), torch.randn(M, R),
            torch.randn(R, N), torch.randn(N, dtype=dtype))


def test_cpu_tensors_are_refused_without_touching_cuda(monkeypatch):
    def no_cuda(*args, **kwargs):
        raise AssertionError("unsupported() queried CUDA for CPU tensors")

    monkeypatch.setattr(torch.cuda, "get_device_capability", no_cuda)
    monkeypatch.setattr(torch.cuda, "get_device_properties", no_cuda)
    monkeypatch.setattr(torch.cuda, "current_device", no_cuda)
    reason = lp.unsupported(*_ok_inputs(), None)
    assert reason is not None and "CUDA" in reason


@pytest.mark.parametrize("case,expected", [
    ("fp32", "16-bit"),
    ("mixed", "16-bit"),
    ("a_transposed", "unit stride"),
    ("b_row_stride", "16 bytes"),
    ("a_misaligned", "aligned"),
    ("L0", "L == 0"),
    ("shapes", "chain"),
    ("bias_shape", "bias"),
    ("out_dtype", "out_dtype"),
])
def test_layout_refusals_name_the_reason(case, expected):
    a, b, t, u, bias = _ok_inputs()
    out_dtype = None
    if case == "fp32":
        a, b, t, u, bias = _ok_inputs(dtype=torch.float32)
    elif case == "mixed":
        b = b.to(torch.bfloat16)
    elif case == "a_transposed":
        a = torch.randn(a.shape[1], a.shape[0], dtype=a.dtype).t()
    elif case == "b_row_stride":  # row-major B [64, 100] fp16: 200-byte rows
        b, u = torch.randn(64, 100, dtype=a.dtype), torch.randn(4, 100)
        bias = None
    elif case == "a_misaligned":  # a view starting 2 bytes into its storage
        a = torch.randn(64 * 64 + 1, dtype=a.dtype)[1:].view(64, 64)
    elif case == "L0":
        a, b = torch.randn(64, 0, dtype=a.dtype), torch.randn(0, 48, dtype=a.dtype)
    elif case == "shapes":
        t = torch.randn(63, 4)
    elif case == "bias_shape":
        bias = torch.randn(47, dtype=a.dtype)
    elif case == "out_dtype":
        out_dtype = torch.float64
    reason = lp._layout_unsupported(a, b, t, u, bias, out_dtype)
    assert reason is not None and expected in reason, reason
    assert lp.unsupported(a, b, t, u, bias, out_dtype) is not None
    with pytest.raises(ValueError, match="lora_gemm_persistent"):
        lp.lora_gemm_persistent(a, b, t, u, bias, out_dtype=out_dtype)


def test_layouts_tma_can_read_are_accepted():
    a, b, t, u, bias = _ok_inputs()
    assert lp._layout_unsupported(a, b, t, u, bias, None) is None  # B = Wᵀ, a transposed view
    assert lp._layout_unsupported(a, b.contiguous(), t, u, bias, None) is None  # B row-major (dx)
    assert lp._layout_unsupported(a.to(torch.bfloat16), b.to(torch.bfloat16), t, u, None, torch.float32) is None
    # an empty batch needs no descriptor
    assert lp._layout_unsupported(a[:0], b, t[:0], u, bias, None) is None
    # a single row: its stride never addresses anything, so it does not have to be TMA-aligned
    one = torch.randn(1, 64, dtype=a.dtype).as_strided((1, 64), (3, 1))
    assert lp._layout_unsupported(one, b, t[:1], u, bias, None) is None


def test_a_triton_without_tensor_descriptors_is_refused(monkeypatch):
    monkeypatch.setattr(lp, "HAS_TENSOR_DESCRIPTORS", False)
    reason = lp._layout_unsupported(*_ok_inputs(), None)
    assert reason is not None and "tensor descriptors" in reason


class _OnCuda:
    """A CPU tensor that says it is on cuda:0: enough for unsupported()'s device and capability checks."""

    def __init__(self, x):
        self._x = x

    device = torch.device("cuda", 0)

    def __getattr__(self, name):
        return getattr(self._x, name)


@pytest.mark.parametrize("capability,ok", [((8, 0), False), ((8, 9), False), ((9, 0), True), ((10, 0), True)])
def test_capability_gate(monkeypatch, capability, ok):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    args = [_OnCuda(x) for x in _ok_inputs()]
    reason = lp.unsupported(*args, None)
    assert (reason is None) == ok, reason
    if not ok:
        assert "compute capability" in reason


# ---- configs and grid ------------------------------------------------------------------------------------

SM90_SMEM = 232448  # bytes one block may opt into on an H100 (cudaDevAttrMaxSharedMemoryPerBlockOptin)


def test_gpu_configs_fit_sm90_shared_memory():
    for c in lp.gpu_configs():
        kw = c.kwargs
        stage = (kw["BLOCK_M"] * kw["BLOCK_K"] + kw["BLOCK_K"] * kw["BLOCK_N"]) * 2  # 16-bit A and B tiles
        assert stage * c.num_stages <= SM90_SMEM, c


@pytest.mark.parametrize("dropout,precision", [(False, "tf32"), (True, "tf32"), (False, "tf32x3"),
                                               (True, "tf32x3")])
def test_configs_that_spill_are_pruned(dropout, precision):
    """The pruning keeps exactly the configs ptxas compiled without spills for sm_90 (the budget comment)."""
    configs = lp.gpu_configs()
    kept = lp.prune_configs(configs, {}, HAS_DROPOUT=dropout, RANK_PRECISION=precision)
    shapes = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) for c in kept}
    if not dropout and precision == "tf32":
        assert kept == configs
    elif dropout and precision == "tf32x3":
        assert shapes == {(128, 128, 64, 8, 4), (128, 128, 128, 8, 3)}
    else:
        assert shapes == {(128, 128, 64, 8, 4), (128, 128, 128, 8, 3), (128, 64, 64, 4, 4)}
    # the launcher passes these flags by keyword; the aot check passes them as named arguments too
    assert lp.prune_configs(configs, {"HAS_DROPOUT": dropout, "RANK_PRECISION": precision}) == kept


@pytest.mark.parametrize("b_transposed", [True, False])
def test_pre_hook_sets_each_configs_block_shapes(b_transposed):
    from triton.tools.tensor_descriptor import TensorDescriptor
    x = torch.randn(256, 256, dtype=torch.float16)
    for c in lp.gpu_configs():
        nargs = dict(a_desc=TensorDescriptor.from_tensor(x, [16, 16]), b_desc=TensorDescriptor.from_tensor(x, [16, 16]),
                     B_TRANSPOSED=b_transposed, **c.kwargs)
        c.pre_hook(nargs)
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        assert nargs["a_desc"].block_shape == [bm, bk]
        assert nargs["b_desc"].block_shape == ([bn, bk] if b_transposed else [bk, bn])


@pytest.mark.parametrize("M,L,N", [(200_000, 4096, 4096), (8192, 4096, 128_256), (200_000, 4096, 128_256), (1, 64, 8)])
@pytest.mark.parametrize("b_transposed", [True, False])
def test_grid_is_one_program_per_sm_at_most(monkeypatch, M, L, N, b_transposed):
    """lm_head-sized layers and 200k-token batches: the grid, recorded for every GPU config, never executed."""
    grids = []

    class Recorder:
        def __getitem__(self, grid_fn):
            def run(*args, **kwargs):
                for c in lp.gpu_configs():
                    grids.append((c.kwargs, grid_fn(dict(kwargs, **c.kwargs))))
                assert kwargs["NUM_SMS"] == 132 and kwargs["B_TRANSPOSED"] == b_transposed
            return run

    monkeypatch.setattr(lp, "_lora_gemm_persistent_tuned", Recorder())
    meta = dict(dtype=torch.bfloat16, device="meta")
    a = torch.empty(M, L, **meta)
    b = torch.empty(N, L, **meta).t() if b_transposed else torch.empty(L, N, **meta)
    t, u, out = torch.empty(M, 16, device="meta"), torch.empty(16, N, device="meta"), torch.empty(M, N, **meta)
    assert lp._layout_unsupported(a, b, t, u, None, None) is None
    lp.launch(a, b, t, u, None, out, lora_scale=1.0, seed=0, dropout_p=0.1, num_sms=132)
    assert grids
    for kw, g in grids:
        tiles = -(-M // kw["BLOCK_M"]) * -(-N // kw["BLOCK_N"])
        assert len(g) == 1 and g[0] == min(132, tiles)
        assert tiles < 2**31  # the kernel's tile index is int32
