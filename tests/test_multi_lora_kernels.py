"""multi_lora_linear's Triton kernels (kernels/multi_lora.py, peftkern/multi_lora/triton.py) under the Triton
interpreter (float32/float16: the interpreter's bf16 dot is wrong, triton-lang/triton#11584), against the float64
reference: forward and every gradient, ids per sequence and per token, −1 rows, ranks that differ (and above one
rank tile), an adapter no row uses, frozen adapters, dropout with lora_linear's mask, float32 adapters beside float16
x, non-contiguous x and int32 ids, a rank above one rank tile, an empty batch, outputs poisoned with NaN before the
kernels write, rows and gradients equal to lora_linear's for their adapter, no host synchronisation after the id
check, and every launcher's grid within CUDA's limits at the GPU tile choices (recorded, not run)."""
import pytest
import torch

import peftkern
from peftkern.core import backend as _backend
from peftkern.multi_lora import op as multi_op, triton as impl
from peftkern.quant import fourbit

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


@pytest.mark.parametrize("variant", ["fused", "composite"])
def test_rows_equal_lora_linear_with_their_adapter_with_dropout(variant, monkeypatch):
    """Each row is lora_linear's row for its adapter (same seed: the same dropout mask, by the row's position in x),
    and so is each gradient: dx row by row, dA_i / dB_i as lora_linear's with dy kept on adapter i's rows only."""
    monkeypatch.setenv("PEFTKERN_DISPATCH", variant)
    cast, _ = _inputs(torch.float32, torch.float32, [4, 2], m_lead=(6,))
    ids = torch.tensor([1, 0, -1, 1, 0, 0])
    scalings = (2.0, 0.5)
    x = cast["x"].clone().requires_grad_()
    a = [t.clone().requires_grad_() for t in cast["a"]]
    b = [t.clone().requires_grad_() for t in cast["bb"]]
    with peftkern.use_backend("triton"):
        y = peftkern.multi_lora_linear(x, cast["w"], a, b, ids, scalings=list(scalings), bias=cast["b"],
                                       dropout_p=0.25, seed=9)
        y.backward(cast["dy"])
        for i, s in enumerate(scalings):
            xi = cast["x"].clone().requires_grad_()
            ai, bi = cast["a"][i].clone().requires_grad_(), cast["bb"][i].clone().requires_grad_()
            yi = peftkern.lora_linear(xi, cast["w"], ai, bi, scaling=s, bias=cast["b"], dropout_p=0.25, seed=9)
            yi.backward(cast["dy"] * (ids == i)[:, None])
            rows = ids == i
            assert rel_err(y[rows], yi[rows]) < 1e-5
            # lora_linear's dx with dy zero off adapter i's rows is dy·W + that adapter's term on its rows
            assert rel_err(x.grad[rows], xi.grad[rows]) < 1e-5
            assert rel_err(a[i].grad, ai.grad) < 1e-5 and rel_err(b[i].grad, bi.grad) < 1e-5
    base = torch.nn.functional.linear(cast["x"], cast["w"], cast["b"])
    assert rel_err(y[ids == -1], base[ids == -1]) < 1e-6
    assert rel_err(x.grad[ids == -1], (cast["dy"] @ cast["w"])[ids == -1]) < 1e-6


def test_unused_adapter_gets_zeros_and_frozen_adapter_nothing(poisoned):
    cast, _ = _inputs(torch.float32, torch.float32, [2, 3, 4], m_lead=(6,))
    ids = torch.tensor([0, 2, 2, -1, 0, 0])  # adapter 1 serves no row
    grads = _run("triton", cast, ids, [1.0, 1.0, 1.0], 0.0, need=[True, True, False])
    d_a, d_b = grads[2:5], grads[5:8]
    assert torch.equal(d_a[1], torch.zeros_like(d_a[1])) and torch.equal(d_b[1], torch.zeros_like(d_b[1]))
    assert d_a[2] is None and d_b[2] is not None and d_b[2].abs().sum() > 0


@pytest.mark.parametrize("variant", ["fused", "composite"])
def test_non_contiguous_x_and_int32_ids(variant, poisoned, monkeypatch):
    monkeypatch.setenv("PEFTKERN_DISPATCH", variant)
    cast, exact = _inputs(torch.float32, torch.float32, [3, 5], m_lead=(9,))
    wide = torch.randn(9, 2 * K)
    wide[:, ::2] = cast["x"]
    cast["x"] = wide[:, ::2]  # every other column: a row stride of 2·K, a column stride of 2
    assert not cast["x"].is_contiguous()
    ids = torch.tensor([1, 0, 0, -1, 1, 1, 0, 1, 0], dtype=torch.int32)
    got = _run("triton", cast, ids, [1.0, 0.5], 0.3)
    want = _run("reference", exact, ids.long(), [1.0, 0.5], 0.3)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


@pytest.mark.parametrize("variant", ["fused", "composite"])
def test_rank_above_one_rank_tile_of_every_kernel(variant, poisoned, monkeypatch):
    """Rank 80 > the 64-wide rank tiles of the rank_down and rank_grad kernels: several rank tiles per row tile
    (programs past a small adapter's rank exit, the big adapter's second tile writes its own columns)."""
    monkeypatch.setenv("PEFTKERN_DISPATCH", variant)
    ranks = [80, 3]
    cast, exact = _inputs(torch.float32, torch.float32, ranks, m_lead=(11,))
    ids = torch.tensor([0, 1, -1, 0, 0, 1, 1, 0, -1, 0, 1])
    got = _run("triton", cast, ids, [0.25, 2.0], 0.3)
    want = _run("reference", exact, ids, [0.25, 2.0], 0.3)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


def test_empty_batch_gives_zero_adapter_gradients(poisoned):
    cast, _ = _inputs(torch.float32, torch.float32, [2, 3], m_lead=(0,))
    got = _run("triton", cast, torch.zeros(0, dtype=torch.int64), [1.0, 1.0], 0.0)
    assert got[0].shape == (0, N) and got[1].shape == (0, K)
    for g in got[2:]:
        assert torch.equal(g, torch.zeros_like(g))


def test_ids_out_of_range_raise_before_any_kernel(monkeypatch):
    cast, _ = _inputs(torch.float32, torch.float32, [2, 2], m_lead=(4,))

    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel ran before the ids were checked")

    monkeypatch.setattr(impl._kernels(), "rank_down", no_kernel)
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
    # the named arguments are made before the reads are forbidden (the op's prepare reads the seed tensor once)
    fwd = multi_op.forward_op.named(x=x, **fourbit.op_args(w), lora_a=a, lora_b=b, row_ids=ids, bias=None,
                                    scalings=[1.0, 2.0], dropout_p=0.2, seed=torch.tensor(7))
    fwd_half = multi_op.forward_op.named(x=x.half(), **fourbit.op_args(w.half()), lora_a=a, lora_b=b,
                                         row_ids=ids.int(), bias=None, scalings=[1.0, 2.0], dropout_p=0.0, seed=None)
    bwd = multi_op.backward_op.named(dy=torch.ones(x.shape[0], N), x=x, **fourbit.op_args(w), lora_a=a, lora_b=b,
                                     row_ids=ids, s_down=torch.empty(0), scalings=[1.0, 2.0], dropout_p=0.2,
                                     seed=torch.tensor(7), need_x=True, need_weight=True, need_lora_a=[True, False],
                                     need_lora_b=[True, True], need_bias=True, backend="triton")

    def forbidden(self, *args, **kwargs):
        raise AssertionError("a host synchronisation (a read of a tensor's value)")

    for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    probe = torch.tensor([3])
    for read in (lambda: probe.item(), lambda: probe.tolist(), lambda: int(probe), lambda: float(probe),
                 lambda: bool(probe), lambda: [0, 1, 2, 3][probe]):
        with pytest.raises(AssertionError, match="host synchronisation"):  # the patches do catch every read
            read()
    y, s_down = impl.forward_fused(fwd)
    y2, _ = impl.forward_composite(fwd)
    grads = impl.backward(bwd._replace(s_down=s_down))
    half = impl.forward_fused(fwd_half)  # fp32 adapters
    monkeypatch.undo()
    with peftkern.use_backend("reference"):
        want_y, _ = multi_op.forward_op(x=x, **fourbit.op_args(w), lora_a=a, lora_b=b, row_ids=ids, bias=None,
                                        scalings=[1.0, 2.0], dropout_p=0.2, seed=torch.tensor(7))
    assert rel_err(y, want_y) < 1e-5 and rel_err(y2, want_y) < 1e-5 and grads[0].shape == x.shape
    assert grads[1].shape == w.shape and grads[2][1].numel() == 0 and half[0].dtype == torch.float16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's sync debug mode needs a GPU")
def test_no_device_synchronisation_on_cuda():
    cast, _ = _inputs(torch.bfloat16, torch.float32, [8, 16], m_lead=(64,))
    t = {k: (v.cuda() if isinstance(v, torch.Tensor) else [u.cuda() for u in v] if isinstance(v, list) else v)
         for k, v in cast.items()}
    ids = torch.randint(-1, 2, (64,), device="cuda")
    fwd = multi_op.forward_op.named(x=t["x"], **fourbit.op_args(t["w"]), lora_a=t["a"], lora_b=t["bb"], row_ids=ids,
                                    bias=t["b"], scalings=[1.0, 2.0], dropout_p=0.0, seed=None)
    impl.forward_fused(fwd)  # warm-up: compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        kern = impl._kernels()
        groups = kern.Groups(ids, [8, 16], [1.0, 2.0])
        s = kern.rank_down(t["x"], [a.contiguous() for a in t["a"]], groups, trans=False, per_adapter_scale=False,
                        exact=True)
        y = torch.nn.functional.linear(t["x"], t["w"], t["b"])
        kern.rank_up_add_(y, s, [b.contiguous() for b in t["bb"]], groups, trans=True, per_adapter_scale=True,
                         exact=True)
        kern.gemm(t["x"], t["w"], s, [b.contiguous() for b in t["bb"]], groups, t["b"], exact=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_adapter_axis_stays_within_cudas_grid_limit():
    from peftkern.core import rules

    kern = impl._kernels()
    assert rules.MAX_GRID_YZ == 65535
    kern._check_adapters(rules.MAX_GRID_YZ)
    with pytest.raises(ValueError, match="at most 65535 adapters"):
        kern._check_adapters(rules.MAX_GRID_YZ + 1)


MAX_X, MAX_YZ = 2**31 - 1, 65535


@pytest.fixture
def grids(monkeypatch):
    """Launches record (kernel, grid, meta-parameters) instead of running, with the launchers' GPU tile choices (the
    interpreter enforces no grid limit, so the grids are checked here; tests/test_grid_limits.py does the same for
    the single-adapter kernels). An autotuned kernel's grid is evaluated for every GPU config it could pick."""
    from .test_grid_limits import record_grids

    return record_grids(monkeypatch, [impl._kernels()])


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(shape, device="meta", dtype=dtype)


@pytest.mark.parametrize("m,n", [(1, 1), (64, 32), (200_000, 8), (16_384, 65535)])
def test_every_launcher_keeps_cuda_grid_limits(grids, m, n):
    """lm_head-sized layers (128256 outputs) at one row, a decode batch, 200k rows, and the most adapters allowed."""
    kern = impl._kernels()
    hidden, vocab, rank = 4096, 128256, 16
    ids = _meta(m, dtype=torch.int64)
    groups = kern.Groups(ids, [rank] * n, [1.0] * n)
    a = [_meta(rank, hidden, dtype=torch.float32)] * n
    b = [_meta(vocab, rank, dtype=torch.float32)] * n
    x, dy = _meta(m, hidden), _meta(m, vocab)
    s = kern.rank_down(x, a, groups, trans=False, per_adapter_scale=False, exact=True, seed=1, dropout_p=0.1)
    ds = kern.rank_down(dy, b, groups, trans=True, per_adapter_scale=True, exact=True)
    kern.rank_up_add_(_meta(m, vocab), s, b, groups, trans=True, per_adapter_scale=True, exact=True)
    kern.rank_up_add_(_meta(m, hidden), ds, a, groups, trans=False, per_adapter_scale=False, exact=True, seed=1,
                     dropout_p=0.1)
    kern.rank_grad(ds, x, a, groups, trans=False, per_adapter_scale=False, exact=True, seed=1, dropout_p=0.1)
    kern.rank_grad(s, dy, b, groups, trans=True, per_adapter_scale=True, exact=True)
    kern.gemm(x, _meta(vocab, hidden), s, b, groups, _meta(vocab), exact=True)
    bad = [(name, grid) for name, grid, _ in grids
           if not (1 <= len(grid) <= 3 and 1 <= grid[0] <= MAX_X and all(1 <= g <= MAX_YZ for g in grid[1:]))]
    assert not bad, f"grids outside CUDA's limits: {bad}"
    launched = {name for name, _, _ in grids}
    assert launched == grids.kernels == {
        "multi_lora._multi_lora_rank_down_kernel", "multi_lora._multi_lora_rank_up_add_kernel",
        "multi_lora._multi_lora_rank_grad_kernel", "multi_lora._multi_lora_gemm_tuned"}
    # the GPU tiles were recorded: small row tiles while adapters serve few rows each (decode), full ones otherwise
    block_m = {meta["BLOCK_M"] for name, _, meta in grids if name == "multi_lora._multi_lora_rank_down_kernel"}
    assert block_m == ({16} if m <= 16 * n else {64})
    assert max(meta["BLOCK_M"] for name, _, meta in grids if name == "multi_lora._multi_lora_gemm_tuned") >= 128


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


def test_ids_are_validated_without_a_host_read_off_the_cpu():
    # on a GPU the id range check is an asynchronous device assert: nothing is read back. A meta tensor stands in
    # for a device tensor here: any read of its values (item, tolist, a comparison's bool) raises
    ids = torch.tensor([0, 1, -1, 2]).to("meta")
    impl.validate_ids(ids, 3)
    impl.validate_ids(ids[:0], 3)
    with pytest.raises(IndexError, match="adapter_ids holds 3"):  # on CPU: the cpu path's IndexError
        impl.validate_ids(torch.tensor([0, 3]), 3)


def test_grouping_gives_out_of_range_ids_no_adapter():
    # the kernels never read an adapter through an id the (asynchronous) check has not stopped yet
    from peftkern.kernels.multi_lora import Groups

    groups = Groups(torch.tensor([0, 5, -3, 1, 1, 2]), [2, 3, 4], [1.0, 1.0, 1.0])
    assert groups.seg_len.tolist() == [1, 2, 1]
    assert groups.seg_start.tolist() == [2, 3, 5]  # the two bad rows sort with the −1 rows, before segment 0
    assert sorted(groups.order[:2].tolist()) == [1, 2]
