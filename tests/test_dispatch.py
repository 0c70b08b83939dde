"""peftkern.core.dispatch: the fused/composite choice (measured with an injected timer on CPU), forcing a
variant, the on-disk cache, and both variants' numerics for every family (the interpreter runs the
Triton parts)."""
from __future__ import annotations

import json

import pytest
import torch

import peftkern
from peftkern.core import dispatch
from peftkern.lora import op as lora_op
from peftkern.quant import fourbit

from .conftest import DEVICE, ERROR_FLOOR, available_backends, rel_err

pytestmark = pytest.mark.skipif("triton" not in available_backends("lora_linear", torch.float32),
                                reason="the fused/composite variants belong to the Triton backend, unavailable here")


class FakeTimer:
    """Times each variant as `ms[variant]` and records what it was asked to time."""

    def __init__(self, ms):
        self.ms, self.calls = ms, []

    def __call__(self, variant, fn, device):
        self.calls.append(variant)
        return self.ms[variant], fn()


@pytest.fixture
def timer(monkeypatch):
    monkeypatch.setenv("PEFTKERN_DISPATCH", "measure")
    monkeypatch.delenv("PEFTKERN_DISPATCH_CACHE", raising=False)
    installed = []

    def install(ms):
        t = FakeTimer(ms)
        installed.append(dispatch.set_timer(t))
        return t

    yield install
    dispatch.set_timer(None)


def lora_inputs(m=9, k=24, n=20, r=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g, dtype=dtype).to(DEVICE)
    w = torch.randn(n, k, generator=g, dtype=dtype).to(DEVICE)
    a = (torch.randn(r, k, generator=g, dtype=dtype) * 0.3).to(DEVICE)
    b = (torch.randn(n, r, generator=g, dtype=dtype) * 0.3).to(DEVICE)
    return x, w, a, b


def lora_step(x, w, a, b, p=0.0):
    x, a, b = (t.clone().requires_grad_() for t in (x, a, b))
    y = peftkern.lora_linear(x, w, a, b, scaling=0.5, dropout_p=p, seed=11)
    y.backward(torch.ones_like(y))
    return y.detach(), x.grad, a.grad, b.grad


@pytest.mark.parametrize("faster", ["fused", "composite"])
def test_measure_keeps_the_faster_variant_per_key(timer, faster):
    t = timer({"fused": 2.0 if faster == "composite" else 1.0, "composite": 1.0 if faster == "composite" else 2.0})
    x, w, a, b = lora_inputs()
    with peftkern.use_backend("triton"):
        lora_step(x, w, a, b)
        assert sorted(t.calls) == ["composite", "composite", "fused", "fused"]  # forward and backward, once each
        lora_step(x, w, a, b)  # same key: remembered, not timed again
        assert len(t.calls) == 4
        lora_step(torch.cat([x, x, x]), w, a, b)  # another power-of-two bucket of tokens: measured again
        assert len(t.calls) == 8
    chosen = dispatch.choices()
    assert len(chosen) == 4 and {c["variant"] for c in chosen.values()} == {faster}
    assert all(set(c["ms"]) == {"fused", "composite"} for c in chosen.values())
    assert peftkern.backend_info()["dispatch"]["choices"] == chosen


def test_a_tie_keeps_the_fused_variant(timer):
    timer({"fused": 1.0, "composite": 1.0})
    with peftkern.use_backend("triton"):
        lora_step(*lora_inputs())
    assert {c["variant"] for c in dispatch.choices().values()} == {"fused"}


@pytest.mark.parametrize("composite_ms, chosen", [(0.99, "fused"), (0.975, "fused"), (0.96, "composite")])
def test_the_fused_variant_stays_unless_another_is_faster_by_the_margin(timer, composite_ms, chosen):
    # near-ties do not flip between runs: composite must beat fused by more than 3%
    timer({"fused": 1.0, "composite": composite_ms})
    with peftkern.use_backend("triton"):
        lora_step(*lora_inputs())
    assert {c["variant"] for c in dispatch.choices().values()} == {chosen}


def test_fastest_prefers_the_fastest_fused_kind_variant():
    assert dispatch._fastest({"fused": 1.0, "fused_persistent": 0.9, "composite": 0.88}) == "fused_persistent"
    assert dispatch._fastest({"fused": 1.0, "fused_persistent": 0.9, "composite": 0.8}) == "composite"
    assert dispatch._fastest({"composite": 1.0}) == "composite"


def test_a_decision_made_before_cuda_graph_capture_is_used_inside_it(timer, monkeypatch):
    # warm-up call first (torch requires one before capture): measured, composite wins; during the capture the
    # remembered choice runs, nothing is timed; a key never seen before runs the fused variant untimed
    t = timer({"fused": 2.0, "composite": 1.0})
    ran = []
    for name, impl in dispatch.variants("lora_linear", "triton").items():
        def spy(*args, _impl=impl, _name=name):
            ran.append(_name)
            return _impl.forward(*args)
        monkeypatch.setitem(dispatch._registry["lora_linear"]["triton"], name,
                            dispatch.dataclasses.replace(impl, forward=spy))
    x, w, a, b = lora_inputs()
    with peftkern.use_backend("triton"), torch.no_grad():
        peftkern.lora_linear(x, w, a, b)
        assert t.calls == ["fused", "composite"]
        monkeypatch.setattr(dispatch, "_capturing", lambda device: True)
        ran.clear()
        peftkern.lora_linear(x, w, a, b)
        assert ran == ["composite"] and len(t.calls) == 2
        ran.clear()
        peftkern.lora_linear(torch.cat([x, x, x]), w, a, b)  # a new token bucket: no decision yet
        assert ran == ["fused"] and len(t.calls) == 2


def test_measuring_returns_the_chosen_variants_result(timer):
    x, w, a, b = lora_inputs()
    with peftkern.use_backend("triton"):
        timer({"fused": 1.0, "composite": 2.0})
        fused = lora_step(x, w, a, b, p=0.25)
        timer({"fused": 2.0, "composite": 1.0})
        composite = lora_step(x, w, a, b, p=0.25)
    with peftkern.use_backend("reference"):
        expected = lora_step(x, w, a, b, p=0.25)
    for f, c, e in zip(fused, composite, expected):  # the same mask, the same math, other summation orders
        torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)


def test_nothing_is_measured_without_a_gpu_or_timer(monkeypatch):
    monkeypatch.setenv("PEFTKERN_DISPATCH", "measure")
    dispatch.clear()
    if DEVICE.type == "cuda":
        pytest.skip("on CUDA, measuring is the point: covered by the tests above")
    with peftkern.use_backend("triton"):
        lora_step(*lora_inputs())
    assert dispatch.choices() == {}  # the interpreter's speed says nothing: the fused variant ran


def test_dispatch_env_is_validated(monkeypatch):
    monkeypatch.setenv("PEFTKERN_DISPATCH", "fastest")
    with pytest.raises(ValueError, match="PEFTKERN_DISPATCH must be one of measure, fused, composite"):
        with peftkern.use_backend("triton"):
            lora_step(*lora_inputs())
    with pytest.raises(ValueError, match="PEFTKERN_DISPATCH"):
        peftkern.backend_info()


def test_cache_file_round_trip(timer, monkeypatch, tmp_path):
    path = tmp_path / "sub" / "dispatch.json"
    monkeypatch.setenv("PEFTKERN_DISPATCH_CACHE", str(path))
    t = timer({"fused": 3.0, "composite": 1.0})
    with peftkern.use_backend("triton"):
        lora_step(*lora_inputs())
    saved = json.loads(path.read_text())
    assert saved["versions"].startswith(f"peftkern {peftkern.__version__}")
    assert {c["variant"] for c in saved["choices"].values()} == {"composite"}
    # a new process (memory cleared) reads the file instead of measuring
    dispatch.clear()
    with peftkern.use_backend("triton"):
        lora_step(*lora_inputs())
    assert len(t.calls) == 4
    assert len(dispatch.choices()) == 2
    # choices made by other versions are ignored (a new kernel can change which one is faster)
    saved["versions"] = "peftkern 0.0.0, torch 0, triton 0"
    path.write_text(json.dumps(saved))
    dispatch.clear()
    with peftkern.use_backend("triton"):
        lora_step(*lora_inputs())
    assert len(t.calls) == 8
    path.write_text("{not json")
    dispatch.clear()
    with pytest.raises(RuntimeError, match="PEFTKERN_DISPATCH_CACHE=.* is not a readable dispatch cache"):
        with peftkern.use_backend("triton"):
            lora_step(*lora_inputs())


# ---- both variants of every family, forced, against the reference backend ------------------------

def adapter_step(h, wd, bd, wu, bu):
    h, wd, bd, wu, bu = (t.clone().requires_grad_() for t in (h, wd, bd, wu, bu))
    out = peftkern.bottleneck_adapter(h, wd, bd, wu, bu, activation="gelu", scaling=0.7)
    out.backward(torch.ones_like(out))
    return out.detach(), h.grad, wd.grad, bd.grad, wu.grad, bu.grad


def sparse_step(x, w, idx, v, bias):
    x, v, bias = (t.clone().requires_grad_() for t in (x, v, bias))
    y = peftkern.sparse_diff_linear(x, w, idx, v, bias)
    y.backward(torch.ones_like(y))
    return y.detach(), x.grad, v.grad, bias.grad


@pytest.mark.parametrize("variant", ["fused", "composite"])
def test_each_variant_matches_the_reference(monkeypatch, variant):
    monkeypatch.setenv("PEFTKERN_DISPATCH", variant)
    g = torch.Generator().manual_seed(1)
    lora = lora_inputs()
    adapter = [torch.randn(shape, generator=g).to(DEVICE) * s
               for shape, s in (((13, 24), 1.0), ((8, 24), 0.3), ((8,), 0.1), ((24, 8), 0.3), ((24,), 0.1))]
    w = torch.randn(20, 24, generator=g).to(DEVICE)
    idx = torch.randperm(20 * 24, generator=g)[:37].to(DEVICE)
    sparse = [torch.randn(9, 24, generator=g).to(DEVICE), w, idx, torch.randn(37, generator=g).to(DEVICE),
              torch.randn(20, generator=g).to(DEVICE)]
    w_before = w.clone()
    version = w._version
    results = {}
    for backend in ("triton", "reference"):
        with peftkern.use_backend(backend):
            results[backend] = (lora_step(*lora, p=0.2), adapter_step(*adapter), sparse_step(*sparse))
    for got, want in zip(results["triton"], results["reference"]):
        for g_, w_ in zip(got, want):
            torch.testing.assert_close(g_, w_, rtol=1e-5, atol=1e-5)
    # the composite sparse path applies the diff in place for its GEMMs: the weight comes back bit for
    # bit, with its version counter untouched (autograd's saved-tensor checks see no change)
    assert torch.equal(w, w_before) and w._version == version


def test_composite_sparse_restores_the_weight_when_the_gemm_fails(monkeypatch):
    monkeypatch.setenv("PEFTKERN_DISPATCH", "composite")
    w = torch.randn(6, 5, device=DEVICE)
    before = w.clone()
    idx = torch.tensor([0, 7, 29], device=DEVICE)
    v = torch.ones(3, device=DEVICE)
    calls = []

    def failing_linear(*args, **kwargs):
        calls.append(torch.equal(args[1], before))  # the GEMM sees W + Δ, not W
        raise RuntimeError("GEMM failed")

    monkeypatch.setattr(torch.nn.functional, "linear", failing_linear)
    with peftkern.use_backend("triton"), pytest.raises(RuntimeError, match="GEMM failed"):
        peftkern.sparse_diff_linear(torch.randn(2, 5, device=DEVICE), w, idx, v)
    assert calls == [False]
    assert torch.equal(w, before)


def test_composite_sparse_needs_a_writable_weight(timer, monkeypatch):
    """An inference tensor cannot be written outside inference mode: measuring skips the composite
    variant (only the fused one is timed and run), forcing it says why."""
    with torch.inference_mode():
        w = torch.randn(6, 5, device=DEVICE)
    idx = torch.tensor([0, 7, 29], device=DEVICE)
    v, x = torch.ones(3, device=DEVICE), torch.randn(2, 5, device=DEVICE)
    t = timer({"fused": 5.0, "composite": 1.0})
    with peftkern.use_backend("reference"):
        expected = peftkern.sparse_diff_linear(x, w, idx, v)
    with peftkern.use_backend("triton"):
        torch.testing.assert_close(peftkern.sparse_diff_linear(x, w, idx, v), expected)
        assert t.calls == []  # one runnable variant: nothing to measure
        monkeypatch.setenv("PEFTKERN_DISPATCH", "composite")
        with pytest.raises(RuntimeError, match="PEFTKERN_DISPATCH=composite: .*inference tensor"):
            peftkern.sparse_diff_linear(x, w, idx, v)


# ---- several variants of one kind: lora_linear's fused_persistent (the Hopper TMA GEMM) --------------

def test_variant_names_must_name_a_kind():
    with pytest.raises(ValueError, match="must be fused, composite"):
        dispatch.register("lora_linear", "triton", "fastest", forward=lambda *a: None)
    assert dispatch.kind_of("fused_persistent") == "fused" and dispatch.kind_of("composite") == "composite"


def test_persistent_variant_says_why_it_cannot_run():
    """CPU tensors, fp32 x and W, a backward without dx: the persistent variant declines (so it is never timed),
    and says why. (Each of kernels/lora_persistent.unsupported's reasons is tested in test_lora_persistent.)"""
    impl = dispatch.variants("lora_linear", "triton")["fused_persistent"]
    x, w, a, b = lora_inputs(dtype=torch.float16)

    def fwd(x, w):
        return lora_op.forward_op.Args(x=x, **fourbit.op_args(w), lora_a=a, lora_b=b, bias=None, scaling=0.5,
                                       dropout_p=0.0, seed=0)

    if DEVICE.type != "cuda":
        assert impl.why_not("forward", (fwd(x, w),)) == "not CUDA tensors"
    else:
        assert "16-bit" in impl.why_not("forward", (fwd(x.float(), w.float()),))
    dy = torch.ones(x.shape[0], w.shape[0], dtype=x.dtype, device=DEVICE)
    bwd = lora_op.backward_op.Args(dy=dy, x=x, **fourbit.op_args(w), lora_a=a, lora_b=b, s_down=None, scaling=0.5,
                                   dropout_p=0.0, seed=0, need_x=False, need_weight=False, need_lora_a=True,
                                   need_lora_b=True, need_bias=False, backend="triton")
    assert "dx is not needed" in impl.why_not("backward", (bwd,))


@pytest.mark.skipif(DEVICE.type == "cuda", reason="runs the persistent kernel in the CPU interpreter (on a GPU "
                    "it needs sm_90, where the measured tests above cover it)")
def test_forced_fused_measures_among_the_fused_variants(timer, monkeypatch):
    """PEFTKERN_DISPATCH=fused with two fused variants runnable: both are timed, the faster runs, composite is
    not a candidate; the persistent variant's results (forward and dx through the interpreter) are as
    accurate as the classic fused kernel's. Its sm_90/CUDA requirement is lifted here (the layout checks
    stay), so the interpreter can run it."""
    from peftkern.kernels import lora_persistent
    monkeypatch.setattr(lora_persistent, "unsupported", lora_persistent._layout_unsupported)
    t = timer({"fused": 2.0, "fused_persistent": 1.0})
    monkeypatch.setenv("PEFTKERN_DISPATCH", "fused")
    # fp16: TMA needs 16-bit x and W, rows of 16-byte multiples (k=24 and n=32 halves)
    x, w, a, b = lora_inputs(m=40, k=24, n=32, r=4, dtype=torch.float16)
    with peftkern.use_backend("triton"):
        persistent = lora_step(x, w, a, b, p=0.2)
    assert sorted(t.calls) == ["fused", "fused", "fused_persistent", "fused_persistent"]
    chosen = dispatch.choices()
    assert {c["variant"] for c in chosen.values()} == {"fused_persistent"}
    assert all(set(c["ms"]) == {"fused", "fused_persistent"} for c in chosen.values())
    monkeypatch.setattr(lora_persistent, "unsupported", lambda *args: "off for this comparison")
    with peftkern.use_backend("triton"):
        classic = lora_step(x, w, a, b, p=0.2)
    with peftkern.use_backend("reference"):
        oracle = lora_step(x.double(), w.double(), a.double(), b.double(), p=0.2)
    for got, ref, want in zip(persistent, classic, oracle):
        assert rel_err(got, want) <= 2 * rel_err(ref, want) + ERROR_FLOOR[torch.float16]


def test_a_single_applicable_variant_runs_whatever_the_mode_asks(monkeypatch):
    """A variant that says NotApplicable (the call is for another kind of input, e.g. a 4-bit base for a dense
    kernel) is not a candidate; when only one variant applies it runs under every PEFTKERN_DISPATCH, as a family
    with one variant always has. A variant that could apply but cannot run still makes a forced mode raise."""
    family = "test_not_applicable_family"

    def only(kind):
        return lambda phase, a: None if a == kind else dispatch.NotApplicable(f"for {kind} inputs")

    dispatch.register(family, "triton", "fused", forward=lambda a: "fused", unsupported=only("dense"))
    dispatch.register(family, "triton", "composite", forward=lambda a: "composite", unsupported=only("dense"))
    dispatch.register(family, "triton", "composite_4bit", forward=lambda a: "composite_4bit", unsupported=only("4bit"))
    try:
        for mode in ("measure", "fused", "composite"):
            monkeypatch.setenv("PEFTKERN_DISPATCH", mode)
            assert dispatch.call(family, "forward", "triton", tuple, "4bit") == "composite_4bit"
        monkeypatch.setenv("PEFTKERN_DISPATCH", "composite")
        assert dispatch.call(family, "forward", "triton", tuple, "dense") == "composite"
        monkeypatch.setenv("PEFTKERN_DISPATCH", "fused")
        assert dispatch.call(family, "forward", "triton", tuple, "dense") == "fused"
        with pytest.raises(RuntimeError, match="cannot run"):  # no variant applies to this input
            dispatch.call(family, "forward", "triton", tuple, "other")
    finally:
        dispatch._registry.pop(family)
