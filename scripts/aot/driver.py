"""The recording driver: peftkern's public ops called on CPU tensors with the Triton backend, in both dispatch
variants (fused, composite), forward and backward, in six dtype settings (bf16 or fp16 activations with
parameters in the same dtype or fp32, fp32 with and without TF32): each family's worst case in every setting,
and enough other calls that every flag (bias, dropout, residual, which inputs need grad), every adapter
activation, the rank and bottleneck widths that change a launcher's tiles, and token counts / strides off
Triton's %16 specialization are each launched (`full`: the cross product).

bfloat16 calls run with fp16 tensors recorded as bf16: the Triton backend refuses bf16 on CPU (the
interpreter's tl.dot is wrong for it, triton-lang/triton#11584), and no launcher chooses anything differently for
fp16 and bf16 (they ask "is it fp32" and "are both 16-bit").
"""
from __future__ import annotations

import os

# How many programs a launcher aims for (kernels/_launch.target_programs: 4 per SM on a GPU, 4 on CPU); split
# counts, and so Triton's ==1 specialization of them, depend on it. The driver runs under both values: 4 (as
# when a problem already fills the GPU: no split) and an H100's 4 x 132; a persistent kernel spreads over an
# H100's 132 SMs.
H100_SMS = 132
GRID_TARGETS = (4, 4 * H100_SMS)

# what a driver call varies; the names are the public ops' arguments
_SETTINGS = [  # (activation dtype, trainable-parameter dtype, torch.backends.cuda.matmul.allow_tf32)
    ("bfloat16", "float32", False),  # PEFT's default: fp32 adapters beside 16-bit activations
    ("bfloat16", "bfloat16", False),
    ("float16", "float32", False),
    ("float16", "float16", False),
    ("float32", "float32", False),   # fp32 products that keep fp32-class accuracy
    ("float32", "float32", True),    # fp32 with TF32 allowed
]
_ACTIVATIONS = ["identity", "relu", "gelu", "gelu_tanh", "silu", "tanh"]
# adapter calls: activation, bottleneck k (its BLOCK_K and the launcher's tile shape), token count
# (aligned or not), and the flags that change a kernel: biases, an explicit residual, which inputs need grad.
# The first is the worst case (the heaviest activation at the largest 64-row tile, every flag adding work).
_ADAPTER_VARIANTS = [
    dict(act="gelu", k=64, M=256),
    dict(act="gelu_tanh", k=256, M=250),
    dict(act="silu", k=128, M=256, biases=False, residual=True),
    dict(act="tanh", k=24, M=250, need_h=False),
    dict(act="relu", k=16, M=256, need_wu=False),
    dict(act="identity", k=32, M=250, residual=True),
]
# LoRA calls: the worst case (bias, dropout, rank 64: the largest rank tiles, aligned sizes), PEFT's common
# case (no bias, no dropout, rank 8, a token count and B's row stride off Triton's %16 specialization), and
# rank 32 (rank_down's middle tile)
_LORA_MAX = dict(M=256, r=64, bias=True, p=0.1)
_LORA_COMMON = dict(M=250, r=8, bias=False, p=0.0)
_LORA_MID = dict(M=256, r=32, bias=True, p=0.1)
# QLoRA calls (LoRA over a 4-bit weight; `wq` is the weight's dtype, BLOCKSIZE a constexpr of the kernel): the
# worst case (bias, dropout, double-quantized absmax resolved on chip) with the weight in the activations' dtype,
# and in PEFT's default setting the common case (no bias, no dropout, a token count off %16, block 128, a
# float32 absmax) over an fp32 weight as well
_QLORA_MAX = dict(M=256, r=16, bias=True, p=0.1)
_QLORA_COMMON = dict(M=250, r=16, bias=False, p=0.0, blocksize=128, dq=False)
# DoRA calls: the worst case (bias, dropout: the two-accumulator GEMMs, rank 64) in every setting, and in PEFT's
# default setting the common one (no dropout, rank 16, an odd M) and a frozen magnitude (no z written)
_DORA_MAX = dict(M=256, r=64, bias=True, p=0.1)
_DORA_COMMON = dict(M=250, r=16, bias=False, p=0.0)
_DORA_RANK8 = dict(M=250, r=8, bias=True, p=0.0)  # the no-dropout GEMM at a rank off 16 (its padded rank factors)
_DORA_FROZEN_MAGNITUDE = dict(M=256, r=16, bias=True, p=0.0, train_magnitude=False)
# many adapters (multi_lora_linear): ranks that differ (the largest sets the tiles; 8 and 4 are off 16), with bias
# and dropout at full tiles; and a decode shape (few rows per adapter: the small row tiles)
_MULTI_MAX = dict(M=256, ranks=(64, 8, 16), bias=True, p=0.1)
_MULTI_DECODE = dict(M=24, ranks=(16, 16, 4, 16), bias=False, p=0.0)
_MULTI_MID = dict(M=256, ranks=(32, 4), bias=False, p=0.1)  # the 32-wide rank tiles of the shrink and grad kernels


def driver_calls(full: bool = False) -> list[dict]:
    """The driver's calls: dicts with family ("lora", "qlora", "dora", "multi_lora", "adapter", "sparse"), dtypes, tf32
    and the call's arguments.

    Default, a covering set sized for CI: in every dtype setting each family's worst case (LoRA with bias,
    dropout and rank 64; the adapter's heaviest variant; sparse with aligned sizes) and one more adapter
    variant (rotating, so every activation, bottleneck width and flag value is launched); in PEFT's default
    setting (bf16 activations, fp32 adapters) also LoRA's common case, rank 32 and odd-sized sparse.
    full=True: every setting gets every LoRA (bias x dropout x rank) combination, every activation at every
    bottleneck width, every adapter variant and both sparse sizes (several times the compiles: a deep check
    before a GPU session, not CI)."""
    calls = []
    for i, (act_dtype, param_dtype, tf32) in enumerate(_SETTINGS):
        base = dict(act_dtype=act_dtype, param_dtype=param_dtype, tf32=tf32)
        peft_default = i == 0
        if full:
            for bias in (False, True):
                for p in (0.0, 0.1):
                    for r in (8, 16, 32, 64):
                        calls.append(dict(base, family="lora", M=250 if r == 8 else 256, r=r, bias=bias, p=p))
            for act in _ACTIVATIONS:
                for k in (16, 24, 64, 128, 256):
                    calls.append(dict(base, family="adapter", act=act, k=k, M=256))
            calls += [dict(base, family="adapter", **v) for v in _ADAPTER_VARIANTS]
            for bias in (False, True):
                for p in (0.0, 0.1):
                    for r in (8, 16, 64):
                        for train_magnitude in (False, True):
                            calls.append(dict(base, family="dora", M=250 if r == 8 else 256, r=r, bias=bias, p=p,
                                              train_magnitude=train_magnitude))
            for ranks in ((64, 8, 16), (16, 16), (32, 4)):
                for bias, p in ((False, 0.0), (True, 0.1)):
                    calls.append(dict(base, family="multi_lora", M=256, ranks=ranks, bias=bias, p=p))
            calls.append(dict(base, family="multi_lora", **_MULTI_DECODE))
            for wq in sorted({act_dtype, "float32"}):
                for bias, p in ((False, 0.0), (True, 0.1)):
                    for blocksize, dq in ((64, True), (128, False)):
                        calls.append(dict(base, family="qlora", wq=wq, M=256, r=16, bias=bias, p=p,
                                          blocksize=blocksize, dq=dq))
        else:
            calls.append(dict(base, family="lora", **_LORA_MAX))
            calls.append(dict(base, family="qlora", wq=act_dtype, **_QLORA_MAX))
            calls.append(dict(base, family="dora", **_DORA_MAX))
            calls.append(dict(base, family="dora", **_DORA_RANK8))
            calls.append(dict(base, family="multi_lora", **_MULTI_MAX))
            calls.append(dict(base, family="multi_lora", **_MULTI_DECODE))
            calls.append(dict(base, family="multi_lora", **_MULTI_MID))
            if peft_default:
                calls.append(dict(base, family="dora", **_DORA_COMMON))
                calls.append(dict(base, family="dora", **_DORA_FROZEN_MAGNITUDE))
                calls.append(dict(base, family="qlora", wq=act_dtype, **_QLORA_COMMON))
                calls.append(dict(base, family="qlora", wq="float32", **_QLORA_COMMON))
                calls.append(dict(base, family="lora", **_LORA_COMMON))
                calls.append(dict(base, family="lora", **_LORA_MID))
            calls.append(dict(base, family="adapter", **_ADAPTER_VARIANTS[0]))
            calls.append(dict(base, family="adapter", **_ADAPTER_VARIANTS[1 + i % (len(_ADAPTER_VARIANTS) - 1)]))
        for M in ((256, 250) if full or peft_default else (256,)):
            calls.append(dict(base, family="sparse", M=M, nnz=333 if M % 16 else 1000, bias=M % 16 == 0))
    return calls


def _rnd(*shape, dtype, grad=False):
    import torch
    return (torch.randn(*shape, dtype=dtype) * 0.1).requires_grad_(grad)


def _lora(xd, pd, M, r, bias, p, K=256, N=384):
    import torch

    import peftkern
    x, w = _rnd(M, K, dtype=xd, grad=True), _rnd(N, K, dtype=xd)
    a, b = _rnd(r, K, dtype=pd, grad=True), _rnd(N, r, dtype=pd, grad=True)
    bb = _rnd(N, dtype=xd) if bias else None
    if xd != torch.float32:
        _lora_persistent(x, w, a, b, bb, p, M)
    return peftkern.lora_linear(x, w, a, b, scaling=0.5, bias=bb, dropout_p=p, seed=3)


def _lora_persistent(x, w, a, b, bb, p, M):
    """The Hopper kernel's launches, with the launch configuration's SM count (the driver's H100_SMS)."""
    import torch

    from peftkern.kernels import _launch, lora_persistent as lp
    N, K = w.shape
    s, ds = _rnd(M, a.shape[0], dtype=torch.float32), _rnd(M, a.shape[0], dtype=torch.float32)
    y, dx = torch.empty(M, N, dtype=x.dtype), torch.empty(M, K, dtype=x.dtype)
    sms = _launch.num_sms(x.device)
    lp.launch(x.detach(), w.t(), s, b.detach().t(), bb, y, lora_scale=0.5, seed=3, dropout_p=0.0,
              num_sms=sms)  # forward: B = Wᵀ (a transposed view)
    lp.launch(y, w, ds, a.detach(), None, dx, lora_scale=1.0, seed=3, dropout_p=p, num_sms=sms)  # dx


def _qlora(xd, pd, M, r, bias, p, wq, blocksize=64, dq=True, K=256, N=384):
    import torch

    import peftkern
    x = _rnd(M, K, dtype=xd, grad=True)
    qw = peftkern.QuantizedWeight.quantize(_rnd(N, K, dtype=getattr(torch, wq)), blocksize=blocksize,
                                           double_quant=dq)
    a, b = _rnd(r, K, dtype=pd, grad=True), _rnd(N, r, dtype=pd, grad=True)
    bb = _rnd(N, dtype=xd) if bias else None
    return peftkern.lora_linear(x, qw, a, b, scaling=0.5, bias=bb, dropout_p=p, seed=3)


def _dora(xd, pd, M, r, bias, p, train_magnitude=True, K=256, N=384):
    import peftkern
    x, w = _rnd(M, K, dtype=xd, grad=True), _rnd(N, K, dtype=xd)
    a, b = _rnd(r, K, dtype=pd, grad=True), _rnd(N, r, dtype=pd, grad=True)
    magnitude = (_rnd(N, dtype=pd).abs() + 1.0).requires_grad_(train_magnitude)
    bb = _rnd(N, dtype=xd) if bias else None
    return peftkern.dora_linear(x, w, a, b, magnitude, scaling=0.5, bias=bb, dropout_p=p, seed=3)


def _multi_lora(xd, pd, M, ranks, bias, p, K=256, N=384):
    import torch

    import peftkern
    x, w = _rnd(M, K, dtype=xd, grad=True), _rnd(N, K, dtype=xd)
    a = [_rnd(r, K, dtype=pd, grad=True) for r in ranks]
    b = [_rnd(N, r, dtype=pd, grad=True) for r in ranks]
    bb = _rnd(N, dtype=xd) if bias else None
    ids = torch.randint(-1, len(ranks), (M,), generator=torch.Generator().manual_seed(M))
    return peftkern.multi_lora_linear(x, w, a, b, ids, scalings=[0.5] * len(ranks), bias=bb, dropout_p=p, seed=3)


def _adapter(hd, pd, act, k, M, d=256, biases=True, residual=False, need_h=True, need_wu=True):
    import peftkern
    h = _rnd(M, d, dtype=hd, grad=need_h)
    wd, wu = _rnd(k, d, dtype=pd, grad=True), _rnd(d, k, dtype=pd, grad=need_wu)
    bd = _rnd(k, dtype=pd, grad=True) if biases else None
    bu = _rnd(d, dtype=pd, grad=need_wu) if biases else None
    res = _rnd(M, d, dtype=hd, grad=True) if residual else None
    return peftkern.bottleneck_adapter(h, wd, bd, wu, bu, activation=act, scaling=0.5, residual=res)


def _sparse(xd, vd, M, nnz, bias, K=256, N=384):
    import torch

    import peftkern
    x, w = _rnd(M, K, dtype=xd, grad=True), _rnd(N, K, dtype=xd)
    idx = torch.randperm(N * K)[:nnz]
    vals = _rnd(nnz, dtype=vd, grad=True)
    return peftkern.sparse_diff_linear(x, w, idx, vals, _rnd(N, dtype=xd) if bias else None)


FAMILIES = {"lora": _lora, "qlora": _qlora, "dora": _dora, "multi_lora": _multi_lora, "adapter": _adapter,
            "sparse": _sparse}
_SETTING_KEYS = ("family", "act_dtype", "param_dtype", "tf32")


def _run_call(call: dict, recorder) -> None:
    """One driver call, forward and backward. bf16 runs as fp16 (the interpreter cannot run bf16 dots) and is
    recorded as bf16."""
    import torch
    args = {k: v for k, v in call.items() if k not in _SETTING_KEYS}
    torch.backends.cuda.matmul.allow_tf32 = call["tf32"]
    bf16 = "bfloat16" in (call["act_dtype"], call["param_dtype"])
    recorder.dtype_map = {"float16": "bfloat16"} if bf16 else {}
    cpu = {"bfloat16": torch.float16, "float16": torch.float16, "float32": torch.float32}
    try:
        out = FAMILIES[call["family"]](cpu[call["act_dtype"]], cpu[call["param_dtype"]], **args)
        out.float().sum().backward()
    finally:
        recorder.dtype_map = {}


def drive(calls: list[dict], recorder, log) -> list[str]:
    """Run each call of driver_calls() with the Triton backend, in both dispatch variants (fused and
    composite launch different kernels), forward and backward. Returns the calls that raised: a failure,
    since the driver only asks for what the ops must run."""
    import torch

    import peftkern

    failures = []
    old_mode = os.environ.get("PEFTKERN_DISPATCH")
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        with peftkern.use_backend("triton"):
            for mode in ("fused", "composite"):
                os.environ["PEFTKERN_DISPATCH"] = mode
                log(f"# driving {len(calls)} calls, {mode}")
                for call in calls:
                    try:
                        _run_call(call, recorder)
                    except Exception as e:
                        failures.append(f"{mode} {call}: {type(e).__name__}: {e}")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
        if old_mode is None:
            os.environ.pop("PEFTKERN_DISPATCH", None)
        else:
            os.environ["PEFTKERN_DISPATCH"] = old_mode
    return failures
