"""Thin nn.Modules over the functional ops; they hold parameters and call the ops, no math of their own.

    LoRALinear         a frozen linear layer (or bitsandbytes Linear4bit) plus a trainable rank-r update
    DoRALinear         LoRALinear with PEFT's DoRA (a trainable per-row magnitude)
    MultiLoRALinear    several LoRA adapters over one frozen base, each input row taking its own
    BottleneckAdapter  a Houlsby / Pfeiffer bottleneck adapter
    SparseDiffLinear   a frozen linear layer plus a trainable sparse diff at fixed positions
"""
from .adapter import BottleneckAdapter
from .dora import DoRALinear
from .lora import LoRALinear
from .multi_lora import MultiLoRALinear
from .sparse_diff import SparseDiffLinear

__all__ = ["LoRALinear", "DoRALinear", "MultiLoRALinear", "BottleneckAdapter", "SparseDiffLinear"]
