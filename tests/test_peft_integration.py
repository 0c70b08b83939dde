"""peftkern.integrations.peft on tiny randomly initialised transformers models (no hub downloads)."""
import copy
import filecmp
import logging
import warnings

import pytest
import torch

peft = pytest.importorskip("peft", reason="the PEFT integration tests need peft (in the test extras)")
transformers = pytest.importorskip("transformers", reason="the PEFT integration tests need transformers")

from peft import LoraConfig, get_peft_model  # noqa: E402

from peftkern.integrations.peft import LayersNotPatchedWarning, patch, unpatch  # noqa: E402

from .conftest import rel_err  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def lora_model(dropout=0.0, seed=0, **kw):
    model = get_peft_model(tiny_llama(seed), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                        lora_dropout=dropout, **kw))
    with torch.no_grad():  # a trained adapter, not PEFT's zero-init B
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return model


def step(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def assert_same(a, b, tol=1e-5):
    assert rel_err(a[0], b[0]) <= tol and rel_err(a[1], b[1]) <= tol
    assert a[2].keys() == b[2].keys() and a[2]
    for name in a[2]:
        assert rel_err(a[2][name], b[2][name]) <= tol, name


def test_logits_loss_and_every_lora_gradient_match_peft():
    model = lora_model()
    ids = torch.randint(0, 128, (2, 24))
    reference = step(model, ids)
    assert patch(model) == 2 * len(TARGETS)
    assert_same(step(model, ids), reference)
    assert unpatch(model) == 2 * len(TARGETS)
    assert not any("forward" in vars(m) for m in model.modules()), "patch() stores no instance forward"
    assert {type(m).__name__ for m in model.modules() if hasattr(m, "lora_A")} == {"Linear"}, "PEFT's class again"
    assert_same(step(model, ids), reference, tol=0)


def test_state_dict_and_save_pretrained_are_unchanged(tmp_path):
    model = lora_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "plain")
    patch(model)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    model.save_pretrained(tmp_path / "patched")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert filecmp.cmp(tmp_path / "plain" / name, tmp_path / "patched" / name, shallow=False), name


def test_adapter_switching_rslora_multiple_adapters_and_disabling():
    model = lora_model()
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=6, use_rslora=True, target_modules=TARGETS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.second" in name:
                p.normal_(std=0.05)
    ids = torch.randint(0, 128, (2, 16))
    twin = copy.deepcopy(model)
    patch(model)
    for adapters in ("second", "default", ["default", "second"]):
        model.base_model.set_adapter(adapters)
        twin.base_model.set_adapter(adapters)
        assert_same(step(model, ids), step(twin, ids))
    with model.disable_adapter(), twin.disable_adapter(), torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, twin(input_ids=ids).logits)
    model.merge_adapter()
    twin.merge_adapter()
    with torch.no_grad():
        assert rel_err(model(input_ids=ids).logits, twin(input_ids=ids).logits) < 1e-5


def test_dora_layers_are_patched_silently():
    """DoRA runs on peftkern.dora_linear (tests/test_dora_peft.py compares it with PEFT in detail)."""
    model = lora_model(use_dora=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LayersNotPatchedWarning)
        assert patch(model) == 2 * len(TARGETS)


def test_gpt2_conv1d_fan_in_fan_out():
    torch.manual_seed(0)
    # no dropout inside GPT-2 itself, so two runs are comparable
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = get_peft_model(transformers.GPT2LMHeadModel(cfg),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    ids = torch.randint(0, 128, (2, 16))
    reference = step(model, ids)
    assert patch(model) == 4
    assert_same(step(model, ids), reference)


def test_training_with_dropout_lowers_the_loss():
    model = lora_model(dropout=0.1)
    patch(model)
    model.train()
    # a learnable sequence (a repeating cycle), so that falling loss means learning, not noise
    ids = (torch.arange(32) % 8 + torch.randint(0, 100, (4, 1)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(40):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # a tiny random-init model learns slowly; a steady 10% drop is learning, not dropout noise
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses


def test_embedding_lora_stays_on_pefts_path_and_linear_layers_are_patched(caplog):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]))
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(std=0.05)
    reference = step(model, ids)
    with caplog.at_level(logging.INFO, logger="peftkern.integrations.peft"), \
            pytest.warns(LayersNotPatchedWarning, match="1 of 3 LoRA layers.*embed_tokens"):
        assert patch(model) == 2  # the two q_proj layers
    assert "embed_tokens stays on PEFT's own forward" in caplog.text and "Embedding" in caplog.text
    assert_same(step(model, ids), reference)
