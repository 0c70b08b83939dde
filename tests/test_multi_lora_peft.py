"""peftkern.integrations.peft with several adapters: PEFT's mixed batch (`adapter_names=[...]`, "__base__" rows) runs
as one multi_lora_linear call per layer, and several active adapters (`set_adapter([...])`) as one lora_linear call,
matching unpatched PEFT in outputs and gradients (tiny random transformers models, CPU, no hub downloads).
"""
import contextlib
import copy
import logging

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft", reason="the PEFT integration tests need peft (in the test extras)")
transformers = pytest.importorskip("transformers", reason="the PEFT integration tests need transformers")

from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora.layer import Linear as PeftLoraLinear  # noqa: E402

import peftkern.integrations.peft as integration  # noqa: E402
from peftkern.integrations.peft import FusedLoraLinear, patch, unpatch  # noqa: E402

from .conftest import ERROR_FLOOR, rel_err  # noqa: E402
from .test_peft_integration import TARGETS, tiny_llama  # noqa: E402

N_LAYERS = 2 * len(TARGETS)


def two_adapters(base=None, dropout_a=0.0, dropout_b=0.0, targets=TARGETS, **kw):
    """Adapters "a" (r=4) and "b" (r=8), both trained-looking (B away from PEFT's zero init)."""
    base = tiny_llama(0) if base is None else base
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=dropout_a, **kw),
                           adapter_name="a")
    model.add_adapter("b", LoraConfig(r=8, lora_alpha=4, target_modules=targets, lora_dropout=dropout_b, **kw))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _spy(monkeypatch, name):
    calls = []
    original = getattr(integration, name)

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(integration, name, spy)
    return calls


def _no_peft_loop(monkeypatch):
    """PEFT's own mixed-batch loop must not run on patched layers."""
    def forbidden(self, *args, **kwargs):
        raise AssertionError("PEFT's _mixed_batch_forward ran on a patched layer")

    monkeypatch.setattr(FusedLoraLinear, "_mixed_batch_forward", forbidden)


@contextlib.contextmanager
def captured_debug_log():
    """The integration logger's DEBUG messages (without pytest's caplog, which `-p no:logging` removes)."""
    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logger = logging.getLogger("peftkern.integrations.peft")
    handler, level = Collect(level=logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.mark.parametrize("names", [["a", "__base__", "b"], ["b", "b", "a"], ["__base__", "a", "a"]])
def test_mixed_batch_equals_peft_and_runs_one_multi_lora_call_per_layer(names, monkeypatch):
    model = two_adapters().eval()
    ids = torch.randint(0, 128, (3, 12))
    with torch.no_grad():
        want = model(input_ids=ids, adapter_names=names).logits
    assert patch(model) == N_LAYERS
    calls = _spy(monkeypatch, "multi_lora_linear")
    _no_peft_loop(monkeypatch)
    with torch.no_grad():
        got = model(input_ids=ids, adapter_names=names).logits
    assert len(calls) == N_LAYERS
    assert rel_err(got, want) < 1e-5
    # the "__base__" row (and a name no layer has) is the base model's own output
    if "__base__" in names:
        with torch.no_grad(), model.disable_adapter():
            base = model(input_ids=ids).logits
        row = names.index("__base__")
        assert rel_err(got[row], base[row]) < 1e-5


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_with_adapter_names_gives_peft_tokens(num_beams, monkeypatch):
    # with beam search PEFT repeats each name num_beams times before the layers see them
    model = two_adapters().eval()
    prompt = torch.randint(0, 128, (3, 6))
    kwargs = dict(max_new_tokens=5, do_sample=False, num_beams=num_beams, adapter_names=["a", "__base__", "b"],
                  pad_token_id=0)
    want = model.generate(input_ids=prompt, **kwargs)
    patch(model)
    calls = _spy(monkeypatch, "multi_lora_linear")
    _no_peft_loop(monkeypatch)
    got = model.generate(input_ids=prompt, **kwargs)
    assert torch.equal(got, want)
    assert len(calls) >= N_LAYERS * 5  # every decoding step ran fused


def test_gpt2_conv1d_mixed_batch(monkeypatch):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=48, n_layer=2, n_head=4)
    model = two_adapters(transformers.GPT2LMHeadModel(cfg), targets=["c_attn", "c_proj", "c_fc"],
                         fan_in_fan_out=True).eval()
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        want = model(input_ids=ids, adapter_names=["b", "a"]).logits
    patch(model)
    calls = _spy(monkeypatch, "multi_lora_linear")
    with torch.no_grad():
        got = model(input_ids=ids, adapter_names=["b", "a"]).logits
    assert calls and rel_err(got, want) < 1e-5


def test_both_adapters_active_match_peft_in_outputs_and_gradients(monkeypatch):
    model = two_adapters()
    model.base_model.set_adapter(["a", "b"])
    ids = torch.randint(0, 128, (2, 16))

    def step():
        model.zero_grad()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.logits.detach(), grads

    want_logits, want_grads = step()
    assert any(".b." in n for n in want_grads) and any(".a." in n for n in want_grads)
    patch(model)
    calls = _spy(monkeypatch, "lora_linear")
    got_logits, got_grads = step()
    assert len(calls) == N_LAYERS  # one fused call per layer for both adapters
    assert rel_err(got_logits, want_logits) < 1e-5
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        assert rel_err(got_grads[name], want_grads[name]) < 1e-5, name


def test_both_adapters_active_with_dropout_keep_pefts_independent_masks(monkeypatch):
    # one call has one mask; PEFT draws one per adapter: the first adapter runs fused, the second on PEFT's math
    model = two_adapters(dropout_a=0.1, dropout_b=0.1).train()
    model.base_model.set_adapter(["a", "b"])
    patch(model)
    calls = _spy(monkeypatch, "lora_linear")
    further = _spy(monkeypatch, "_further_adapters")
    model(input_ids=torch.randint(0, 128, (2, 8))).logits.sum().backward()
    assert len(calls) == N_LAYERS and len(further) == N_LAYERS


def test_mixed_batch_in_training_trains_both_adapters_like_peft(monkeypatch):
    # no dropout: PEFT's per-adapter sub-batches and the fused call give the same gradients to both adapters
    model = two_adapters()
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)  # PEFT freezes every adapter but the active one; train both
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(4, 5, 64)
    names = ["a", "b", "__base__", "a"]

    def grads():
        model.zero_grad()
        layer(x, adapter_names=names).square().sum().backward()
        return {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}

    want = grads()
    patch(model)
    calls = _spy(monkeypatch, "multi_lora_linear")
    got = grads()
    assert len(calls) == 1
    assert got.keys() == want.keys() and len(want) == 4
    for name in want:
        assert rel_err(got[name], want[name]) < 1e-5, name


def test_differing_dropouts_in_training_fall_back_to_peft(monkeypatch):
    model = two_adapters(dropout_a=0.1, dropout_b=0.2).train()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, 64)
    torch.manual_seed(3)
    want = layer(x, adapter_names=["a", "b"])
    patch(model)
    calls = _spy(monkeypatch, "multi_lora_linear")
    torch.manual_seed(3)  # PEFT's forward draws the same masks again
    with captured_debug_log() as log:
        got = layer(x, adapter_names=["a", "b"])
    assert not calls
    assert torch.equal(got, want)
    assert any("different dropout in effect" in m for m in log)
    layer.eval()  # eval: no dropout in effect, so one fused call serves both
    layer(torch.randn(2, 3, 64), adapter_names=["a", "b"])
    assert len(calls) == 1


def test_peft_errors_are_kept():
    model = two_adapters().eval()
    patch(model)
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        model(input_ids=torch.randint(0, 128, (2, 4)), adapter_names=["a"])


def test_state_dict_unchanged_and_unpatch_restores():
    model = two_adapters().eval()
    before = copy.deepcopy(model.state_dict())
    patch(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert unpatch(model) == N_LAYERS
    assert all(type(m) is PeftLoraLinear for m in model.modules() if isinstance(m, PeftLoraLinear))


def test_dora_adapter_in_the_batch_raises_as_peft_does_and_one_outside_it_does_not_stop_fusion(monkeypatch):
    model = two_adapters().eval()
    model.add_adapter("d", LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, use_dora=True,
                                      init_lora_weights=False))
    ids = torch.randint(0, 128, (2, 9))
    twin = copy.deepcopy(model)
    patch(model)
    calls = _spy(monkeypatch, "multi_lora_linear")
    errors = []
    for m in (twin, model):
        with pytest.raises(ValueError) as err, torch.no_grad():
            m(input_ids=ids, adapter_names=["a", "d"])
        errors.append(str(err.value))
    assert errors[0] == errors[1] and "DoRA" in errors[0]
    assert not calls
    # PEFT checks only the names in the batch: "d" merely present on the layers changes nothing
    with torch.no_grad():
        want = twin(input_ids=ids, adapter_names=["b", "a"]).logits
        got = model(input_ids=ids, adapter_names=["b", "a"]).logits
    assert len(calls) == N_LAYERS and rel_err(got, want) < 1e-5


def _plus_one(module, args, output):
    return output + 1.0


def test_a_hook_on_a_used_adapter_falls_back_and_runs(monkeypatch):
    model = two_adapters().eval()
    twin = copy.deepcopy(model)
    patch(model)
    for m in (model, twin):
        m.base_model.model.model.layers[1].mlp.up_proj.lora_A["b"].register_forward_hook(_plus_one)
    calls = _spy(monkeypatch, "multi_lora_linear")
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad(), captured_debug_log() as log:
        got = model(input_ids=ids, adapter_names=["a", "b"]).logits
        want = twin(input_ids=ids, adapter_names=["a", "b"]).logits
    assert len(calls) == N_LAYERS - 1, "the hooked layer ran PEFT's forward"
    assert rel_err(got, want) < 1e-5
    assert any("hook" in m for m in log)
    # a batch without "b" never calls the hooked module, in PEFT or fused
    calls.clear()
    with torch.no_grad():
        got = model(input_ids=ids, adapter_names=["a", "__base__"]).logits
        want = twin(input_ids=ids, adapter_names=["a", "__base__"]).logits
    assert len(calls) == N_LAYERS and rel_err(got, want) < 1e-5


def test_unpatch_restores_pefts_mixed_batch_loop(monkeypatch):
    model = two_adapters().eval()
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        want = model(input_ids=ids, adapter_names=["b", "__base__"]).logits
    patch(model)
    assert unpatch(model) == N_LAYERS
    calls = _spy(monkeypatch, "multi_lora_linear")
    loops = []
    original = PeftLoraLinear._mixed_batch_forward

    def counting(self, *args, **kwargs):
        loops.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PeftLoraLinear, "_mixed_batch_forward", counting)
    with torch.no_grad():
        got = model(input_ids=ids, adapter_names=["b", "__base__"]).logits
    assert not calls and len(loops) == N_LAYERS
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_base_with_float32_adapters_is_within_tolerance_of_float64(dtype, monkeypatch):
    """PEFT keeps adapters in float32 beside a half-precision base: the mixed batch still runs fused, within the
    dtype's tolerance (the project's bound: at most twice PEFT's own error against a float64 oracle, plus the floor)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(48, 40)).to(dtype)
    model = two_adapters(base, targets=["0"]).eval()
    layer = model.base_model.model[0]
    assert layer.base_layer.weight.dtype == dtype and layer.lora_A["a"].weight.dtype == torch.float32
    twin, oracle = copy.deepcopy(model), copy.deepcopy(model).double()
    patch(model)
    calls = _spy(monkeypatch, "multi_lora_linear")
    x, names = torch.randn(4, 5, 48), ["a", "b", "__base__", "b"]
    with torch.no_grad():
        got = model(x.to(dtype), adapter_names=names)
        peft_own = twin(x.to(dtype), adapter_names=names)
        want = oracle(x.double(), adapter_names=names)
    assert len(calls) == 1 and got.dtype == peft_own.dtype == dtype
    assert rel_err(got, want) <= 2 * rel_err(peft_own, want) + ERROR_FLOOR[dtype]


def test_cpu_autocast_mixed_batch_is_within_tolerance_of_float64(monkeypatch):
    model = two_adapters().eval()
    twin, oracle = copy.deepcopy(model), copy.deepcopy(model).double()
    patch(model)
    calls = _spy(monkeypatch, "multi_lora_linear")
    ids, names = torch.randint(0, 128, (3, 8)), ["b", "a", "__base__"]
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(input_ids=ids, adapter_names=names).logits
            peft_own = twin(input_ids=ids, adapter_names=names).logits
        want = oracle(input_ids=ids, adapter_names=names).logits
    assert len(calls) == N_LAYERS
    assert rel_err(got, want) <= 2 * rel_err(peft_own, want) + ERROR_FLOOR[torch.bfloat16]


def test_adapters_of_different_dtypes_fall_back_to_peft(monkeypatch):
    # multi_lora_linear takes one dtype for all adapter tensors; PEFT casts each sub-batch to its adapter's
    model = two_adapters().eval()
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    for p in (layer.lora_A["b"].weight, layer.lora_B["b"].weight):
        p.data = p.data.double()
    twin = copy.deepcopy(model)
    patch(model)
    calls = _spy(monkeypatch, "multi_lora_linear")
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad(), captured_debug_log() as log:
        got = model(input_ids=ids, adapter_names=["a", "b"]).logits
        want = twin(input_ids=ids, adapter_names=["a", "b"]).logits
    assert len(calls) == N_LAYERS - 1, "the layer with a float64 adapter ran PEFT's forward"
    assert rel_err(got, want) < 1e-5
    assert any("more than one dtype" in m for m in log)


# ---- 4-bit bases: multi_lora_linear over a QuantizedWeight ----------------------------------------

def test_linear4bit_llama_mixed_batch_matches_peft(monkeypatch):
    bnb = pytest.importorskip("bitsandbytes", reason="4-bit bases are bitsandbytes Linear4bit (in the test extras)")
    from .test_qlora_peft import TARGETS as QTARGETS, linear4bit

    torch.manual_seed(0)
    # in_features multiples of 64: bitsandbytes' own CPU dequantize (the unpatched side) needs whole blocks
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base = transformers.LlamaForCausalLM(cfg)
    for module in list(base.modules()):
        for child_name, child in list(module.named_children()):
            if child_name in QTARGETS and type(child) is nn.Linear:
                setattr(module, child_name, linear4bit(child))
    model = two_adapters(base, targets=QTARGETS).eval()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # in eval mode on a CPU with AVX512-BF16, bitsandbytes repacks the weight into a layout that rounds
            # absmax to bfloat16, which peftkern does not read (that layer would stay on PEFT's path)
            module.train()
    ids, names = torch.randint(0, 128, (3, 10)), ["b", "__base__", "a"]
    with torch.no_grad():
        want = model(input_ids=ids, adapter_names=names).logits
    assert patch(model) == 2 * len(QTARGETS)
    calls = _spy(monkeypatch, "multi_lora_linear")
    _no_peft_loop(monkeypatch)
    with torch.no_grad():
        got = model(input_ids=ids, adapter_names=names).logits
    assert len(calls) == 2 * len(QTARGETS)
    assert rel_err(got, want) < 1e-5


def test_pefts_bitsandbytes_class_mixed_batch_matches_peft(monkeypatch):
    pytest.importorskip("bitsandbytes", reason="4-bit bases are bitsandbytes Linear4bit (in the test extras)")
    from peft.tuners.lora.bnb import Linear4bit as PeftLora4bit

    from peftkern.integrations.peft import FusedLoraLinear4bit

    from .test_qlora_peft import linear4bit

    torch.manual_seed(0)
    layer = PeftLora4bit(linear4bit(nn.Linear(64, 24)), "a", config=LoraConfig(r=4, lora_alpha=8), r=4, lora_alpha=8)
    layer.update_layer("b", r=8, lora_alpha=4, config=LoraConfig(r=8, lora_alpha=4))
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.1)
    holder = nn.Sequential(layer)
    x, names = torch.randn(4, 3, 64), ["a", "b", "__base__", "a"]
    with torch.no_grad():
        want = layer(x, adapter_names=names)
    assert patch(holder) == 1 and type(layer) is FusedLoraLinear4bit
    calls = _spy(monkeypatch, "multi_lora_linear")
    with torch.no_grad():
        got = layer(x, adapter_names=names)
    assert len(calls) == 1
    assert rel_err(got, want) < 1e-5
