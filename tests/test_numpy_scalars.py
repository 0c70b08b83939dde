"""numpy scalars wherever a Python number is accepted.

Every public op and module takes numpy's scalars as the numbers they are: reals (scaling, dropout_p, alpha,
scalings[i], density, offset) through numbers.Real, integers (seed, r, in/out features, ranks, k, blocksize, shape
dims, dequantize_rows' start/stop) through operator.index, with the same result as the Python number, bit for bit.
What was refused stays refused, with the exception the docstrings name: bools (Python's and numpy's), floats for
integer arguments (np.float32(3) is not truncated to 3), NaN/inf and out-of-range values.
"""
import pytest
import torch

import peftkern
from peftkern import QuantizedWeight, SparseDiff
from peftkern.nn import BottleneckAdapter, DoRALinear, LoRALinear, MultiLoRALinear

np = pytest.importorskip("numpy")

REALS = [np.float32, np.float64, np.float16]
INTS = [np.int64, np.int32, np.uint16, np.int8]


def _lora_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(5, 3, 12, generator=g), torch.randn(10, 12, generator=g)
    a, b = torch.randn(3, 12, generator=g), torch.randn(10, 3, generator=g)
    mag, bias = torch.rand(10, generator=g) + 0.5, torch.randn(10, generator=g)
    return x, w, a, b, mag, bias


# ---- the ops: scaling, dropout_p, seed -------------------------------------------------------------------

@pytest.mark.parametrize("real", REALS, ids=lambda t: t.__name__)
@pytest.mark.parametrize("integer", INTS, ids=lambda t: t.__name__)
@pytest.mark.parametrize("op", ["lora_linear", "dora_linear"])
def test_lora_and_dora_take_numpy_scalars(op, real, integer):
    x, w, a, b, mag, bias = _lora_inputs(1)
    fn = peftkern.lora_linear if op == "lora_linear" else (lambda *t, **kw: peftkern.dora_linear(*t, mag, **kw))
    # 0.75 and 0.25 are exact in float16 too, so the numpy value is the Python one
    want = fn(x, w, a, b, scaling=0.75, bias=bias, dropout_p=0.25, seed=41)
    got = fn(x, w, a, b, scaling=real(0.75), bias=bias, dropout_p=real(0.25), seed=integer(41))
    assert torch.equal(got, want)
    assert not torch.equal(want, fn(x, w, a, b, scaling=0.75, bias=bias, dropout_p=0.25, seed=42))  # seed matters


def test_numpy_scalars_reach_the_ops_as_python_numbers_and_grads_match():
    """Forward and every gradient of a numpy-scalar call (dropout on) equal the Python-number call's, bit for bit:
    the numbers are converted once, before the custom ops (whose schema takes float/int)."""
    x, w, a, b, mag, bias = _lora_inputs(2)
    grads = []
    for scaling, p, seed in ((1.5, 0.125, 9), (np.float32(1.5), np.float32(0.125), np.int64(9))):
        leaves = [t.clone().requires_grad_() for t in (x, a, b, mag)]
        y = peftkern.dora_linear(leaves[0], w, leaves[1], leaves[2], leaves[3], scaling=scaling, bias=bias,
                                 dropout_p=p, seed=seed)
        y.square().sum().backward()
        grads.append([y.detach()] + [t.grad for t in leaves])
    for got, want in zip(*grads):
        assert torch.equal(got, want)


def test_multi_lora_takes_numpy_scalings_dropout_and_seed():
    x, w, a, b, _, bias = _lora_inputs(3)
    a2, b2 = a[:2].clone(), b[:, :2].clone()
    ids = torch.tensor([0, 1, -1, 1, 0])
    want = peftkern.multi_lora_linear(x, w, [a, a2], [b, b2], ids, scalings=[0.5, 2.0], bias=bias, dropout_p=0.5,
                                      seed=5)
    got = peftkern.multi_lora_linear(x, w, [a, a2], [b, b2], ids, scalings=(np.float32(0.5), np.int64(2)), bias=bias,
                                     dropout_p=np.float64(0.5), seed=np.uint8(5))
    assert torch.equal(got, want)


def test_bottleneck_adapter_and_sparse_apply_take_numpy_scalars():
    g = torch.Generator().manual_seed(4)
    h, wd, bd = torch.randn(2, 7, 16, generator=g), torch.randn(5, 16, generator=g), torch.randn(5, generator=g)
    wu, bu = torch.randn(16, 5, generator=g), torch.randn(16, generator=g)
    want = peftkern.bottleneck_adapter(h, wd, bd, wu, bu, activation="gelu", scaling=0.5)
    for scaling in (np.float32(0.5), np.float16(0.5), np.float64(0.5)):
        assert torch.equal(peftkern.bottleneck_adapter(h, wd, bd, wu, bu, activation="gelu", scaling=scaling), want)
    weight = torch.randn(9, 11, generator=g)
    idx, vals = torch.tensor([3, 50, 7, 98]), torch.randn(4, generator=g)
    w1, w2 = weight.clone(), weight.clone()
    peftkern.sparse_diff_apply_(w1, idx, vals, alpha=-1.5)
    backup = peftkern.sparse_diff_apply_(w2, idx, vals, alpha=np.float32(-1.5))
    assert torch.equal(w1, w2) and not torch.equal(w1, weight)
    peftkern.sparse_diff_restore_(w2, idx, backup)
    assert torch.equal(w2, weight)


def _lora_call(**kw):
    x, w, a, b, _, _ = _lora_inputs(5)
    return peftkern.lora_linear(x, w, a, b, **kw)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(scaling=np.float32("nan")), ValueError, "scaling must be finite"),
    (dict(scaling=np.float64("inf")), ValueError, "scaling must be finite"),
    (dict(scaling=np.bool_(True)), TypeError, "scaling must be a real number"),
    (dict(scaling=torch.tensor(2.0)), TypeError, "scaling must be a real number"),
    (dict(dropout_p=np.float32(1.0)), ValueError, "dropout_p must be < 1.0"),
    (dict(dropout_p=np.float32(-0.5)), ValueError, "dropout_p must be >= 0.0"),
    (dict(dropout_p=np.float32("nan")), ValueError, "dropout_p must be finite"),
    (dict(dropout_p=0.1, seed=np.float32(3)), TypeError, "seed must be an int"),
    (dict(dropout_p=0.1, seed=3.0), TypeError, "seed must be an int"),
    (dict(dropout_p=0.1, seed=np.bool_(False)), TypeError, "seed must be an int"),
    (dict(dropout_p=0.1, seed=True), TypeError, "seed must be an int"),
    (dict(dropout_p=0.1, seed=np.int64(-1)), ValueError, r"seed must be in \[0, 2\*\*63\)"),
    (dict(dropout_p=0.1, seed=np.uint64(2**63)), ValueError, r"seed must be in \[0, 2\*\*63\)"),
    (dict(training=np.bool_(True)), TypeError, "training must be a bool"),
])
def test_bad_numpy_values_still_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        _lora_call(**kwargs)


def test_the_issue_message_is_gone():
    """The report: scaling=np.float32(2) said "scaling must be a real number, got float32"."""
    want = _lora_call(scaling=2.0)
    assert torch.equal(_lora_call(scaling=np.float32(2)), want)
    with pytest.raises(TypeError, match=r"scaling must be a real number \(an int, a float or a numpy scalar\), "
                                        r"got str"):
        _lora_call(scaling="2")


def test_other_op_arguments_refuse_bad_numpy_values():
    x, w, a, b, mag, _ = _lora_inputs(6)
    with pytest.raises(ValueError, match="scaling must be finite"):
        peftkern.dora_linear(x, w, a, b, mag, scaling=np.float32("inf"))
    with pytest.raises(ValueError, match=r"scalings\[1\] must be finite"):
        peftkern.multi_lora_linear(x, w, [a, a], [b, b], torch.tensor([0, 1, 0, 1, 0]),
                                   scalings=[1.0, np.float32("nan")])
    with pytest.raises(TypeError, match=r"scalings\[0\] must be a real number"):
        peftkern.multi_lora_linear(x, w, [a], [b], torch.tensor([0, 0, 0, 0, 0]), scalings=[np.bool_(True)])
    h = torch.randn(3, 8)
    with pytest.raises(ValueError, match="scaling must be finite"):
        peftkern.bottleneck_adapter(h, torch.randn(2, 8), None, torch.randn(8, 2), None, scaling=np.float16("inf"))
    weight = torch.randn(4, 4)
    before = weight.clone()
    with pytest.raises(ValueError, match="alpha must be finite"):
        peftkern.sparse_diff_apply_(weight, torch.tensor([1]), torch.randn(1), alpha=np.float32("nan"))
    assert torch.equal(weight, before)


# ---- modules ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
def test_lora_modules_take_numpy_sizes_and_hyperparameters(cls):
    torch.manual_seed(7)
    want = cls(12, 10, r=4, alpha=8, dropout=0.25)
    torch.manual_seed(7)
    got = cls(np.int64(12), np.int32(10), r=np.uint8(4), alpha=np.float32(8), dropout=np.float64(0.25))
    got_values = (got.in_features, got.out_features, got.r, got.alpha, got.scaling, got.dropout)
    assert got_values == (12, 10, 4, 8.0, 2.0, 0.25)
    assert all(type(v) is int for v in (got.in_features, got.out_features, got.r))
    assert all(type(v) is float for v in (got.alpha, got.dropout))  # stored as Python numbers
    assert repr(got) == repr(want)
    for name, p in want.named_parameters():
        assert torch.equal(p, dict(got.named_parameters())[name]), name
    x = torch.randn(3, 12)
    with torch.no_grad():
        got.lora_b.copy_(torch.randn(10, 4))
        want.lora_b.copy_(got.lora_b)
    got.eval(), want.eval()
    assert torch.equal(got(x), want(x))
    base = torch.nn.Linear(12, 10)
    torch.manual_seed(8)
    a = cls.from_linear(base, r=np.int64(4), alpha=np.float32(8), dropout=np.float32(0.5))
    torch.manual_seed(8)
    b = cls.from_linear(base, r=4, alpha=8.0, dropout=0.5)
    assert (a.r, a.scaling, a.dropout) == (b.r, b.scaling, b.dropout) and torch.equal(a.lora_a, b.lora_a)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(r=np.float32(4)), TypeError, "r must be an int, got float32"),
    (dict(r=4.0), TypeError, "r must be an int, got float"),
    (dict(r=np.bool_(True)), TypeError, "r must be an int"),
    (dict(r=np.int64(0)), ValueError, "r must be >= 1"),
    (dict(alpha=np.float32("nan")), ValueError, "alpha must be finite"),
    (dict(dropout=np.float32(1)), ValueError, "dropout must be < 1.0"),
])
def test_lora_module_bad_numpy_values_raise(kwargs, error, match):
    args = dict(r=4, alpha=8, dropout=0.0)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        LoRALinear(np.int64(12), 10, **args)
    with pytest.raises(TypeError, match="in_features must be an int, got float64"):
        LoRALinear(np.float64(12), 10)


def test_multi_lora_and_adapter_modules_take_numpy_scalars():
    torch.manual_seed(9)
    want = MultiLoRALinear(12, 10, ranks=[2, 5], alphas=4, dropout=0.125)
    torch.manual_seed(9)
    got = MultiLoRALinear(np.int64(12), np.int64(10), ranks=[np.int64(2), np.uint8(5)], alphas=np.float32(4),
                          dropout=np.float32(0.125))
    assert got.ranks == [2, 5] and got.scalings == want.scalings == [2.0, 0.8]
    assert all(type(r) is int for r in got.ranks) and type(got.in_features) is int
    assert MultiLoRALinear(12, 10, ranks=[2, 5], alphas=[np.int64(4), np.float32(10)]).scalings == [2.0, 2.0]
    x, ids = torch.randn(4, 12), torch.tensor([0, 1, -1, 1])
    with torch.no_grad():
        for b in list(got.lora_b) + list(want.lora_b):
            b.copy_(torch.ones_like(b) * 0.5)
    got.eval(), want.eval()
    assert torch.equal(got(x, ids), want(x, ids))
    with pytest.raises(TypeError, match=r"ranks\[0\] must be an int, got float32"):
        MultiLoRALinear(12, 10, ranks=[np.float32(2)])
    torch.manual_seed(10)
    want = BottleneckAdapter(16, 4, scaling=0.5)
    torch.manual_seed(10)
    got = BottleneckAdapter(np.int64(16), np.int16(4), scaling=np.float32(0.5))
    assert (got.d_model, got.bottleneck, got.scaling) == (16, 4, 0.5) and type(got.d_model) is int
    h = torch.randn(3, 16)
    assert torch.equal(got(h), want(h))
    with pytest.raises(TypeError, match="bottleneck must be an int, got float32"):
        BottleneckAdapter(16, np.float32(4))


# ---- QuantizedWeight and SparseDiff ------------------------------------------------------------------------

def test_quantized_weight_takes_numpy_integers_and_offset():
    torch.manual_seed(11)
    w = torch.randn(6, 128)
    want = QuantizedWeight.quantize(w, blocksize=64)
    got = QuantizedWeight.quantize(w, blocksize=np.int64(64))
    assert type(got.blocksize) is int and got.blocksize == 64
    assert torch.equal(got.dequantize(), want.dequantize())
    assert torch.equal(want.dequantize_rows(np.int64(1), np.int32(4)), want.dequantize()[1:4])
    offset = np.float32(want.offset.item())  # the float32 offset, exactly
    raw = QuantizedWeight(want.packed, want.absmax, shape=(np.int64(6), np.int64(128)), quant_type="nf4",
                          blocksize=np.int32(64), dtype=torch.float32, offset=offset, absmax2=want.absmax2,
                          code2=want.code2)
    assert type(raw.blocksize) is int and torch.equal(raw.dequantize(), want.dequantize())
    with pytest.raises(ValueError, match="blocksize must be one of"):
        QuantizedWeight.quantize(w, blocksize=np.float32(64))
    with pytest.raises(ValueError, match="blocksize must be one of"):
        QuantizedWeight.quantize(w, blocksize=64.0)
    with pytest.raises(TypeError, match="start must be an int, got float32"):
        want.dequantize_rows(np.float32(1), 4)
    with pytest.raises(TypeError, match="stop must be an int, got bool"):
        want.dequantize_rows(0, np.bool_(True))
    with pytest.raises(ValueError, match="need 0 <= start <= stop"):
        want.dequantize_rows(np.int64(3), np.int64(2))


def test_sparse_diff_takes_numpy_integers_and_density():
    torch.manual_seed(12)
    delta = torch.randn(9, 13)
    want = SparseDiff.from_dense(delta, k=10)
    got = SparseDiff.from_dense(delta, k=np.int64(10))
    assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values)
    by_density = SparseDiff.from_dense(delta, density=np.float32(0.25))
    assert torch.equal(by_density.indices, SparseDiff.from_dense(delta, density=0.25).indices)
    sd = SparseDiff(want.indices, want.values, (np.int64(9), np.int32(13)))
    assert sd.shape == torch.Size([9, 13]) and torch.equal(sd.to_dense(), want.to_dense())
    with pytest.raises(ValueError, match="k must be an int"):
        SparseDiff.from_dense(delta, k=np.float32(10))
    with pytest.raises(ValueError, match="k must be an int"):
        SparseDiff.from_dense(delta, k=np.bool_(True))
    with pytest.raises(ValueError, match="density must be in"):
        SparseDiff.from_dense(delta, density=np.float32("nan"))
    with pytest.raises(TypeError, match="shape must be a sequence of non-negative ints"):
        SparseDiff(want.indices, want.values, (np.float32(9), 13))
    with pytest.raises(TypeError, match="shape must be a sequence of non-negative ints"):
        SparseDiff(want.indices, want.values, (np.int64(-9), 13))
