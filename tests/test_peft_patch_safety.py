"""patch() never silently changes what a PEFT model computes: stacked adapters, pickling, hooks (accelerate's
offloading included), disabled input casting, layers added after patch(), and what patch() reports."""
import copy
import io
import pickle
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft", reason="the PEFT integration tests need peft (in the test extras)")
pytest.importorskip("transformers", reason="the PEFT integration tests need transformers")

from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model  # noqa: E402
from peft.helpers import disable_input_dtype_casting  # noqa: E402

import peftkern.integrations.peft as integration  # noqa: E402
from peftkern.integrations.peft import FusedLoraLinear, LayersNotPatchedWarning, patch, unpatch  # noqa: E402

from .conftest import rel_err  # noqa: E402
from .test_peft_integration import TARGETS, lora_model  # noqa: E402


class MLP(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, dtype=dtype)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 16, dtype=dtype)

    def forward(self, x):
        return self.lin1(self.relu(self.lin0(x)))


def mlp_lora(targets=("lin0", "lin1"), seed=0, **kw):
    torch.manual_seed(seed)
    return get_peft_model(MLP(), LoraConfig(target_modules=list(targets), init_lora_weights=False, **kw)).eval()


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the forwards that took the fused path (calls of lora_linear from the patched layers)."""
    calls = []
    original = integration.lora_linear

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(integration, "lora_linear", counting)
    return calls


def patch_quietly(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LayersNotPatchedWarning)
        return patch(model)


def patched_layers(model):
    return [name for name, m in model.named_modules() if type(m) is FusedLoraLinear]


# ---- 1. only a LoRA layer whose direct base layer is a plain linear runs fused ----------------------------

@pytest.mark.parametrize("under", [LoHaConfig, LoKrConfig], ids=["loha", "lokr"])
def test_lora_stacked_on_another_adapter_falls_back_and_keeps_it(under, fused_calls):
    torch.manual_seed(0)
    model = get_peft_model(MLP(), under(target_modules=["lin0"], init_weights=False), adapter_name="under",
                           mixed=True).eval()
    torch.manual_seed(1)
    # LoRA on lin0 wraps the LoHa/LoKr layer; LoRA on lin1 wraps a plain nn.Linear
    model.add_adapter("adapter1", LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False))
    model.set_adapter(["under", "adapter1"])
    x = torch.randn(9, 10)
    with torch.no_grad():
        expected = model(x)
        with model.disable_adapter():
            base = model(x)
    assert rel_err(expected, base) > 1e-2  # both adapters change the output, so dropping one would show
    with pytest.warns(LayersNotPatchedWarning, match="base layer is .*not a plain nn.Linear"):
        assert patch(model) == 1
    assert patched_layers(model) == ["base_model.model.lin1"]
    with torch.no_grad():
        assert rel_err(model(x), expected) < 1e-6
    assert fused_calls, "lin1's LoRA ran fused"


def test_lora_underneath_another_adapter_is_patched_and_the_outer_adapter_still_applies(fused_calls):
    torch.manual_seed(0)
    model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"], init_lora_weights=False),
                           adapter_name="adapter0", mixed=True).eval()
    torch.manual_seed(1)
    model.add_adapter("loha", LoHaConfig(target_modules=["lin0"], init_weights=False))
    model.set_adapter(["adapter0", "loha"])
    x = torch.randn(9, 10)
    with torch.no_grad():
        expected = model(x)
    assert patch(model) == 1
    with torch.no_grad():
        assert rel_err(model(x), expected) < 1e-6
    assert fused_calls


# ---- 2. pickle, torch.save/torch.load, deepcopy -------------------------------------------------------------

def _roundtrips():
    def via_pickle(m):
        return pickle.loads(pickle.dumps(m))

    def via_torch_save(m):
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)

    return {"pickle": via_pickle, "torch.save": via_torch_save, "deepcopy": copy.deepcopy}


@pytest.mark.parametrize("how", list(_roundtrips()))
def test_patched_model_round_trips_patched_and_correct(how, fused_calls):
    model = lora_model()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    n = patch(model)
    clone = _roundtrips()[how](model)
    assert len(patched_layers(clone)) == n == 2 * len(TARGETS)
    with torch.no_grad():
        assert rel_err(clone(input_ids=ids).logits, expected) < 1e-5
    assert fused_calls, "the copy runs on the fused path"
    # the copy keeps patch()'s mark: an adapter added to it is patched too
    clone.add_adapter("more", LoraConfig(r=2, target_modules=["lm_head"]))
    assert "base_model.model.lm_head" in patched_layers(clone)
    assert unpatch(clone) == n + 1 and not patched_layers(clone)


def test_saved_patched_model_loads_in_a_fresh_interpreter(tmp_path):
    model = lora_model()
    ids = torch.randint(0, 128, (2, 12))
    patch(model)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    torch.save({"model": model, "ids": ids, "expected": expected}, tmp_path / "model.pt")
    # nothing imported beforehand: unpickling finds FusedLoraLinear by its module path
    code = textwrap.dedent(f"""
        import torch
        saved = torch.load({str(tmp_path / "model.pt")!r}, weights_only=False)
        model = saved["model"]
        kinds = {{type(m).__name__ for n, m in model.named_modules() if n.endswith("_proj")}}
        assert kinds == {{"FusedLoraLinear"}}, kinds
        with torch.no_grad():
            out = model(input_ids=saved["ids"]).logits
        err = ((out - saved["expected"]).norm() / saved["expected"].norm()).item()
        assert err < 1e-5, err
        print("ok", err)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stdout + proc.stderr


def test_print_of_a_patched_model_is_pefts():
    model = mlp_lora()
    before = repr(model)
    patch(model)
    assert repr(model) == before and repr(model.base_model.model.lin0).startswith("lora.Linear")


# ---- 3. hooks -----------------------------------------------------------------------------------------------

def _plus_one(module, args, output):
    return output + 1.0


def _halve_input(module, args):
    return (args[0] * 0.5,)


@pytest.mark.parametrize("where,kind", [("base_layer", "forward"), ("lora_A", "pre"), ("lora_B", "forward"),
                                        ("lora_dropout", "pre")])
def test_hooks_on_the_layers_inside_a_lora_layer_run(where, kind, fused_calls):
    model, twin = mlp_lora(), mlp_lora()
    x = torch.randn(5, 10)
    patch(model)
    handles = []
    for m in (model, twin):
        layer = m.base_model.model.lin0
        inner = layer.base_layer if where == "base_layer" else getattr(layer, where)["default"]
        handles.append(inner.register_forward_hook(_plus_one) if kind == "forward"
                       else inner.register_forward_pre_hook(_halve_input))
    with torch.no_grad():
        hooked = twin(x)
        assert rel_err(model(x), hooked) < 1e-6
        for h in handles:
            h.remove()
        plain = twin(x)
        assert rel_err(hooked, plain) > 1e-3, "the hook changes the output"
        calls = len(fused_calls)
        assert rel_err(model(x), plain) < 1e-6
    assert len(fused_calls) == calls + 2, "hooks removed: both layers are fused again"


def test_hook_on_the_patched_layer_itself_runs_on_the_fused_path(fused_calls):
    model, twin = mlp_lora(), mlp_lora()
    patch(model)
    for m in (model, twin):
        m.base_model.model.lin1.register_forward_hook(_plus_one)
    x = torch.randn(5, 10)
    with torch.no_grad():
        assert rel_err(model(x), twin(x)) < 1e-6
    assert len(fused_calls) == 2


def test_global_module_hooks_see_the_same_calls_as_unpatched():
    model, twin = mlp_lora(), mlp_lora()
    patch(model)
    x = torch.randn(5, 10)
    seen = []
    names = {m: n for model_ in (model, twin) for n, m in model_.named_modules()}
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: seen.append(names[m]))
    try:
        with torch.no_grad():
            twin(x)
            plain, seen[:] = list(seen), []
            model(x)
    finally:
        handle.remove()
    assert seen == plain and "base_model.model.lin0.base_layer" in plain


def test_accelerate_cpu_offload(fused_calls):
    accelerate = pytest.importorskip("accelerate", reason="needs accelerate (in the test extras)")
    model, twin = lora_model(), lora_model()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        expected = twin(input_ids=ids).logits
    patch(model)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.base_layer.weight.device.type == "meta", "weights live off the module until pre_forward"
    with torch.no_grad():
        assert rel_err(model(input_ids=ids).logits, expected) < 1e-5
    assert not fused_calls, "offloaded layers run PEFT's forward, which runs accelerate's hooks"


# ---- 4. disable_input_dtype_casting ---------------------------------------------------------------------------

def test_disabled_input_casting_with_bf16_base_and_fp32_adapters_raises_as_peft_does():
    torch.manual_seed(0)
    model = get_peft_model(MLP(dtype=torch.bfloat16), LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    layer = model.base_model.model.lin0
    assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(4, 10, dtype=torch.bfloat16)
    with disable_input_dtype_casting(model), pytest.raises(RuntimeError) as peft_error:
        model(x)
    patch(model)
    with disable_input_dtype_casting(model), pytest.raises(RuntimeError) as patched_error:
        model(x)
    assert str(patched_error.value) == str(peft_error.value)


# ---- 5. layers added after patch() -------------------------------------------------------------------------

def _randomize_lora_b(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)


def test_add_adapter_after_patch_patches_the_new_layers(fused_calls):
    model, twin = lora_model(), lora_model()
    patch(model)
    for m in (model, twin):
        torch.manual_seed(3)
        m.add_adapter("mlp_only", LoraConfig(r=2, target_modules=["lm_head", "gate_proj"]))
        _randomize_lora_b(m)
        m.base_model.set_adapter("mlp_only")
    assert "base_model.model.lm_head" in patched_layers(model)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert rel_err(model(input_ids=ids).logits, twin(input_ids=ids).logits) < 1e-5
    assert len(fused_calls) == 1 + 2, "lm_head and both gate_proj layers ran fused"


def test_load_adapter_after_patch_patches_the_new_layers(tmp_path):
    source = lora_model()
    source.add_adapter("head", LoraConfig(r=2, target_modules=["lm_head"]))
    source.save_pretrained(tmp_path)
    model = lora_model()
    patch(model)
    model.load_adapter(tmp_path / "head", adapter_name="head")
    assert "base_model.model.lm_head" in patched_layers(model)


def test_inject_adapter_in_model_after_patch_and_no_patching_without_patch():
    model = mlp_lora(targets=["lin0"])
    untouched = mlp_lora(targets=["lin0"])
    patch(model)
    for m in (model, untouched):
        m.add_adapter("second", LoraConfig(target_modules=["lin1"]))
    assert patched_layers(model) == ["base_model.model.lin0", "base_model.model.lin1"]
    assert patched_layers(untouched) == [], "a model never patched stays PEFT's"
    plain = MLP()
    peft.inject_adapter_in_model(LoraConfig(target_modules=["lin0"]), plain)
    patch(plain)
    peft.inject_adapter_in_model(LoraConfig(target_modules=["lin1"]), plain, adapter_name="other")
    assert patched_layers(plain) == ["lin0", "lin1"]
    unpatch(model)
    model.add_adapter("third", LoraConfig(target_modules=["lin1"]))
    assert patched_layers(model) == [], "unpatch() stops patching new layers"


@pytest.mark.filterwarnings("ignore:aLoRA is currently only supported for CAUSAL_LM")  # PEFT's note; an MLP here
def test_new_layers_that_cannot_be_patched_are_reported_and_variants_added_to_a_patched_layer_match():
    model, twin = mlp_lora(targets=["lin0"]), mlp_lora(targets=["lin0"])
    patch(model)
    alora = dict(alora_invocation_tokens=[3], init_lora_weights=False)  # aLoRA: a variant with no fused path
    with pytest.warns(LayersNotPatchedWarning, match=r"1 of 1 LoRA layers .*LoRA variant other than DoRA"):
        model.add_adapter("alora_new", LoraConfig(target_modules=["lin1"], **alora))
    twin.add_adapter("alora_new", LoraConfig(target_modules=["lin1"], **alora))
    for m in (model, twin):  # DoRA (fused) and aLoRA (PEFT's path) adapters on lin0, which is already patched
        torch.manual_seed(5)
        m.add_adapter("dora_old", LoraConfig(target_modules=["lin0"], use_dora=True, init_lora_weights=False))
        m.add_adapter("alora_old", LoraConfig(target_modules=["lin0"], **alora))
    x = torch.randn(5, 10)
    for active in ("dora_old", ["default", "dora_old"], "alora_old", ["default", "alora_old"]):
        for m in (model, twin):
            m.base_model.set_adapter(active)
        with torch.no_grad():
            assert rel_err(model(x), twin(x)) < 1e-6, active


# ---- 6. eligibility is decided at patch time, not per call -------------------------------------------------

def test_forward_does_not_redo_the_patch_time_checks(monkeypatch, fused_calls):
    model = mlp_lora()
    patch(model)

    def fail(module):
        raise AssertionError("unsupported_reason() called per forward")

    monkeypatch.setattr(integration, "unsupported_reason", fail)
    with torch.no_grad():
        model(torch.randn(3, 10))
    assert len(fused_calls) == 2


# ---- 7. what patch() reports --------------------------------------------------------------------------------

def test_patch_is_silent_when_everything_is_patched():
    model = lora_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning would fail here
        assert patch(model) == 2 * len(TARGETS)
        assert patch(model) == 0, "patching twice is harmless"


def test_patch_warns_once_with_skipped_layers_grouped_by_reason():
    model = lora_model(alora_invocation_tokens=[3])  # aLoRA: a LoRA variant with no fused path
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert patch(model) == 0
    ours = [w for w in caught if issubclass(w.category, LayersNotPatchedWarning)]
    assert len(ours) == 1
    message = str(ours[0].message)
    assert f"{2 * len(TARGETS)} of {2 * len(TARGETS)} LoRA layers" in message
    assert message.count("LoRA variant other than DoRA") == 1, "one group for one reason"
    assert "and 11 more" in message


def test_patch_warns_when_there_is_no_lora_layer():
    with pytest.warns(LayersNotPatchedWarning, match="no PEFT LoRA layers"):
        assert patch(MLP()) == 0


@pytest.mark.parametrize("fn", [patch, unpatch])
@pytest.mark.parametrize("bad", [None, "model", {"lin0": 1}])
def test_not_a_module_is_a_type_error_naming_model(fn, bad):
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module"):
        fn(bad)
