"""peftkern.integrations.peft on DoRA adapters (PEFT's DoraLinearVariant, use_dora=True): tiny randomly
initialised transformers models (no hub downloads), CPU, the default backend (the fast CPU path here).

- patched equals unpatched PEFT: logits, loss and every adapter gradient (lora_A, lora_B, magnitude) on nn.Linear
  (Llama), Conv1D (GPT-2, fan_in_fan_out) and bitsandbytes Linear4bit bases (PEFT's generic class and its bnb
  class); with dropout, in eval mode and, in training mode, against PEFT whose dropout modules apply the mask
  peftkern draws (the masks are otherwise two different random draws);
- the patched layers really call dora_linear (a spy on the name the patched forward calls);
- state dict and save_pretrained files unchanged; unpatch() restores PEFT's classes;
- eval mode: an in-place change of lora_B shows in the next output exactly as in PEFT, with PEFT's own DoRA cache
  (ENABLE_DORA_CACHING) off and on; dora_linear's norm cache hits call after call (no entry per call);
- several active adapters (DoRA after DoRA, DoRA after LoRA, LoRA after DoRA), merging, disabling, mixed-batch
  adapter_names, hooks on the magnitude layer, disabled input casting;
- half-precision bases with float32 adapters and CPU autocast: within the project's bound of a float64 oracle
  (2x PEFT's own error in the same dtypes, plus the floor);
- Embedding DoRA and LoRA variants other than DoRA stay on PEFT's path, reported.
"""
import contextlib
import copy
import filecmp
import logging
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft", reason="the PEFT integration tests need peft (in the test extras)")
transformers = pytest.importorskip("transformers", reason="the PEFT integration tests need transformers")

from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.helpers import disable_input_dtype_casting  # noqa: E402
from peft.tuners.lora import dora as peft_dora  # noqa: E402
from peft.tuners.lora.layer import Linear as PeftLoraLinear, LoraLayer

import peftkern.integrations.peft as integration  # noqa: E402
from peftkern import QuantizedWeight  # noqa: E402
from peftkern.dora import op as dora_op  # noqa: E402
from peftkern.integrations.peft import FusedLoraLinear, LayersNotPatchedWarning, patch, unpatch  # noqa: E402

from .conftest import ERROR_FLOOR, rel_err  # noqa: E402
from .test_dora import _MaskDropout  # noqa: E402
from .test_peft_integration import TARGETS, assert_same, step, tiny_llama  # noqa: E402

N_LAYERS = 2 * len(TARGETS)  # the tiny Llama's targeted projections


def train_like(model, seed=1):
    """A trained-looking adapter: B away from PEFT's zero init, magnitudes away from the row norms (m / n != 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif "lora_magnitude_vector" in name:
                p.mul_(torch.rand(p.shape, generator=gen).to(p.dtype) + 0.5)


def dora_model(base=None, dropout=0.0, seed=0, **kw):
    base = tiny_llama(seed) if base is None else base
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=dropout,
                                            use_dora=True, **kw))
    train_like(model)
    return model


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _counting(monkeypatch, name):
    calls = []
    original = getattr(integration, name)

    def counting(*args, **kwargs):
        calls.append(args[1])  # the weight: a tensor or a QuantizedWeight
        return original(*args, **kwargs)

    monkeypatch.setattr(integration, name, counting)
    return calls


@pytest.fixture
def dora_calls(monkeypatch):
    """The weights of the dora_linear calls the patched layers make (the name their forward calls)."""
    return _counting(monkeypatch, "dora_linear")


@pytest.fixture
def lora_calls(monkeypatch):
    return _counting(monkeypatch, "lora_linear")


@contextlib.contextmanager
def captured_log():
    """The integration logger's INFO messages (without pytest's caplog, which `-p no:logging` removes)."""
    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logger = logging.getLogger("peftkern.integrations.peft")
    handler, level = Collect(level=logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def ids_for(seed=0, shape=(2, 24)):
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


# ---- 1. nn.Linear (tiny Llama) --------------------------------------------------------------------------------

@pytest.mark.parametrize("rslora", [False, True])
def test_llama_logits_loss_and_every_dora_gradient_match_peft(rslora, dora_calls):
    model = dora_model(use_rslora=rslora)
    ids = ids_for()
    reference = step(model, ids)
    assert {k.split(".")[-3] for k in reference[2]} == {"lora_A", "lora_B", "lora_magnitude_vector"}
    assert patch(model) == N_LAYERS
    assert all(type(m) is FusedLoraLinear for m in lora_layers(model))
    assert_same(step(model, ids), reference)
    assert len(dora_calls) == N_LAYERS, "every layer ran dora_linear"
    assert unpatch(model) == N_LAYERS
    assert all(type(m) is PeftLoraLinear for m in lora_layers(model)), "PEFT's class again"
    assert_same(step(model, ids), reference, tol=0)
    assert len(dora_calls) == N_LAYERS, "unpatched: no more fused calls"


def test_dropout_in_eval_mode_matches_peft(dora_calls):
    model = dora_model(dropout=0.2).eval()
    ids = ids_for(1)
    reference = step(model, ids)  # gradients in eval mode too: no dropout, the norm cached by peftkern
    patch(model)
    assert_same(step(model, ids), reference)
    assert len(dora_calls) == N_LAYERS
    # PEFT's DoRA drops out only while the LoRA layer itself trains, whatever mode its dropout module is in
    for layer in lora_layers(model):
        layer.lora_dropout["default"].train()
    assert_same(step(model, ids), reference)


def test_training_with_dropout_matches_peft_given_peftkerns_mask(monkeypatch):
    """PEFT draws its dropout mask from torch's generator, peftkern from a seed: the same mask goes into both by
    giving each patched layer's dora_linear call a fixed seed and filling the unpatched twin's dropout slots with
    modules that apply the mask dora_linear draws for that seed (tests/test_dora.py checks that mask is
    lora_linear's)."""
    p = 0.2
    model = dora_model(dropout=p).train()
    twin = copy.deepcopy(model)
    seeds = {}
    for i, (name, layer) in enumerate((n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)):
        seeds[id(layer.lora_A["default"].weight)] = 1000 + i
        assert type(layer.lora_dropout["default"]) is nn.Dropout
        twin.get_submodule(name).lora_dropout["default"] = _MaskDropout(p, seed=1000 + i)
    calls = []
    original = integration.dora_linear

    def seeded(x, weight, lora_a, *args, **kwargs):
        calls.append((kwargs["dropout_p"], kwargs["training"]))
        return original(x, weight, lora_a, *args, **{**kwargs, "seed": seeds[id(lora_a)]})

    monkeypatch.setattr(integration, "dora_linear", seeded)
    patch(model)
    ids = ids_for(2)
    got, want = step(model, ids), step(twin, ids)
    assert_same(got, want)
    assert calls == [(p, True)] * N_LAYERS
    # and the mask matters: PEFT without dropout computes something else
    for layer in lora_layers(twin):
        layer.lora_dropout["default"] = nn.Identity()
    assert rel_err(got[0], step(twin, ids)[0]) > 1e-3


def test_state_dict_and_save_pretrained_are_unchanged(tmp_path):
    model = dora_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert any("lora_magnitude_vector" in k for k in before)
    model.save_pretrained(tmp_path / "plain")
    patch(model)
    with torch.no_grad():
        model(input_ids=ids_for())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    model.save_pretrained(tmp_path / "patched")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert filecmp.cmp(tmp_path / "plain" / name, tmp_path / "patched" / name, shallow=False), name


# ---- 2. eval mode: in-place changes, PEFT's DoRA cache, peftkern's norm cache ------------------------------------

def _scale_lora_b_data(model, factor):
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.mul_(factor)  # bypasses autograd's version counter


@pytest.mark.parametrize("pefts_cache", [False, True], ids=["peft-cache-off", "peft-cache-on"])
def test_eval_mode_lora_b_changed_in_place_changes_the_output_as_in_peft(pefts_cache, monkeypatch, dora_calls):
    monkeypatch.setattr(peft_dora, "ENABLE_DORA_CACHING", pefts_cache)
    model = dora_model().eval()
    twin = copy.deepcopy(model)
    patch(model)
    ids = ids_for(3)
    with torch.no_grad():
        first, twin_first = model(input_ids=ids).logits, twin(input_ids=ids).logits
        assert rel_err(first, twin_first) < 1e-5
        for m in (model, twin):
            _scale_lora_b_data(m, 1.5)
        second, twin_second = model(input_ids=ids).logits, twin(input_ids=ids).logits
    assert rel_err(second, first) > 1e-3, "the change shows"
    assert rel_err(second, twin_second) < 1e-5, "exactly as PEFT shows it"
    # PEFT's cache serves the norm it computed before the change (only lora_B's own product is fresh): patched
    # layers leave eval-mode calls to PEFT while it is on, so that they compute the same thing
    assert len(dora_calls) == (0 if pefts_cache else 2 * N_LAYERS)
    if pefts_cache:
        fresh = copy.deepcopy(twin)
        monkeypatch.setattr(peft_dora, "ENABLE_DORA_CACHING", False)
        with torch.no_grad():
            assert rel_err(fresh(input_ids=ids).logits, twin_second) > 1e-6, "PEFT's cache was stale indeed"


def test_fused_calls_empty_pefts_dora_cache_as_pefts_own_uncached_calls_do(monkeypatch, dora_calls):
    """PEFT empties a DoRA layer's cache on every call it does not cache (cache off, or training); patched layers
    do too, so an entry PEFT made earlier is never served after that, in either model."""
    model = dora_model().eval()
    twin = copy.deepcopy(model)
    patch(model)
    ids = ids_for(4)
    with torch.no_grad():
        monkeypatch.setattr(peft_dora, "ENABLE_DORA_CACHING", True)
        for m in (model, twin):
            m(input_ids=ids)  # PEFT's path in both: caches the norms
        monkeypatch.setattr(peft_dora, "ENABLE_DORA_CACHING", False)
        for m in (model, twin):
            m(input_ids=ids)  # fused in `model`, PEFT uncached in `twin`: both empty the caches
        assert len(dora_calls) == N_LAYERS
        for m in (model, twin):
            _scale_lora_b_data(m, 1.5)
        monkeypatch.setattr(peft_dora, "ENABLE_DORA_CACHING", True)
        assert rel_err(model(input_ids=ids).logits, twin(input_ids=ids).logits) < 1e-5


def test_eval_mode_norm_cache_hits_across_calls():
    """The patched layers hand dora_linear the same weight object each call (a stable Conv1D view, a reused
    QuantizedWeight): one norm cache entry per layer, however many calls."""
    model = dora_model().eval()
    patch(model)
    dora_op.clear_norm_cache()
    with torch.no_grad():
        for seed in range(3):
            model(input_ids=ids_for(seed))
    assert len(dora_op._norm_cache) == N_LAYERS


# ---- 3. several adapters, merging, disabling, mixed batches, hooks, casting ----------------------------------------

@pytest.mark.parametrize("active", [["default", "second"], ["plain", "default"], ["default", "plain"],
                                    ["default", "plain", "second"]], ids=lambda a: "+".join(a))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_several_active_adapters_match_peft(active, mode, dora_calls, lora_calls):
    model = dora_model()
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=6, use_rslora=True, use_dora=True,
                                           target_modules=TARGETS))
    model.add_adapter("plain", LoraConfig(r=3, lora_alpha=6, target_modules=TARGETS))
    train_like(model, seed=2)
    twin = copy.deepcopy(model)
    patch(model)
    for m in (model, twin):
        m.base_model.set_adapter(active)
        m.train(mode == "train")
    ids = ids_for(5)
    assert_same(step(model, ids), step(twin, ids))
    # the first active adapter ran fused; the others on PEFT's own math
    assert (len(dora_calls), len(lora_calls)) == ((N_LAYERS, 0) if active[0] == "default" else (0, N_LAYERS))


def test_merged_and_disabled_adapters_match_peft():
    model = dora_model().eval()
    twin = copy.deepcopy(model)
    patch(model)
    ids = ids_for(6)
    with torch.no_grad():
        unmerged = twin(input_ids=ids).logits
        with model.disable_adapter(), twin.disable_adapter():
            assert torch.equal(model(input_ids=ids).logits, twin(input_ids=ids).logits)
        for m in (model, twin):
            m.merge_adapter()
        assert rel_err(model(input_ids=ids).logits, twin(input_ids=ids).logits) < 1e-5
        for m in (model, twin):
            m.unmerge_adapter()
        assert rel_err(model(input_ids=ids).logits, unmerged) < 1e-5


def test_mixed_batch_adapter_names_with_dora_raises_as_peft_does():
    model = dora_model().eval()
    twin = copy.deepcopy(model)
    patch(model)
    ids = ids_for(7)
    errors = []
    for m in (twin, model):
        with pytest.raises(ValueError) as err, torch.no_grad():
            m(input_ids=ids, adapter_names=["default", "__base__"])
        errors.append(str(err.value))
    assert errors[0] == errors[1] and "DoRA" in errors[0]


def _plus_one(module, args, output):
    return output + 1.0


def test_a_hook_on_the_magnitude_layer_runs(dora_calls):
    model = dora_model().eval()
    twin = copy.deepcopy(model)
    patch(model)
    for m in (model, twin):
        m.base_model.model.model.layers[0].self_attn.q_proj.lora_magnitude_vector["default"].register_forward_hook(
            _plus_one)
    ids = ids_for(8)
    with torch.no_grad():
        assert rel_err(model(input_ids=ids).logits, twin(input_ids=ids).logits) < 1e-5
    assert len(dora_calls) == N_LAYERS - 1, "the hooked layer ran PEFT's forward"


def test_disabled_input_casting_with_bf16_base_and_fp32_dora_adapters_raises_as_peft_does():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(10, 20, dtype=torch.bfloat16))
    model = get_peft_model(base, LoraConfig(target_modules=["0"], use_dora=True, init_lora_weights=False))
    layer = model.base_model.model[0]
    assert layer.lora_A["default"].weight.dtype == layer.lora_magnitude_vector["default"].weight.dtype == torch.float32
    x = torch.randn(4, 10, dtype=torch.bfloat16)
    with disable_input_dtype_casting(model), pytest.raises(RuntimeError) as peft_error:
        model(x)
    patch(model)
    with disable_input_dtype_casting(model), pytest.raises(RuntimeError) as patched_error:
        model(x)
    assert str(patched_error.value) == str(peft_error.value)


# ---- 4. half precision and autocast: within the dtype's tolerance of a float64 oracle ------------------------------

def _within_bound(got, peft_own, oracle, dtype, names=("logits", "loss")):
    """The bound: peftkern's error against the float64 oracle is at most twice PEFT's own, plus the floor.
    got, peft_own, oracle: (output, loss or input gradient, {parameter: gradient})."""
    assert got[0].dtype == peft_own[0].dtype and got[1].dtype == peft_own[1].dtype
    assert got[2].keys() == peft_own[2].keys() == oracle[2].keys() and got[2]
    pairs = [(names[i], got[i], peft_own[i], oracle[i]) for i in (0, 1)]
    pairs += [(name, got[2][name], peft_own[2][name], oracle[2][name]) for name in got[2]]
    for name, g, e, o in pairs:
        assert g.dtype == e.dtype, name
        assert rel_err(g, o) <= 2 * rel_err(e, o) + ERROR_FLOOR[dtype], name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_base_with_float32_adapters_is_within_tolerance_of_float64(dtype, dora_calls):
    model = dora_model(base=tiny_llama(0).to(dtype))
    layer = lora_layers(model)[0]
    assert layer.base_layer.weight.dtype == dtype
    assert layer.lora_A["default"].weight.dtype == layer.lora_magnitude_vector["default"].weight.dtype == torch.float32
    twin = copy.deepcopy(model)
    oracle = copy.deepcopy(model).double()
    patch(model)
    ids = ids_for(9)
    _within_bound(step(model, ids), step(twin, ids), step(oracle, ids), dtype)
    assert len(dora_calls) == N_LAYERS, "the mixed dtypes ran fused"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("bias", [True, False])
def test_one_half_precision_layer_is_within_tolerance_of_float64(dtype, mode, bias, dora_calls):
    """The same bound on one layer, where the DoRA layer's own rounding is all the error there is."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(48, 40, bias=bias)).to(dtype)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True))
    train_like(model)
    model.train(mode == "train")
    twin, oracle = copy.deepcopy(model), copy.deepcopy(model).double()
    patch(model)
    x, dy = torch.randn(3, 7, 48), torch.randn(3, 7, 40)

    def run(m, dt):
        m.zero_grad()
        xx = x.to(dt).requires_grad_()
        y = m(xx)
        y.backward(dy.to(dt))
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        return y.detach(), xx.grad, grads

    _within_bound(run(model, dtype), run(twin, dtype), run(oracle, torch.float64), dtype, names=("y", "dx"))
    assert len(dora_calls) == 1


def test_float32_base_with_bfloat16_adapters_runs_on_pefts_path(dora_calls):
    """PEFT casts x down to the adapters' bfloat16 and adds a bfloat16 DoRA term to a float32 result: a mix
    dora_linear's dtype rule does not take, so those calls stay on PEFT's path, computing exactly what PEFT does."""
    model = dora_model()
    for layer in lora_layers(model):
        for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                  layer.lora_magnitude_vector["default"].weight):
            p.data = p.data.to(torch.bfloat16)
    twin = copy.deepcopy(model)
    patch(model)
    ids = ids_for(14)
    got, want = step(model, ids), step(twin, ids)
    assert not dora_calls
    assert torch.equal(got[0], want[0]) and all(torch.equal(got[2][k], want[2][k]) for k in want[2])


def _autocast_step(model, ids, dtype):
    model.zero_grad()
    with torch.autocast("cpu", dtype=dtype):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def test_cpu_autocast_bf16_is_within_tolerance_of_float64(dora_calls):
    model = dora_model()
    twin = copy.deepcopy(model)
    oracle = copy.deepcopy(model).double()
    patch(model)
    ids = ids_for(10)
    got, peft_own = _autocast_step(model, ids, torch.bfloat16), _autocast_step(twin, ids, torch.bfloat16)
    _within_bound(got, peft_own, step(oracle, ids), torch.bfloat16)
    assert len(dora_calls) == N_LAYERS


# ---- 5. transformers Conv1D (GPT-2, fan_in_fan_out) ---------------------------------------------------------------

def tiny_gpt2_dora(seed=0):
    torch.manual_seed(seed)
    # no dropout inside GPT-2 itself, so two runs are comparable
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = get_peft_model(transformers.GPT2LMHeadModel(cfg),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                      use_dora=True))
    train_like(model)
    return model


def test_gpt2_conv1d_dora_matches_peft(dora_calls):
    model = tiny_gpt2_dora()
    twin = copy.deepcopy(model)
    ids = ids_for(11, (2, 16))
    reference = step(model, ids)
    assert patch(model) == 4
    assert_same(step(model, ids), reference)
    assert len(dora_calls) == 4
    # eval mode: one norm cache entry per layer over repeated calls; a replaced weight is seen
    for m in (model, twin):
        m.eval()
    dora_op.clear_norm_cache()
    with torch.no_grad():
        for _ in range(3):
            assert rel_err(model(input_ids=ids).logits, twin(input_ids=ids).logits) < 1e-5
        assert len(dora_op._norm_cache) == 4
        for m in (model, twin):
            conv = m.base_model.model.transformer.h[0].attn.c_attn.base_layer
            conv.weight = nn.Parameter(conv.weight * 1.25, requires_grad=False)
        assert rel_err(model(input_ids=ids).logits, twin(input_ids=ids).logits) < 1e-5


# ---- 6. bitsandbytes Linear4bit bases -------------------------------------------------------------------------------

def tiny_qdora_llama(seed=0):
    """The tiny Llama with NF4 Linear4bit projections. intermediate_size 128: bitsandbytes' CPU 4-bit path is
    wrong for in_features that are not a multiple of its block size (64), which down_proj's would be at 96."""
    from .test_qlora_peft import linear4bit

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if child_name in TARGETS and type(child) is nn.Linear:
                setattr(module, child_name, linear4bit(child))
    return dora_model(base=model)


def test_linear4bit_dora_llama_matches_peft(dora_calls):
    bnb = pytest.importorskip("bitsandbytes", reason="4-bit bases are bitsandbytes Linear4bit (in the test extras)")
    model = tiny_qdora_llama()
    assert all(type(m.base_layer) is bnb.nn.Linear4bit for m in lora_layers(model))
    ids = ids_for(12)
    reference = step(model, ids)
    assert patch(model) == N_LAYERS
    assert_same(step(model, ids), reference)
    assert len(dora_calls) == N_LAYERS and all(isinstance(w, QuantizedWeight) for w in dora_calls)
    # train mode (bitsandbytes repacks a 4-bit weight on its eval-mode CPU path): the norm is recomputed per call,
    # the QuantizedWeight is reused
    assert len({id(w) for w in dora_calls}) == N_LAYERS
    step(model, ids)
    assert len({id(w) for w in dora_calls}) == N_LAYERS


def test_pefts_bitsandbytes_class_with_dora_is_patched_and_matches(dora_calls):
    pytest.importorskip("bitsandbytes", reason="4-bit bases are bitsandbytes Linear4bit (in the test extras)")
    from peft.tuners.lora.bnb import Linear4bit as PeftLora4bit

    from .test_qlora_peft import linear4bit

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, use_dora=True)
    layer = PeftLora4bit(linear4bit(nn.Linear(64, 40)), "default", config=config, r=4, lora_alpha=8)
    holder = nn.Sequential(layer)
    train_like(holder)
    x = torch.randn(2, 5, 64)
    leaves = [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
              layer.lora_magnitude_vector["default"].weight]

    def run():
        xx = x.clone().requires_grad_()
        for t in leaves:
            t.grad = None
        y = layer(xx)
        y.pow(2).sum().backward()
        return [y.detach(), xx.grad] + [t.grad.clone() for t in leaves]

    want = run()
    assert patch(holder) == 1 and type(layer) is integration.FusedLoraLinear4bit
    got = run()
    assert len(dora_calls) == 1
    for name, g, w in zip(["y", "x", "lora_A", "lora_B", "magnitude"], got, want):
        assert rel_err(g, w) <= 1e-5, name
    assert unpatch(holder) == 1 and type(layer) is PeftLora4bit


# ---- 7. what stays on PEFT's path ---------------------------------------------------------------------------------

def test_embedding_dora_stays_on_pefts_path_and_linear_dora_layers_are_patched(dora_calls):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"],
                                                    use_dora=True))
    train_like(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_embedding_B" in name:
                p.normal_(std=0.05)
    ids = ids_for(13, (2, 16))
    reference = step(model, ids)
    assert any("embed_tokens.lora_magnitude_vector" in k for k in reference[2])
    with captured_log() as log, pytest.warns(LayersNotPatchedWarning, match="1 of 3 LoRA layers.*Embedding.*embed"):
        assert patch(model) == 2  # the two q_proj layers
    assert any("embed_tokens stays on PEFT's own forward" in m and "Embedding layers have no fused path" in m
               for m in log), log
    assert_same(step(model, ids), reference)
    assert len(dora_calls) == 2


@pytest.mark.filterwarnings("ignore:aLoRA is currently only supported for CAUSAL_LM")  # PEFT's note; an MLP here
def test_lora_variants_other_than_dora_stay_on_pefts_path(lora_calls, dora_calls):
    """aLoRA (a LoRA variant that, without invocation offsets, leaves the base output alone): reported at patch()
    when present from the start, and a per-call fallback when added to a layer patch() already patched."""
    torch.manual_seed(0)
    alora = dict(alora_invocation_tokens=[3], init_lora_weights=False)
    mlp = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 16))
    model = get_peft_model(mlp, LoraConfig(target_modules=["0"], **alora)).eval()
    with pytest.warns(LayersNotPatchedWarning, match="LoRA variant other than DoRA \\(ALoraLinearVariant\\)"):
        assert patch(model) == 0
    torch.manual_seed(1)
    mlp = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 16))
    model = get_peft_model(mlp, LoraConfig(target_modules=["0"], init_lora_weights=False, use_dora=True)).eval()
    twin = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LayersNotPatchedWarning)
        assert patch(model) == 1
    for m in (model, twin):
        torch.manual_seed(2)
        m.add_adapter("alora", LoraConfig(target_modules=["0"], **alora))
    x = torch.randn(5, 10)
    with torch.no_grad():
        for active in ("alora", ["default", "alora"], ["alora", "default"]):
            for m in (model, twin):
                m.base_model.set_adapter(active)
            assert rel_err(model(x), twin(x)) < 1e-6, active
        assert not lora_calls and not dora_calls
        model.base_model.set_adapter("default")
        twin.base_model.set_adapter("default")
        assert rel_err(model(x), twin(x)) < 1e-6
    assert len(dora_calls) == 1
