"""lora_linear over a peftkern.QuantizedWeight (a 4-bit base), the fast CPU path and the oracle.

- equals lora_linear over the dequantized weight (rounded as bitsandbytes' matmul_4bit rounds it: to the
  weight's dtype, then x's), forward and every gradient, dropout with the same seed included, fp32 and fp64;
- gradcheck in float64;
- no tensor of the weight's [out, in] size is allocated, forward or backward (every op's outputs recorded);
- autocast casts x and the adapters but not the packed weight's block scales; bad input raises before work.
The 4-bit format itself (bit-exact with bitsandbytes) is tests/test_quant.py's.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import peftkern
from peftkern import QuantizedWeight
from peftkern.core import dispatch
from peftkern.lora import cpu as lora_cpu, op as lora_op
from peftkern.quant import fourbit

from .conftest import DEVICE, ERROR_FLOOR, available_backends, rel_err


def _inputs(m=6, k=40, n=48, r=4, dtype=torch.float32, weight_dtype=None, bias=True):
    w = torch.randn(n, k, dtype=weight_dtype or dtype)
    qw = QuantizedWeight.quantize(w, quant_type="nf4", blocksize=64, double_quant=True)
    x = torch.randn(m, k, dtype=dtype)
    a = torch.randn(r, k, dtype=dtype) * 0.3
    b = torch.randn(n, r, dtype=dtype) * 0.3
    bb = torch.randn(n, dtype=dtype) if bias else None
    return x, qw, a, b, bb


def _step(x, weight, a, b, bias, p=0.0, seed=5):
    leaves = [t.clone().requires_grad_() for t in (x, a, b)]
    leaves += [bias.clone().requires_grad_()] if bias is not None else []
    y = peftkern.lora_linear(leaves[0], weight, leaves[1], leaves[2], bias=leaves[3] if bias is not None else None,
                             scaling=0.75, dropout_p=p, seed=seed)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y))
    return [y.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("double_quant,quant_type", [(True, "nf4"), (False, "fp4")])
def test_equals_lora_linear_over_the_dequantized_weight(dtype, p, double_quant, quant_type, monkeypatch):
    monkeypatch.setattr(fourbit, "BLOCK_ELEMENTS", 7 * 40)  # several row blocks, one straddling absmax blocks
    x, _, a, b, bias = _inputs(dtype=dtype)
    qw = QuantizedWeight.quantize(torch.randn(48, 40, dtype=dtype), quant_type=quant_type, blocksize=64,
                                  double_quant=double_quant)
    dense = qw.dequantize()
    assert dense.dtype == dtype and dense.shape == (48, 40)
    got = _step(x, qw, a, b, bias, p)
    want = _step(x, dense, a, b, bias, p)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_deq_is_rounded_to_the_weights_dtype_then_xs():
    """A bfloat16 weight beside a float32 x: bitsandbytes dequantizes to bfloat16, then casts to x's dtype."""
    x, qw, a, b, bias = _inputs(weight_dtype=torch.bfloat16)
    assert qw.dtype == torch.bfloat16
    got = _step(x, qw, a, b, bias)
    want = _step(x, qw.dequantize().to(torch.float32), a, b, bias)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_gradcheck_float64():
    x, qw, a, b, bias = _inputs(m=3, k=20, n=12, r=2, dtype=torch.float64)
    args = [t.clone().requires_grad_() for t in (x, a, b, bias)]

    def f(x_, a_, b_, bias_):
        return peftkern.lora_linear(x_, qw, a_, b_, bias=bias_, scaling=0.5, dropout_p=0.25, seed=3)

    assert torch.autograd.gradcheck(f, args)


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def _named_args(x, qw, a, b, bias, p, *, dy, s_down=None, seed=5, backend="cpu"):
    """The arguments lora_linear's implementations receive (forward, backward) for a call over qw."""
    seed_t = torch.tensor(seed)
    fwd = lora_op.forward_op.named(x=x, **fourbit.op_args(qw), lora_a=a, lora_b=b, bias=bias, scaling=0.75,
                                   dropout_p=p, seed=seed_t)
    bwd = lora_op.backward_op.named(dy=dy, x=x, **fourbit.op_args(qw), lora_a=a, lora_b=b, s_down=s_down,
                                    scaling=0.75, dropout_p=p, seed=seed_t, need_x=True, need_weight=False,
                                    need_lora_a=True, need_lora_b=True, need_bias=bias is not None, backend=backend)
    return fwd, bwd


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_no_dense_weight_is_ever_allocated(p, monkeypatch):
    """The fast CPU path's forward and backward, every op's output recorded (a dispatch mode does
    not see inside a custom op, so the implementation is called directly, with the op's arguments): none has
    the [out, in] weight's element count (x, y and dx are smaller here: M < out and M < in); the products
    are right. The same recorder does see the dense weight that QuantizedWeight.dequantize() makes."""
    x, qw, a, b, bias = _inputs(m=6, k=40, n=48)
    dy = torch.randn(6, 48)
    full = 48 * 40

    def biggest_allocation():
        fwd, bwd = _named_args(x, qw, a, b, bias, p, dy=dy)
        with _Shapes() as rec:
            y, s_down = lora_cpu.forward(fwd)
            dx, _, da, db, dbias = lora_cpu.backward(bwd._replace(s_down=s_down))
        assert rec.shapes, "nothing recorded"
        return max(torch.Size(s).numel() for s in rec.shapes), (y, dx, da, db, dbias)

    largest, got = biggest_allocation()  # default block budget: at most half the rows of a small weight
    assert largest < full
    monkeypatch.setattr(fourbit, "BLOCK_ELEMENTS", 10 * 40)  # blocks of 10 of the 48 rows
    assert biggest_allocation()[0] < full
    with _Shapes() as rec:  # the recorder does see a dense weight where one is made
        qw.dequantize()
    assert max(torch.Size(s).numel() for s in rec.shapes) >= full
    leaves = [t.clone().requires_grad_() for t in (x, a, b, bias)]
    y = peftkern.lora_linear(leaves[0], qw.dequantize(), leaves[1], leaves[2], bias=leaves[3], scaling=0.75,
                             dropout_p=p, seed=5)
    y.backward(dy)
    for g, w in zip(got, [y.detach()] + [t.grad for t in leaves]):
        torch.testing.assert_close(g, w)


def test_autocast_leaves_the_block_scales_alone():
    x, qw, a, b, bias = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = peftkern.lora_linear(x, qw, a, b, bias=bias, scaling=0.5)
        want = peftkern.lora_linear(x, qw.dequantize(), a, b, bias=bias, scaling=0.5)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)


def test_leading_dims_and_a_frozen_x():
    x, qw, a, b, bias = _inputs()
    x3 = x.view(2, 3, 40)
    y = peftkern.lora_linear(x3, qw, a.requires_grad_(), b, bias=bias)
    assert y.shape == (2, 3, 48)
    y.sum().backward()
    assert a.grad is not None and a.grad.shape == a.shape


@pytest.mark.parametrize("case,error,match", [
    ("x_width", ValueError, "x's last dim"),
    ("lora_a", ValueError, "lora_a"),
    ("lora_b", ValueError, "lora_b"),
    ("bias", ValueError, "bias"),
    ("bias_dtype", TypeError, "bias"),
    ("dropout", ValueError, "dropout_p"),
])
def test_bad_input_raises_naming_the_argument(case, error, match):
    x, qw, a, b, bias = _inputs()
    kwargs = dict(bias=bias)
    if case == "x_width":
        x = torch.randn(6, 41)
    elif case == "lora_a":
        a = torch.randn(4, 39)
    elif case == "lora_b":
        b = torch.randn(47, 4)
    elif case == "bias":
        kwargs["bias"] = torch.randn(47)
    elif case == "bias_dtype":
        kwargs["bias"] = bias.double()
    elif case == "dropout":
        kwargs["dropout_p"] = 1.0
    with pytest.raises(error, match=match):
        peftkern.lora_linear(x, qw, a, b, **kwargs)


def test_opcheck():
    x, qw, a, b, bias = _inputs(m=5, k=16, n=24, r=2)
    a.requires_grad_()
    base = fourbit.op_args(qw)
    for quant in (base["quant"],  # double-quantized
                  [qw.absmax_float(), qw.code]):  # resolved
        kwargs = dict(x=x, **{**base, "quant": quant}, lora_a=a, lora_b=b, bias=bias, scaling=0.5, dropout_p=0.1,
                      seed=torch.tensor(7))
        torch.library.opcheck(torch.ops.peftkern.lora_linear_fwd.default, (), kwargs)


@pytest.mark.parametrize("mode", ["fused", "composite"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_triton_backend_both_variants(mode, dtype, p, monkeypatch):
    """The Triton backend's variants (fused: kernels/qlora.py through the interpreter; composite: blockwise
    dequantize + library GEMM) against float64 math on the dequantized weight, within 2x the reference
    backend's own error in the same dtype plus the dtype's floor."""
    if "triton" not in available_backends("lora_linear", dtype):
        pytest.skip("the Triton backend is unavailable here")
    monkeypatch.setenv("PEFTKERN_DISPATCH", mode)
    x, qw, a, b, bias = _inputs(m=20, k=40, n=48, dtype=dtype)
    x, a, b, bias, qw = x.to(DEVICE), a.to(DEVICE), b.to(DEVICE), bias.to(DEVICE), qw.to(DEVICE)
    with peftkern.use_backend("triton"):
        got = _step(x, qw, a, b, bias, p)
    with peftkern.use_backend("reference"):
        same_dtype = _step(x, qw.dequantize(), a, b, bias, p)
        oracle = _step(x.double(), qw.dequantize().double(), a.double(), b.double(), bias.double(), p)
    for g, s, o in zip(got, same_dtype, oracle):
        assert g.dtype == s.dtype
        assert rel_err(g, o) <= 2 * rel_err(s, o) + ERROR_FLOOR[dtype]


@pytest.mark.parametrize("name", ["packed", "absmax", "code", "absmax2", "code2"])
def test_the_op_checks_its_storage_sizes_where_it_indexes_them(name):
    """Called directly (not through a validated QuantizedWeight), the op refuses storage too short for the weight
    shape it is told, before any kernel reads it."""
    x, qw, a, b, bias = _inputs(m=5, k=16, n=24, r=2)
    parts = dict(packed=qw.packed, absmax=qw.absmax, code=qw.code, absmax2=qw.absmax2, code2=qw.code2)
    parts[name] = parts[name][:-1]
    rest = dict(out_features=24, blocksize=qw.blocksize, weight_dtype=qw.dtype, lora_a=a, lora_b=b, bias=bias,
                scaling=0.5, dropout_p=0.0, seed=None)
    with pytest.raises(ValueError, match=name):
        torch.ops.peftkern.lora_linear_fwd(x=x, weight=parts["packed"], quant=[parts["absmax"], parts["code"],
                                           parts["absmax2"], parts["code2"], qw.offset], **rest)
    with pytest.raises(ValueError, match="absmax2, code2 and offset"):  # a float32 absmax with a nested state
        torch.ops.peftkern.lora_linear_fwd(x=x, weight=qw.packed, quant=[qw.absmax_float(), qw.code, qw.absmax2,
                                           qw.code2, qw.offset], **rest)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_kernel_dequantizes_bit_exactly(double_quant, dtype, monkeypatch):
    """Through the op, the Triton kernel's deq(W) (double-quantized absmax resolved on chip, or float32 absmax) is
    QuantizedWeight.dequantize() bit for bit: x = I and a zero rank-r term make y = deq(W)ᵀ exactly."""
    if "triton" not in available_backends("lora_linear", dtype):
        pytest.skip("the Triton backend is unavailable here")
    monkeypatch.setenv("PEFTKERN_DISPATCH", "fused")
    qw = QuantizedWeight.quantize(torch.randn(48, 40, dtype=dtype), blocksize=64, double_quant=double_quant)
    qw = qw.to(DEVICE)
    eye = torch.eye(40, dtype=dtype, device=DEVICE)
    a, b = torch.zeros(2, 40, dtype=dtype, device=DEVICE), torch.zeros(48, 2, dtype=dtype, device=DEVICE)
    with peftkern.use_backend("triton"):
        y = peftkern.lora_linear(eye, qw, a, b)
    assert torch.equal(y, qw.dequantize().t())


def test_no_dense_weight_on_the_triton_fused_path():
    """The Triton backend's fused variant, forward and backward, every torch allocation recorded (its kernels
    dequantize tiles in registers; on CPU they run in the interpreter): nothing of the [out, in] size."""
    if "triton" not in available_backends("lora_linear", torch.float32):
        pytest.skip("the Triton backend is unavailable here")
    from peftkern.lora import triton as lora_triton
    x, qw, a, b, bias = _inputs(m=6, k=40, n=48)
    x, a, b, bias, qw = x.to(DEVICE), a.to(DEVICE), b.to(DEVICE), bias.to(DEVICE), qw.to(DEVICE)
    dy = torch.randn(6, 48, device=DEVICE)
    fwd, bwd = _named_args(x, qw, a, b, bias, 0.2, dy=dy, backend="triton")
    fused = dispatch.variants("lora_linear", "triton")["fused_4bit"]
    assert fused.forward is lora_triton.forward_fused_4bit
    with peftkern.use_backend("triton"), _Shapes() as rec:
        y, s_down = fused.forward(fwd)
        grads = fused.backward(bwd._replace(s_down=s_down))
    assert rec.shapes and max(torch.Size(s).numel() for s in rec.shapes) < 48 * 40
    assert y.shape == (6, 48) and grads[0].shape == (6, 40)
