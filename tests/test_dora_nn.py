"""peftkern.nn.DoRALinear: init (magnitude = row norms: a new layer is its base), training, merge/unmerge, eval
caching through the module, parity with PEFT's DoRA layer, a 4-bit base."""
import copy

import pytest
import torch
from torch import nn

import peftkern
from peftkern.nn import DoRALinear

from .conftest import rel_err


def test_new_layer_equals_its_source_linear_and_trains():
    torch.manual_seed(0)
    base = nn.Linear(20, 12)
    layer = DoRALinear.from_linear(base, r=4, alpha=8)
    assert layer.weight is base.weight and layer.bias is base.bias and not layer.weight.requires_grad
    torch.testing.assert_close(layer.magnitude.detach(), base.weight.detach().norm(dim=1), rtol=1e-6, atol=0)
    x = torch.randn(3, 7, 20)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-6, atol=1e-6)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_a", "lora_b", "magnitude"}
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    before = layer(x).detach()
    layer(x).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (layer.lora_b, layer.magnitude))
    opt.step()
    assert not torch.allclose(layer(x), before)


def test_constructor_makes_a_consistent_layer():
    layer = DoRALinear(16, 8, r=3, alpha=6, dropout=0.1, bias=False, dtype=torch.float64)
    assert layer.magnitude.shape == (8,) and layer.magnitude.dtype == torch.float64
    torch.testing.assert_close(layer.magnitude.detach(), layer.weight.norm(dim=1))
    with pytest.raises(ValueError, match="r must be"):
        DoRALinear(16, 8, r=0)
    assert "dora=True" in repr(layer)


def _trained(seed=1):
    torch.manual_seed(seed)
    layer = DoRALinear.from_linear(nn.Linear(24, 10), r=3, alpha=5)
    with torch.no_grad():
        layer.lora_b.normal_()
        layer.magnitude.mul_(torch.rand(10) + 0.5)
    return layer


def test_merge_and_unmerge():
    layer = _trained().eval()
    x = torch.randn(6, 24)
    original = layer.weight.detach().clone()
    want = layer(x)
    layer.merge_()
    assert layer.merged
    assert rel_err(layer(x), want) < 1e-5
    layer.unmerge_()
    assert not layer.merged and torch.equal(layer.weight, original)
    assert torch.equal(layer(x), want)


def test_eval_mode_caches_and_sees_in_place_changes():
    layer = _trained().eval()
    x = torch.randn(4, 24)
    with torch.no_grad():
        first = layer(x)
        assert torch.equal(layer(x), first)
        layer.lora_b.data.mul_(2.0)  # through .data: no version bump
        second = layer(x)
    assert not torch.equal(first, second)
    layer.train()
    with torch.no_grad():
        assert torch.equal(layer(x), second)  # p = 0: training mode computes the same, uncached


def test_matches_peft_dora_layer():
    peft = pytest.importorskip("peft", reason="parity with PEFT's DoRA layer needs peft (in the test extras)")
    torch.manual_seed(2)

    class Host(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(24, 10)

        def forward(self, x):
            return self.proj(x)

    model = peft.get_peft_model(Host(), peft.LoraConfig(r=3, lora_alpha=5, use_dora=True, init_lora_weights=False,
                                                        target_modules=["proj"]))
    theirs = model.base_model.model.proj
    ours = DoRALinear.from_linear(copy.deepcopy(theirs.base_layer), r=3, alpha=5)
    torch.testing.assert_close(ours.magnitude.detach(), torch.linalg.norm(ours.weight, dim=1))
    with torch.no_grad():
        theirs.lora_magnitude_vector["default"].weight.mul_(torch.rand(10) + 0.5)
        ours.lora_a.copy_(theirs.lora_A["default"].weight)
        ours.lora_b.copy_(theirs.lora_B["default"].weight)
        ours.magnitude.copy_(theirs.lora_magnitude_vector["default"].weight)
    x = torch.randn(2, 5, 24)
    dy = torch.randn(2, 5, 10)
    y_ours, y_theirs = ours(x), theirs(x)
    y_ours.backward(dy)
    y_theirs.backward(dy)
    assert rel_err(y_ours, y_theirs) < 1e-5
    for mine, peft_param in ((ours.lora_a, theirs.lora_A["default"].weight),
                             (ours.lora_b, theirs.lora_B["default"].weight),
                             (ours.magnitude, theirs.lora_magnitude_vector["default"].weight)):
        assert rel_err(mine.grad, peft_param.grad) < 1e-5


def test_over_a_linear4bit():
    bnb = pytest.importorskip("bitsandbytes", reason="a 4-bit base is a bitsandbytes Linear4bit (in the test extras)")
    torch.manual_seed(3)
    linear = nn.Linear(64, 32)
    q = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True)
    q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    q = q.to("cpu")
    layer = DoRALinear.from_linear(q, r=4, alpha=8)
    dense = layer.quantized_weight.dequantize()
    torch.testing.assert_close(layer.magnitude.detach(), dense.norm(dim=1), rtol=1e-6, atol=0)
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, dense, q.bias), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        layer.lora_b.normal_()
    y = layer(x)
    want = peftkern.dora_linear(x, dense, layer.lora_a, layer.lora_b, layer.magnitude, scaling=2.0, bias=q.bias)
    assert rel_err(y, want) < 1e-5
    y.sum().backward()
    assert layer.magnitude.grad is not None and layer.lora_a.grad is not None
    with pytest.raises(RuntimeError, match="4-bit"):
        layer.merge_()


def test_4bit_state_dict_round_trips_the_whole_quantization_state():
    from .test_nn import check_4bit_state_dict_round_trip
    check_4bit_state_dict_round_trip(DoRALinear)


def test_4bit_state_dict_with_missing_or_inconsistent_state_raises_and_changes_nothing():
    from .test_nn import check_4bit_state_dict_refusals
    check_4bit_state_dict_refusals(DoRALinear)


def test_from_linear_refuses_an_8bit_base():
    bnb = pytest.importorskip("bitsandbytes",
                              reason="an 8-bit base is a bitsandbytes Linear8bitLt (in the test extras)")
    int8 = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False).to("cpu")
    with pytest.raises(TypeError, match=r"DoRALinear.from_linear: linear is a bitsandbytes Linear8bitLt .8-bit"):
        DoRALinear.from_linear(int8)
