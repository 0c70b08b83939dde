"""peftkern.nn.LoRALinear: init, training, merge/unmerge, and parity with PEFT's own LoRA layer."""
import copy

import pytest
import torch
import torch.nn.functional as F

from peftkern.nn import LoRALinear

from .conftest import DEVICE, rel_err


def test_new_layer_equals_its_source_linear():
    base = torch.nn.Linear(20, 12, device=DEVICE)
    layer = LoRALinear.from_linear(base, r=4, alpha=8)
    assert layer.weight is base.weight and layer.bias is base.bias, "weights are shared, not copied"
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.scaling == 2.0
    assert torch.count_nonzero(layer.lora_b) == 0 and torch.count_nonzero(layer.lora_a) > 0
    x = torch.randn(3, 7, 20, device=DEVICE)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-6, atol=1e-6)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_a", "lora_b"}


def test_constructor_and_bad_arguments():
    layer = LoRALinear(16, 8, r=3, alpha=6, dropout=0.1, bias=False, dtype=torch.float64)
    assert layer.bias is None and layer.weight.dtype == torch.float64 and layer.lora_a.shape == (3, 16)
    with pytest.raises(ValueError, match="r must be"):
        LoRALinear(16, 8, r=0)
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(16, 8, dropout=1.0)
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear.from_linear(torch.nn.Conv1d(3, 3, 1))


BAD_LORA_ARGS = [
    # (keyword arguments, exception, words the message must hold): each fails in the constructor,
    # naming the argument the user passed (not a derived value such as `scaling`)
    (dict(alpha=float("nan")), ValueError, ["alpha", "finite", "nan"]),
    (dict(alpha=float("inf")), ValueError, ["alpha", "finite"]),
    (dict(alpha="16"), TypeError, ["alpha", "str"]),
    (dict(r=2.0), TypeError, ["r", "int", "float"]),
    (dict(r=True), TypeError, ["r", "bool"]),
    (dict(r=-1), ValueError, ["r", ">= 1", "-1"]),
    (dict(dropout=float("nan")), ValueError, ["dropout", "finite"]),
    (dict(dropout="0.1"), TypeError, ["dropout", "str"]),
    (dict(dropout=-0.5), ValueError, ["dropout", ">= 0.0"]),
    (dict(in_features=-3), ValueError, ["in_features", ">= 0", "-3"]),
    (dict(out_features=4.0), TypeError, ["out_features", "int", "float"]),
]


@pytest.mark.parametrize("kw,exc,words", BAD_LORA_ARGS, ids=[str(b[0]) for b in BAD_LORA_ARGS])
def test_lora_layer_validates_its_arguments_when_built(kw, exc, words):
    args = {"in_features": 16, "out_features": 8, **kw}
    with pytest.raises(exc) as info:
        LoRALinear(**args)
    for word in words:
        assert word in str(info.value), f"message {str(info.value)!r} should mention {word!r}"
    if "in_features" not in kw and "out_features" not in kw:
        with pytest.raises(exc) as info:
            LoRALinear.from_linear(torch.nn.Linear(16, 8), **kw)
        assert words[0] in str(info.value)


def test_zero_in_features_layer_is_its_bias():
    layer = LoRALinear(0, 5, r=2)
    x = torch.randn(3, 0, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, layer.bias.expand(3, 5), rtol=0, atol=0)
    y.sum().backward()
    assert x.grad.shape == (3, 0) and torch.count_nonzero(layer.lora_b.grad) == 0


def test_training_updates_only_the_adapter_and_lowers_the_loss():
    torch.manual_seed(0)
    layer = LoRALinear(16, 8, r=4, alpha=8, dropout=0.1).to(DEVICE)
    target_layer = copy.deepcopy(layer)
    with torch.no_grad():
        target_layer.weight.add_(0.3 * torch.randn_like(target_layer.weight[:, :1]) @ torch.randn(1, 16, device=DEVICE))
    w0 = layer.weight.clone()
    opt = torch.optim.Adam([layer.lora_a, layer.lora_b], lr=1e-2)
    x = torch.randn(256, 16, device=DEVICE)
    with torch.no_grad():
        target = F.linear(x, target_layer.weight, target_layer.bias)
    losses = []
    for _ in range(150):
        loss = F.mse_loss(layer(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    assert torch.equal(layer.weight, w0)


def test_merge_and_unmerge_restore_the_exact_weight():
    layer = LoRALinear(24, 10, r=3, alpha=5).to(DEVICE)
    with torch.no_grad():
        layer.lora_b.normal_()
    w0 = layer.weight.clone()
    x = torch.randn(4, 24, device=DEVICE)
    layer.eval()
    y = layer(x)
    assert not layer.merged
    layer.merge_()
    assert layer.merged and not torch.equal(layer.weight, w0)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.merge_()  # merging twice is a no-op
    layer.unmerge_()
    assert not layer.merged and torch.equal(layer.weight, w0)
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)


peft = pytest.importorskip("peft", reason="PEFT parity needs peft (in the test extras)")


def test_matches_pefts_own_lora_layer():
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    base = torch.nn.Linear(33, 17, device=DEVICE)
    base.requires_grad_(False)
    ref = PeftLinear(copy.deepcopy(base), "default", config=LoraConfig(r=5, lora_alpha=10), r=5, lora_alpha=10)
    ref.to(DEVICE)
    with torch.no_grad():
        ref.lora_B["default"].weight.normal_()
    ours = LoRALinear.from_linear(copy.deepcopy(base), r=5, alpha=10)
    with torch.no_grad():
        ours.lora_a.copy_(ref.lora_A["default"].weight)
        ours.lora_b.copy_(ref.lora_B["default"].weight)
    x = torch.randn(2, 9, 33, device=DEVICE)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y = ref(x1), ours(x2)
    assert rel_err(y, y_ref) < 1e-5
    dy = torch.randn_like(y)
    y_ref.backward(dy)
    y.backward(dy)
    assert rel_err(x2.grad, x1.grad) < 1e-5
    assert rel_err(ours.lora_a.grad, ref.lora_A["default"].weight.grad) < 1e-5
    assert rel_err(ours.lora_b.grad, ref.lora_B["default"].weight.grad) < 1e-5


# ---- BottleneckAdapter -----------------------------------------------------------------------------
from peftkern.nn import BottleneckAdapter  # noqa: E402


def test_adapter_inits_and_identity_start():
    bert = BottleneckAdapter(64, 8, activation="gelu", device=DEVICE)
    assert abs(bert.w_down.std().item() - 0.02) < 0.005 and torch.count_nonzero(bert.b_down) == 0
    mam = BottleneckAdapter(64, 8, init_weights="mam_adapter", device=DEVICE)
    assert torch.count_nonzero(mam.w_up) == 0 and torch.count_nonzero(mam.w_down) > 0
    h = torch.randn(3, 5, 64, device=DEVICE)
    torch.testing.assert_close(mam(h), h, rtol=0, atol=0)
    r = torch.randn_like(h)
    torch.testing.assert_close(mam(h, residual=r), r, rtol=0, atol=0)
    no_bias = BottleneckAdapter(16, 2, bias=False, dtype=torch.float64)
    assert no_bias.b_down is None and no_bias.b_up is None and no_bias.w_up.dtype == torch.float64


def test_adapter_bad_arguments():
    with pytest.raises(ValueError, match="'gelu_tanh'"):
        BottleneckAdapter(16, 4, activation="prelu")
    with pytest.raises(ValueError, match="bottleneck"):
        BottleneckAdapter(16, 0)
    with pytest.raises(ValueError, match="init_weights"):
        BottleneckAdapter(16, 4, init_weights="xavier")
    with pytest.raises(ValueError, match="scaling"):
        BottleneckAdapter(16, 4, scaling=float("nan"))
    with pytest.raises(TypeError, match="d_model"):
        BottleneckAdapter(16.0, 4)


def test_adapter_blames_h_when_its_width_is_wrong():
    adapter = BottleneckAdapter(16, 4)
    with pytest.raises(ValueError) as info:
        adapter(torch.randn(3, 15))
    message = str(info.value)
    assert message.startswith("h") and "16" in message and "(3, 15)" in message, message
    assert "w_down must" not in message, "the weights agree with each other: h is what is wrong"


def test_adapter_trains_and_matches_functional():
    torch.manual_seed(1)
    adapter = BottleneckAdapter(32, 4, activation="silu", scaling=0.5, device=DEVICE)
    h = torch.randn(128, 32, device=DEVICE)
    teacher = BottleneckAdapter(32, 4, activation="silu", scaling=0.5, device=DEVICE)
    with torch.no_grad():
        teacher.w_down.normal_(std=0.3)
        teacher.w_up.normal_(std=0.3)
        target = teacher(h)
    expected = h + 0.5 * (F.silu(h @ adapter.w_down.t() + adapter.b_down) @ adapter.w_up.t() + adapter.b_up)
    torch.testing.assert_close(adapter(h), expected, rtol=1e-5, atol=1e-5)
    opt = torch.optim.Adam(adapter.parameters(), lr=2e-2)
    losses = []
    for _ in range(200):
        loss = F.mse_loss(adapter(h), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
