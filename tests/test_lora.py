"""peftkern.lora_linear on every backend this machine can run, against the float64 reference."""
import pytest
import torch
import torch.nn.functional as F

import peftkern
from peftkern.core import dropout as ref_dropout

from .conftest import DEVICE, ERROR_FLOOR, available_backends, device_dtypes, rel_err, run_step

# (leading dims, in_features K, out_features N, r, bias, weight trainable)
SHAPES = [
    ((17,), 33, 130, 1, True, False),
    ((2, 9), 70, 45, 3, False, True),
    ((5,), 64, 17, 16, True, False),
]

# input dtype, adapter dtype: adapters share the input's dtype, or are float32 beside a half input (PEFT's default)
DTYPE_PAIRS = [(d, d) for d in device_dtypes()] + [(d, torch.float32) for d in device_dtypes() if d != torch.float32]


def make_inputs(lead, k, n, r, bias, weight_grad, dtype, adapter_dtype, device=DEVICE):
    x = torch.randn(*lead, k, device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(n, k, device=device, dtype=dtype) / k**0.5).requires_grad_(weight_grad)
    lora_a = (torch.randn(r, k, device=device, dtype=adapter_dtype) / k**0.5).requires_grad_()
    lora_b = torch.randn(n, r, device=device, dtype=adapter_dtype).requires_grad_()
    b = torch.randn(n, device=device, dtype=dtype).requires_grad_() if bias else None
    return x, weight, lora_a, lora_b, b


def eager_torch(x, weight, lora_a, lora_b, bias, scaling, p, seed):
    """What a PyTorch user writes, with peftkern's dropout mask so that it is the same function."""
    x2 = x.reshape(-1, x.shape[-1])
    xd = x2
    if p > 0:
        xd = x2 * ref_dropout.multiplier(x2.shape[0], x2.shape[1], seed, p, dtype=x.dtype, device=x.device)
    lora = F.linear(F.linear(xd.to(lora_a.dtype), lora_a), lora_b) * scaling
    y = F.linear(x2, weight, bias) + lora.to(x.dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])


run = run_step


def upcast(tensors):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}->{s[2]}r{s[3]}")
@pytest.mark.parametrize("dtype,adapter_dtype", DTYPE_PAIRS, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_forward_and_grads_match_float64_reference(backend, dtype, adapter_dtype, shape, p, poisoned):
    if backend not in available_backends("lora_linear", dtype):
        pytest.skip(f"backend {backend} cannot run {dtype} on {DEVICE.type} here")
    lead, k, n, r, bias, weight_grad = shape
    tensors = make_inputs(lead, k, n, r, bias, weight_grad, dtype, adapter_dtype)
    scaling, seed = 0.75, 1234
    dy = torch.randn(*lead, n, device=DEVICE, dtype=dtype)

    def fused(x, w, a, b, bias_):
        return peftkern.lora_linear(x, w, a, b, scaling=scaling, bias=bias_, dropout_p=p, seed=seed)

    def eager(x, w, a, b, bias_):
        return eager_torch(x, w, a, b, bias_, scaling, p, seed)

    with peftkern.use_backend(backend):
        ours = run(fused, tensors, dy)
    torch_out = run(eager, tensors, dy)
    with peftkern.use_backend("reference"):
        oracle = run(fused, upcast(tensors), dy.double())

    names = ["y", "dx", "dweight", "dlora_a", "dlora_b", "dbias"]
    assert ours[0].dtype == dtype
    for name, o, t, ref in zip(names, ours, torch_out, oracle):
        assert (o is None) == (ref is None), name
        if o is None:
            continue
        if name in ("dlora_a", "dlora_b"):
            assert o.dtype == adapter_dtype, f"{name} must come back in the adapter's dtype"
        bound = 2 * rel_err(t, ref) + ERROR_FLOOR[dtype]
        err = rel_err(o, ref)
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} ({backend}, {dtype})"


def test_gradcheck_float64_with_dropout_and_bias():
    x = torch.randn(2, 3, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 9, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    for p in (0.0, 0.4):
        def f(x, w, a, b, bias, p=p):
            return peftkern.lora_linear(x, w, a, b, scaling=0.5, bias=bias, dropout_p=p, seed=99)

        for backend in ("reference", "cpu"):
            with peftkern.use_backend(backend):
                assert torch.autograd.gradcheck(f, (x, w, a, b, bias))


# ---- dropout semantics -------------------------------------------------------------------------

def identity_setup(m, k, dtype=torch.float32, device=DEVICE):
    """weight 0 and A = B = I, so y = dropout(x) exactly: the mask becomes visible."""
    x = torch.randn(m, k, device=device, dtype=dtype)
    x = torch.where(x == 0, torch.ones_like(x), x).requires_grad_()
    eye = torch.eye(k, device=device, dtype=dtype)
    weight = torch.zeros(k, k, device=device, dtype=dtype)
    return x, weight, eye.clone().requires_grad_(), eye.clone().requires_grad_()


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_dropout_rate_scale_and_seed(backend):
    if backend not in available_backends("lora_linear", torch.float32):
        pytest.skip(f"backend {backend} unavailable here")
    p = 0.3
    m, k = (64, 32) if backend == "triton" and DEVICE.type == "cpu" else (512, 64)
    x, w, a, b = identity_setup(m, k)
    with peftkern.use_backend(backend):
        y = peftkern.lora_linear(x, w, a, b, dropout_p=p, seed=7)
        again = peftkern.lora_linear(x, w, a, b, dropout_p=p, seed=7)
        other = peftkern.lora_linear(x, w, a, b, dropout_p=p, seed=8)
        off = peftkern.lora_linear(x, w, a, b, dropout_p=p, seed=7, training=False)
        zero_p = peftkern.lora_linear(x, w, a, b, dropout_p=0.0, seed=7)
    dropped = y == 0
    n = dropped.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(dropped.float().mean().item() - p) < 5 * sigma + 1e-3
    kept = ~dropped
    torch.testing.assert_close(y[kept], x.detach()[kept] / (1 - p), rtol=1e-6, atol=0)
    assert torch.equal(y, again), "same seed and inputs must give the same bits"
    assert not torch.equal(y, other), "another seed must give another mask"
    torch.testing.assert_close(off, x.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(zero_p, x.detach(), rtol=1e-6, atol=0)
    # backward regenerates the same mask: dx = dy ⊙ mask / (1 - p) here
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad == 0, dropped)


def test_seed_none_draws_from_torch_generator():
    x, w, a, b = identity_setup(64, 32)
    with peftkern.use_backend("reference"):
        torch.manual_seed(3)
        y1 = peftkern.lora_linear(x, w, a, b, dropout_p=0.5)
        y2 = peftkern.lora_linear(x, w, a, b, dropout_p=0.5)
        torch.manual_seed(3)
        y3 = peftkern.lora_linear(x, w, a, b, dropout_p=0.5)
    assert not torch.equal(y1, y2)
    assert torch.equal(y1, y3)


def test_triton_and_reference_share_the_mask():
    if "triton" not in available_backends("lora_linear", torch.float32):
        pytest.skip("Triton unavailable here")
    x, w, a, b = identity_setup(33, 70)
    with peftkern.use_backend("triton"):
        yt = peftkern.lora_linear(x, w, a, b, dropout_p=0.25, seed=2**40 + 5)
    with peftkern.use_backend("reference"):
        yr = peftkern.lora_linear(x, w, a, b, dropout_p=0.25, seed=2**40 + 5)
    assert torch.equal(yt == 0, yr == 0)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_compiled_mask_equals_torch_spelling(device):
    ext = peftkern.core.backend.extension()
    if ext is None or (device == "cuda" and not ext.with_cuda):
        pytest.skip(f"peftkern._C is not built for {device} in this environment")
    rows, cols, seed, p = 37, 70, 2**33 + 11, 0.35
    for row_offset in (0, 5):
        out = ref_dropout.multiplier(rows, cols, seed, p, dtype=torch.float32, device=device, row_offset=row_offset)
        keep = ref_dropout.keep_mask(rows, cols, seed, p, device=device, row_offset=row_offset)
        assert torch.equal(out != 0, keep)
        assert torch.equal(out[keep], torch.full_like(out[keep], 1 / (1 - p)))


# ---- layouts and dtypes ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_non_contiguous_inputs(backend):
    if backend not in available_backends("lora_linear", torch.float32):
        pytest.skip(f"backend {backend} unavailable here")
    k, n, r = 40, 24, 4
    x = torch.randn(3, 11, 2 * k, device=DEVICE)[..., ::2].requires_grad_()
    w = torch.randn(k, n, device=DEVICE).t()
    a = torch.randn(k, r, device=DEVICE).t().requires_grad_()
    b = torch.randn(r, n, device=DEVICE).t().requires_grad_()
    bias = torch.randn(2 * n, device=DEVICE)[::2]
    assert not any(t.is_contiguous() for t in (x, w, a, b, bias))
    dy = torch.randn(3, 11, n, device=DEVICE)

    def go(x, w, a, b, bias):
        with peftkern.use_backend(backend):
            return run(lambda *t: peftkern.lora_linear(t[0], t[1], t[2], t[3], scaling=2.0, bias=t[4],
                                                       dropout_p=0.1, seed=5), [x, w, a, b, bias], dy)

    strided = go(x, w, a, b, bias)
    dense = go(*[t.detach().contiguous().requires_grad_(t.requires_grad) for t in (x, w, a, b, bias)])
    for s, d in zip(strided, dense):
        if d is not None:
            assert rel_err(s, d) <= ERROR_FLOOR[torch.float32]


def test_autocast_casts_to_the_autocast_dtype():
    x, w, a, b, bias = make_inputs((6,), 16, 12, 2, True, False, torch.float32, torch.float32, device="cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = peftkern.lora_linear(x, w, a, b, bias=bias, scaling=0.5)
        ref = F.linear(x, w, bias)
    assert y.dtype == torch.bfloat16 == ref.dtype
    y.float().sum().backward()
    assert a.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    with peftkern.use_backend("reference"):
        oracle = peftkern.lora_linear(*upcast([x, w, a, b]), bias=bias.double(), scaling=0.5)
    assert rel_err(y, oracle) < 2e-2


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_deterministic_backward(backend):
    if backend not in available_backends("lora_linear", torch.float32):
        pytest.skip(f"backend {backend} unavailable here")
    tensors = make_inputs((40,), 48, 36, 5, True, False, torch.float32, torch.float32)
    dy = torch.randn(40, 36, device=DEVICE)
    fn = lambda x, w, a, b, bias: peftkern.lora_linear(x, w, a, b, bias=bias, dropout_p=0.1, seed=1)  # noqa: E731
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with peftkern.use_backend(backend):
            first = run(fn, tensors, dy)
            second = run(fn, tensors, dy)
    finally:
        torch.use_deterministic_algorithms(previous)
    for f, s in zip(first, second):
        if f is not None:
            assert torch.equal(f, s)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_empty_batch(backend):
    if backend not in available_backends("lora_linear", torch.float32):
        pytest.skip(f"backend {backend} unavailable here")
    x, w, a, b, bias = make_inputs((0,), 12, 7, 2, True, False, torch.float32, torch.float32)
    with peftkern.use_backend(backend):
        y = peftkern.lora_linear(x, w, a, b, bias=bias, dropout_p=0.1, seed=3)
        y.sum().backward()
    assert y.shape == (0, 7)
    assert torch.equal(a.grad, torch.zeros_like(a)) and torch.equal(b.grad, torch.zeros_like(b))


# ---- half-precision base with float32 adapters (PEFT's default) ----------------------------------

def peft_eager(x, weight, lora_a, lora_b, bias, scaling, p, seed):
    """Hugging Face PEFT's LoRA Linear forward, spelled out: the base linear in x's dtype, the LoRA branch
    on x cast to the adapters' dtype (float32), the sum taken in float32 and cast back to x's dtype.
    The dropout mask is peftkern's (a function of the seed), so both sides compute the same function."""
    x2 = x.reshape(-1, x.shape[-1])
    base = F.linear(x2, weight, bias)
    xa = x2.to(lora_a.dtype)
    if p > 0:
        xa = xa * ref_dropout.multiplier(x2.shape[0], x2.shape[1], seed, p, dtype=lora_a.dtype, device=x.device)
    y = (base + F.linear(F.linear(xa, lora_a), lora_b) * scaling).to(x.dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def mixed_dtypes():
    # bf16 through Triton needs a GPU (the interpreter's bf16 tl.dot is broken); the reference runs it anywhere
    return [(backend, dtype) for backend in ("reference", "cpu", "triton")
            for dtype in (torch.float16, torch.bfloat16)
            if dtype in device_dtypes() or backend in ("reference", "cpu")]


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("backend,dtype", mixed_dtypes(), ids=lambda v: str(v).replace("torch.", ""))
def test_half_base_with_float32_adapters_is_at_least_as_accurate_as_peft(backend, dtype, p, poisoned):
    """The rank-r product stays in float32 until the one final add (as PEFT computes it), forward and backward,
    so no output or gradient is further from the float64 oracle than PEFT's own eager computation."""
    if backend not in available_backends("lora_linear", dtype):
        pytest.skip(f"backend {backend} cannot run {dtype} on {DEVICE.type} here")
    lead, k, n, r = (3, 21), 70, 45, 6
    tensors = make_inputs(lead, k, n, r, True, False, dtype, torch.float32)
    scaling, seed = 1.5, 4321
    dy = torch.randn(*lead, n, device=DEVICE, dtype=dtype)

    def fused(x, w, a, b, bias_):
        return peftkern.lora_linear(x, w, a, b, scaling=scaling, bias=bias_, dropout_p=p, seed=seed)

    with peftkern.use_backend(backend):
        ours = run(fused, tensors, dy)
    peft_out = run(lambda *t: peft_eager(*t, scaling, p, seed), tensors, dy)
    with peftkern.use_backend("reference"):
        oracle = run(fused, upcast(tensors), dy.double())
    assert ours[0].dtype == dtype and ours[3].dtype == ours[4].dtype == torch.float32
    for name, o, e, ref in zip(["y", "dx", "dweight", "dlora_a", "dlora_b", "dbias"], ours, peft_out, oracle):
        if ref is None:
            continue
        ours_err, peft_err = rel_err(o, ref), rel_err(e, ref)
        if o.dtype == torch.float32:
            # the adapters' gradients: both sides are float32 sums, equal up to summation order; a factor
            # rounded to 16 bits on the way (x ⊙ mask, S, dS) would cost ~1e-3, far above this bound
            bound = 2 * peft_err + ERROR_FLOOR[torch.float32]
        else:
            # y and dx in x's dtype: one rounding of (base + float32 rank-r term), never more than PEFT's;
            # the 1% margin covers float32 reassociation (scaling before or after the add) moving a final
            # rounding by one ulp; a 16-bit rank-r factor costs 40-60% here
            bound = 1.01 * peft_err
        assert ours_err <= bound, f"{name}: {ours_err:.4g} vs PEFT's {peft_err:.4g} ({backend}, {dtype})"


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_zero_in_features_gives_the_bias_like_f_linear(backend, bias):
    """F.linear accepts in_features == 0 (an empty sum): the result is the bias (or zeros), every
    gradient has its input's shape, and lora_b's gradient is zero."""
    if backend not in available_backends("lora_linear", torch.float32):
        pytest.skip(f"backend {backend} unavailable here")
    x = torch.randn(2, 3, 0, device=DEVICE, requires_grad=True)
    w = torch.randn(5, 0, device=DEVICE, requires_grad=True)
    a = torch.randn(2, 0, device=DEVICE, requires_grad=True)
    b = torch.randn(5, 2, device=DEVICE, requires_grad=True)
    bb = torch.randn(5, device=DEVICE, requires_grad=True) if bias else None
    dy = torch.randn(2, 3, 5, device=DEVICE)
    for p in (0.0, 0.3):
        with peftkern.use_backend(backend):
            ours = run(lambda *t: peftkern.lora_linear(*t[:4], bias=t[4], dropout_p=p, seed=3), [x, w, a, b, bb], dy)
        expected = run(lambda *t: F.linear(t[0], t[1], t[4]) + 0 * t[3].sum() + 0 * t[2].sum(), [x, w, a, b, bb], dy)
        for name, o, e in zip(["y", "dx", "dweight", "dlora_a", "dlora_b", "dbias"], ours, expected):
            assert (o is None) == (e is None), name
            if o is not None:
                assert o.shape == e.shape and torch.equal(o, e), name
