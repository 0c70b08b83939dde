"""The recording driver: peftkern's public ops called on CPU tensors with the Triton backend, in both dispatch
variants (fused, composite), forward and backward, in six dtype settings (bf16 or fp16 activations with
parameters in the same dtype or fp32, fp32 with and without TF32).

The calls are the families' own: every subpackage of peftkern with an op.py is an op family, and its examples
module declares them (`aot_calls(setting, *, full, peft_default)`: each family's worst case in every setting,
and enough other calls that every flag, activation, tile-changing width and token count / stride off Triton's %16
specialization is launched; `full`: the cross product) and runs one (`run_aot_call(call, act_dtype,
param_dtype)`). Nothing here names a family: a new family folder is driven once its examples declare its calls.

bfloat16 calls run with fp16 tensors recorded as bf16: the Triton backend refuses bf16 on CPU (the
interpreter's tl.dot is wrong for it, triton-lang/triton#11584), and no launcher chooses anything differently for
fp16 and bf16 (they ask "is it fp32" and "are both 16-bit").
"""
from __future__ import annotations

import importlib
import os
import pathlib

# How many programs a launcher aims for (kernels/_launch.target_programs: 4 per SM on a GPU, 4 on CPU); split
# counts, and so Triton's ==1 specialization of them, depend on it. The driver runs under both values: 4 (as
# when a problem already fills the GPU: no split) and an H100's 4 x 132; a persistent kernel spreads over an
# H100's 132 SMs.
H100_SMS = 132
GRID_TARGETS = (4, 4 * H100_SMS)

# what a driver call varies besides the family's own arguments
SETTINGS = [  # (activation dtype, trainable-parameter dtype, torch.backends.cuda.matmul.allow_tf32)
    ("bfloat16", "float32", False),  # PEFT's default: fp32 adapters beside 16-bit activations
    ("bfloat16", "bfloat16", False),
    ("float16", "float32", False),
    ("float16", "float16", False),
    ("float32", "float32", False),   # fp32 products that keep fp32-class accuracy
    ("float32", "float32", True),    # fp32 with TF32 allowed
]
_SETTING_KEYS = ("family", "act_dtype", "param_dtype", "tf32")


def families() -> list[tuple[str, object]]:
    """(name, examples module) of every op family: the subpackages of peftkern that have an op.py, by name."""
    import peftkern
    root = pathlib.Path(peftkern.__file__).parent
    names = sorted(p.name for p in root.iterdir() if (p / "op.py").is_file() and (p / "__init__.py").is_file())
    return [(name, importlib.import_module(f"peftkern.{name}.examples")) for name in names]


def driver_calls(full: bool = False) -> list[dict]:
    """The driver's calls: dicts with family (its folder's name), act_dtype, param_dtype, tf32 and the arguments
    the family's examples.aot_calls gave, setting by setting and, within a setting, family by family.

    Default, a covering set sized for CI: in every dtype setting each family's worst case and the calls that
    rotate through its other variants, and in PEFT's default setting (bf16 activations, fp32 adapters, the first)
    its common cases too. full=True: every family's cross product in every setting (several times the compiles:
    a deep check before a GPU session, not CI)."""
    calls = []
    found = families()
    for index, (act_dtype, param_dtype, tf32) in enumerate(SETTINGS):
        base = dict(act_dtype=act_dtype, param_dtype=param_dtype, tf32=tf32)
        for name, examples in found:
            for args in examples.aot_calls(dict(base, index=index), full=full, peft_default=index == 0):
                clash = set(args) & set(_SETTING_KEYS)
                if clash:
                    raise ValueError(f"peftkern.{name}.examples.aot_calls: a call names {sorted(clash)}, which the "
                                     "driver sets")
                calls.append(dict(base, family=name, **args))
    return calls


def _run_call(call: dict, examples: dict, recorder) -> None:
    """One driver call, forward and backward, by its family's run_aot_call. bf16 runs as fp16 (the interpreter
    cannot run bf16 dots) and is recorded as bf16."""
    import torch
    args = {k: v for k, v in call.items() if k not in _SETTING_KEYS}
    torch.backends.cuda.matmul.allow_tf32 = call["tf32"]
    bf16 = "bfloat16" in (call["act_dtype"], call["param_dtype"])
    recorder.dtype_map = {"float16": "bfloat16"} if bf16 else {}
    cpu = {"bfloat16": torch.float16, "float16": torch.float16, "float32": torch.float32}
    try:
        examples[call["family"]].run_aot_call(args, cpu[call["act_dtype"]], cpu[call["param_dtype"]])
    finally:
        recorder.dtype_map = {}


def drive(calls: list[dict], recorder, log) -> list[str]:
    """Run each call of driver_calls() (its family's run_aot_call runs it on the Triton backend) in both dispatch
    variants (fused and composite launch different kernels), forward and backward. Returns the calls that raised:
    a failure, since the driver only asks for what the ops must run."""
    import torch

    examples = dict(families())
    failures = []
    old_mode = os.environ.get("PEFTKERN_DISPATCH")
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for mode in ("fused", "composite"):
            os.environ["PEFTKERN_DISPATCH"] = mode
            log(f"# driving {len(calls)} calls, {mode}")
            for call in calls:
                try:
                    _run_call(call, examples, recorder)
                except Exception as e:
                    failures.append(f"{mode} {call}: {type(e).__name__}: {e}")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
        if old_mode is None:
            os.environ.pop("PEFTKERN_DISPATCH", None)
        else:
            os.environ["PEFTKERN_DISPATCH"] = old_mode
    return failures
