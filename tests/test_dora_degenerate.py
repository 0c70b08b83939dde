"""dora_linear at degenerate sizes, on every path: the reference (the oracle), the fast CPU path (CPU's default),
both Triton variants (the interpreter here) and a 4-bit base through the same op.

- in_features = 0: every row of W + ΔW is empty, so n = 0 and c = m / n would be 0/0. The product terms are empty
  sums, so the layer is its base linear: y = bias (zeros without one), forward and backward finite, dbias = Σ dy,
  the adapters' and magnitude's gradients zero. (PEFT's own DoRA layer gives NaN there.)
- a zero row of W + ΔW inside an ordinary layer: that column is its bias (F.normalize's convention: a zero
  vector has a zero direction), the other columns are the float64 dense formula's.
- zero rows of x (M = 0) and out_features = 0: empty outputs of the right shape, zero (not NaN, not garbage)
  gradients, equal to the float64 reference.
"""
import pytest
import torch
from torch import nn

import peftkern
from peftkern.dora import op as dora_op
from peftkern.nn import DoRALinear, LoRALinear

from .conftest import ERROR_FLOOR, available_backends, rel_err

PATHS = [("reference", None), ("cpu", None), ("triton", "fused"), ("triton", "composite")]


def _path_id(path):
    return path[0] if path[1] is None else f"{path[0]}-{path[1]}"


def _skip_unless_available(backend, dtype=torch.float32):
    if backend not in available_backends("dora_linear", dtype):
        pytest.skip(f"the {backend} backend cannot run here")


def _leaves(M, K, N, r, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g, dtype=dtype)
    w = torch.randn(N, K, generator=g, dtype=dtype)
    a = torch.randn(r, K, generator=g, dtype=dtype)
    b = torch.randn(N, r, generator=g, dtype=dtype)
    mag = torch.rand(N, generator=g, dtype=dtype) + 0.5
    b_ = torch.randn(N, generator=g, dtype=dtype) if bias else None
    dy = torch.randn(M, N, generator=g, dtype=dtype)
    return [x, w, a, b, mag, b_], dy


def _step(path, tensors, dy, p, monkeypatch, dtype=None, weight_grad=True):
    """y and the gradients of x, weight, lora_a, lora_b, magnitude, bias on `path`, in `dtype` (default: as given)."""
    backend, mode = path
    if mode is not None:
        monkeypatch.setenv("PEFTKERN_DISPATCH", mode)
    leaves = [None if t is None else t.to(dtype or t.dtype, copy=True).requires_grad_(i != 1 or weight_grad)
              for i, t in enumerate(tensors)]
    x, w, a, b, mag, bias = leaves
    with peftkern.use_backend(backend):
        y = peftkern.dora_linear(x, w, a, b, mag, scaling=0.7, bias=bias, dropout_p=p, seed=11)
        y.backward(dy.to(y.dtype))
    return y.detach(), [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("path", PATHS, ids=_path_id)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_zero_in_features_gives_the_base_linear(path, p, dtype, bias, monkeypatch):
    _skip_unless_available(path[0], dtype)
    tensors, dy = _leaves(5, 0, 9, 3, torch.float32, bias=bias, seed=1)
    # x, weight and bias in dtype; lora_a, lora_b and magnitude float32 (the adapter rule allows it beside fp16)
    tensors = [t if t is None or i in (2, 3, 4) else t.to(dtype) for i, t in enumerate(tensors)]
    y, (dx, dw, da, db, dmag, dbias) = _step(path, tensors, dy.to(dtype), p, monkeypatch)
    expected = tensors[5].expand(5, 9) if bias else torch.zeros(5, 9, dtype=dtype)
    assert y.dtype == dtype and torch.equal(y, expected)
    assert dx.shape == (5, 0) and dw.shape == (9, 0) and da.shape == (3, 0)
    assert torch.equal(db, torch.zeros(9, 3)) and torch.equal(dmag, torch.zeros(9))
    if bias:
        torch.testing.assert_close(dbias, dy.to(dtype).sum(0), rtol=0, atol=0)
    # and the float64 reference agrees
    y64, grads64 = _step(("reference", None), tensors, dy, p, monkeypatch, dtype=torch.float64)
    assert torch.equal(y.double(), y64)
    for got, want in zip((db, dmag), (grads64[3], grads64[4])):
        assert torch.equal(got.double(), want)


@pytest.mark.parametrize("path", PATHS, ids=_path_id)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(0, 7, 9), (6, 7, 0), (0, 0, 4)], ids=lambda s: "MKN=%d,%d,%d" % s)
def test_zero_rows_and_zero_out_features(path, p, shape, monkeypatch):
    _skip_unless_available(path[0])
    M, K, N = shape
    tensors, dy = _leaves(M, K, N, 2, torch.float32, seed=2)
    y, grads = _step(path, tensors, dy, p, monkeypatch)
    y64, grads64 = _step(("reference", None), tensors, dy, p, monkeypatch, dtype=torch.float64)
    assert y.shape == (M, N)
    for name, got, want, leaf in zip(("x", "weight", "lora_a", "lora_b", "magnitude", "bias"), grads, grads64,
                                     tensors):
        assert got.shape == leaf.shape, name
        assert torch.equal(got, torch.zeros_like(leaf)), name  # no row or no column: nothing flows
        assert torch.equal(want, torch.zeros_like(want)), name


@pytest.mark.parametrize("path", PATHS, ids=_path_id)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_a_zero_row_of_the_adapted_weight_gives_its_bias(path, p, monkeypatch):
    """Rows 0 and 5 of W and of lora_b are zero, so W + ΔW has zero rows there (n = 0, as after pruning with a
    fresh adapter): those columns are the bias, the others the float64 dense formula's; gradients finite."""
    _skip_unless_available(path[0])
    M, K, N, r = 13, 17, 10, 3
    tensors, dy = _leaves(M, K, N, r, torch.float32, seed=3)
    x, w, a, b, mag, bias = tensors
    dead = [0, 5]
    w[dead], b[dead] = 0.0, 0.0
    y, grads = _step(path, tensors, dy, p, monkeypatch, weight_grad=False)
    assert torch.equal(y[:, dead], bias[dead].expand(M, len(dead)))
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[4][dead], torch.zeros(len(dead)))  # dmag: y does not depend on those magnitudes
    if p == 0.0:  # the dense float64 formula on the live columns
        x64, w64, a64, b64, m64, bias64 = (t.double() for t in tensors)
        v = w64 + 0.7 * b64 @ a64
        c = m64 / v.norm(dim=1)
        live = [j for j in range(N) if j not in dead]
        want = (c * (x64 @ v.t()) + bias64)[:, live]
        torch_own = (c.float() * (x @ (w + 0.7 * b @ a).t()) + bias)[:, live]
        assert rel_err(y[:, live], want) < 2 * rel_err(torch_own, want) + ERROR_FLOOR[torch.float32]
    y64, grads64 = _step(("reference", None), tensors, dy, p, monkeypatch, dtype=torch.float64, weight_grad=False)
    assert rel_err(y, y64) < 1e-5
    for name, got, want in zip(("x", "weight", "lora_a", "lora_b", "magnitude", "bias"), grads, grads64):
        if want is not None:
            assert rel_err(got, want) < 1e-5, name


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_4bit_base_with_zero_in_features(backend, p):
    """dora_linear_fwd/bwd called directly with a [9, 0] 4-bit weight's raw parts (empty codes and absmax; a
    QuantizedWeight itself refuses a zero dimension): y is the bias, gradients as in the dense case."""
    if backend not in available_backends("dora_linear", torch.float32):
        pytest.skip(f"the {backend} backend cannot run here")
    code = peftkern.QuantizedWeight.quantize(torch.randn(4, 64)).code
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 0).requires_grad_()
    a, b = torch.randn(2, 0).requires_grad_(), torch.randn(9, 2, generator=g).requires_grad_()
    mag = (torch.rand(9, generator=g) + 0.5).requires_grad_()
    bias = torch.randn(9, generator=g).requires_grad_()
    seed = torch.tensor(7) if p > 0 else None
    with peftkern.use_backend(backend):
        y, _z, _s, n = dora_op.forward_op(
            x=x, weight=torch.empty(0, dtype=torch.uint8), quant=[torch.empty(0), code], out_features=9, blocksize=64,
            weight_dtype=torch.float32, lora_a=a, lora_b=b, magnitude=mag, bias=bias, weight_norm=None, scaling=0.7,
            dropout_p=p, seed=seed, keep_z=True)
        dy = torch.randn(5, 9, generator=g)
        y.backward(dy)
    assert torch.equal(y, bias.detach().expand(5, 9)) and torch.equal(n, torch.zeros(9))
    assert torch.equal(b.grad, torch.zeros(9, 2)) and torch.equal(mag.grad, torch.zeros(9))
    torch.testing.assert_close(bias.grad, dy.sum(0), rtol=0, atol=0)
    assert x.grad.shape == (5, 0) and a.grad.shape == (2, 0)


def test_module_with_zero_in_features_is_its_base_linear():
    """DoRALinear(0, 8) computes what LoRALinear(0, 8) and nn.Linear(0, 8) compute: the bias, train and eval."""
    torch.manual_seed(5)
    base = nn.Linear(0, 8)
    with torch.no_grad():
        base.bias.copy_(torch.randn(8))  # nn.Linear(0, n) initialises its bias to zeros
    x = torch.randn(3, 0)
    dora, lora = DoRALinear.from_linear(base), LoRALinear.from_linear(base)
    assert torch.equal(dora.magnitude.detach(), torch.zeros(8))
    for mode in (True, False):
        dora.train(mode)
        y = dora(x)
        assert torch.equal(y, base(x)) and torch.equal(y, lora(x))
    dora.train()
    dora(x).sum().backward()
    assert torch.equal(dora.magnitude.grad, torch.zeros(8)) and torch.equal(dora.lora_b.grad, torch.zeros(8, 8))
    fresh = DoRALinear(0, 8)
    assert torch.isfinite(fresh(x)).all() and torch.equal(fresh(x), fresh.bias.detach().expand(3, 8))


def test_merge_of_a_layer_with_a_zero_row_equals_its_forward():
    """merge_() scales by the same c as the forward (0 on a zero row of W + ΔW): the merged layer computes what
    the unmerged one does, no NaN row, and unmerge_ restores the weight bit for bit."""
    torch.manual_seed(6)
    base = nn.Linear(11, 7)
    with torch.no_grad():
        base.weight[2] = 0.0
    layer = DoRALinear.from_linear(base, r=2, alpha=4)
    with torch.no_grad():
        layer.magnitude.copy_(torch.rand(7) + 0.5)  # a trained-looking magnitude, nonzero on the dead row too
    original = layer.weight.detach().clone()
    x = torch.randn(5, 11)
    layer.eval()
    unmerged = layer(x).detach()
    assert torch.equal(unmerged[:, 2], base.bias.detach()[2].expand(5))
    layer.merge_()
    assert torch.isfinite(layer.weight).all() and torch.equal(layer.weight[2], torch.zeros(11))
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    layer.unmerge_()
    assert torch.equal(layer.weight, original)
