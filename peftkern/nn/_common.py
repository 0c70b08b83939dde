"""What the layer modules share: recognising bitsandbytes layers without importing bitsandbytes, the refusals every
`from_linear` makes, and nn.Linear's own initialisation of a frozen base built from scratch."""
from __future__ import annotations

import math
import sys

import torch
from torch import nn


def is_linear4bit(module) -> bool:
    """A bitsandbytes Linear4bit, recognised without importing bitsandbytes (it is optional)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def is_linear8bit(module) -> bool:
    """A bitsandbytes 8-bit linear (LLM.int8's Linear8bitLt), recognised without importing bitsandbytes."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, getattr(bnb.nn, "Linear8bitLt", ()))


def check_dense_linear(cls_name: str, linear, takes_4bit: bool) -> None:
    """The refusals every from_linear shares, before anything is built: not an nn.Linear, a bitsandbytes 8-bit
    layer (an nn.Linear subclass whose int8 weight and matmul peftkern does not reproduce), or any other nn.Linear
    subclass whose weight is not floating. `takes_4bit`: whether the class also takes a Linear4bit (the message
    then offers it)."""
    accepted = "a torch.nn.Linear or a bitsandbytes Linear4bit" if takes_4bit else "a torch.nn.Linear"
    if is_linear8bit(linear):
        instead = ("load the base in 4-bit (bitsandbytes Linear4bit, BitsAndBytesConfig(load_in_4bit=True)) or "
                   "unquantized" if takes_4bit else "load the base unquantized (or in 4-bit and call "
                   "peftkern.multi_lora_linear over peftkern.QuantizedWeight.from_bnb(layer))")
        raise TypeError(f"{cls_name}.from_linear: linear is a bitsandbytes {type(linear).__name__} (8-bit, LLM.int8), "
                        f"and 8-bit bases are not supported (their int8 weight and outlier matmul have no peftkern "
                        f"path); linear must be {accepted}: {instead}")
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be {accepted}, got {type(linear).__name__}")
    weight = getattr(linear, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"{cls_name}.from_linear: linear ({type(linear).__name__}) has a weight of dtype "
                        f"{getattr(weight, 'dtype', type(weight).__name__)}, not a floating dtype (a quantized or "
                        f"packed layer peftkern cannot read); linear must be {accepted} with a floating weight")


def reset_base(weight: torch.Tensor, bias: torch.Tensor | None, in_features: int) -> None:
    """nn.Linear's own initialisation of a frozen weight and bias, for layers built from scratch."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        bound = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
        nn.init.uniform_(bias, -bound, bound)
