"""Sparse diff vectors: bit-exact apply/restore on every backend, validation, SparseDiff files and model
helpers, and sparse_diff_linear against the float64 reference."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import peftkern
from peftkern import SparseDiff
from peftkern.nn import SparseDiffLinear
from peftkern.sparse_diff import examples as sparse_examples, op as sparse_op

from .conftest import DEVICE, ERROR_FLOOR, available_backends, device_dtypes, rel_err

WEIGHT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# "cpu": the fast CPU path (the compiled C++ loops when built); "cuda": the compiled CUDA kernels
APPLY_BACKENDS = ["cpu", "cuda", "reference"]


def apply_backends(device=DEVICE):
    device = torch.device(device)
    names = ["reference"]
    if device.type == "cpu":
        names.insert(0, "cpu")
    elif peftkern.core.backend._extension_unavailable_reason(device) is None:
        names.insert(0, "cuda")
    return names


def random_diff(numel, nnz, index_dtype, device=DEVICE):
    idx = torch.randperm(numel, device=device)[:nnz]  # unsorted on purpose
    return idx.to(index_dtype)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("wdtype", WEIGHT_DTYPES, ids=str)
@pytest.mark.parametrize("backend", APPLY_BACKENDS)
def test_apply_restore_is_bit_exact(backend, wdtype, index_dtype):
    if backend not in apply_backends():
        pytest.skip(f"backend {backend} does not run {DEVICE.type} tensors here (peftkern._C not built for it)")
    weight = torch.randn(37, 53, device=DEVICE).to(wdtype)
    original = weight.clone()
    idx = random_diff(weight.numel(), 300, index_dtype)
    for values_dtype in {wdtype, torch.float32}:  # a float32 diff applies to a weight of any dtype
        values = torch.randn(300, device=DEVICE).to(values_dtype)
        with peftkern.use_backend(backend):
            backup = peftkern.sparse_diff_apply_(weight, idx, values, alpha=0.37)
        assert backup.dtype == wdtype and torch.equal(backup, original.view(-1)[idx.long()])
        acc = torch.float64 if wdtype == torch.float64 else torch.float32
        expected = (original.view(-1)[idx.long()].to(acc) + 0.37 * values.to(acc)).to(wdtype)
        assert torch.equal(weight.view(-1)[idx.long()], expected), "one fp32 add, rounded once"
        untouched = torch.ones(weight.numel(), dtype=torch.bool, device=DEVICE)
        untouched[idx.long()] = False
        assert torch.equal(weight.view(-1)[untouched], original.view(-1)[untouched])
        with peftkern.use_backend(backend):
            peftkern.sparse_diff_restore_(weight, idx, backup)
        assert torch.equal(weight, original)


def test_backends_agree_bit_for_bit_and_strided_weights_work():
    backends = apply_backends()
    base = torch.randn(64, 40, device=DEVICE)
    idx = random_diff(base.numel(), 500, torch.int64)
    values = torch.randn(500, device=DEVICE)
    results = []
    for backend in backends:
        w = base.clone()
        with peftkern.use_backend(backend):
            peftkern.sparse_diff_apply_(w, idx, values, alpha=-1.3)
        results.append(w)
    for r in results[1:]:
        assert torch.equal(r, results[0])
    # a transposed (non-contiguous) weight: flat indices are row-major in its logical shape
    storage = base.t().contiguous()
    w_t = storage.t()
    assert not w_t.is_contiguous()
    for backend in backends:
        with peftkern.use_backend(backend):
            backup = peftkern.sparse_diff_apply_(w_t, idx, values, alpha=-1.3)
        assert torch.equal(w_t, results[0])
        with peftkern.use_backend(backend):
            peftkern.sparse_diff_restore_(w_t, idx, backup)
        assert torch.equal(w_t, base)


def bad_cases(numel):
    good_idx = torch.arange(0, numel, 7)
    dup = good_idx.clone()
    dup[5] = dup[2]
    high = good_idx.clone()
    high[3] = numel
    neg = good_idx.clone()
    neg[4] = -1
    v = torch.randn(good_idx.numel())
    return [
        ("duplicate", dup, v, {}, ValueError, ["indices[5]", "repeats"]),
        ("out of range", high, v, {}, IndexError, ["indices[3]", str(numel)]),
        ("negative", neg, v, {}, IndexError, ["indices[4]", "-1"]),
        ("float indices", good_idx.float(), v, {}, TypeError, ["indices", "int32 or int64"]),
        ("2-D indices", good_idx.view(1, -1), v, {}, ValueError, ["indices", "1-D"]),
        ("values length", good_idx, v[:-1], {}, ValueError, ["values", f"({good_idx.numel()},)"]),
        ("values dtype", good_idx, v.half(), {}, TypeError, ["values", "torch.float16"]),
        ("values device", good_idx, v.to("meta"), {}, RuntimeError, ["values", "meta"]),
        ("alpha nan", good_idx, v, {"alpha": float("nan")}, ValueError, ["alpha", "finite"]),
    ]


@pytest.mark.parametrize("backend", APPLY_BACKENDS)
@pytest.mark.parametrize("case", range(9))
def test_bad_input_raises_and_leaves_the_weight_unchanged(backend, case):
    if backend not in apply_backends("cpu"):
        pytest.skip(f"backend {backend} does not run CPU tensors")
    weight = torch.randn(20, 30)
    name, idx, values, kw, exc, words = bad_cases(weight.numel())[case]
    original = weight.clone()
    with pytest.raises(exc) as info:
        with peftkern.use_backend(backend):
            peftkern.sparse_diff_apply_(weight, idx, values, **kw)
    for word in words:
        assert word in str(info.value), f"{name}: message {str(info.value)!r} should mention {word!r}"
    assert torch.equal(weight, original), f"{name}: the weight changed although the call raised"
    if exc in (IndexError, ValueError) and name in ("duplicate", "out of range", "negative"):
        with pytest.raises(exc):
            peftkern.sparse_diff_restore_(weight, idx, torch.zeros(idx.numel()))
        assert torch.equal(weight, original)


def test_int64_required_for_huge_weights(monkeypatch):
    monkeypatch.setattr(sparse_op, "INT32_LIMIT", 100)
    with pytest.raises(TypeError, match="int64"):
        peftkern.sparse_diff_apply_(torch.zeros(20, 10), torch.arange(3, dtype=torch.int32), torch.ones(3))


@pytest.mark.parametrize("backend", APPLY_BACKENDS)
def test_apply_and_restore_tell_autograd_the_weight_changed(backend):
    """Eager apply/restore skip torch's dispatcher (core/opdef.direct_call_ok), so they bump the weight's version
    counter themselves, as the dispatcher does for an in-place op: a tensor saved for a backward and then changed
    by a diff makes that backward fail loudly instead of using the new values."""
    if backend not in apply_backends():
        pytest.skip(f"backend {backend} does not run {DEVICE.type} tensors here (peftkern._C not built for it)")
    scale = torch.randn(4, 6, device=DEVICE, requires_grad=True)
    weight = torch.randn(4, 6, device=DEVICE)
    idx, values = torch.tensor([1, 7, 20], device=DEVICE), torch.randn(3, device=DEVICE)
    for change in ("apply", "restore"):
        loss = (scale * weight).sum()  # saves weight for the backward
        version = weight._version
        with peftkern.use_backend(backend):
            if change == "apply":
                backup = peftkern.sparse_diff_apply_(weight, idx, values)
            else:
                peftkern.sparse_diff_restore_(weight, idx, backup)
        assert weight._version > version
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_duplicate_check_is_remembered_until_the_indices_change():
    weight = torch.randn(10, 10)
    idx = torch.tensor([3, 1, 4])
    backup = peftkern.sparse_diff_apply_(weight, idx, torch.ones(3))
    peftkern.sparse_diff_restore_(weight, idx, backup)
    assert idx._peftkern_unique_for == (idx._version, 100)
    idx[0] = 100  # in-place change: the remembered check no longer holds
    original = weight.clone()
    with pytest.raises(IndexError):
        peftkern.sparse_diff_apply_(weight, idx, torch.ones(3))
    assert torch.equal(weight, original)


# Indices changed behind PyTorch's back (.numpy() / .data writes do not bump Tensor._version) after a
# successful call: every kernel must still refuse them itself. Run in a subprocess, so that a kernel that
# writes out of bounds fails this test (a crash, or a write into the neighbouring tensor) instead of
# killing the test run.
_MUTATED_INDICES_SCRIPT = r"""
import sys, torch, peftkern
backend, device = sys.argv[1], sys.argv[2]
def expect_index_error(fn, *tensors_unchanged):
    before = [t.clone() for t in tensors_unchanged]
    try:
        fn()
    except IndexError as err:
        assert "out of range" in str(err), str(err)
    else:
        raise AssertionError("no IndexError")
    for b, t in zip(before, tensors_unchanged):
        assert torch.equal(b, t), "a tensor was written although the call raised"
with peftkern.use_backend(backend):
    idx = torch.tensor([3, 17, 40], device=device)
    val = torch.tensor([1., 2., 3.], device=device)
    peftkern.sparse_diff_apply_(torch.zeros(8, 16, device=device), idx, val)  # validated; duplicates remembered
    big = torch.zeros(2, 8, 16, device=device)
    for bad in (200, 128, 10**9, -3):
        version = idx._version
        if device == "cpu":
            idx.numpy()[0] = bad  # the issue's spelling
        else:
            idx.data[0] = bad
        assert idx._version == version, "the write must bypass version tracking for this test to mean anything"
        expect_index_error(lambda: peftkern.sparse_diff_apply_(big[0], idx, val), big)
        expect_index_error(lambda: peftkern.sparse_diff_restore_(big[0], idx, val), big)
        # a strided view: row-major position 130 of a [8, 16] view of columns 0..7 (transposed) would land
        # in columns 8..15 of the storage, outside the view but inside the tensor's memory span
        store = torch.zeros(16, 16, device=device)
        view = store[:, :8].t()
        expect_index_error(lambda: peftkern.sparse_diff_apply_(view, idx, val), store)
print("ok")
"""


@pytest.mark.parametrize("backend", APPLY_BACKENDS)
def test_indices_changed_behind_torchs_back_never_reach_memory(backend, tmp_path):
    import subprocess
    import sys

    if backend not in apply_backends():
        pytest.skip(f"backend {backend} does not run {DEVICE.type} tensors here (peftkern._C not built for it)")
    script = tmp_path / "mutated.py"
    script.write_text(_MUTATED_INDICES_SCRIPT)
    run = subprocess.run([sys.executable, str(script), backend, DEVICE.type], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_linear_refuses_indices_changed_behind_torchs_back(backend):
    if backend not in available_backends("sparse_diff_linear", torch.float32):
        pytest.skip(f"backend {backend} unavailable here")
    x = torch.randn(4, 8, device=DEVICE, requires_grad=True)
    weight = torch.randn(5, 8, device=DEVICE)
    idx = torch.tensor([1, 9, 30], device=DEVICE)
    values = torch.randn(3, device=DEVICE, requires_grad=True)
    with peftkern.use_backend(backend):
        y = peftkern.sparse_diff_linear(x, weight, idx, values)  # validated once
        for bad in (40, 10**9, -1):
            idx.data[1] = bad  # .data writes do not bump _version: the remembered check still "holds"
            with pytest.raises(IndexError, match=r"indices\[1\] = .* out of range"):
                peftkern.sparse_diff_linear(x, weight, idx, values)
            with pytest.raises(IndexError, match="out of range"):
                y.sum().backward(retain_graph=True)  # the backward uses the indices too
        assert x.grad is None and values.grad is None


# ---- SparseDiff --------------------------------------------------------------------------------------

def test_sparse_diff_from_dense_to_dense():
    delta = torch.randn(30, 20)
    diff = SparseDiff.from_dense(delta, density=0.1)
    assert diff.nnz == 60 and diff.indices.dtype == torch.int32
    assert torch.equal(diff.indices, diff.indices.sort().values)
    kept = delta.view(-1).abs()[diff.indices.long()]
    dropped = torch.ones(600, dtype=torch.bool)
    dropped[diff.indices.long()] = False
    assert kept.min() >= delta.view(-1).abs()[dropped].max(), "from_dense keeps the largest |delta|"
    dense = diff.to_dense()
    assert dense.shape == delta.shape and torch.count_nonzero(dense) == 60
    assert torch.equal(dense.view(-1)[diff.indices.long()], delta.view(-1)[diff.indices.long()])
    assert SparseDiff.from_dense(delta, k=7).nnz == 7
    with pytest.raises(ValueError, match="exactly one"):
        SparseDiff.from_dense(delta, k=3, density=0.5)
    with pytest.raises(ValueError, match="density"):
        SparseDiff.from_dense(delta, density=1.5)


def test_sparse_diff_file_round_trip(tmp_path):
    pytest.importorskip("safetensors", reason="SparseDiff.save/load use safetensors files, and it is not installed")
    delta = torch.randn(30, 20)
    half = SparseDiff.from_dense(delta.bfloat16(), k=9)
    half.save(tmp_path / "d.safetensors")
    loaded = SparseDiff.load(tmp_path / "d.safetensors")
    assert loaded.shape == delta.shape and loaded.values.dtype == torch.bfloat16
    assert torch.equal(loaded.indices, half.indices) and torch.equal(loaded.values, half.values)
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a peftkern SparseDiff"):
        SparseDiff.load(tmp_path / "other.safetensors")


def test_sparse_diff_validates_its_indices_so_to_dense_agrees_with_apply():
    values = torch.randn(3)
    cases = [
        (torch.tensor([2, -3, 5]), IndexError, r"indices\[1\] = -3 is out of range"),  # used to wrap to 125
        (torch.tensor([2, 128, 5]), IndexError, r"indices\[1\] = 128"),
        (torch.tensor([2, 7, 2]), ValueError, r"indices\[2\] = 2 repeats"),  # to_dense kept the last value
    ]
    for idx, exc, message in cases:
        with pytest.raises(exc, match=message):
            SparseDiff(idx, values, (8, 16))
    with pytest.raises(TypeError, match="shape must be a sequence of ints"):
        SparseDiff(torch.tensor([1, 2, 3]), values, 128)
    with pytest.raises(TypeError, match="non-negative ints"):
        SparseDiff(torch.tensor([1, 2, 3]), values, (8, -16))
    with pytest.raises(TypeError, match="values must be a floating-point"):
        SparseDiff(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 3]), (8, 16))
    diff = SparseDiff(torch.tensor([2, 127, 5]), values, [8, 16])
    weight = torch.randn(8, 16)
    applied = weight.clone()
    diff.apply_(applied)
    assert torch.equal(applied, weight + diff.to_dense()), "to_dense and apply_ describe the same diff"
    diff.indices.numpy()[1] = 128  # changed behind PyTorch's back: to_dense checks again
    with pytest.raises(IndexError, match="out of range"):
        diff.to_dense()


def test_from_dense_refuses_non_finite_deltas():
    for bad in (float("nan"), float("inf"), -float("inf")):
        delta = torch.randn(6, 5)
        delta[2, 3] = bad
        with pytest.raises(ValueError, match="non-finite"):
            SparseDiff.from_dense(delta, k=4)


def test_load_rejects_inconsistent_files_naming_file_and_field(tmp_path):
    pytest.importorskip("safetensors", reason="SparseDiff.load reads safetensors files, and it is not installed")
    from safetensors.torch import save_file

    good = {"indices": torch.tensor([1, 5, 9], dtype=torch.int32), "values": torch.randn(3)}
    meta = {"format": "peftkern.SparseDiff/1", "shape": "[4, 3]", "dtype": "float32"}
    cases = [
        ("small", dict(meta, shape="[2, 3]"), good, ["small.safetensors", "'indices'", "'shape'", "out of range"]),
        ("garbage", dict(meta, shape="[4, x"), good, ["garbage.safetensors", "'shape'"]),
        ("notlist", dict(meta, shape="12"), good, ["notlist.safetensors", "'shape'"]),
        ("negdim", dict(meta, shape="[4, -3]"), good, ["negdim.safetensors", "'shape'"]),
        ("dtype", dict(meta, dtype="float16"), good, ["dtype.safetensors", "'dtype'"]),
        ("dup", meta, dict(good, indices=torch.tensor([1, 5, 5], dtype=torch.int32)), ["dup.safetensors", "repeats"]),
        ("neg", meta, dict(good, indices=torch.tensor([1, -5, 9], dtype=torch.int32)), ["neg.safetensors", "-5"]),
        ("missing", meta, {"indices": good["indices"]}, ["missing.safetensors", "'values'"]),
    ]
    for name, metadata, tensors, words in cases:
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        with pytest.raises(ValueError) as info:
            SparseDiff.load(path)
        for word in words:
            assert word in str(info.value), f"{name}: {str(info.value)!r} should mention {word!r}"
    save_file(good, str(tmp_path / "ok.safetensors"), metadata=meta)
    assert SparseDiff.load(tmp_path / "ok.safetensors").shape == (4, 3)


def test_save_into_a_missing_directory_says_so(tmp_path):
    diff = SparseDiff(torch.tensor([1]), torch.ones(1), (2, 2))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        diff.save(tmp_path / "no" / "such" / "dir" / "d.safetensors")


def test_model_helpers_switch_tasks_in_one_call():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.ReLU(), torch.nn.Linear(12, 4))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 16)
    y0 = model(x)
    diffs = {"0.weight": SparseDiff.from_dense(torch.randn(12, 16), density=0.2),
             "2.weight": SparseDiff.from_dense(torch.randn(4, 12), k=5)}
    with peftkern.sparse_diffs_applied(model, diffs):
        assert not torch.allclose(model(x), y0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k])
    backups = peftkern.apply_sparse_diffs_(model, diffs, alpha=0.5)
    peftkern.restore_sparse_diffs_(model, backups)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    with pytest.raises(KeyError, match="nope"):
        peftkern.apply_sparse_diffs_(model, {"nope": diffs["0.weight"]})
    wrong = {"0.weight": diffs["0.weight"], "2.weight": SparseDiff.from_dense(torch.randn(5, 5), k=2)}
    with pytest.raises(ValueError, match="shape"):
        peftkern.apply_sparse_diffs_(model, wrong)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items()), "nothing half-applied"


# ---- sparse_diff_linear --------------------------------------------------------------------------------

def oracle_linear(x, weight, idx, values, bias):
    dense = torch.zeros(weight.numel(), dtype=torch.float64, device=weight.device)
    dense[idx.long()] = values.double()
    w = weight.double() + dense.view(weight.shape)
    return F.linear(x.double(), w, None if bias is None else bias.double())


def eager_spiel(x, weight, idx, values, bias):
    """SpIEL-style baseline: clone W, scatter the values in, F.linear; gradient via the dense weight."""
    w = weight.detach().clone().to(values.dtype)
    w = w.view(-1).scatter_add(0, idx.long(), values).view(weight.shape).to(x.dtype)
    return F.linear(x, w, bias)


DTYPE_PAIRS = [(d, d) for d in device_dtypes()] + [(d, torch.float32) for d in device_dtypes() if d != torch.float32]



@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype,vdtype", DTYPE_PAIRS, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_linear_matches_float64_reference(backend, dtype, vdtype, bias, poisoned):
    if backend not in available_backends("sparse_diff_linear", dtype):
        pytest.skip(f"backend {backend} cannot run {dtype} on {DEVICE.type} here")
    n_out, n_in = 33, 70
    x = torch.randn(3, 7, n_in, device=DEVICE, dtype=dtype, requires_grad=True)
    weight = (torch.randn(n_out, n_in, device=DEVICE) / n_in**0.5).to(dtype)
    idx = random_diff(weight.numel(), 250, torch.int64)
    values = torch.randn(250, device=DEVICE, dtype=vdtype, requires_grad=True)
    b = torch.randn(n_out, device=DEVICE, dtype=dtype, requires_grad=True) if bias else None
    dy = torch.randn(3, 7, n_out, device=DEVICE, dtype=dtype)

    def run(fn, *tensors):
        for t in tensors:
            if t is not None:
                t.grad = None
        y = fn(*tensors)
        y.backward(dy.to(y.dtype))
        return [y.detach()] + [None if t is None else t.grad.clone() for t in (tensors[0], tensors[3], tensors[4])]

    with peftkern.use_backend(backend):
        ours = run(peftkern.sparse_diff_linear, x, weight, idx, values, b)
    base = run(eager_spiel, x, weight, idx, values, b)
    up = [t.detach().double().requires_grad_() if t is not None else None for t in (x, values, b)]
    oracle = run(oracle_linear, up[0], weight, idx, up[1], up[2])
    assert ours[0].dtype == dtype and ours[2].dtype == vdtype
    for name, o, t, ref in zip(["y", "dx", "dvalues", "dbias"], ours, base, oracle):
        if ref is None:
            assert o is None
            continue
        bound = 2 * rel_err(t, ref) + ERROR_FLOOR[dtype]
        assert rel_err(o, ref) <= bound, f"{name}: {rel_err(o, ref):.3g} > {bound:.3g} ({backend}, {dtype})"


def test_linear_gradcheck_float64():
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 9, dtype=torch.float64)
    idx = random_diff(54, 12, torch.int32, device="cpu")
    values = torch.randn(12, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    for backend in ("reference", "cpu"):
        with peftkern.use_backend(backend):
            assert torch.autograd.gradcheck(lambda x, v, b: peftkern.sparse_diff_linear(x, weight, idx, v, b),
                                            (x, values, bias))


def test_linear_reuses_its_sort_only_while_it_still_sorts_the_indices():
    """The fast CPU path keeps the sorting permutation of the last call as a hint; indices changed behind
    PyTorch's back (.data) to other valid positions must give the new diff's result, not the old one's."""
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 8, dtype=torch.float64)
    idx = torch.tensor([5, 30, 12, 7, 44])
    values = torch.randn(5, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(5, 6, dtype=torch.float64)
    with peftkern.use_backend("cpu"):
        for positions in ([5, 30, 12, 7, 44], [31, 2, 47, 19, 8], [0, 1, 2, 3, 4]):
            idx.data.copy_(torch.tensor(positions))
            x.grad = values.grad = None
            y = peftkern.sparse_diff_linear(x, weight, idx, values)
            y.backward(dy)
            xo, vo = x.detach().clone().requires_grad_(), values.detach().clone().requires_grad_()
            yo = oracle_linear(xo, weight, idx, vo, None)
            yo.backward(dy)
            for ours, ref in ((y, yo), (x.grad, xo.grad), (values.grad, vo.grad)):
                assert rel_err(ours, ref) < 1e-12, positions


class _LargestAllocation(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_linear_never_allocates_an_out_by_in_tensor(backend):
    if backend not in available_backends("sparse_diff_linear", torch.float32):
        pytest.skip(f"backend {backend} unavailable here")
    n_out, n_in, m = 64, 96, 16  # every activation-sized tensor is smaller than [out, in]
    x = torch.randn(m, n_in, device=DEVICE, requires_grad=True)
    weight = torch.randn(n_out, n_in, device=DEVICE)
    idx = random_diff(weight.numel(), 300, torch.int64)
    values = torch.zeros(300, device=DEVICE, requires_grad=True)
    spy = _LargestAllocation()
    with peftkern.use_backend(backend), spy:
        peftkern.sparse_diff_linear(x, weight, idx, values).sum().backward()
    assert values.grad is not None and spy.largest < n_out * n_in
    spy_base = _LargestAllocation()
    with spy_base:
        eager_spiel(x, weight, idx, values, None).sum().backward()
    assert spy_base.largest >= n_out * n_in  # the baseline does build dense [out, in] tensors


def test_linear_bad_input():
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="in_features 8"):
        peftkern.sparse_diff_linear(torch.randn(3, 7), w, torch.tensor([1]), torch.ones(1))
    with pytest.raises(IndexError, match="out of range"):
        peftkern.sparse_diff_linear(x, w, torch.tensor([40]), torch.ones(1))
    with pytest.raises(ValueError, match="repeats"):
        peftkern.sparse_diff_linear(x, w, torch.tensor([4, 4]), torch.ones(2))
    with pytest.raises(ValueError, match="bias"):
        peftkern.sparse_diff_linear(x, w, torch.tensor([1]), torch.ones(1), torch.ones(4))


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("case", sorted(sparse_examples.cases()))
def test_opcheck(backend, case):
    if backend not in available_backends("sparse_diff_linear", torch.float32):
        pytest.skip(f"backend {backend} unavailable here")
    fwd = sparse_examples.cases(device=DEVICE)[case]
    with peftkern.use_backend(backend):
        torch.library.opcheck(torch.ops.peftkern.sparse_diff_linear_fwd.default, (), fwd)
        bwd = sparse_examples.linear_backward_args(fwd, backend)
        torch.library.opcheck(torch.ops.peftkern.sparse_diff_linear_bwd.default, (), bwd)


@pytest.mark.parametrize("backend", APPLY_BACKENDS)
def test_opcheck_apply_restore(backend):
    if backend not in apply_backends():
        pytest.skip(f"backend {backend} does not run {DEVICE.type} tensors here")
    args = sparse_examples.apply_args(device=DEVICE)
    with peftkern.use_backend(backend):
        torch.library.opcheck(torch.ops.peftkern.sparse_diff_apply_.default, (), args)
        backup = torch.ops.peftkern.sparse_diff_apply_(**args)
        torch.library.opcheck(torch.ops.peftkern.sparse_diff_restore_.default, (),
                              dict(weight=args["weight"], indices=args["indices"], backup=backup))


def test_torch_compile_fullgraph():
    x = torch.randn(6, 10, requires_grad=True)
    weight = torch.randn(7, 10)
    idx = random_diff(70, 20, torch.int64, device="cpu")
    values = torch.randn(20, requires_grad=True)

    def step(x, v):
        return (peftkern.sparse_diff_linear(x, weight, idx, v) ** 2).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (step, compiled):
        x.grad = values.grad = None
        loss = fn(x, values)
        loss.backward()
        grads.append([loss.detach(), x.grad.clone(), values.grad.clone()])
    for e, c in zip(*grads):
        assert rel_err(c, e) < 1e-5


def test_sparse_diff_linear_module():
    lin = torch.nn.Linear(24, 10, device=DEVICE)
    idx = random_diff(240, 30, torch.int64)
    layer = SparseDiffLinear.from_linear(lin, idx)
    x = torch.randn(8, 24, device=DEVICE)
    torch.testing.assert_close(layer(x), lin(x), rtol=1e-6, atol=1e-6)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["values"]
    target = torch.randn(8, 10, device=DEVICE)
    opt = torch.optim.SGD([layer.values], lr=0.5)
    w0 = layer.weight.clone()
    first = None
    for _ in range(30):
        loss = F.mse_loss(layer(x), target)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first and torch.equal(layer.weight, w0)
    diff = layer.to_sparse_diff()
    merged = lin.weight.detach().clone()
    diff.apply_(merged)
    torch.testing.assert_close(F.linear(x, merged, lin.bias), layer(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="repeats"):
        SparseDiffLinear.from_linear(lin, torch.tensor([1, 1]))
