"""Benchmark cases, shared by `python -m peftkern bench` and the pytest-benchmark suites."""
from __future__ import annotations

import dataclasses
import itertools

import torch


@dataclasses.dataclass(frozen=True)
class LoraCase:
    m: int  # tokens
    k: int  # in_features
    n: int  # out_features
    r: int
    dtype: torch.dtype
    dropout: float
    bias: bool = False
    family = "lora_linear"  # the op family whose backend `auto` chooses

    @property
    def label(self) -> str:
        return (f"M={self.m} K={self.k} N={self.n} r={self.r} {str(self.dtype).replace('torch.', '')} "
                f"p={self.dropout}")

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dtype"] = str(self.dtype).replace("torch.", "")
        return d


def lora_cases(device: torch.device, quick: bool = False) -> list[LoraCase]:
    """GPU: the headline shapes (tokens 2048-16384, hidden 4096 and 8192, ranks 8-64, bf16). CPU: one mid-size
    shape, float32."""
    if device.type == "cuda":
        if quick:
            return [LoraCase(8192, 4096, 4096, 16, torch.bfloat16, p) for p in (0.0, 0.1)]
        return [LoraCase(m, h, h, r, torch.bfloat16, p)
                for m, h, r, p in itertools.product((2048, 8192, 16384), (4096, 8192), (8, 16, 64), (0.0, 0.1))]
    if quick:
        return [LoraCase(256, 256, 256, 16, torch.float32, p) for p in (0.0, 0.1)]
    return [LoraCase(2048, 1024, 1024, 16, torch.float32, p) for p in (0.0, 0.1)]


@dataclasses.dataclass(frozen=True)
class DoraCase(LoraCase):
    """DoRA (weight-decomposed LoRA): LoRA's shapes plus a trainable magnitude vector [N]."""
    family = "dora_linear"


def dora_cases(device: torch.device, quick: bool = False) -> list[DoraCase]:
    """The LoRA cases (headline shapes in bf16 on GPU, M=8192 K=N=4096 r=16 among them; on CPU the
    acceptance shape, float32), as DoRA layers."""
    return [DoraCase(**{f.name: getattr(c, f.name) for f in dataclasses.fields(c)}) for c in lora_cases(device, quick)]


@dataclasses.dataclass(frozen=True)
class AdapterCase:
    m: int  # tokens
    d: int  # model width
    k: int  # bottleneck
    dtype: torch.dtype
    activation: str = "relu"
    family = "bottleneck_adapter"

    @property
    def label(self) -> str:
        return f"M={self.m} d={self.d} k={self.k} {str(self.dtype).replace('torch.', '')} {self.activation}"

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dtype"] = str(self.dtype).replace("torch.", "")
        return d


def adapter_cases(device: torch.device, quick: bool = False) -> list[AdapterCase]:
    """GPU: M=16384, d in {1024, 4096}, k in {16, 64, 256}, bf16. CPU: the acceptance shape, float32."""
    if device.type == "cuda":
        if quick:
            return [AdapterCase(16384, 4096, 64, torch.bfloat16)]
        return [AdapterCase(16384, d, k, torch.bfloat16) for d, k in itertools.product((1024, 4096), (16, 64, 256))]
    if quick:
        return [AdapterCase(512, 256, 16, torch.float32)]
    return [AdapterCase(4096, 1024, 64, torch.float32)]


@dataclasses.dataclass(frozen=True)
class SparseCase:
    kind: str  # "apply" (sparse_diff_apply_) or "linear" (sparse_diff_linear forward + backward)
    n_out: int
    n_in: int
    density: float
    dtype: torch.dtype
    m: int = 0  # tokens, for "linear"

    @property
    def family(self) -> str:
        return "sparse_diff_apply" if self.kind == "apply" else "sparse_diff_linear"

    @property
    def label(self) -> str:
        tokens = f"M={self.m} " if self.kind == "linear" else ""
        return (f"{self.kind} {tokens}{self.n_out}x{self.n_in} {100 * self.density:g}% "
                f"{str(self.dtype).replace('torch.', '')}")

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dtype"] = str(self.dtype).replace("torch.", "")
        return d


def sparse_cases(device: torch.device, quick: bool = False) -> list[SparseCase]:
    """apply into 4096x4096 at 0.1%, 1%, 5%; sparse_diff_linear at 1% (GPU bf16 M=8192, CPU fp32 M=512)."""
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    if quick:
        return [SparseCase("apply", 1024, 1024, 0.01, dtype), SparseCase("linear", 1024, 1024, 0.01, dtype, m=128)]
    return ([SparseCase("apply", 4096, 4096, d, dtype) for d in (0.001, 0.01, 0.05)]
            + [SparseCase("linear", 4096, 4096, 0.01, dtype, m=8192 if gpu else 512)])


@dataclasses.dataclass(frozen=True)
class QLoraCase:
    """LoRA over a 4-bit base (bitsandbytes' format, double-quantized absmax by default)."""
    m: int  # tokens
    k: int  # in_features
    n: int  # out_features
    r: int
    dtype: torch.dtype  # compute dtype of x, the adapters and deq(W)
    dropout: float
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    family = "lora_linear"

    @property
    def label(self) -> str:
        dq = "+dq" if self.double_quant else ""
        return (f"M={self.m} K={self.k} N={self.n} r={self.r} {self.quant_type}{dq} "
                f"{str(self.dtype).replace('torch.', '')} p={self.dropout}")

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dtype"] = str(self.dtype).replace("torch.", "")
        return d


def qlora_cases(device: torch.device, quick: bool = False) -> list[QLoraCase]:
    """GPU: the headline QLoRA shape (M=8192, K=N=4096, r=16, NF4 double-quantized, bf16). CPU: float32,
    smaller (bitsandbytes' CPU 4-bit matmul is slow)."""
    if device.type == "cuda":
        return [QLoraCase(8192, 4096, 4096, 16, torch.bfloat16, p) for p in ((0.0,) if quick else (0.0, 0.1))]
    if quick:
        return [QLoraCase(128, 256, 256, 16, torch.float32, 0.0)]
    return [QLoraCase(512, 1024, 1024, 16, torch.float32, p) for p in (0.0, 0.1)]


@dataclasses.dataclass(frozen=True)
class MultiLoraCase:
    """Many adapters over one base, forward in eval mode (serving a mixed batch): `batch` sequences of `seq` tokens,
    `adapters` adapters of rank r, ids one per sequence (prefill: adapter i for sequence i; decode: drawn at random
    from a fixed generator, so each adapter serves about batch / adapters rows)."""
    kind: str  # "prefill" or "decode"
    batch: int
    seq: int
    k: int
    n: int
    r: int
    adapters: int
    dtype: torch.dtype
    family = "multi_lora_linear"

    @property
    def m(self) -> int:
        return self.batch * self.seq

    @property
    def label(self) -> str:
        return (f"{self.kind} M={self.m} ({self.batch}x{self.seq}) K={self.k} N={self.n} r={self.r} "
                f"{self.adapters} adapters {str(self.dtype).replace('torch.', '')}")

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dtype"] = str(self.dtype).replace("torch.", "")
        return d


def multi_lora_cases(device: torch.device, quick: bool = False) -> list[MultiLoraCase]:
    """The serving shapes: prefill (4096 rows = 8 sequences of 512 tokens, 8 adapters) and decode (64 sequences of one
    token, 32 adapters), rank 16; K=N=1024 float32 on CPU, K=N=4096 bf16 on GPU."""
    if device.type == "cuda":
        h, dtype = 4096, torch.bfloat16
    else:
        h, dtype = 1024, torch.float32
    if quick:
        return [MultiLoraCase("prefill", 4, 64, 256, 256, 16, 4, dtype),
                MultiLoraCase("decode", 16, 1, 256, 256, 16, 8, dtype)]
    return [MultiLoraCase("prefill", 8, 512, h, h, 16, 8, dtype), MultiLoraCase("decode", 64, 1, h, h, 16, 32, dtype)]
