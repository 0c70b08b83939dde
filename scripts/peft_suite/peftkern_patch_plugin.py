"""pytest plugin: run Hugging Face PEFT's own tests with peftkern's backend patched in after every injection.

Load it with `-p peftkern_patch_plugin` (this folder on PYTHONPATH); see README.md here for the full check.
After each `BaseTuner.inject_adapter` (behind `get_peft_model`, `PeftModel.from_pretrained`, `add_adapter`,
`load_adapter`, `inject_adapter_in_model`, `PeftMixedModel.add_adapter`) it calls
`peftkern.integrations.peft.patch()` on the model that was injected into, so every LoRA layer PEFT's tests
build runs on peftkern wherever peftkern can run it. The run ends with a line saying how many layers were
patched and how many forwards took the fused path, so a run that silently patched nothing cannot pass for
a check.

patch()'s LayersNotPatchedWarning is silenced here: PEFT's tests inject LoHa, IA3, ... adapters too, and
some of its tests assert that no warning is raised.
"""
import warnings

_counts = {"patched_layers": 0, "fused_forwards": 0}


def pytest_configure(config):
    from peft.tuners.tuners_utils import BaseTuner

    import peftkern.integrations.peft as integration

    inject = BaseTuner.inject_adapter  # already peftkern's wrapper (patches marked models' new layers)

    fused_classes = tuple(c for c in (integration.FusedLoraLinear, integration.FusedLoraLinear4bit) if c is not None)

    def fused_layers(model):
        return sum(type(m) in fused_classes for m in model.modules())

    def inject_adapter_then_patch(self, model, *args, **kwargs):
        before = fused_layers(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", integration.LayersNotPatchedWarning)
            result = inject(self, model, *args, **kwargs)  # patches new layers itself once model is marked
            integration.patch(model)
        _counts["patched_layers"] += fused_layers(model) - before
        return result

    BaseTuner.inject_adapter = inject_adapter_then_patch

    def counting(fused):
        def count_then_call(*args, **kwargs):
            _counts["fused_forwards"] += 1
            return fused(*args, **kwargs)
        return count_then_call

    # the names the patched forwards call: lora_linear, and dora_linear for DoRA adapters
    integration.lora_linear = counting(integration.lora_linear)
    integration.dora_linear = counting(integration.dora_linear)


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"peftkern: {_counts['patched_layers']} LoRA layers patched, "
                                f"{_counts['fused_forwards']} forwards on the fused path")
