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


# ------------------------------------------------------------------ a bitsandbytes 4-bit base: state dict, refusals
NO_BNB = "a 4-bit base is a bitsandbytes Linear4bit (in the test extras)"


def linear4bit(in_features=128, out_features=40, seed=0, quant_type="nf4", blocksize=64, double_quant=True):
    """A quantized bitsandbytes Linear4bit (CPU) of a random nn.Linear; in_features a multiple of the block size so
    bitsandbytes' own CPU forward is right, and more than one block per row."""
    bnb = pytest.importorskip("bitsandbytes", reason=NO_BNB)
    torch.manual_seed(seed)
    dense = torch.nn.Linear(in_features, out_features)
    q = bnb.nn.Linear4bit(in_features, out_features, compute_dtype=torch.float32, quant_type=quant_type,
                          compress_statistics=double_quant)
    q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                 compress_statistics=double_quant, blocksize=blocksize, module=q)
    q.bias = torch.nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    return q.to("cpu")  # quantizes


def trained(layer):
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_(std=0.5)  # a trained adapter (and a DoRA magnitude not equal to the norms)
    return layer


def check_4bit_state_dict_round_trip(cls):
    """cls.from_linear over one Linear4bit -> state_dict -> load_state_dict into a layer over another Linear4bit
    of a different format (fp4, blocksize 128, no double quantization): the loaded layer computes exactly what the
    saved one computes, with the saved format, and so does the Linear4bit it shares its weight with."""
    source = linear4bit(seed=0)
    saved = trained(cls.from_linear(source, r=4, alpha=8))
    target_linear = linear4bit(seed=1, quant_type="fp4", blocksize=128, double_quant=False)
    loaded = trained(cls.from_linear(target_linear, r=4, alpha=8))
    x = torch.randn(6, 128)
    assert not torch.equal(loaded(x), saved(x))
    state = saved.state_dict()
    # bitsandbytes' own names for the quantization state beside the packed weight
    assert set(state) == set(source.state_dict()) | {n for n, p in saved.named_parameters() if p.requires_grad}
    result = loaded.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    qa, qb = saved.quantized_weight, loaded.quantized_weight
    assert (qb.quant_type, qb.blocksize, qb.double_quant, qb.dtype) == ("nf4", 64, True, torch.float32)
    for name, t in qa._tensors().items():
        assert torch.equal(getattr(qb, name), t), name
        assert getattr(qb, name).data_ptr() != t.data_ptr(), f"{name} is copied, not aliased"
    assert torch.equal(loaded(x), saved(x))
    # the shared Params4bit took the bytes and quant_state: the Linear4bit itself computes with the loaded weight
    assert loaded.weight is target_linear.weight and qb.packed.data_ptr() == target_linear.weight.data_ptr()
    torch.testing.assert_close(target_linear(x), F.linear(x, qa.dequantize(), saved.bias))


def check_4bit_state_dict_refusals(cls):
    """Packed bytes without their quantization state (an older checkpoint, or a dense one), a partial or
    inconsistent state, or another shape: load_state_dict raises naming the problem and the layer is unchanged."""
    saved = trained(cls.from_linear(linear4bit(seed=0), r=4, alpha=8))
    layer = trained(cls.from_linear(linear4bit(seed=1), r=4, alpha=8))
    other_shape = cls.from_linear(linear4bit(in_features=64, seed=2), r=4, alpha=8).state_dict()
    good = saved.state_dict()
    x = torch.randn(5, 128)
    before_y = layer(x)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    blob = next(k for k in good if k.startswith("weight.quant_state"))
    bad_absmax = good["weight.absmax"].clone()
    cases = [
        ({k: v for k, v in good.items() if not k.startswith("weight.")}, "none of its quantization state"),
        ({k: v for k, v in good.items() if k != "weight.absmax"}, "missing ['absmax']"),
        ({k: v for k, v in good.items() if k != "weight.nested_absmax"}, "double quantization is incomplete"),
        ({k: v for k, v in good.items() if k != "weight"}, "not the packed weight"),
        ({**good, blob: other_shape[blob]}, "packed must have"),
        ({**good, "weight.nested_quant_map": torch.linspace(-1, 1, 256)}, "code2 must be"),
        ({**good, "weight.absmax": bad_absmax[:-1]}, "absmax must have"),
        ({**{k: v for k, v in good.items() if k.startswith("weight")}, **{k: v for k, v in other_shape.items()
                                                                         if k.startswith("weight")}},
         "size mismatch: the checkpoint's 4-bit weight stands for a (40, 64) weight"),
    ]
    for state, words in cases:
        with pytest.raises(RuntimeError, match="Error.s. in loading state_dict") as info:
            layer.load_state_dict(state)
        assert words in str(info.value), (words, str(info.value))
        after = layer.state_dict()
        assert after.keys() == before.keys()
        for k in before:
            assert torch.equal(after[k], before[k]), (words, k)
        assert torch.equal(layer(x), before_y), words
    # a dense layer's state dict: a size mismatch, as torch reports one
    dense_state = cls.from_linear(torch.nn.Linear(128, 40), r=4, alpha=8).state_dict()
    with pytest.raises(RuntimeError, match="none of its quantization state"):
        layer.load_state_dict(dense_state)
    assert torch.equal(layer(x), before_y)


def test_4bit_state_dict_round_trips_the_whole_quantization_state():
    check_4bit_state_dict_round_trip(LoRALinear)


def test_4bit_state_dict_with_missing_or_inconsistent_state_raises_and_changes_nothing():
    check_4bit_state_dict_refusals(LoRALinear)


def test_4bit_layer_loads_a_linear4bit_state_dict_and_a_saved_file(tmp_path):
    """A Linear4bit's own state dict loads (strict=False: it has no adapters), and a state dict that went through
    torch.save / torch.load (weights_only) still round-trips."""
    source = linear4bit(seed=3)
    layer = LoRALinear.from_linear(linear4bit(seed=4, blocksize=32), r=4, alpha=8)
    result = layer.load_state_dict(source.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["lora_a", "lora_b"] and not result.unexpected_keys
    x = torch.randn(4, 128)
    assert layer.quantized_weight.blocksize == 64
    from_source = LoRALinear.from_linear(source).quantized_weight
    assert torch.equal(layer.quantized_weight.dequantize(), from_source.dequantize())
    torch.testing.assert_close(layer(x), source(x))
    saved = trained(LoRALinear.from_linear(linear4bit(seed=5), r=4, alpha=8))
    torch.save(saved.state_dict(), tmp_path / "layer.pt")
    layer.load_state_dict(torch.load(tmp_path / "layer.pt", weights_only=True))
    assert torch.equal(layer(x), saved(x))


def test_4bit_layer_over_an_unpickled_linear4bit():
    """A pickled Linear4bit comes back with a plain Parameter weight carrying its quant_state: from_linear still
    builds the 4-bit layer (not a refusal or torch's requires-grad error), computing what the original computes,
    and a pickled LoRALinear keeps computing and saving its 4-bit state."""
    import pickle

    q = linear4bit(seed=6)
    back = pickle.loads(pickle.dumps(q))
    assert type(back.weight) is torch.nn.Parameter
    x = torch.randn(4, 128)
    layer = trained(LoRALinear.from_linear(back, r=4, alpha=8))
    assert layer.weight is back.weight and layer.quantized_weight.packed.data_ptr() == back.weight.data_ptr()
    assert torch.equal(layer.quantized_weight.dequantize(), LoRALinear.from_linear(q).quantized_weight.dequantize())
    again = pickle.loads(pickle.dumps(layer))
    assert torch.equal(again(x), layer(x))
    fresh = LoRALinear.from_linear(linear4bit(seed=7), r=4, alpha=8)
    fresh.load_state_dict(again.state_dict())
    assert torch.equal(fresh(x), layer(x))


def test_from_linear_refuses_8bit_and_other_non_float_bases():
    """Linear8bitLt and any nn.Linear subclass with a non-floating weight: a TypeError naming `linear` and what to
    do, not torch's "Only Tensors of floating point ... can require gradients"; the layer is left as it was."""
    bnb = pytest.importorskip("bitsandbytes", reason=NO_BNB)
    for has_fp16_weights in (False, True):
        int8 = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=has_fp16_weights).to("cpu")
        before = int8.weight.detach().clone()
        with pytest.raises(TypeError) as info:
            LoRALinear.from_linear(int8)
        for word in ("LoRALinear.from_linear", "linear", "Linear8bitLt", "8-bit", "not supported", "Linear4bit"):
            assert word in str(info.value), word
        assert torch.equal(int8.weight, before) and int8.weight.dtype == before.dtype
    packed = torch.nn.Linear(8, 4)
    packed.weight = torch.nn.Parameter(torch.zeros(4, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match=r"linear \(Linear\) has a weight of dtype torch.int8, not a floating dtype"):
        LoRALinear.from_linear(packed)
