"""One dtype rule for every product op (peftkern/core/checks.py): outside torch.autocast an op's input, frozen
weight, bias and residual share one dtype; trainable adapter tensors have that dtype too, or float32 beside a
float16/bfloat16 input (PEFT's default) and nowhere else. sparse_diff_apply_ is an in-place edit, not a
product: its values may be the weight's dtype or float32 for a weight of any dtype."""
import itertools

import pytest
import torch

import peftkern

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def allowed(x_dtype, adapter_dtype):
    return adapter_dtype == x_dtype or (adapter_dtype == torch.float32 and x_dtype in (torch.float16, torch.bfloat16))


def lora(x_dtype, a_dtype):
    x, w, bias = torch.randn(3, 8).to(x_dtype), torch.randn(5, 8).to(x_dtype), torch.randn(5).to(x_dtype)
    a, b = torch.randn(2, 8).to(a_dtype), torch.randn(5, 2).to(a_dtype)
    return "lora_a", [x, w, a, b, bias], lambda: peftkern.lora_linear(x, w, a, b, bias=bias)


def adapter(x_dtype, a_dtype):
    h = torch.randn(3, 8).to(x_dtype)
    wd, bd, wu, bu = (torch.randn(*s).to(a_dtype) for s in [(2, 8), (2,), (8, 2), (8,)])
    return "w_down", [h, wd, bd, wu, bu], lambda: peftkern.bottleneck_adapter(h, wd, bd, wu, bu)


def sparse_linear(x_dtype, a_dtype):
    x, w = torch.randn(3, 8).to(x_dtype), torch.randn(5, 8).to(x_dtype)
    idx, values = torch.tensor([0, 9, 33]), torch.randn(3).to(a_dtype)
    return "values", [x, w, values], lambda: peftkern.sparse_diff_linear(x, w, idx, values)


def sparse_apply(x_dtype, a_dtype):
    w = torch.randn(5, 8).to(x_dtype)
    idx, values = torch.tensor([0, 9, 33]), torch.randn(3).to(a_dtype)
    return "values", [w, values], lambda: peftkern.sparse_diff_apply_(w, idx, values)


def allowed_for_apply(w_dtype, values_dtype):
    return values_dtype in (w_dtype, torch.float32)


@pytest.mark.parametrize("op", [lora, adapter, sparse_linear, sparse_apply], ids=lambda f: f.__name__)
def test_every_op_follows_the_one_dtype_rule(op):
    rule = allowed_for_apply if op is sparse_apply else allowed
    for x_dtype, a_dtype in itertools.product(DTYPES, DTYPES):
        name, tensors, call = op(x_dtype, a_dtype)
        before = [t.clone() for t in tensors]
        with peftkern.use_backend("reference"):
            if rule(x_dtype, a_dtype):
                assert call().dtype == x_dtype  # the result (the backup for apply_) has the input's dtype
                continue
            with pytest.raises(TypeError) as info:
                call()
        message = str(info.value)
        assert name in message and str(x_dtype) in message and str(a_dtype) in message, (x_dtype, a_dtype, message)
        for t, b in zip(tensors, before):
            assert torch.equal(t, b), f"{op.__name__} changed an input while raising"


def test_float32_module_refuses_float64_input_like_nn_linear():
    """A float32 module fed float64 input raises TypeError naming the parameter, whichever module it is
    (nn.Linear raises too): no op quietly mixes a float32 parameter into a float64 computation."""
    from peftkern.nn import BottleneckAdapter, LoRALinear

    h = torch.randn(2, 16, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        torch.nn.Linear(16, 16)(h)
    with pytest.raises(TypeError, match="weight"):
        LoRALinear(16, 16)(h)
    with pytest.raises(TypeError, match="w_down"):
        BottleneckAdapter(16, 4)(h)
    assert BottleneckAdapter(16, 4, dtype=torch.float64)(h).dtype == torch.float64


def test_patched_peft_model_with_float64_base_and_float32_adapters_stays_on_pefts_path():
    """PEFT runs float32 adapters beside a float64 base (it casts x to the adapters' dtype); peftkern's rule
    refuses that mix, so the patched layer must leave it to PEFT rather than raise."""
    pytest.importorskip("peft", reason="the PEFT integration needs peft (in the test extras)")
    from peft import LoraConfig, get_peft_model

    from peftkern.integrations.peft import patch

    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 6)).double(), LoraConfig(r=2, target_modules=["0"]))
    layer = model.base_model.model[0]
    layer.lora_A["default"].float()
    layer.lora_B["default"].float()
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(3, 8, dtype=torch.float64)
    expected = model(x)
    patch(model)
    assert torch.equal(model(x), expected)
