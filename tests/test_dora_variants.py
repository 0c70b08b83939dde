"""The Triton backend's two dense dora_linear variants (peftkern/dora/triton.py) as a whole, with the helpers of
tests/test_dora_kernels.py (in Triton's CPU interpreter here; on a GPU machine on CUDA tensors), every kernel output
NaN-poisoned before the kernels write it:
- both registered implementations (fused, composite), forward and backward, every gradient, against an oracle of
  the whole layer: dropout, bias, a frozen magnitude (no z), a precomputed norm (the eval cache), a trainable
  weight; distinct empty tensors for the gradients not asked for;
- a backward asked for the magnitude's gradient without z is refused;
- the public op through each variant.
"""
import pytest
import torch

import peftkern
from peftkern.core import dispatch
from peftkern.dora import op as dora_op
from peftkern.kernels import interpreter_scope
from peftkern.quant import fourbit

from .conftest import DEVICE
from .test_dora_kernels import (
    BF16,
    F16,
    F32,
    SCALE,
    SEED,
    SHAPES,
    SHORT,
    P,
    _check,
    _launch_in_scope,
    _multiplier,
    _randn,
    _shape_id,
)

_NEEDS = ("need_x", "need_weight", "need_lora_a", "need_lora_b", "need_magnitude", "need_bias")


def _layer(x, w, a, b, mag, bias, dy, s, p, *, base, wide, out_dtypes=None):
    """DoRA's forward and every gradient by the formulas of kernels/dora.py's docstring: the big products in
    `base`, the norm, the rank-r branch, the column scales and the sums in `wide`; with base = wide = float64 the
    oracle, with x's dtype and float32 what PyTorch computes in the working dtypes (a half z and gc as a PEFT
    layer's autograd keeps them). Results cast to `out_dtypes` {name: dtype} when given."""
    M, K = x.shape
    xb, wb = x.to(base), w.to(base)
    aw, bw = a.to(wide), b.to(wide)
    n = (w.to(wide) + s * bw @ aw).norm(dim=1)
    c = mag.to(wide) / n
    if p > 0:
        mult = _multiplier(M, K, p, wide)
        kept = torch.where(mult != 0, x, torch.zeros_like(x)).to(base)  # keep ⊙ x: exact in x's dtype
        d = kept.to(wide) / (1 - p)
    else:
        kept, d = xb, x.to(wide)
    s_down = d @ aw.t()
    low = s * s_down @ bw.t()
    xw = (xb @ wb.t()).to(wide)
    if p > 0:
        z = (kept @ wb.t()).to(wide) / (1 - p) + low
        y = xw + low + (c - 1) * z
    else:
        z = xw + low
        y = c * z
    if bias is not None:
        y = y + bias.to(wide)
    z = z.to(base)  # saved in x's dtype
    g = dy.to(wide)
    gc = (g * c).to(base)
    dmag = (g * z.to(wide)).sum(0) / n
    ds = s * gc.to(wide) @ bw
    db = s * gc.to(wide).t() @ s_down
    da = ds.t() @ d
    if p > 0:
        gm = (g * (c - 1)).to(base)
        dx = (dy.to(base) @ wb).to(wide) + mult * ((gm @ wb).to(wide) + ds @ aw)
        dw = (dy.to(base).t() @ xb).to(wide) + (gm.t() @ kept).to(wide) / (1 - p)
    else:
        dx = (gc @ wb).to(wide) + ds @ aw
        dw = (gc.t() @ xb).to(wide)
    out = dict(y=y, z=z, s_down=s_down, n=n, dx=dx, dweight=dw, da=da, db=db, dmag=dmag, dbias=g.sum(0))
    if out_dtypes:
        out = {k: v.to(out_dtypes[k]) for k, v in out.items()}
    return out


# (x, adapters, magnitude, dropout, bias, magnitude trains (z kept), norm given (eval cache), weight trains)
IMPL_VARIANTS = [
    (F32, F32, F32, 0.0, True, True, False, True),
    (F32, F32, F32, P, False, True, False, True),
    (F16, F32, F32, 0.0, False, True, True, False),
    (F16, F32, F32, P, True, True, False, True),
    (F16, F16, F16, P, False, False, False, False),
    (F16, F16, F16, 0.0, True, True, False, True),
] + ([(BF16, F32, F32, P, True, True, False, True), (BF16, BF16, BF16, 0.0, True, True, False, False)]
     if DEVICE.type == "cuda" else [])


def _impl_id(v):
    return (f"x{SHORT[v[0]]}-ad{SHORT[v[1]]}-mag{SHORT[v[2]]}-p{v[3]}-{'bias' if v[4] else 'nobias'}"
            f"-{'z' if v[5] else 'frozenmag'}-{'cachednorm' if v[6] else 'norm'}-{'dW' if v[7] else 'frozenW'}")


@pytest.mark.parametrize("variant", IMPL_VARIANTS, ids=_impl_id)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=_shape_id)
@pytest.mark.parametrize("impl_name", ["fused", "composite"])
def test_implementation_matches_float64_oracle(impl_name, shape, variant, poisoned):
    M, K, N, r = shape
    dtype, ad_dtype, mag_dtype, p, has_bias, keep_z, cached, need_weight = variant
    impl = dispatch.variants("dora_linear", "triton")[impl_name]
    x, w = _randn(M, K, dtype=dtype), _randn(N, K, dtype=dtype, scale=K ** -0.5)
    a, b = _randn(r, K, dtype=ad_dtype, scale=K ** -0.5), _randn(N, r, dtype=ad_dtype, scale=0.5)
    bias = _randn(N, dtype=dtype) if has_bias else None
    dy = _randn(M, N, dtype=dtype)
    dtypes = dict(y=dtype, z=dtype, s_down=F32, n=F32, dx=dtype, dweight=dtype, da=ad_dtype, db=ad_dtype,
                  dmag=mag_dtype, dbias=dtype)
    # the magnitude near the norm, as PEFT initialises it (c near 1: what makes gc − g cancel)
    n_exact = (w.double() + SCALE * b.double() @ a.double()).norm(dim=1)
    mag = (n_exact * (1 + 0.05 * torch.randn(N, device=DEVICE, dtype=torch.float64))).to(mag_dtype)
    oracle = _layer(x, w, a, b, mag, bias, dy, SCALE, p, base=torch.float64, wide=torch.float64)
    eager = _layer(x, w, a, b, mag, bias, dy, SCALE, p, base=dtype, wide=F32, out_dtypes=dtypes)
    norm_in = n_exact.float() if cached else None
    seed = torch.tensor(SEED) if p > 0 else None
    fwd = dora_op.forward_op.named(x=x, **fourbit.op_args(w), lora_a=a, lora_b=b, magnitude=mag, bias=bias,
                                   weight_norm=norm_in, scaling=SCALE, dropout_p=p, seed=seed, keep_z=keep_z)

    y, z, s_down, n = _launch_in_scope(impl.forward, fwd)
    assert (y.dtype, s_down.dtype, n.dtype) == (dtype, F32, F32)
    assert (y.shape, s_down.shape, n.shape) == ((M, N), (M, r), (N,))
    if cached:
        assert n.data_ptr() != norm_in.data_ptr(), "the norm must be a fresh tensor (custom-op outputs do not alias)"
    for name, got in (("y", y), ("s_down", s_down), ("n", n)):
        _check(got, oracle[name], eager[name], dtype, name)
    if keep_z:
        assert z.dtype == dtype and z.shape == (M, N)
        _check(z, oracle["z"], eager["z"], dtype, "z")
    else:
        assert z.numel() == 0

    needs = dict(dx=True, dweight=need_weight, da=True, db=True, dmag=keep_z, dbias=has_bias)
    bwd = dora_op.backward_op.named(dy=dy, x=x, **fourbit.op_args(w), lora_a=a, lora_b=b, magnitude=mag, n=n,
                                    s_down=s_down, z=z, scaling=SCALE, dropout_p=p, seed=seed,
                                    **dict(zip(_NEEDS, needs.values())), backend="triton")
    grads = _launch_in_scope(impl.backward, bwd)
    assert len(grads) == 6
    assert len({id(t) for t in grads}) == 6
    for (name, needed), got in zip(needs.items(), grads):
        if not needed:
            assert got.numel() == 0, f"{name} was not asked for"
            continue
        assert got.dtype == dtypes[name], name
        assert got.shape == oracle[name].shape, name
        _check(got, oracle[name], eager[name], dtype, name)


def test_backward_without_z_refuses_the_magnitudes_gradient():
    """Asked for the magnitude's gradient without the z the forward keeps for it, the backward refuses before any
    variant runs (the op's prepare), and so through the op on the Triton backend too."""
    impl = dispatch.variants("dora_linear", "triton")["fused"]
    M, K, N, r = 8, 16, 12, 2
    x, w, a, b = _randn(M, K), _randn(N, K), _randn(r, K), _randn(N, r)
    args = dict(dy=_randn(M, N), x=x, **fourbit.op_args(w), lora_a=a, lora_b=b,
                magnitude=torch.rand(N, device=DEVICE) + 1, n=torch.rand(N, device=DEVICE) + 1, s_down=_randn(M, r),
                z=x.new_empty(0), scaling=SCALE, dropout_p=0.0, seed=None,
                **dict(zip(_NEEDS, (True, False, True, True, True, False))), backend="triton")
    with pytest.raises(RuntimeError, match="needs z"):
        _launch_in_scope(lambda: impl.backward(dora_op.backward_op.named(**args)))
    with pytest.raises(RuntimeError, match="needs z"):
        _launch_in_scope(lambda: dora_op.backward_op(**args))


@pytest.mark.parametrize("p", [0.0, P])
@pytest.mark.parametrize("mode", ["fused", "composite"])
def test_public_op_through_each_variant(mode, p, monkeypatch, poisoned):
    """peftkern.dora_linear on the Triton backend (leading batch dims, a strided x, half x with fp32 adapters)
    equals the layer's float64 oracle, output and every gradient."""
    monkeypatch.setenv(dispatch.ENV_VAR, mode)
    lead, K, N, r = (3, 11), 40, 50, 3
    M = lead[0] * lead[1]
    x = _randn(K, *lead, dtype=F16).permute(1, 2, 0).requires_grad_()  # [3, 11, K], not contiguous
    w = _randn(N, K, dtype=F16, scale=K ** -0.5)
    a = _randn(r, K, scale=K ** -0.5).requires_grad_()
    b = _randn(N, r, scale=0.5).requires_grad_()
    mag = (torch.rand(N, device=DEVICE) + 0.5).requires_grad_()
    bias = _randn(N, dtype=F16)
    dy = _randn(*lead, N, dtype=F16)
    with peftkern.use_backend("triton"), interpreter_scope():
        y = peftkern.dora_linear(x, w, a, b, mag, scaling=SCALE, bias=bias, dropout_p=p, seed=SEED)
        y.backward(dy)
    x2, dy2 = x.detach().reshape(M, K), dy.reshape(M, N)
    dtypes = dict(y=F16, z=F16, s_down=F32, n=F32, dx=F16, dweight=F16, da=F32, db=F32, dmag=F32, dbias=F16)
    oracle = _layer(x2, w, a.detach(), b.detach(), mag.detach(), bias, dy2, SCALE, p, base=torch.float64,
                    wide=torch.float64)
    eager = _layer(x2, w, a.detach(), b.detach(), mag.detach(), bias, dy2, SCALE, p, base=F16, wide=F32,
                   out_dtypes=dtypes)
    assert y.shape == (*lead, N) and y.dtype == F16
    for name, got in (("y", y.detach().reshape(M, N)), ("dx", x.grad.reshape(M, K)), ("da", a.grad), ("db", b.grad),
                      ("dmag", mag.grad)):
        _check(got, oracle[name], eager[name], F16, name)
