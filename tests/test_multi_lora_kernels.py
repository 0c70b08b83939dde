"""multi_lora_linear's Triton kernels (kernels/multi_lora.py, peftkern/impls/triton_multi_lora.py) under the Triton
interpreter (float32/float16: the interpreter's bf16 dot is wrong, triton issue 11584), against the float64
reference: forward and every gradient, ids per sequence and per token, −1 rows, ranks that differ (and above one
rank tile), an adapter no row uses, frozen adapters, dropout with lora_linear's mask, float32 adapters beside float16
x, non-contiguous x, outputs poisoned with NaN before the kernels write, and no host synchronisation after the id
check."""
import pytest
import torch

import peftkern
from peftkern import _backend
from peftkern.impls import triton_multi_lora as impl
from peftkern.reference import multi_lora as ref

from .conftest import DEVICE, ERROR_FLOOR, rel_err

pytestmark = pytest.mark.skipif(_backend._triton_unavailable_reason(DEVICE, torch.float32) is not None,
                                reason="Triton (or its interpreter) is not available here")

K, N = 40, 24


def _inputs(x_dtype, adapter_dtype, ranks, m_lead=(5, 7), bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    x = rnd(*m_lead, K)
    w = rnd(N, K, scale=K ** -0.5)
    b = rnd(N) if bias else None
    lora_a = [rnd(r, K, scale=K ** -0.5) for r in ranks]
    lora_b = [rnd(N, r, scale=r ** -0.5) for r in ranks]
    dy = rnd(*m_lead, N)
    cast = dict(x=x.to(x_dtype), w=w.to(x_dtype), b=None if b is None else b.to(x_dtype),
                a=[t.to(adapter_dtype) for t in lora_a], bb=[t.to(adapter_dtype) for t in lora_b], dy=dy.to(x_dtype))
    exact = dict(x=x, w=w, b=b, a=lora_a, bb=lora_b, dy=dy)
    return cast, exact


def _run(backend, t, ids, scalings, p, need=None):
    """Forward and backward through the public op on `backend`; returns [y, dx, dA_i..., dB_i...]."""
    x = t["x"].clone().requires_grad_()
    lora_a = [a.clone().requires_grad_(need is None or need[i]) for i, a in enumerate(t["a"])]
    lora_b = [b.clone().requires_grad_() for b in t["bb"]]
    with peftkern.use_backend(backend):
        y = peftkern.multi_lora_linear(x, t["w"], lora_a, lora_b, ids, scalings=scalings, bias=t["b"], dropout_p=p,
                                       seed=5)
        y.backward(t["dy"])
    return [y.detach(), x.grad] + [a.grad for a in lora_a] + [b.grad for b in lora_b]


IDS = {
    "per_sequence": lambda n: torch.tensor([0, -1, n - 1, 0, 1 % n]),
    "per_token": lambda n: torch.randint(-1, n, (5, 7), generator=torch.Generator().manual_seed(3)),
}


@pytest.mark.parametrize("variant", ["fused", "composite"])
@pytest.mark.parametrize("ids_kind", list(IDS))
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("x_dtype,adapter_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                                   (torch.float16, torch.float32)])
def test_triton_matches_the_float64_reference(variant, ids_kind, p, x_dtype, adapter_dtype, poisoned, monkeypatch):
    monkeypatch.setenv("PEFTKERN_DISPATCH", variant)
    ranks = [3, 1, 20, 8]  # 20: a rank above one 16-wide rank tile
    cast, exact = _inputs(x_dtype, adapter_dtype, ranks)
    ids = IDS[ids_kind](len(ranks))
    scalings = [0.5, 2.0, -1.0, 1.5]
    got = _run("triton", cast, ids, scalings, p)
    want = _run("reference", exact, ids, scalings, p)
    torch_own = _run("reference", cast, ids, scalings, p)  # plain torch in the same dtypes: its own error
    for g, w, o in zip(got, want, torch_own):
        bound = 2 * rel_err(o, w) + ERROR_FLOOR[torch.float16 if torch.float16 in (x_dtype, adapter_dtype)
                                                 else torch.float32]
        assert g.dtype == o.dtype
        assert rel_err(g, w) <= bound


def test_rows_equal_lora_linear_with_their_adapter_with_dropout():
    cast, _ = _inputs(torch.float32, torch.float32, [4, 2], m_lead=(6,))
    ids = torch.tensor([1, 0, -1, 1, 0, 0])
    with peftkern.use_backend("triton"):
        y = peftkern.multi_lora_linear(cast["x"], cast["w"], cast["a"], cast["bb"], ids, scalings=[2.0, 0.5],
                                       bias=cast["b"], dropout_p=0.25, seed=9)
        for i, s in enumerate((2.0, 0.5)):
            yi = peftkern.lora_linear(cast["x"], cast["w"], cast["a"][i], cast["bb"][i], scaling=s, bias=cast["b"],
                                      dropout_p=0.25, seed=9)
            assert rel_err(y[ids == i], yi[ids == i]) < 1e-5
    base = torch.nn.functional.linear(cast["x"], cast["w"], cast["b"])
    assert rel_err(y[ids == -1], base[ids == -1]) < 1e-6


def test_unused_adapter_gets_zeros_and_frozen_adapter_nothing(poisoned):
    cast, _ = _inputs(torch.float32, torch.float32, [2, 3, 4], m_lead=(6,))
    ids = torch.tensor([0, 2, 2, -1, 0, 0])  # adapter 1 serves no row
    grads = _run("triton", cast, ids, [1.0, 1.0, 1.0], 0.0, need=[True, True, False])
    d_a, d_b = grads[2:5], grads[5:8]
    assert torch.equal(d_a[1], torch.zeros_like(d_a[1])) and torch.equal(d_b[1], torch.zeros_like(d_b[1]))
    assert d_a[2] is None and d_b[2] is not None and d_b[2].abs().sum() > 0


def test_non_contiguous_x_and_int32_ids():
    cast, _ = _inputs(torch.float32, torch.float32, [3, 5], m_lead=(9,))
    wide = torch.randn(9, 2 * K)
    wide[:, ::2] = cast["x"]
    x = wide[:, ::2]
    ids = torch.tensor([1, 0, 0, -1, 1, 1, 0, 1, 0], dtype=torch.int32)
    with peftkern.use_backend("triton"):
        got = peftkern.multi_lora_linear(x, cast["w"], cast["a"], cast["bb"], ids, scalings=[1.0, 0.5])
    want = peftkern.multi_lora_linear(x.contiguous(), cast["w"], cast["a"], cast["bb"], ids.long(), scalings=[1.0, 0.5])
    assert rel_err(got, want) < 1e-5


def test_ids_out_of_range_raise_before_any_kernel(monkeypatch):
    cast, _ = _inputs(torch.float32, torch.float32, [2, 2], m_lead=(4,))

    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel ran before the ids were checked")

    monkeypatch.setattr(impl._kernels(), "shrink", no_kernel)
    with peftkern.use_backend("triton"), pytest.raises(IndexError, match="adapter_ids holds 2"):
        peftkern.multi_lora_linear(cast["x"], cast["w"], cast["a"], cast["bb"], torch.tensor([0, 2, 1, 0]),
                                   scalings=[1.0, 1.0])


def test_no_host_synchronisation_after_the_id_check(monkeypatch):
    """The grouping, the tables and the kernels read nothing back to the host: every Python-level read of a tensor's
    value (item, tolist, int/float/bool of a tensor) raises inside the implementation after check_ids."""
    cast, _ = _inputs(torch.float32, torch.float32, [2, 3], m_lead=(6,))
    ids = torch.tensor([1, 0, -1, 1, 0, 0])
    x, w, a, b = cast["x"], cast["w"], cast["a"], cast["bb"]
    monkeypatch.setattr(impl, "check_ids", lambda row_ids, n: None)

    def forbidden(self, *args, **kwargs):
        raise AssertionError("a host synchronisation (a read of a tensor's value)")

    for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    y, s_down = impl._forward(True)(x, w, a, b, ids, None, [1.0, 2.0], 0.2, 7)
    y2, _ = impl._forward(False)(x, w, a, b, ids, None, [1.0, 2.0], 0.2, 7)
    grads = impl.backward(torch.ones_like(y), x, w, a, b, ids, s_down, [1.0, 2.0], 0.2, 7, True, False,
                          [True, True], [True, True], True)
    monkeypatch.undo()
    with peftkern.use_backend("reference"):
        want_y, _ = torch.ops.peftkern.multi_lora_linear_fwd(x, w, a, b, ids, None, [1.0, 2.0], 0.2, torch.tensor(7))
    assert rel_err(y, want_y) < 1e-5 and rel_err(y2, want_y) < 1e-5 and grads[0].shape == x.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's sync debug mode needs a GPU")
def test_no_device_synchronisation_on_cuda():
    cast, _ = _inputs(torch.bfloat16, torch.float32, [8, 16], m_lead=(64,))
    t = {k: (v.cuda() if isinstance(v, torch.Tensor) else [u.cuda() for u in v] if isinstance(v, list) else v)
         for k, v in cast.items()}
    ids = torch.randint(-1, 2, (64,), device="cuda")
    impl._forward(True)(t["x"], t["w"], t["a"], t["bb"], ids, t["b"], [1.0, 2.0], 0.0, 0)  # warm-up: compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        kern = impl._kernels()
        groups = kern.Groups(ids, [8, 16], [1.0, 2.0])
        s = kern.shrink(t["x"], [a.contiguous() for a in t["a"]], groups, trans=False, per_adapter_scale=False,
                        exact=True)
        y = torch.nn.functional.linear(t["x"], t["w"], t["b"])
        kern.expand_add_(y, s, [b.contiguous() for b in t["bb"]], groups, trans=True, per_adapter_scale=True,
                         exact=True)
        kern.gemm(t["x"], t["w"], s, [b.contiguous() for b in t["bb"]], groups, t["b"], exact=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_adapter_axis_stays_within_cudas_grid_limit():
    kern = impl._kernels()
    kern._check_adapters(kern.GRID_YZ_LIMIT)
    with pytest.raises(ValueError, match="at most 65535 adapters"):
        kern._check_adapters(kern.GRID_YZ_LIMIT + 1)


@pytest.mark.parametrize("variant", ["fused", "composite"])
def test_decode_shape_many_adapters_few_rows(variant, poisoned, monkeypatch):
    monkeypatch.setenv("PEFTKERN_DISPATCH", variant)
    ranks = [4] * 12
    cast, exact = _inputs(torch.float32, torch.float32, ranks, m_lead=(16,))
    ids = torch.arange(16) % 12 - (torch.arange(16) == 5).long() * 6  # every adapter, one row with -1
    got = _run("triton", cast, ids, [0.5] * 12, 0.0)
    want = _run("reference", exact, ids, [0.5] * 12, 0.0)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5
