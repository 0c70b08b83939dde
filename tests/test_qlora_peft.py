"""QLoRA through the modules users hold: bitsandbytes Linear4bit bases under PEFT's LoRA layers (patched by
peftkern.integrations.peft) and peftkern.nn.LoRALinear.from_linear. CPU, float32 compute (bitsandbytes' CPU
4-bit path), tiny randomly initialised models (no hub downloads)."""
import filecmp

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes", reason="QLoRA layers are bitsandbytes Linear4bit (in the test extras)")
peft = pytest.importorskip("peft", reason="the PEFT integration tests need peft (in the test extras)")
transformers = pytest.importorskip("transformers", reason="the PEFT integration tests need transformers")

from peft import LoraConfig, get_peft_model  # noqa: E402

import peftkern  # noqa: E402
from peftkern.integrations.peft import FusedLoraLinear, FusedLoraLinear4bit, patch, unpatch  # noqa: E402
from peftkern.lora import op as lora_op  # noqa: E402

from .conftest import rel_err  # noqa: E402
from .test_peft_integration import assert_same, step  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def linear4bit(linear: nn.Linear, compute_dtype=torch.float32) -> nn.Module:
    """A bitsandbytes NF4 (double-quantized) copy of `linear`, quantized on CPU."""
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q.to("cpu")  # quantizes


def tiny_qlora_llama(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    # every in_features a multiple of the 64-element block: bitsandbytes' own CPU dequantize (the unpatched side)
    # is wrong otherwise on AVX-512 CPUs; peftkern follows the format on any shape
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in TARGETS and type(child) is nn.Linear:
                setattr(module, child_name, linear4bit(child))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=dropout))
    with torch.no_grad():  # a trained adapter, not PEFT's zero-init B
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return model


def test_patched_qlora_llama_matches_peft_and_saves_the_same_adapter(tmp_path):
    model = tiny_qlora_llama()
    layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert layers and all(type(m.base_layer) is bnb.nn.Linear4bit for m in layers)
    ids = torch.randint(0, 128, (2, 24))
    reference = step(model, ids)
    model.save_pretrained(tmp_path / "plain")
    assert patch(model) == 2 * len(TARGETS)
    assert all(type(m) is FusedLoraLinear for m in layers)
    calls = []
    original = lora_op.forward_op
    try:  # the patched layers really run the op over a 4-bit base (not PEFT's forward)
        lora_op.forward_op = lambda **k: (k["quant"] and calls.append(1)) or original(**k)
        patched = step(model, ids)
    finally:
        lora_op.forward_op = original
    assert len(calls) == 2 * len(TARGETS)
    assert_same(patched, reference)
    model.save_pretrained(tmp_path / "patched")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert filecmp.cmp(tmp_path / "plain" / name, tmp_path / "patched" / name, shallow=False), name
    assert unpatch(model) == 2 * len(TARGETS)
    assert_same(step(model, ids), reference, tol=0)


def test_pefts_bitsandbytes_lora_class_is_patched_too():
    """PEFT uses peft.tuners.lora.bnb.Linear4bit for 4-bit bases on GPU; built directly here, it is patched
    to FusedLoraLinear4bit and computes what PEFT's class computes."""
    from peft.tuners.lora.bnb import Linear4bit as PeftLora4bit

    torch.manual_seed(0)
    layer = PeftLora4bit(linear4bit(nn.Linear(40, 24)), "default", config=LoraConfig(r=4, lora_alpha=8), r=4,
                         lora_alpha=8)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(std=0.05)
    holder = nn.Sequential(layer)
    x = torch.randn(5, 40, requires_grad=True)
    want = layer(x)
    want.sum().backward()
    want_grads = (x.grad.clone(), layer.lora_A["default"].weight.grad.clone())
    x.grad = None
    layer.zero_grad()
    assert patch(holder) == 1 and type(layer) is FusedLoraLinear4bit
    got = layer(x)
    got.sum().backward()
    assert rel_err(got, want) <= 1e-5
    assert rel_err(x.grad, want_grads[0]) <= 1e-5
    assert rel_err(layer.lora_A["default"].weight.grad, want_grads[1]) <= 1e-5
    assert unpatch(holder) == 1 and type(layer) is PeftLora4bit


_LATE_BNB = """
import pickle, sys
import torch
from torch import nn
import peftkern.integrations.peft as integration  # before bitsandbytes, as under PEFT 0.22 (which no longer imports it)
from peft import LoraConfig
import bitsandbytes as bnb
from peft.tuners.lora.bnb import Linear4bit as PeftLora4bit
q = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
q.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="nf4")
layer = PeftLora4bit(q.to("cpu"), "default", config=LoraConfig(r=4, lora_alpha=8), r=4, lora_alpha=8)
holder = nn.Sequential(layer)
assert integration.patch(holder) == 1 and type(layer) is integration.FusedLoraLinear4bit
sys.stdout.buffer.write(pickle.dumps(holder))
"""
_UNPICKLE = """
import pickle, sys
holder = pickle.loads(sys.stdin.buffer.read())  # imports peftkern's integration and bitsandbytes itself
import peftkern.integrations.peft as integration
assert type(holder[0]) is integration.FusedLoraLinear4bit, type(holder[0])
print("fused")
"""


def test_4bit_layers_are_patched_when_bitsandbytes_is_imported_after_the_integration():
    """The 4-bit twin class is made when first needed, so a process that imports bitsandbytes only after
    peftkern.integrations.peft (PEFT 0.22 does not import it) still patches PEFT's 4-bit layers, and a fresh process
    that unpickles such a model finds the class by name."""
    import subprocess
    import sys

    made = subprocess.run([sys.executable, "-c", _LATE_BNB], capture_output=True, timeout=300)
    assert made.returncode == 0, made.stderr.decode()
    back = subprocess.run([sys.executable, "-c", _UNPICKLE], input=made.stdout, capture_output=True, timeout=300)
    assert back.returncode == 0, back.stderr.decode()
    assert back.stdout.decode().strip() == "fused"


def test_compute_dtype_mismatch_runs_on_pefts_path():
    """A Linear4bit computing in bfloat16 under a float32 x: PEFT feeds the LoRA branch the uncast x, so the
    fused path (one input for both) steps aside for that call."""
    layer = peft.tuners.lora.layer.Linear(linear4bit(nn.Linear(32, 16), compute_dtype=torch.bfloat16), "default",
                                          config=LoraConfig(r=2, lora_alpha=4), r=2, lora_alpha=4)
    layer.base_layer.compute_type_is_set = True  # as after a first call with a bfloat16 input
    holder = nn.Sequential(layer)
    x = torch.randn(3, 32)
    want = layer(x)
    patch(holder)
    calls = []
    original = lora_op.forward_op
    try:
        lora_op.forward_op = lambda **k: (k["quant"] and calls.append(1)) or original(**k)
        got = layer(x)
    finally:
        lora_op.forward_op = original
    assert calls == [] and torch.equal(got, want)


def test_lora_linear_module_from_a_linear4bit():
    torch.manual_seed(0)
    dense = nn.Linear(40, 24)
    q = linear4bit(dense)
    layer = peftkern.nn.LoRALinear.from_linear(q, r=4, alpha=8)
    assert layer.weight is q.weight and layer.quantized_weight is not None
    assert layer.quantized_weight.packed.data_ptr() == q.weight.data_ptr()  # shared, not copied
    with torch.no_grad():
        layer.lora_b.normal_(std=0.05)
    x = torch.randn(5, 40)
    y = layer(x)
    deq = layer.quantized_weight.dequantize()
    want = torch.nn.functional.linear(x, deq, q.bias) + (x @ layer.lora_a.t()) @ layer.lora_b.t() * 2.0
    torch.testing.assert_close(y, want)
    y.sum().backward()
    assert layer.lora_a.grad is not None and layer.lora_b.grad is not None
    with pytest.raises(RuntimeError, match="4-bit"):
        layer.merge_()


@pytest.mark.parametrize("round_trip", ["torch.save", "pickle"])
def test_patched_qlora_model_runs_fused_after_torch_save_and_pickle(round_trip, tmp_path):
    """The README's promise: a patched model pickles and torch.saves as a patched model. bitsandbytes' Params4bit
    comes back from either as a plain Parameter carrying its quant_state; the layers must run peftkern's 4-bit op
    again (not PEFT's forward, which they would otherwise fall back to, logging at INFO only) and compute what the
    model computed before the round trip, outputs and gradients."""
    import pickle

    model = tiny_qlora_llama()
    layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    ids = torch.randint(0, 128, (2, 24))
    assert patch(model) == 2 * len(TARGETS)
    before = step(model, ids)
    if round_trip == "torch.save":
        torch.save(model, tmp_path / "model.pt")
        back = torch.load(tmp_path / "model.pt", weights_only=False)
    else:
        back = pickle.loads(pickle.dumps(model))
    back_layers = [m for m in back.modules() if hasattr(m, "lora_A")]
    assert len(back_layers) == len(layers) and all(type(m) is FusedLoraLinear for m in back_layers)
    assert all(type(m.base_layer) is bnb.nn.Linear4bit for m in back_layers)
    calls = []
    original = lora_op.forward_op
    try:
        lora_op.forward_op = lambda **k: (k["quant"] and calls.append(1)) or original(**k)
        after = step(back, ids)
    finally:
        lora_op.forward_op = original
    assert len(calls) == 2 * len(TARGETS), "every 4-bit layer runs peftkern's op after the round trip"
    assert_same(after, before, tol=0)
