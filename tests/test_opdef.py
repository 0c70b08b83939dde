"""core/opdef.py: a Tensor[] input's gradient flags and gradients travel element by element, and an op runs its
body past the dispatcher exactly when the dispatcher could not change the result (direct_call_ok)."""
import pytest
import torch

from peftkern.core import dispatch
from peftkern.core.opdef import Op, call_path, direct_call_ok, grad_slot, wire_autograd

FAMILY = "_opdef_list_test"
_ops = {}


def _forward(a):
    y = a.x
    for s, t in zip(a.scales, a.mats):
        y = y + s * t
    return y


def _backward(a):
    dmats = [a.dy * s if k else t.new_empty(0) for s, t, k in zip(a.scales, a.mats, a.need_mats)]
    return (a.dy.clone() if a.need_x else a.x.new_empty(0)), dmats


@pytest.fixture(scope="module")
def ops():
    """A toy op pair y = x + Σ s_i·mats[i] with a Tensor[] input, its family registered for this module only."""
    if not _ops:
        fwd = Op(f"{FAMILY}_fwd(Tensor x, Tensor[] mats, float[] scales) -> Tensor y", family=FAMILY,
                 fake=lambda a: a.x.new_empty(a.x.shape))
        bwd = Op(f"{FAMILY}_bwd(Tensor dy, Tensor x, Tensor[] mats, float[] scales, bool need_x, bool[] need_mats, "
                 "str backend) -> (Tensor dx, Tensor[] dmats)", family=FAMILY, phase="backward",
                 fake=lambda a: (grad_slot(a.need_x, a.x, a.x.shape, a.x),
                                 [grad_slot(k, t, t.shape, t) for k, t in zip(a.need_mats, a.mats)]))
        wire_autograd(fwd, bwd)
        _ops.update(fwd=fwd, bwd=bwd)
    dispatch.register(FAMILY, "reference", forward=_forward, backward=_backward)
    yield _ops
    dispatch._registry.pop(FAMILY, None)


def test_a_tensor_list_input_gets_one_gradient_per_element_and_none_where_frozen(ops):
    x = torch.randn(3, 4, requires_grad=True)
    mats = [torch.randn(3, 4, requires_grad=True), torch.randn(3, 4), torch.randn(3, 4, requires_grad=True)]
    y = ops["fwd"](x=x, mats=mats, scales=[2.0, 3.0, -1.0])
    assert torch.equal(y, x + 2.0 * mats[0] + 3.0 * mats[1] - mats[2])
    dy = torch.randn(3, 4)
    y.backward(dy)
    assert torch.equal(x.grad, dy)
    assert torch.equal(mats[0].grad, 2.0 * dy) and torch.equal(mats[2].grad, -dy)
    assert mats[1].grad is None  # frozen: need_mats[1] was False, and no gradient reaches it


def test_a_direct_call_is_the_dispatched_call(ops):
    x, mats = torch.randn(2, 5), [torch.randn(2, 5) for _ in range(2)]
    values = dict(x=x, mats=mats, scales=[0.5, 1.5])
    assert direct_call_ok(ops["fwd"], values)
    want = torch.ops.peftkern._opdef_list_test_fwd(**values)
    assert torch.equal(ops["fwd"](**values), want)


def test_a_call_goes_through_the_dispatcher_whenever_it_could_differ(ops):
    """Each of these is a call the dispatcher treats differently from plain eager code."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    fwd = ops["fwd"]
    x, mats = torch.randn(2, 5), [torch.randn(2, 5), torch.randn(2, 5, requires_grad=True)]
    values = dict(x=x, mats=mats, scales=[0.5, 1.5])
    assert not direct_call_ok(fwd, values)  # a gradient may be asked for (an element of a Tensor[] requires grad)
    with torch.no_grad():
        assert direct_call_ok(fwd, values)
    with torch.inference_mode():
        assert direct_call_ok(fwd, values)
    plain = dict(values, mats=[m.detach() for m in mats])

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    class Functions(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():
        assert not direct_call_ok(fwd, plain)
    with Functions():
        assert not direct_call_ok(fwd, plain)
    with torch.profiler.profile():
        assert not direct_call_ok(fwd, plain)  # the profiler shows the op by name
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
    assert not direct_call_ok(fwd, dict(plain, x=fake))
    assert not direct_call_ok(fwd, dict(plain, x=torch.empty(2, 5, device="meta")))

    seen = []

    def inside_vmap(row):
        seen.append(direct_call_ok(fwd, dict(plain, x=row)))
        return row

    torch.vmap(inside_vmap)(x)
    assert seen == [False]
    assert direct_call_ok(fwd, plain)  # and nothing above left state behind


def test_an_eager_call_that_needs_gradients_runs_the_ops_own_autograd_function():
    """Plain eager code with an input that requires grad runs the op under its own torch.autograd.Function (the
    custom op's setup_context and backward, without its dispatch): the same values and gradients as through
    torch.ops. A Tensor[] element that requires grad keeps the custom op's list handling."""
    import peftkern
    from peftkern.lora import op as lora_op
    from peftkern.quant import fourbit

    torch.manual_seed(0)
    x = torch.randn(6, 8, requires_grad=True)
    w, a, b = torch.randn(5, 8), torch.randn(3, 8, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    args = dict(x=x, **fourbit.op_args(w), lora_a=a, lora_b=b, bias=None, scaling=0.5, dropout_p=0.25,
                seed=torch.tensor(7))
    assert call_path(lora_op.forward_op, args) == "autograd"
    dy = torch.randn(6, 5)
    grads = []
    for call in (lambda: lora_op.forward_op(**args)[0], lambda: torch.ops.peftkern.lora_linear_fwd(**args)[0]):
        y = call()
        y.backward(dy)
        grads.append([y.detach()] + [t.grad.clone() for t in (x, a, b)])
        for t in (x, a, b):
            t.grad = None
    for got, want in zip(*grads):
        assert torch.equal(got, want)
    assert lora_op.forward_op(**args)[0].grad_fn.name() == "lora_linear_fwd_eagerBackward"
    assert peftkern.lora_linear(x, w, a, b).grad_fn.next_functions[0][0].name() == "lora_linear_fwd_eagerBackward"
    with torch.no_grad():
        assert call_path(lora_op.forward_op, args) == "direct"
    listed = dict(x=torch.randn(2, 5), mats=[torch.randn(2, 5, requires_grad=True)], scales=[1.0])
    assert call_path(_ops["fwd"], listed) == "dispatcher"


def test_an_autocast_rule_keeps_its_op_on_the_dispatcher_under_autocast():
    if "cast" not in _ops:  # an op registers once per process
        _ops["cast"] = Op("_opdef_autocast_test(Tensor x) -> Tensor y", family="_opdef_autocast_test",
                          autocast_keep=(), fake=lambda a: a.x.new_empty(a.x.shape))
    op = _ops["cast"]
    values = dict(x=torch.randn(3))
    assert direct_call_ok(op, values)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not direct_call_ok(op, values)
