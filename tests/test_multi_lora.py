"""peftkern.multi_lora_linear on the cpu backend (the fast torch path) and the reference backend (the oracle):

- every row equals lora_linear with that row's adapter (same seed: dropout included), ids per sequence, per
  token and one for all, −1 rows, ranks that differ, bias or not, non-contiguous x, int32 and int64 ids;
- gradients of every adapter, x, weight and bias against a float64 oracle built from lora_linear alone; an
  adapter no row uses gets a zero gradient; frozen adapters get none;
- both CPU paths (the grouped BLAS path and the compiled row kernel, csrc/multi_lora.cpp) agree;
- the oracle (multi_lora/reference.py) itself against lora_linear row by row, and gradcheck of it;
- gradcheck in float64 (dropout on), opcheck of both ops over examples.cases() on every backend, with per-adapter
  gradient flags, torch.compile(fullgraph=True) forward and backward;
- half-precision x beside float32 adapters, autocast;
- bad input raises the named exception, IndexError for ids outside [−1, n).
The Triton kernels are tested in tests/test_multi_lora_kernels.py.
"""
import pytest
import torch

import peftkern
from peftkern.core import backend as _backend, opdef
from peftkern.multi_lora import cpu as multi_cpu, examples, op as multi_op
from peftkern.quant import fourbit

from .conftest import DEVICE, available_backends, rel_err

K, N = 33, 17


def _adapters(ranks, dtype=torch.float64, grad=True):
    lora_a = [(torch.randn(r, K, dtype=dtype) / K ** 0.5).requires_grad_(grad) for r in ranks]
    lora_b = [(torch.randn(N, r, dtype=dtype) / r ** 0.5).requires_grad_(grad) for r in ranks]
    return lora_a, lora_b


def _row_ids(ids, lead):
    return ids.reshape(tuple(ids.shape) + (1,) * (len(lead) - ids.dim())).expand(lead)


def _oracle(x, w, lora_a, lora_b, ids, scalings, bias, p, seed):
    """The definition from lora_linear alone: each row takes lora_linear's row for its adapter."""
    rows = _row_ids(ids, x.shape[:-1]).unsqueeze(-1)
    y = torch.nn.functional.linear(x, w, bias)
    for i, (a, b) in enumerate(zip(lora_a, lora_b)):
        yi = peftkern.lora_linear(x, w, a, b, scaling=scalings[i], bias=bias, dropout_p=p, seed=seed)
        y = torch.where(rows == i, yi, y)
    return y


IDS = {
    "per_sequence": lambda n: torch.tensor([0, -1, n - 1, 0, 1 % n]),
    "per_token": lambda n: torch.randint(-1, n, (5, 7)),
    "one_for_all": lambda n: torch.tensor(n - 1),
    "contiguous": lambda n: torch.tensor([-1, 0, 0, n - 1, -1]),  # each adapter's rows in one run, base rows between
}


@pytest.fixture(params=["grouped", "rows_kernel", "segments"])
def cpu_path(request, monkeypatch):
    """The grouped BLAS path, the compiled row kernel (taken for few rows per adapter when built), or the
    segment-by-segment forward (taken when every adapter's rows are contiguous and long)."""
    if request.param in ("grouped", "segments"):
        monkeypatch.setattr(multi_cpu, "ROWS_KERNEL_MAX_ROWS_PER_ADAPTER", 0)
        monkeypatch.setattr(multi_cpu, "SEGMENT_MIN_ROWS", 1 if request.param == "segments" else 10**9)
    else:
        ext = _backend.extension()
        if ext is None or not hasattr(ext, "multi_lora_rows"):
            pytest.skip("the compiled extension (peftkern._C) is not built: no row kernel to test")
        monkeypatch.setattr(multi_cpu, "ROWS_KERNEL_MAX_ROWS_PER_ADAPTER", 10**9)
    return request.param


@pytest.mark.parametrize("ids_kind", list(IDS))
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_each_row_equals_lora_linear_and_gradients_match_a_float64_oracle(ids_kind, p, dtype, bias, cpu_path):
    ranks = [3, 1, 8]
    n = len(ranks)
    x64 = torch.randn(5, 7, K, dtype=torch.float64)
    w64 = torch.randn(N, K, dtype=torch.float64) / K ** 0.5
    b64 = torch.randn(N, dtype=torch.float64) if bias else None
    a64, bb64 = _adapters(ranks)
    ids = IDS[ids_kind](n)
    scalings = [0.5, 2.0, -1.25]
    dy64 = torch.randn(5, 7, N, dtype=torch.float64)

    x = x64.to(dtype).requires_grad_()
    w = w64.to(dtype).requires_grad_()
    b = b64.to(dtype).requires_grad_() if bias else None
    lora_a = [t.detach().to(dtype).requires_grad_() for t in a64]
    lora_b = [t.detach().to(dtype).requires_grad_() for t in bb64]
    y = peftkern.multi_lora_linear(x, w, lora_a, lora_b, ids, scalings=scalings, bias=b, dropout_p=p, seed=11)
    y.backward(dy64.to(dtype))

    x64.requires_grad_(), w64.requires_grad_()
    if bias:
        b64.requires_grad_()
    y64 = _oracle(x64, w64, a64, bb64, ids, scalings, b64, p, 11)
    y64.backward(dy64)

    floor = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel_err(y, y64) < floor * 10
    pairs = [(x.grad, x64.grad), (w.grad, w64.grad)] + list(zip([t.grad for t in lora_a], [t.grad for t in a64]))
    pairs += list(zip([t.grad for t in lora_b], [t.grad for t in bb64]))
    if bias:
        pairs.append((b.grad, b64.grad))
    for got, want in pairs:
        assert got is not None and got.dtype == dtype
        assert rel_err(got, want) < floor * 10


def test_rows_equal_lora_linear_bit_for_bit_with_one_adapter_per_contiguous_group():
    # one adapter for all rows is lora_linear itself, on the grouped path's views (no gather): the same products
    x, w = torch.randn(4, 6, K), torch.randn(N, K)
    lora_a, lora_b = _adapters([5], torch.float32, grad=False)
    y = peftkern.multi_lora_linear(x, w, lora_a, lora_b, torch.tensor(0), scalings=[0.7], dropout_p=0.2, seed=3)
    want = peftkern.lora_linear(x, w, lora_a[0], lora_b[0], scaling=0.7, dropout_p=0.2, seed=3)
    assert torch.equal(y, want)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_gradcheck_float64(p, cpu_path):
    x = torch.randn(3, 4, K, dtype=torch.float64, requires_grad=True)
    w = torch.randn(N, K, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(N, dtype=torch.float64, requires_grad=True)
    lora_a, lora_b = _adapters([2, 1, 3])
    ids = torch.tensor([[2, 0, -1, 2], [1, 1, 0, -1], [0, 2, 2, 2]], dtype=torch.int32)

    def fn(x_, w_, bias_, *ab):
        return peftkern.multi_lora_linear(x_, w_, ab[:3], ab[3:], ids, scalings=[0.5, -2.0, 1.5], bias=bias_,
                                          dropout_p=p, seed=9)

    assert torch.autograd.gradcheck(fn, (x, w, bias, *lora_a, *lora_b))


@pytest.mark.parametrize("ids_kind", list(IDS))
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("quantized", [False, True])
def test_the_oracle_equals_lora_linear_row_by_row_and_the_cpu_backend(ids_kind, p, quantized):
    """The reference backend (the plain-torch oracle) gives each row lora_linear's row for its adapter, and agrees
    with the cpu backend on the result and every gradient (dense and 4-bit bases)."""
    from peftkern import QuantizedWeight

    ranks, k = [3, 1, 8], 64
    x = torch.randn(5, 7, k, dtype=torch.float64)
    w = torch.randn(N, k, dtype=torch.float64) / k ** 0.5
    weight = QuantizedWeight.quantize(w, blocksize=64) if quantized else w
    dense = weight.dequantize() if quantized else w
    bias = torch.randn(N, dtype=torch.float64)
    lora_a = [torch.randn(r, k, dtype=torch.float64) / k ** 0.5 for r in ranks]
    lora_b = [torch.randn(N, r, dtype=torch.float64) for r in ranks]
    ids, scalings, dy = IDS[ids_kind](len(ranks)), [0.5, 2.0, -1.25], torch.randn(5, 7, N, dtype=torch.float64)
    results = {}
    for backend in ("reference", "cpu"):
        tensors = [t.clone().requires_grad_() for t in (x, bias, *lora_a, *lora_b)]
        with peftkern.use_backend(backend):
            y = peftkern.multi_lora_linear(tensors[0], weight, tensors[2:5], tensors[5:], ids, scalings=scalings,
                                           bias=tensors[1], dropout_p=p, seed=11)
            y.backward(dy)
        results[backend] = [y.detach()] + [t.grad for t in tensors]
    with peftkern.use_backend("reference"):
        want = _oracle(x, dense, lora_a, lora_b, ids, scalings, bias, p, 11)
    assert rel_err(results["reference"][0], want) < 1e-12
    for got, oracle in zip(results["cpu"], results["reference"]):
        assert rel_err(got, oracle) < 1e-12


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_gradcheck_float64_reference(p):
    x = torch.randn(3, 4, K, dtype=torch.float64, requires_grad=True)
    w = torch.randn(N, K, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(N, dtype=torch.float64, requires_grad=True)
    lora_a, lora_b = _adapters([2, 1, 3])
    ids = torch.tensor([[2, 0, -1, 2], [1, 1, 0, -1], [0, 2, 2, 2]], dtype=torch.int32)

    def fn(x_, w_, bias_, *ab):
        return peftkern.multi_lora_linear(x_, w_, ab[:3], ab[3:], ids, scalings=[0.5, -2.0, 1.5], bias=bias_,
                                          dropout_p=p, seed=9)

    with peftkern.use_backend("reference"):
        assert torch.autograd.gradcheck(fn, (x, w, bias, *lora_a, *lora_b))


def test_unused_adapter_gets_a_zero_gradient_and_frozen_ones_none():
    x = torch.randn(6, K)
    w = torch.randn(N, K)
    lora_a, lora_b = _adapters([2, 4, 3], torch.float32)
    lora_a[2].requires_grad_(False)  # frozen: no gradient at all
    ids = torch.tensor([0, 0, -1, 2, 0, 2])  # adapter 1 serves no row
    peftkern.multi_lora_linear(x, w, lora_a, lora_b, ids, scalings=[1.0, 1.0, 1.0]).pow(2).sum().backward()
    assert torch.equal(lora_a[1].grad, torch.zeros_like(lora_a[1]))
    assert torch.equal(lora_b[1].grad, torch.zeros_like(lora_b[1]))
    assert lora_a[2].grad is None
    assert lora_b[2].grad is not None and lora_b[2].grad.abs().sum() > 0
    assert lora_a[0].grad.abs().sum() > 0


def test_two_adapters_train_in_one_batch_like_two_separate_lora_calls():
    x = torch.randn(8, K, dtype=torch.float64)
    w = torch.randn(N, K, dtype=torch.float64)
    lora_a, lora_b = _adapters([4, 4])
    ids = torch.tensor([0, 1, 1, 0, 0, 1, 1, 0])
    y = peftkern.multi_lora_linear(x, w, lora_a, lora_b, ids, scalings=[2.0, 0.5], dropout_p=0.25, seed=5)
    y.square().sum().backward()
    got = [t.grad.clone() for t in (*lora_a, *lora_b)]
    for t in (*lora_a, *lora_b):
        t.grad = None
    for i, s in enumerate((2.0, 0.5)):
        yi = peftkern.lora_linear(x, w, lora_a[i], lora_b[i], scaling=s, dropout_p=0.25, seed=5)
        yi[ids == i].square().sum().backward()
    for g, t in zip(got, (*lora_a, *lora_b)):
        assert rel_err(g, t.grad) < 1e-12


def test_the_two_cpu_paths_agree():
    x = torch.randn(40, K)
    w = torch.randn(N, K)
    lora_a, lora_b = _adapters([3, 5, 1, 2], torch.float32, grad=False)
    ids = torch.randint(-1, 4, (40,))
    args = dict(x=x, **fourbit.op_args(w), lora_a=lora_a, lora_b=lora_b, row_ids=ids, bias=None,
                scalings=[0.3, 1.0, -2.0, 0.9], dropout_p=0.0, seed=None)
    old = multi_cpu.ROWS_KERNEL_MAX_ROWS_PER_ADAPTER
    try:
        multi_cpu.ROWS_KERNEL_MAX_ROWS_PER_ADAPTER = 0
        grouped = multi_op.forward_op(**args)
        multi_cpu.ROWS_KERNEL_MAX_ROWS_PER_ADAPTER = 10**9
        rows = multi_op.forward_op(**args)
    finally:
        multi_cpu.ROWS_KERNEL_MAX_ROWS_PER_ADAPTER = old
    for g, r in zip(grouped, rows):
        assert rel_err(r, g) < 1e-6


def test_non_contiguous_x_and_int32_ids():
    base = torch.randn(6, 2 * K)
    x = base[:, ::2]  # strided view
    w = torch.randn(N, K)
    lora_a, lora_b = _adapters([3, 2], torch.float32, grad=False)
    ids64 = torch.tensor([1, 0, -1, 1, 1, 0])
    y32 = peftkern.multi_lora_linear(x, w, lora_a, lora_b, ids64.int(), scalings=[1.0, 3.0])
    y64 = peftkern.multi_lora_linear(x.contiguous(), w, lora_a, lora_b, ids64, scalings=[1.0, 3.0])
    assert torch.equal(y32, y64)
    want = _oracle(x.double(), w.double(), [t.double() for t in lora_a], [t.double() for t in lora_b], ids64,
                   [1.0, 3.0], None, 0.0, None)
    assert rel_err(y32, want) < 1e-5


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
def test_half_x_with_float32_adapters(x_dtype):
    x = torch.randn(9, K).to(x_dtype)
    w = (torch.randn(N, K) / K ** 0.5).to(x_dtype)
    lora_a, lora_b = _adapters([4, 2], torch.float32)
    ids = torch.tensor([0, 1, -1, 1, 0, 0, 1, -1, 0])
    y = peftkern.multi_lora_linear(x, w, lora_a, lora_b, ids, scalings=[2.0, 0.5])
    assert y.dtype == x_dtype
    y.float().sum().backward()
    assert all(t.grad.dtype == torch.float32 for t in (*lora_a, *lora_b))
    for i in range(2):
        want = peftkern.lora_linear(x, w, lora_a[i], lora_b[i], scaling=[2.0, 0.5][i])
        assert torch.equal(y[ids == i], want[ids == i])  # the same fp32 rank-r branch and one rounding


def test_autocast_casts_like_f_linear():
    x, w = torch.randn(5, K), torch.randn(N, K)
    lora_a, lora_b = _adapters([3, 2], torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = peftkern.multi_lora_linear(x, w, lora_a, lora_b, torch.tensor([0, 1, 1, -1, 0]), scalings=[1.0, 1.0])
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert lora_a[0].grad.dtype == torch.float32


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_opcheck_with_per_adapter_gradient_flags(backend):
    if backend not in available_backends("multi_lora_linear", torch.float32):
        pytest.skip(f"backend {backend} unavailable here")
    x, w, bias = torch.randn(7, K), torch.randn(N, K), torch.randn(N)
    lora_a, lora_b = _adapters([3, 2], torch.float32)
    ids = torch.tensor([0, 1, 1, -1, 0, 1, 0])
    with peftkern.use_backend(backend):
        for p, seed in ((0.0, None), (0.3, torch.tensor(4))):
            fwd = dict(x=x, **fourbit.op_args(w), lora_a=lora_a, lora_b=lora_b, row_ids=ids, bias=bias,
                       scalings=[0.5, 2.0], dropout_p=p, seed=seed)
            torch.library.opcheck(torch.ops.peftkern.multi_lora_linear_fwd.default, (), fwd)
            _, s_down = multi_op.forward_op(**fwd)
            bwd = examples.backward_args(fwd, s_down, backend, need_lora_a=[True, False], need_lora_b=[False, True])
            torch.library.opcheck(torch.ops.peftkern.multi_lora_linear_bwd.default, (), bwd)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("case", sorted(examples.cases()))
def test_opcheck(backend, case):
    """torch.library.opcheck on both ops, over the family's representative arguments (dense and 4-bit bases, ranks
    that differ, rows with no adapter, with and without bias and dropout)."""
    if backend not in available_backends("multi_lora_linear", torch.float32):
        pytest.skip(f"backend {backend} unavailable here")
    fwd = examples.cases(device=DEVICE)[case]
    with peftkern.use_backend(backend):
        torch.library.opcheck(torch.ops.peftkern.multi_lora_linear_fwd.default, (), fwd)
        _, s_down = multi_op.forward_op(**fwd)
        bwd = examples.backward_args(fwd, s_down, backend)
        torch.library.opcheck(torch.ops.peftkern.multi_lora_linear_bwd.default, (), bwd)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_forward_backward(compile_backend):
    x = torch.randn(2, 3, K, requires_grad=True)
    w = torch.randn(N, K)
    lora_a, lora_b = _adapters([4, 2], torch.float32)
    ids = torch.tensor([1, 0])

    def step(x_, a0, a1, b0, b1):
        y = peftkern.multi_lora_linear(x_, w, [a0, a1], [b0, b1], ids, scalings=[0.5, 2.0], dropout_p=0.1, seed=4)
        return (y * y).sum()

    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    tensors = (x, *lora_a, *lora_b)
    results = []
    for fn in (step, compiled):
        for t in tensors:
            t.grad = None
        loss = fn(x, lora_a[0], lora_a[1], lora_b[0], lora_b[1])
        loss.backward()
        results.append([loss.detach()] + [t.grad.clone() for t in tensors])
    for eager, comp in zip(*results):
        assert rel_err(comp, eager) < 1e-5


@pytest.mark.parametrize("bad", [-2, 3, 100])
def test_ids_out_of_range_raise_index_error(bad, cpu_path):
    x, w = torch.randn(4, K), torch.randn(N, K)
    lora_a, lora_b = _adapters([2, 2, 2], torch.float32)
    ids = torch.tensor([0, bad, 1, 2])
    with pytest.raises(IndexError, match=f"adapter_ids holds {bad}, outside \\[-1, 3\\)"):
        peftkern.multi_lora_linear(x, w, lora_a, lora_b, ids, scalings=[1.0] * 3)


def _good():
    x, w, bias = torch.randn(3, 4, K), torch.randn(N, K), torch.randn(N)
    lora_a, lora_b = _adapters([2, 3], torch.float32, grad=False)
    return dict(x=x, weight=w, lora_a=lora_a, lora_b=lora_b, adapter_ids=torch.tensor([0, 1, -1]),
                scalings=[1.0, 2.0], bias=bias)


def _call(**kw):
    args = _good()
    args.update(kw)
    return peftkern.multi_lora_linear(args.pop("x"), args.pop("weight"), args.pop("lora_a"), args.pop("lora_b"),
                                      args.pop("adapter_ids"), **args)


BAD = [
    ("lora_a", lambda g: g["lora_a"][0], TypeError, "lora_a must be a list or tuple"),
    ("lora_a", lambda g: [], ValueError, "lora_a must hold at least one adapter"),
    ("lora_b", lambda g: g["lora_b"][:1], ValueError, "lora_b must hold one tensor per adapter"),
    ("lora_a", lambda g: [g["lora_a"][0], torch.randn(3, K + 1)], ValueError, r"lora_a\[1\] must have shape"),
    ("lora_b", lambda g: [g["lora_b"][0], torch.randn(N, 2)], ValueError, r"lora_b\[1\] must have shape"),
    ("lora_a", lambda g: [g["lora_a"][0], g["lora_a"][1].double()], TypeError, r"lora_a\[1\] is torch.float64"),
    ("lora_a", lambda g: [g["lora_a"][0], torch.zeros(0, K)], ValueError, r"lora_a\[1\] must have rank r >= 1"),
    ("lora_b", lambda g: [g["lora_b"][0], "b"], TypeError, r"lora_b\[1\] must be a torch.Tensor"),
    ("scalings", lambda g: [1.0], ValueError, "scalings must hold one number per adapter"),
    ("scalings", lambda g: 1.0, TypeError, "scalings must be a list or tuple"),
    ("scalings", lambda g: [1.0, float("nan")], ValueError, r"scalings\[1\] must be finite"),
    ("scalings", lambda g: [1.0, "2"], TypeError, r"scalings\[1\] must be a real number"),
    ("adapter_ids", lambda g: [0, 1, 0], TypeError, "adapter_ids must be an int32 or int64 torch.Tensor"),
    ("adapter_ids", lambda g: torch.tensor([0.0, 1.0, 0.0]), TypeError, "adapter_ids must be int32 or int64"),
    ("adapter_ids", lambda g: torch.tensor([0, 1]), ValueError, "adapter_ids must have a leading part"),
    ("adapter_ids", lambda g: torch.zeros(3, 4, 1, dtype=torch.int64), ValueError, "leading part"),
    ("weight", lambda g: torch.randn(N, K + 1), ValueError, "x's last dim must equal weight's in_features"),
    ("bias", lambda g: torch.randn(N + 1), ValueError, "bias must have shape"),
    ("weight", lambda g: g["weight"].double(), TypeError, "weight has dtype torch.float64"),
]


@pytest.mark.parametrize("name,make,error,match", BAD)
def test_bad_input_raises_naming_the_argument(name, make, error, match):
    good = _good()
    with pytest.raises(error, match=match):
        _call(**{name: make(good)})


def test_bad_scalars_raise():
    with pytest.raises(ValueError, match="dropout_p"):
        _call(dropout_p=1.0)
    with pytest.raises(TypeError, match="seed"):
        _call(seed=1.5)
    with pytest.raises(TypeError, match="training"):
        _call(training=1)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("double_quant", [True, False])
def test_quantized_weight_equals_the_dequantized_dense_weight(p, double_quant, cpu_path):
    from peftkern import QuantizedWeight

    x = torch.randn(6, 2, 64, requires_grad=True)
    qw = QuantizedWeight.quantize(torch.randn(N, 64) / 8, blocksize=64, double_quant=double_quant)
    dense = qw.dequantize()
    lora_a = [(torch.randn(r, 64) / 8).requires_grad_() for r in (3, 2)]
    lora_b = [torch.randn(N, r).requires_grad_() for r in (3, 2)]
    bias = torch.randn(N, requires_grad=True)
    ids = torch.tensor([1, -1, 0, 0, 1, 1])
    dy = torch.randn(6, 2, N)
    results = []
    for weight in (qw, dense):
        for t in (x, *lora_a, *lora_b, bias):
            t.grad = None
        y = peftkern.multi_lora_linear(x, weight, lora_a, lora_b, ids, scalings=[0.5, 2.0], bias=bias, dropout_p=p,
                                       seed=8)
        y.backward(dy)
        results.append([y.detach()] + [t.grad.clone() for t in (x, *lora_a, *lora_b, bias)])
    for got, want in zip(*results):
        assert rel_err(got, want) < 1e-6


def test_quantized_ops_opcheck_and_bad_weight():
    from peftkern import QuantizedWeight

    x = torch.randn(5, 64)
    qw = QuantizedWeight.quantize(torch.randn(N, 64), blocksize=64)
    lora_a = [torch.randn(3, 64, requires_grad=True)]
    lora_b = [torch.randn(N, 3, requires_grad=True)]
    ids = torch.tensor([0, -1, 0, 0, -1])
    fwd = dict(x=x, **fourbit.op_args(qw), lora_a=lora_a, lora_b=lora_b, row_ids=ids, bias=None, scalings=[2.0],
               dropout_p=0.2, seed=torch.tensor(3))
    torch.library.opcheck(torch.ops.peftkern.multi_lora_linear_fwd.default, (), fwd)
    fwd.update(dropout_p=0.0, seed=None)
    y, s_down = multi_op.forward_op(**fwd)
    for backend in ("reference", "cpu"):
        bwd = examples.backward_args(fwd, s_down, backend, dy=torch.randn_like(y))
        assert bwd["need_weight"] is False  # a 4-bit base is frozen
        torch.library.opcheck(torch.ops.peftkern.multi_lora_linear_bwd.default, (), bwd)
    with pytest.raises(ValueError, match="the QuantizedWeight stands for"):
        peftkern.multi_lora_linear(torch.randn(5, 32), qw, lora_a, lora_b, ids, scalings=[1.0])


def test_eager_inference_runs_the_op_body_directly_with_the_same_result(monkeypatch):
    """Under no_grad with plain tensors the public function runs the forward op's body without the dispatcher (its
    per-call cost on a Tensor[] argument matters at decode); the result is the op's bit for bit, and anything that
    traces or intercepts (a dispatch mode here), or a call that needs gradients, goes through the op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ops = multi_op

    x, w, bias = torch.randn(6, K), torch.randn(N, K), torch.randn(N)
    lora_a, lora_b = _adapters([3, 2], torch.float32)  # parameters that require grad, as in a served model
    ids = torch.tensor([1, 0, -1, 1, 0, 0])
    want, _ = torch.ops.peftkern.multi_lora_linear_fwd(x=x, **fourbit.op_args(w), lora_a=lora_a, lora_b=lora_b,
                                                       row_ids=ids, bias=bias, scalings=[0.5, 2.0], dropout_p=0.0,
                                                       seed=None)
    decisions = []
    original = opdef.call_path

    def record(op, values):
        path = original(op, values)
        if op is ops.forward_op:
            decisions.append(path == "direct")
        return path

    monkeypatch.setattr(opdef, "call_path", record)

    def call():
        return peftkern.multi_lora_linear(x, w, lora_a, lora_b, ids, scalings=[0.5, 2.0], bias=bias)

    with torch.no_grad():
        got = call()
    assert decisions == [True] and torch.equal(got, want)

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Passthrough():
        assert torch.equal(call(), want)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert call().dtype == torch.bfloat16  # the op's autocast rule ran
    y = call()
    y.sum().backward()
    assert decisions == [True, False, False, False] and torch.equal(y.detach(), want)
    assert lora_a[0].grad is not None
