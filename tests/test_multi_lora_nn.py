"""peftkern.nn.MultiLoRALinear: a thin module over multi_lora_linear."""
import pytest
import torch
from torch import nn

import peftkern
from peftkern.nn import MultiLoRALinear

from .conftest import rel_err


def test_new_layer_equals_its_linear_and_shares_its_parameters():
    linear = nn.Linear(20, 12)
    layer = MultiLoRALinear.from_linear(linear, ranks=[4, 2, 8], alphas=[8, 4, 16])
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert not linear.weight.requires_grad and not linear.bias.requires_grad
    assert [tuple(a.shape) for a in layer.lora_a] == [(4, 20), (2, 20), (8, 20)]
    assert [tuple(b.shape) for b in layer.lora_b] == [(12, 4), (12, 2), (12, 8)]
    assert layer.scalings == [2.0, 2.0, 2.0]
    x = torch.randn(3, 5, 20)
    assert torch.equal(layer(x, torch.tensor([0, 2, -1])), linear(x))


def test_forward_is_the_functional_op_and_trains_every_used_adapter():
    torch.manual_seed(0)
    layer = MultiLoRALinear(16, 10, ranks=[3, 5], alphas=6.0, dropout=0.1)
    for b in layer.lora_b:
        nn.init.normal_(b)
    x = torch.randn(4, 16)
    ids = torch.tensor([1, 0, 1, -1])
    layer.eval()
    y = layer(x, ids)
    want = peftkern.multi_lora_linear(x, layer.weight, list(layer.lora_a), list(layer.lora_b), ids,
                                      scalings=[2.0, 1.2], bias=layer.bias, training=False)
    assert torch.equal(y, want)
    layer.train()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = [p.detach().clone() for p in (*layer.lora_a, *layer.lora_b)]
    layer(x, ids).square().sum().backward()
    opt.step()
    after = [p.detach() for p in (*layer.lora_a, *layer.lora_b)]
    assert all(not torch.equal(b, a) for b, a in zip(before, after))
    assert layer.weight.grad is None


def test_state_dict_names_and_round_trip():
    layer = MultiLoRALinear(8, 6, ranks=[2, 3])
    keys = set(layer.state_dict())
    assert keys == {"weight", "bias", "lora_a.0", "lora_a.1", "lora_b.0", "lora_b.1"}
    other = MultiLoRALinear(8, 6, ranks=[2, 3])
    other.load_state_dict(layer.state_dict())
    x = torch.randn(5, 8)
    ids = torch.tensor([0, 1, 1, 0, -1])
    assert torch.equal(other(x, ids), layer(x, ids))


def test_float64_gradients_match_per_adapter_lora_layers():
    layer = MultiLoRALinear(9, 7, ranks=[2, 4], alphas=[1.0, 3.0], dtype=torch.float64)
    for b in layer.lora_b:
        nn.init.normal_(b)
    x = torch.randn(6, 9, dtype=torch.float64)
    ids = torch.tensor([0, 1, 1, 0, 0, -1])
    layer(x, ids).square().sum().backward()
    for i in range(2):
        a = layer.lora_a[i].detach().clone().requires_grad_()
        b = layer.lora_b[i].detach().clone().requires_grad_()
        y = peftkern.lora_linear(x, layer.weight, a, b, scaling=layer.scalings[i], bias=layer.bias)
        y[ids == i].square().sum().backward()
        assert rel_err(layer.lora_a[i].grad, a.grad) < 1e-12
        assert rel_err(layer.lora_b[i].grad, b.grad) < 1e-12


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(ranks=4), TypeError, "ranks must be a list or tuple"),
    (dict(ranks=[]), ValueError, "ranks must hold at least one"),
    (dict(ranks=[2, 0]), ValueError, r"ranks\[1\] must be >= 1"),
    (dict(ranks=[2, 3], alphas=[1.0]), ValueError, "alphas must hold one number per adapter"),
    (dict(ranks=[2], alphas="a"), TypeError, "alphas must be a real number"),
    (dict(ranks=[2], alphas=[float("inf")]), ValueError, r"alphas\[0\] must be finite"),
    (dict(ranks=[2], dropout=1.5), ValueError, "dropout"),
])
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        MultiLoRALinear(8, 6, **kwargs)


def test_from_linear_refuses_other_modules():
    with pytest.raises(TypeError, match="linear must be a torch.nn.Linear"):
        MultiLoRALinear.from_linear(nn.Conv1d(3, 3, 1), ranks=[2])


def test_from_linear_refuses_4bit_and_8bit_bases_naming_what_to_do():
    """A Linear4bit or Linear8bitLt subclasses nn.Linear: a TypeError saying what to use instead, not torch's
    "Only Tensors of floating point ... can require gradients"."""
    bnb = pytest.importorskip("bitsandbytes", reason="the quantized bases are bitsandbytes layers (in the test extras)")
    q4 = bnb.nn.Linear4bit(64, 32, quant_type="nf4").to("cpu")
    with pytest.raises(TypeError) as info:
        MultiLoRALinear.from_linear(q4, ranks=[2, 3])
    for word in ("MultiLoRALinear.from_linear", "linear", "Linear4bit", "peftkern.multi_lora_linear",
                 "QuantizedWeight.from_bnb", "LoRALinear.from_linear"):
        assert word in str(info.value), word
    q8 = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False).to("cpu")
    with pytest.raises(TypeError, match=r"Linear8bitLt \(8-bit, LLM.int8\), and 8-bit bases are not supported"):
        MultiLoRALinear.from_linear(q8, ranks=[2])
    packed = nn.Linear(8, 4)
    packed.weight = nn.Parameter(torch.zeros(4, 8, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(TypeError, match="not a floating dtype"):
        MultiLoRALinear.from_linear(packed, ranks=[2])
