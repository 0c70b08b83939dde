"""peftkern.integrations.peft with several adapters: PEFT's mixed batch (`adapter_names=[...]`, "__base__" rows) runs
as one multi_lora_linear call per layer, and several active adapters (`set_adapter([...])`) as one lora_linear call,
matching unpatched PEFT in outputs and gradients (tiny random transformers models, CPU, no hub downloads).
"""
import copy

import pytest
import torch

peft = pytest.importorskip("peft", reason="the PEFT integration tests need peft (in the test extras)")
transformers = pytest.importorskip("transformers", reason="the PEFT integration tests need transformers")

from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora.layer import Linear as PeftLoraLinear  # noqa: E402

import peftkern.integrations.peft as integration  # noqa: E402
from peftkern.integrations.peft import FusedLoraLinear, patch, unpatch  # noqa: E402

from .conftest import rel_err  # noqa: E402
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


def test_generate_with_adapter_names_gives_peft_tokens(monkeypatch):
    model = two_adapters().eval()
    prompt = torch.randint(0, 128, (3, 6))
    kwargs = dict(max_new_tokens=5, do_sample=False, adapter_names=["a", "__base__", "b"], pad_token_id=0)
    want = model.generate(input_ids=prompt, **kwargs)
    patch(model)
    calls = _spy(monkeypatch, "multi_lora_linear")
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
    patch(model)
    calls = _spy(monkeypatch, "multi_lora_linear")
    layer(torch.randn(2, 3, 64), adapter_names=["a", "b"])
    assert not calls
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
