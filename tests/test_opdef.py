"""core/opdef.py: a Tensor[] input's gradient flags and gradients travel element by element, and Op.run runs the
op's body past the dispatcher with the same result."""
import pytest
import torch

from peftkern.core import dispatch
from peftkern.core.opdef import Op, grad_slot, wire_autograd

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


def test_run_is_the_ops_body(ops):
    x, mats = torch.randn(2, 5), [torch.randn(2, 5) for _ in range(2)]
    assert torch.equal(ops["fwd"].run(x=x, mats=mats, scales=[0.5, 1.5]), ops["fwd"](x=x, mats=mats, scales=[0.5, 1.5]))
