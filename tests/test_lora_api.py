"""lora_linear's contract around the math: bad input, backend control, opcheck, torch.compile."""
import pytest
import torch

import peftkern
from peftkern.core import backend as _backend
from peftkern.lora import examples as lora_examples

from .conftest import DEVICE, available_backends, rel_err


def good(dtype=torch.float32, device="cpu"):
    return dict(
        x=torch.randn(2, 5, 12, device=device, dtype=dtype),
        weight=torch.randn(9, 12, device=device, dtype=dtype),
        lora_a=torch.randn(3, 12, device=device, dtype=dtype),
        lora_b=torch.randn(9, 3, device=device, dtype=dtype),
        bias=torch.randn(9, device=device, dtype=dtype),
    )


def call(args, **kw):
    return peftkern.lora_linear(args["x"], args["weight"], args["lora_a"], args["lora_b"], bias=args["bias"], **kw)


BAD = [
    # (name, change to the good arguments, keyword overrides, exception, words the message must hold)
    ("x last dim", {"x": torch.randn(2, 5, 11)}, {}, ValueError, ["x", "in_features 12", "(2, 5, 11)"]),
    ("weight 1-D", {"weight": torch.randn(12)}, {}, ValueError, ["weight", "2-D"]),
    ("lora_a cols", {"lora_a": torch.randn(3, 13)}, {}, ValueError, ["lora_a", "(3, 12)", "(3, 13)"]),
    ("lora_b rows", {"lora_b": torch.randn(8, 3)}, {}, ValueError, ["lora_b", "(9, 3)", "(8, 3)"]),
    ("lora_b rank", {"lora_b": torch.randn(9, 4)}, {}, ValueError, ["lora_b", "(9, 3)", "(9, 4)"]),
    ("bias shape", {"bias": torch.randn(8)}, {}, ValueError, ["bias", "(9,)", "(8,)"]),
    ("x int", {"x": torch.ones(2, 5, 12, dtype=torch.int64)}, {}, TypeError, ["x", "torch.int64"]),
    ("weight dtype", {"weight": torch.randn(9, 12, dtype=torch.float64)}, {}, TypeError,
     ["weight", "torch.float64", "torch.float32"]),
    ("bias dtype", {"bias": torch.randn(9, dtype=torch.float64)}, {}, TypeError, ["bias", "torch.float64"]),
    ("lora_a half beside float32 x", {"lora_a": torch.randn(3, 12, dtype=torch.float16)}, {}, TypeError,
     ["lora_a", "float32", "torch.float16"]),
    ("x not a tensor", {"x": [[1.0] * 12]}, {}, TypeError, ["x", "torch.Tensor", "list"]),
    ("device mismatch", {"weight": torch.randn(9, 12, device="meta")}, {}, RuntimeError, ["weight", "meta", "cpu"]),
    ("dropout 1", {}, {"dropout_p": 1.0}, ValueError, ["dropout_p", "< 1.0", "1.0"]),
    ("dropout negative", {}, {"dropout_p": -0.1}, ValueError, ["dropout_p", ">= 0.0"]),
    ("scaling nan", {}, {"scaling": float("nan")}, ValueError, ["scaling", "finite"]),
    ("scaling str", {}, {"scaling": "2"}, TypeError, ["scaling", "str"]),
    ("seed negative", {}, {"seed": -1}, ValueError, ["seed", "2**63", "-1"]),
    ("seed float", {}, {"seed": 1.5}, TypeError, ["seed", "float"]),
    ("training not bool", {}, {"training": 1}, TypeError, ["training", "bool"]),
]


@pytest.mark.parametrize("name,change,kw,exc,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_and_changes_nothing(name, change, kw, exc, words):
    args = {**good(), **change}
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}
    with pytest.raises(exc) as info:
        call(args, **kw)
    for word in words:
        assert word in str(info.value), f"message {str(info.value)!r} should mention {word!r}"
    for k, v in before.items():
        assert torch.equal(args[k], v), f"{k} was changed by a call that raised"


def test_backend_names_and_availability(monkeypatch):
    args = good()
    with pytest.raises(ValueError, match="use_backend"):
        with peftkern.use_backend("fastest"):
            pass
    with pytest.raises(RuntimeError, match="'cuda' has no implementation of lora_linear"):
        with peftkern.use_backend("cuda"):
            call(args)
    with pytest.raises(RuntimeError, match="float64"):
        with peftkern.use_backend("triton"):
            call(good(torch.float64))
    monkeypatch.setenv("PEFTKERN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="PEFTKERN_BACKEND"):
        call(args)
    monkeypatch.setenv("PEFTKERN_BACKEND", "reference")
    assert _backend.select("lora_linear", torch.device("cpu"), torch.float32) == "reference"
    with peftkern.use_backend("auto"):  # the context manager wins over the environment
        assert _backend.requested_backend() == "auto"


def test_backend_info_reports_everything():
    info = peftkern.backend_info()
    for key in ("torch", "triton", "devices", "extension_built", "auto"):
        assert key in info
    assert info["auto"]["lora_linear"]["cpu"] == "cpu"
    assert info["torch"] == torch.__version__


# ---- opcheck and torch.compile -------------------------------------------------------------------

def op_args(p, bias, device=DEVICE, dtype=torch.float32):
    x = torch.randn(10, 12, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(9, 12, device=device, dtype=dtype)
    a = torch.randn(3, 12, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(9, 3, device=device, dtype=dtype, requires_grad=True)
    bb = torch.randn(9, device=device, dtype=dtype) if bias else None
    seed = torch.tensor(42) if p > 0 else None
    return x, w, a, b, bb, 0.5, p, seed


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("case", sorted(lora_examples.cases()))
def test_opcheck(backend, case):
    """torch.library.opcheck on both ops, over the family's representative arguments (dense and 4-bit bases,
    with and without bias and dropout)."""
    if backend not in available_backends("lora_linear", torch.float32):
        pytest.skip(f"backend {backend} unavailable here")
    fwd = lora_examples.cases(device=DEVICE)[case]
    with peftkern.use_backend(backend):
        torch.library.opcheck(torch.ops.peftkern.lora_linear_fwd.default, (), fwd)
        _, s_down = torch.ops.peftkern.lora_linear_fwd(**fwd)
        bwd = lora_examples.backward_args(fwd, s_down, backend)
        torch.library.opcheck(torch.ops.peftkern.lora_linear_bwd.default, (), bwd)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_forward_backward(compile_backend):
    x, w, a, b, bb, _, _, _ = op_args(0.2, True)

    def step(x, a, b):
        y = peftkern.lora_linear(x, w, a, b, scaling=0.5, bias=bb, dropout_p=0.2, seed=11)
        return (y * y).sum()

    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    grads = []
    for fn in (step, compiled):
        for t in (x, a, b):
            t.grad = None
        loss = fn(x, a, b)
        loss.backward()
        grads.append([loss.detach()] + [t.grad.clone() for t in (x, a, b)])
    for eager, comp in zip(*grads):
        assert rel_err(comp, eager) < 1e-5


def test_compiled_fresh_seeds_do_not_recompile():
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    x, w, a, b, _, _, _, _ = op_args(0.2, False)
    fn = torch.compile(lambda x: peftkern.lora_linear(x, w, a, b, dropout_p=0.5), fullgraph=True, backend=counter)
    y1, y2 = fn(x), fn(x)
    assert counter.frame_count == 1
    assert not torch.equal(y1, y2), "seed=None must draw a new mask per call, also when compiled"


# ---- documentation -------------------------------------------------------------------------------

def _params(fn):
    import inspect

    return [n for n in inspect.signature(fn).parameters if n != "self"]


def test_public_docstrings_stand_alone():
    """Users have the docstrings, not the repository's design documents: each public function and class
    documents its own arguments, dtypes and exceptions and points nowhere else."""
    from peftkern.nn import BottleneckAdapter, DoRALinear, LoRALinear

    documented = {
        peftkern.lora_linear: _params(peftkern.lora_linear) + ["2**63", "float32", "bfloat16", "autocast"],
        peftkern.dora_linear: _params(peftkern.dora_linear) + ["2**63", "float32", "bfloat16", "autocast", "cached"],
        DoRALinear: _params(DoRALinear.__init__) + ["magnitude", "lora_a", "lora_b", "Linear4bit"],
        DoRALinear.from_linear: ["linear", "shared", "frozen", "magnitude"],
        DoRALinear.forward: ["in_features", "out_features", "float32", "autocast", "dropout", "magnitude"],
        DoRALinear.merge_: ["unmerge_", "float32", "magnitude"],
        DoRALinear.reset_magnitude: ["magnitude"],
        peftkern.bottleneck_adapter: _params(peftkern.bottleneck_adapter) + ["float32", "autocast", "gelu_tanh"],
        peftkern.use_backend: ["auto", "triton", "cuda", "reference", "PEFTKERN_BACKEND", "backward"],
        peftkern.backend_info: ["extension_built", "auto", "devices"],
        LoRALinear: _params(LoRALinear.__init__) + ["lora_a", "lora_b", "scaling"],
        LoRALinear.from_linear: ["linear", "shared", "frozen"],
        LoRALinear.forward: ["in_features", "out_features", "float32", "autocast", "dropout"],
        LoRALinear.merge_: ["unmerge_", "float32"],
        LoRALinear.unmerge_: ["bit", "merge"],
        LoRALinear.reset_lora_parameters: ["lora_a", "lora_b"],
        LoRALinear.merged: ["merge_"],
        BottleneckAdapter: _params(BottleneckAdapter.__init__) + ["w_down", "b_down", "w_up", "b_up"],
        BottleneckAdapter.forward: ["h", "residual", "d_model", "float32", "autocast"],
        BottleneckAdapter.reset_parameters: ["init_weights"],
    }
    for obj, words in documented.items():
        doc = obj.__doc__ or ""
        name = getattr(obj, "__qualname__", None) or getattr(obj.fget, "__qualname__", repr(obj))
        for word in words:
            assert word in doc, f"{name}'s docstring should mention {word!r}"
        if obj not in (LoRALinear.unmerge_, LoRALinear.merged, LoRALinear.reset_lora_parameters,
                       BottleneckAdapter.reset_parameters, LoRALinear.merge_, DoRALinear.reset_magnitude):
            assert "Raises" in doc or "raises" in doc.lower(), f"{name}'s docstring should say what it raises"
