"""peftkern.dora_linear on the default backend (the fast CPU path here), and its ops on every backend.

- equals PEFT's own DoRA Linear layer, output and every gradient (x, lora_A, lora_B, magnitude, bias), fp32 and
  fp64, several shapes, bias or not, dropout 0 and > 0 (PEFT's dropout module replaced by one applying the mask
  lora_linear draws for the same seed);
- gradcheck in float64 (the norm held fixed through the op's weight_norm input: n is a constant in backward, so
  a finite difference through the public function would see it move);
- opcheck of the op pair over the family's examples (dense and 4-bit bases) on every backend,
  torch.compile(fullgraph=True) forward and backward;
- no [out, in]-sized tensor allocated in forward or backward (dense and 4-bit weights, dropout on and off);
- the eval-mode norm cache: hits, and every in-place change (lora_b through .data or an optimizer step, the
  weight, the magnitude, scaling) shows in the next output;
- a QuantizedWeight base equals dora_linear over its dequantized weight; bad input raises naming the argument.
"""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import peftkern
from peftkern import QuantizedWeight
from peftkern.core import dropout as ref_dropout
from peftkern.dora import cpu as dora_cpu, examples as dora_examples, op as dora_op
from peftkern.quant import fourbit

from .conftest import DEVICE, ERROR_FLOOR, available_backends, rel_err

peft = pytest.importorskip("peft", reason="the comparison with PEFT's DoRA layer needs peft (in the test extras)")


class _Host(nn.Module):
    def __init__(self, k, n, bias, dtype):
        super().__init__()
        self.proj = nn.Linear(k, n, bias=bias, dtype=dtype)

    def forward(self, x):
        return self.proj(x)


class _MaskDropout(nn.Module):
    """PEFT's dropout slot filled with peftkern's mask for `seed` (keep / (1 - p) per element of x)."""

    def __init__(self, p, seed):
        super().__init__()
        self.p, self.seed = p, seed

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])
        mult = ref_dropout.multiplier(x2.shape[0], x2.shape[1], self.seed, self.p, dtype=x.dtype, device=x.device)
        return (x2 * mult).view_as(x)


def _peft_layer(k, n, r, alpha, p, bias, dtype, seed):
    torch.manual_seed(seed)
    host = _Host(k, n, bias, dtype)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p, use_dora=True, init_lora_weights=False,
                          target_modules=["proj"])
    model = peft.get_peft_model(host, cfg)
    layer = model.base_model.model.proj
    with torch.no_grad():  # a trained-looking magnitude: c = m / n away from 1
        mag = layer.lora_magnitude_vector["default"].weight
        mag.mul_(torch.rand_like(mag) + 0.5)
    if p > 0:
        layer.lora_dropout["default"] = _MaskDropout(p, seed=1234)
    layer.train()
    return layer


def _peft_step(layer, x, dy):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    base = layer.base_layer
    grads = [x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad,
             layer.lora_magnitude_vector["default"].weight.grad]
    grads.append(base.bias.grad if base.bias is not None else None)
    return y.detach(), grads


def _ours_step(layer, x, dy, p):
    base = layer.base_layer
    leaves = [x.clone().requires_grad_(), layer.lora_A["default"].weight.detach().clone().requires_grad_(),
              layer.lora_B["default"].weight.detach().clone().requires_grad_(),
              layer.lora_magnitude_vector["default"].weight.detach().clone().requires_grad_()]
    bias = base.bias.detach().clone().requires_grad_() if base.bias is not None else None
    y = peftkern.dora_linear(leaves[0], base.weight.detach(), leaves[1], leaves[2], leaves[3],
                             scaling=layer.scaling["default"], bias=bias, dropout_p=p, seed=1234)
    y.backward(dy)
    return y.detach(), [t.grad for t in leaves] + [bias.grad if bias is not None else None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(2, 5, 33, 50, 3), (1, 17, 64, 40, 1), (3, 4, 24, 24, 8)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_peft_dora_layer(dtype, p, shape, bias):
    b, t, k, n, r = shape
    layer = _peft_layer(k, n, r, alpha=2 * r, p=p, bias=bias, dtype=dtype, seed=sum(shape))
    if bias:  # frozen in PEFT; made trainable here so that its gradient is compared too
        layer.base_layer.bias.requires_grad_(True)
    x = torch.randn(b, t, k, dtype=dtype)
    dy = torch.randn(b, t, n, dtype=dtype)
    y_ref, g_ref = _peft_step(layer, x, dy)
    y, g = _ours_step(layer, x, dy, p)
    bound = 1e-5 if dtype == torch.float32 else 1e-11  # two computations in the same dtype, summed differently
    assert rel_err(y, y_ref) < bound
    names = ["x", "lora_a", "lora_b", "magnitude", "bias"]
    for name, ours, theirs in zip(names, g, g_ref):
        if name == "bias" and not bias:
            continue
        assert ours is not None and theirs is not None, name
        assert rel_err(ours, theirs) < bound, name


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_gradcheck_float64(p, backend):
    torch.manual_seed(0)
    m, k, n, r = 5, 11, 9, 3
    x, w = torch.randn(m, k, dtype=torch.float64), torch.randn(n, k, dtype=torch.float64)
    a, b = torch.randn(r, k, dtype=torch.float64), torch.randn(n, r, dtype=torch.float64)
    mag, bias = torch.rand(n, dtype=torch.float64) + 0.5, torch.randn(n, dtype=torch.float64)
    norm = torch.rand(n, dtype=torch.float64) + 0.5
    seed = torch.tensor(11) if p else None
    leaves = [t.clone().requires_grad_() for t in (x, w, a, b, mag, bias)]

    def op(x_, w_, a_, b_, m_, bias_):
        return dora_op.forward_op(x=x_, **fourbit.op_args(w_), lora_a=a_, lora_b=b_, magnitude=m_, bias=bias_,
                                  weight_norm=norm, scaling=0.6, dropout_p=p, seed=seed, keep_z=True)[0]

    with peftkern.use_backend(backend):
        assert torch.autograd.gradcheck(op, leaves)
        # through the public function, for the inputs the norm does not depend on
        assert torch.autograd.gradcheck(
            lambda x_, m_, bias_: peftkern.dora_linear(x_, w, a, b, m_, scaling=0.6, bias=bias_, dropout_p=p,
                                                       seed=11),
            [leaves[0], leaves[4], leaves[5]])


def test_norm_is_the_row_norm_of_the_merged_weight_and_a_constant():
    torch.manual_seed(1)
    x, w = torch.randn(4, 30, dtype=torch.float64), torch.randn(20, 30, dtype=torch.float64)
    a, b = torch.randn(2, 30, dtype=torch.float64).requires_grad_(), torch.randn(20, 2, dtype=torch.float64)
    mag = torch.rand(20, dtype=torch.float64)
    _, _, _, n = torch.ops.peftkern.dora_linear_fwd(x=x, **fourbit.op_args(w), lora_a=a, lora_b=b, magnitude=mag,
                                                    bias=None, weight_norm=None, scaling=0.8, dropout_p=0.0,
                                                    seed=None, keep_z=False)
    assert torch.allclose(n, torch.linalg.vector_norm(w + 0.8 * b @ a, dim=1), rtol=1e-13, atol=0)
    assert not n.requires_grad


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("case", sorted(dora_examples.cases()))
def test_opcheck(backend, case):
    """torch.library.opcheck on both ops, over the family's representative arguments (dense and 4-bit bases, bias,
    dropout, a frozen magnitude with a given norm)."""
    if backend not in available_backends("dora_linear", torch.float32):
        pytest.skip(f"backend {backend} unavailable here")
    torch.manual_seed(2)
    fwd = dora_examples.cases(device=DEVICE)[case]
    with peftkern.use_backend(backend):
        torch.library.opcheck(torch.ops.peftkern.dora_linear_fwd.default, (), fwd)
        outputs = torch.ops.peftkern.dora_linear_fwd(**fwd)
        bwd = dora_examples.backward_args(fwd, outputs, backend)
        torch.library.opcheck(torch.ops.peftkern.dora_linear_bwd.default, (), bwd)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("training", [True, False])
def test_torch_compile_fullgraph_forward_backward(compile_backend, training):
    torch.manual_seed(3)
    x, w = torch.randn(2, 3, 16, requires_grad=True), torch.randn(10, 16)
    a, b = torch.randn(4, 16, requires_grad=True), torch.randn(10, 4, requires_grad=True)
    mag, bias = (torch.rand(10) + 0.5).requires_grad_(), torch.randn(10)

    def step(x_, a_, b_, m_):
        y = peftkern.dora_linear(x_, w, a_, b_, m_, scaling=0.5, bias=bias, dropout_p=0.1, training=training, seed=4)
        return (y * y).sum()

    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    results = []
    for fn in (step, compiled):
        for t in (x, a, b, mag):
            t.grad = None
        loss = fn(x, a, b, mag)
        loss.backward()
        results.append([loss.detach()] + [t.grad.clone() for t in (x, a, b, mag)])
    for eager, comp in zip(*results):
        assert rel_err(comp, eager) < 1e-5


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor any op allocates (views of an input, e.g. weight.t(), are not new memory)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        storages = {a.untyped_storage().data_ptr() for a in inputs}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in storages:
                self.shapes.append(tuple(t.shape))
        return out


def _named(x, weight, a, b, mag, bias, p, *, dy, seed=5, backend="cpu"):
    """The arguments dora_linear's implementations receive (forward, backward; the backward's n, S and z are
    filled in from the forward's results with _replace) for a call over `weight` (a tensor or a QuantizedWeight)."""
    seed_t = torch.tensor(seed)
    fwd = dora_op.forward_op.named(x=x, **fourbit.op_args(weight), lora_a=a, lora_b=b, magnitude=mag, bias=bias,
                                   weight_norm=None, scaling=0.5, dropout_p=p, seed=seed_t, keep_z=True)
    empty = x.new_empty(0)
    bwd = dora_op.backward_op.named(dy=dy, x=x, **fourbit.op_args(weight), lora_a=a, lora_b=b, magnitude=mag,
                                    n=empty, s_down=empty, z=x.new_empty(dy.shape), scaling=0.5, dropout_p=p,
                                    seed=seed_t, need_x=True, need_weight=False, need_lora_a=True, need_lora_b=True,
                                    need_magnitude=True, need_bias=True, backend=backend)
    return fwd, bwd


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_no_out_by_in_tensor_is_ever_allocated(quantized, p):
    """Every op's output inside the fast CPU path's forward and backward (called directly with the op's arguments: a
    dispatch mode does not see inside a custom op) is recorded; none has the weight's element count (x, y, z and
    dx are smaller here: M < out, M < in). The recorder does see the dense weight a plain merge would make."""
    torch.manual_seed(4)
    m, k, n, r = 6, 40, 48, 4
    x, w = torch.randn(m, k), torch.randn(n, k)
    a, b, mag, bias = torch.randn(r, k), torch.randn(n, r), torch.rand(n) + 0.5, torch.randn(n)
    dy = torch.randn(m, n)
    full = n * k
    weight = QuantizedWeight.quantize(w, blocksize=64) if quantized else w
    fwd, bwd = _named(x, weight, a, b, mag, bias, p, dy=dy)

    def run():
        y, z, s, nrm = dora_cpu.forward(fwd)
        dora_cpu.backward(bwd._replace(n=nrm, s_down=s, z=z))
    with _Shapes() as rec:
        run()
    assert rec.shapes, "nothing recorded"
    biggest = max(s[0] * s[1] if len(s) == 2 else (s[0] if s else 1) for s in rec.shapes)
    assert biggest < full, f"a tensor of {biggest} elements (the weight has {full})"
    with _Shapes() as rec:
        _ = w + 0.5 * b @ a  # what PEFT forms
    assert any(s == (n, k) for s in rec.shapes)


def test_quantized_weight_equals_the_dequantized_dense_weight():
    torch.manual_seed(5)
    w = torch.randn(24, 64)
    qw = QuantizedWeight.quantize(w, blocksize=64)
    dense = qw.dequantize()
    x, a, b = torch.randn(7, 64), torch.randn(3, 64) * 0.3, torch.randn(24, 3) * 0.3
    mag, bias = torch.rand(24) + 0.5, torch.randn(24)
    dy = torch.randn(7, 24)
    results = []
    for weight in (qw, dense):
        leaves = [t.clone().requires_grad_() for t in (x, a, b, mag, bias)]
        y = peftkern.dora_linear(leaves[0], weight, *leaves[1:4], scaling=0.5, bias=leaves[4], dropout_p=0.2, seed=9)
        y.backward(dy)
        results.append([y.detach()] + [t.grad for t in leaves])
    for got, want in zip(*results):
        assert rel_err(got, want) < 2e-6


def test_half_activations_with_float32_adapters():
    """PEFT's default mix: float16 x and weight, float32 adapters and magnitude; the result has x's dtype, the
    adapters' gradients come back in float32, and every result is within the project's error bound of the float64
    oracle (tests/conftest.py): 2x the error of PEFT's own eager computation in the same dtypes (spelled out below),
    plus the floor."""
    torch.manual_seed(6)
    m, k, n, r, p, seed = 9, 48, 40, 4, 0.1, 2
    x, w, bias = torch.randn(m, k).half(), (torch.randn(n, k) / 7).half(), torch.randn(n).half()
    a, b, mag = torch.randn(r, k) * 0.2, torch.randn(n, r) * 0.2, torch.rand(n) + 0.5
    dy = torch.randn(m, n).half()
    mult = ref_dropout.multiplier(m, k, seed, p, dtype=torch.float32, device="cpu")

    def peft_eager(x_, a_, b_, m_):  # PEFT 0.21's DoRA Linear path with dropout, op for op
        result = nn.functional.linear(x_, w, bias)
        x32 = x_.to(torch.float32)
        norm = torch.linalg.norm(w.to(torch.float32) + 0.5 * (b_ @ a_), dim=1).detach()
        c = (m_ / norm).view(1, -1)
        d = x32 * mult
        out = (c - 1) * nn.functional.linear(d, w.to(torch.float32)) + c * ((d @ a_.t()) @ b_.t()) * 0.5
        return (result + out).to(torch.float16)

    def run(fn, dt, wdt):
        leaves = [t.to(d, copy=True).requires_grad_() for t, d in ((x, dt), (a, wdt), (b, wdt), (mag, wdt))]
        y = fn(*leaves)
        y.backward(dy.to(dt))
        return [y] + [t.grad for t in leaves]

    def ours(x_, a_, b_, m_):
        return peftkern.dora_linear(x_, w.to(x_.dtype), a_, b_, m_, scaling=0.5, bias=bias.to(x_.dtype),
                                    dropout_p=p, seed=seed)

    got, eager, oracle = (run(ours, torch.float16, torch.float32), run(peft_eager, torch.float16, torch.float32),
                          run(ours, torch.float64, torch.float64))
    assert got[0].dtype == torch.float16 and all(g.dtype == torch.float32 for g in got[2:])
    for name, g, e, o in zip(["y", "x", "lora_a", "lora_b", "magnitude"], got, eager, oracle):
        assert rel_err(g, o) < 2 * rel_err(e, o) + ERROR_FLOOR[torch.float16], name


def test_autocast_keeps_the_magnitude_in_float32():
    torch.manual_seed(7)
    x, w = torch.randn(4, 16), torch.randn(8, 16)
    a, b, mag = torch.randn(2, 16), torch.randn(8, 2), (torch.rand(8) + 0.5).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = peftkern.dora_linear(x, w, a, b, mag, scaling=0.5)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert mag.grad.dtype == torch.float32
    want = peftkern.dora_linear(x.bfloat16().double(), w.bfloat16().double(), a.bfloat16().double(),
                                b.bfloat16().double(), mag.detach().double(), scaling=0.5)
    assert rel_err(y, want) < 2 * 2 ** -8 + ERROR_FLOOR[torch.bfloat16]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_backend_matches_the_oracle(backend, quantized, p):
    """The fast CPU path and the Triton backend (dense and 4-bit bases through the one op) against the oracle
    (the reference backend in float64 on the same inputs): output and every gradient within 2x the reference's own
    float32 error plus the floor."""
    if backend not in available_backends("dora_linear", torch.float32):
        pytest.skip(f"backend {backend} unavailable here")
    torch.manual_seed(14)
    m, k, n, r = 13, 64, 24, 3
    w = torch.randn(n, k) / 8
    weight = QuantizedWeight.quantize(w, blocksize=64) if quantized else w
    x, bias, dy = torch.randn(m, k), torch.randn(n), torch.randn(m, n)
    a, b, mag = torch.randn(r, k) / 8, torch.randn(n, r) / 2, torch.rand(n) + 0.5

    def run(name, dt):
        base = weight if quantized else weight.to(dt)
        leaves = [t.to(dt, copy=True).requires_grad_() for t in (x, a, b, mag, bias)]
        with peftkern.use_backend(name):
            y = peftkern.dora_linear(leaves[0], base, *leaves[1:4], scaling=0.7, bias=leaves[4], dropout_p=p,
                                     seed=21)
            y.backward(dy.to(dt))
        return [y.detach()] + [t.grad for t in leaves]

    got, own, oracle = run(backend, torch.float32), run("reference", torch.float32), run("reference", torch.float64)
    for name, g, e, o in zip(["y", "x", "lora_a", "lora_b", "magnitude", "bias"], got, own, oracle):
        assert g.dtype == torch.float32, name
        assert rel_err(g, o) < 2 * rel_err(e, o) + ERROR_FLOOR[torch.float32], name


# ---- the eval-mode norm cache --------------------------------------------------------------------

def _eval_inputs(seed=8):
    torch.manual_seed(seed)
    x, w = torch.randn(5, 24), nn.Parameter(torch.randn(16, 24), requires_grad=False)
    a, b = nn.Parameter(torch.randn(3, 24)), nn.Parameter(torch.randn(16, 3))
    mag = nn.Parameter(torch.rand(16) + 0.5)
    return x, w, a, b, mag


def _eval_call(x, w, a, b, mag, scaling=0.5):
    with torch.no_grad():
        return peftkern.dora_linear(x, w, a, b, mag, scaling=scaling, training=False)


def _fresh(x, w, a, b, mag, scaling=0.5):
    with torch.no_grad():
        return peftkern.dora_linear(x, w, a, b, mag, scaling=scaling, training=True)  # training: never cached


def test_eval_cache_hits_and_equals_the_uncached_result():
    dora_op.clear_norm_cache()
    x, w, a, b, mag = _eval_inputs()
    y1 = _eval_call(x, w, a, b, mag)
    assert len(dora_op._norm_cache) == 1
    entry_n = dora_op._norm_cache.get(w, a, b, 0.5, x.dtype, None)
    assert entry_n is not None
    y2 = _eval_call(x, w, a, b, mag)
    assert torch.equal(y1, y2) and torch.equal(y1, _fresh(x, w, a, b, mag))


@pytest.mark.parametrize("change", ["lora_b.data", "lora_b optimizer step", "lora_a copy_", "weight no_grad add_",
                                    "magnitude.data", "scaling", "lora_b replaced"])
def test_eval_cache_never_serves_a_stale_norm(change):
    dora_op.clear_norm_cache()
    x, w, a, b, mag = _eval_inputs()
    scaling = 0.5
    before = _eval_call(x, w, a, b, mag)
    if change == "lora_b.data":
        b.data.mul_(1.5)  # bypasses the version counter
    elif change == "lora_b optimizer step":
        b.grad = torch.randn_like(b)
        torch.optim.SGD([b], lr=0.1).step()
    elif change == "lora_a copy_":
        with torch.no_grad():
            a.copy_(torch.randn_like(a))
    elif change == "weight no_grad add_":
        with torch.no_grad():
            w.add_(0.1)
    elif change == "magnitude.data":
        mag.data.mul_(2.0)
    elif change == "scaling":
        scaling = 0.9
    elif change == "lora_b replaced":
        b = nn.Parameter(b.detach() * 1.5)
    after = _eval_call(x, w, a, b, mag, scaling)
    assert not torch.equal(before, after)
    assert torch.equal(after, _fresh(x, w, a, b, mag, scaling))


# ---- bad input ----------------------------------------------------------------------------------

def _good():
    return dict(x=torch.randn(3, 8), weight=torch.randn(6, 8), lora_a=torch.randn(2, 8), lora_b=torch.randn(6, 2),
                magnitude=torch.rand(6))


@pytest.mark.parametrize("name,value,error,match", [
    ("magnitude", torch.rand(5), ValueError, "magnitude must have shape \\(6,\\)"),
    ("magnitude", torch.rand(6, 1), ValueError, "magnitude must be 1-D"),
    ("magnitude", torch.rand(6, dtype=torch.float64), TypeError, "magnitude must have x's dtype"),
    ("magnitude", torch.ones(6, dtype=torch.int64), TypeError, "magnitude must be float16"),
    ("magnitude", [1.0] * 6, TypeError, "magnitude must be a torch.Tensor"),
    ("lora_b", torch.randn(5, 2), ValueError, "lora_b must have shape"),
    ("weight", torch.randn(6, 7), ValueError, "x's last dim must equal weight's in_features"),
])
def test_bad_input_raises_naming_the_argument(name, value, error, match):
    args = _good()
    args[name] = value
    with pytest.raises(error, match=match):
        peftkern.dora_linear(args["x"], args["weight"], args["lora_a"], args["lora_b"], args["magnitude"])


def test_bad_scalars_raise():
    args = _good()
    with pytest.raises(ValueError, match="dropout_p"):
        peftkern.dora_linear(*args.values(), dropout_p=1.0)
    with pytest.raises(TypeError, match="training"):
        peftkern.dora_linear(*args.values(), training=1)
    with pytest.raises(ValueError, match="scaling"):
        peftkern.dora_linear(*args.values(), scaling=float("nan"))


def test_eval_cache_entries_go_with_their_tensors():
    """A layer rebuilt per call (or a deleted one) leaves no entry behind: entries hold the weight and adapters
    weakly and are dropped when one of them is garbage-collected."""
    import gc

    dora_op.clear_norm_cache()
    x, w, a, b, mag = _eval_inputs()
    _eval_call(x, w, a, b, mag)
    assert len(dora_op._norm_cache) == 1
    del b
    gc.collect()
    assert len(dora_op._norm_cache) == 0
    b2 = nn.Parameter(torch.randn(16, 3))
    _eval_call(x, w, a, b2, mag)
    assert len(dora_op._norm_cache) == 1
    del w
    gc.collect()
    assert len(dora_op._norm_cache) == 0


@pytest.mark.parametrize("mode", ["fused", "composite"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_triton_backend_through_the_op(mode, dtype, p, monkeypatch):
    """The public function on the Triton backend (the interpreter here), each variant forced: output and every
    gradient within the bound of the float64 reference (2x PyTorch's own error in the dtype, through the same
    formula on the fast CPU path, plus the floor); the dropout mask is the reference's."""
    if "triton" not in available_backends("dora_linear", dtype):
        pytest.skip("the Triton backend cannot run here (Triton missing)")
    monkeypatch.setenv("PEFTKERN_DISPATCH", mode)
    torch.manual_seed(12)
    m, k, n, r = 33, 40, 50, 3
    x, w, bias = torch.randn(m, k), torch.randn(n, k) / 6, torch.randn(n)
    a, b, mag = torch.randn(r, k) / 6, torch.randn(n, r) / 2, torch.rand(n) + 0.5
    dy = torch.randn(m, n)

    def run(backend, dt):
        leaves = [t.to(dt, copy=True).requires_grad_() for t in (x, a, b, mag)]
        with peftkern.use_backend(backend):
            y = peftkern.dora_linear(leaves[0], w.to(dt), *leaves[1:], scaling=0.7, bias=bias.to(dt), dropout_p=p,
                                     seed=5)
            y.backward(dy.to(dt))
        return [y.detach()] + [t.grad for t in leaves]

    got, torch_own, oracle = run("triton", dtype), run("cpu", dtype), run("reference", torch.float64)
    for name, g, e, o in zip(["y", "x", "lora_a", "lora_b", "magnitude"], got, torch_own, oracle):
        assert rel_err(g, o) < 2 * rel_err(e, o) + ERROR_FLOOR[dtype], name


@pytest.mark.parametrize("variant", ["fused", "composite"])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_no_out_by_in_tensor_on_the_triton_paths(variant, p):
    """Both Triton variants, forward and backward, every torch allocation recorded (on CPU the kernels run in the
    interpreter): nothing of the weight's size; the norm is formed tile by tile in the kernel's registers."""
    if "triton" not in available_backends("dora_linear", torch.float32):
        pytest.skip("the Triton backend is unavailable here (Triton missing)")
    from peftkern.dora import triton as dora_triton

    impl = peftkern.core.dispatch.variants("dora_linear", "triton")[variant]
    torch.manual_seed(13)
    m, k, n, r = 6, 40, 48, 4
    x, w = torch.randn(m, k), torch.randn(n, k)
    a, b, mag, bias = torch.randn(r, k), torch.randn(n, r), torch.rand(n) + 0.5, torch.randn(n)
    dy = torch.randn(m, n)
    fwd, bwd = _named(x, w, a, b, mag, bias, p, dy=dy, backend="triton")
    with peftkern.use_backend("triton"), _Shapes() as rec:
        y, z, s_down, nrm = impl.forward(fwd)
        grads = impl.backward(bwd._replace(n=nrm, s_down=s_down, z=z))
    assert impl.forward is getattr(dora_triton, f"forward_{variant}") and rec.shapes
    biggest = max(torch.Size(s).numel() for s in rec.shapes)
    assert biggest < n * k, f"a tensor of {biggest} elements (the weight has {n * k})"
    assert y.shape == (m, n) and grads[0].shape == (m, k) and grads[4].shape == (n,)
