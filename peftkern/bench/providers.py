"""What each benchmark row times: one training step (forward + backward) of one layer.

LoRA
- eager:    Hugging Face PEFT's own LoRA `Linear` when peft is importable, else its exact eager
            computation  base(x) + lora_B(lora_A(dropout(x))) * scaling
- peftkern: peftkern.lora_linear on the backend `auto` picks
- floor:    the bare frozen base F.linear, forward and backward (what LoRA cannot go under)
DoRA (weight-decomposed LoRA, the same shapes as LoRA)
- eager:    Hugging Face PEFT's own LoRA `Linear` with use_dora=True when peft is importable, else its exact
            eager computation (PEFT 0.21's DoraLinearLayer op for op: the norm of W + scaling·(B·A), with B·A
            made as PEFT makes it, through lora_B(lora_A(eye)); detached; base result reused without dropout,
            recomputed from dropout(x) with it)
- peftkern: peftkern.dora_linear on the backend `auto` picks, over the same parameters
- peftkern_lora: peftkern.lora_linear over the same x, weight and adapters: what DoRA costs on top of
            peftkern's own LoRA (the target is at most 1.10x)
- floor:    the bare frozen base F.linear, forward and backward
Many LoRA adapters over one base (forward only, eval mode, no grad: serving a mixed batch)
- eager:    Hugging Face PEFT's own LoRA `Linear` holding every adapter, called with `adapter_names=[...]` (its
            `_mixed_batch_forward`), else its exact eager loop (gather each adapter's rows, its branch, add back)
- peftkern: peftkern.multi_lora_linear over the same weight, adapters and ids
- peftkern_single: peftkern.lora_linear with one adapter on every row: what one adapter costs
- floor:    the bare frozen base F.linear, forward
Bottleneck adapter
- eager:    AdapterHub's computation: down Linear, activation, up Linear, scale, add the residual
- peftkern: peftkern.bottleneck_adapter on the backend `auto` picks
- floor:    one elementwise pass over h forward and over dy backward (h·s): reading h and writing the
            output once, which any adapter must do
- peftkern_fwd: the forward alone under no_grad, for the share of the bandwidth roofline
QLoRA (LoRA over a 4-bit NF4 base)
- eager:    PEFT's LoRA layer over a bitsandbytes Linear4bit when both are importable, else the same math in
            eager torch: dequantize the whole weight, F.linear, plus the LoRA branch
- peftkern: peftkern.lora_linear over a peftkern.QuantizedWeight of the same bytes
- floor:    the bare dense F.linear (the unquantized weight in the compute dtype), forward and backward
Sparse diff, apply (into a 4096x4096 weight)
- eager:    index_put_(accumulate=True) into a copy of the weight (how a diff is applied without peftkern)
- eager_inplace: the in-place update a user writes by hand with the same result as sparse_diff_apply_:
            backup = w.view(-1)[idx] (a gather, for restoring later), then w.view(-1).index_add_(0, idx, v)
- peftkern: sparse_diff_apply_ in place, returning the backup; the duplicate check is remembered after the
            first call (the kernel's range check runs in every call)
- peftkern_fresh: the same with indices never seen before, so validation runs in the timed call
- floor:    index_put_(accumulate=True) in place: the library's cheapest call making the same update
Sparse diff, linear (forward + backward, x and values requiring grad)
- eager:    the SpIEL-style computation: clone W, scatter the values in, F.linear, dense weight gradient
- peftkern: sparse_diff_linear
- floor:    the bare frozen F.linear, forward and backward
x / h requires grad in every provider, as an activation inside a network does.
On CUDA, LoRA, the adapter, sparse linear (and DoRA, where its backend has both variants) also time
peftkern_fused and peftkern_composite: the same peftkern step with PEFTKERN_DISPATCH forced to each
variant, beside `peftkern` (measured dispatch).
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Callable

import torch
import torch.nn.functional as F

from .cases import DoraCase, LoraCase, QLoraCase

VARIANTS = ("fused", "composite")


def with_variants(steps: dict[str, Callable[[], None]], device: torch.device, case=None
                  ) -> dict[str, Callable[[], None]]:
    """On CUDA, add peftkern_<variant> for each dispatch variant: the peftkern step with PEFTKERN_DISPATCH
    forced to it (set for the step only, then restored). With `case`, only where the backend `auto` picks
    for the case's family has both a fused and a composite variant (forcing a missing one raises)."""
    if device.type != "cuda":
        return steps
    if case is not None:
        from ..core import backend as _backend, dispatch

        backend = _backend.auto_choice(case.family, device, case.dtype)
        if {dispatch.kind_of(v) for v in dispatch.variants(case.family, backend)} != set(VARIANTS):
            return steps
    import os

    def forced(step, mode):
        def run():
            previous = os.environ.get("PEFTKERN_DISPATCH")
            os.environ["PEFTKERN_DISPATCH"] = mode
            try:
                step()
            finally:
                if previous is None:
                    os.environ.pop("PEFTKERN_DISPATCH", None)
                else:
                    os.environ["PEFTKERN_DISPATCH"] = previous
        return run

    return {**steps, **{f"peftkern_{v}": forced(steps["peftkern"], v) for v in VARIANTS}}


def _importable(name: str) -> bool:
    """False when the package is not installed; an installed package that fails to import is an error, not a
    missing baseline (the bench would otherwise time its own eager copy and call it the baseline)."""
    if importlib.util.find_spec(name) is None:
        return False
    try:
        importlib.import_module(name)
    except ImportError as err:
        raise RuntimeError(f"{name} is installed but does not import ({type(err).__name__}: {err}); the bench "
                           f"compares against it, so fix the environment (or uninstall {name} to time the "
                           f"built-in eager copy instead)") from err
    return True


def peft_available() -> bool:
    return _importable("peft")


class _EagerLora(torch.nn.Module):
    """PEFT's eager LoRA computation, for machines without peft."""

    def __init__(self, base: torch.nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base_layer = base
        self.lora_A = torch.nn.Linear(base.in_features, r, bias=False, device=base.weight.device,
                                      dtype=base.weight.dtype)
        self.lora_B = torch.nn.Linear(r, base.out_features, bias=False, device=base.weight.device,
                                      dtype=base.weight.dtype)
        self.dropout = torch.nn.Dropout(dropout)
        self.scaling = alpha / r

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


def lora_providers(case: LoraCase, device: torch.device) -> tuple[dict[str, Callable[[], None]], str]:
    """Step functions for eager, peftkern and floor over the same weights; plus the eager provider's name."""
    import peftkern

    gen = torch.Generator(device="cpu").manual_seed(0)
    alpha = 2 * case.r
    base = torch.nn.Linear(case.k, case.n, bias=case.bias, device=device, dtype=case.dtype)
    base.requires_grad_(False)
    if peft_available():
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear as PeftLinear

        layer = PeftLinear(base, "default", config=LoraConfig(r=case.r, lora_alpha=alpha, lora_dropout=case.dropout),
                           r=case.r, lora_alpha=alpha)
        layer.base_layer.requires_grad_(False)
        lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        eager_name = f"peft {__import__('peft').__version__}"
    else:
        layer = _EagerLora(base, case.r, alpha, case.dropout)
        lora_a, lora_b = layer.lora_A.weight, layer.lora_B.weight
        eager_name = "eager (peft not installed)"
    layer.to(device).train()
    with torch.no_grad():  # a trained adapter, not PEFT's zero-init B
        lora_b.copy_(torch.randn(lora_b.shape, generator=gen).to(lora_b) * 0.01)

    x = torch.randn(case.m, case.k, generator=gen).to(device=device, dtype=case.dtype).requires_grad_()
    dy = torch.randn(case.m, case.n, generator=gen).to(device=device, dtype=case.dtype)

    def eager():
        layer(x).backward(dy)
        x.grad = None

    def fused():
        peftkern.lora_linear(x, base.weight, lora_a, lora_b, scaling=alpha / case.r, bias=base.bias,
                             dropout_p=case.dropout, training=True).backward(dy)
        x.grad = None

    def floor():
        F.linear(x, base.weight, base.bias).backward(dy)
        x.grad = None

    def zero_adapter_grads():
        lora_a.grad = None
        lora_b.grad = None

    def with_reset(fn):
        def step():
            fn()
            zero_adapter_grads()
        return step

    return with_variants({"eager": with_reset(eager), "peftkern": with_reset(fused), "floor": floor},
                         device), eager_name


class _EagerDora(_EagerLora):
    """PEFT 0.21's DoRA Linear computation (DoraLinearVariant.forward + DoraLinearLayer.forward), op for op,
    for machines without peft."""

    def __init__(self, base: torch.nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__(base, r, alpha, dropout)
        with torch.no_grad():  # PEFT's init: the row norms of W + scaling·B·A
            norm = torch.linalg.norm(base.weight + self.scaling * (self.lora_B.weight @ self.lora_A.weight), dim=1)
        self.magnitude = torch.nn.Parameter(norm.to(base.weight.dtype))

    def forward(self, x):
        result = self.base_layer(x)
        if self.training and self.dropout.p > 0:
            x = self.dropout(x)
            base_result = None
        else:
            base_result = result
        eye = torch.eye(self.lora_A.in_features, device=x.device, dtype=self.lora_A.weight.dtype)
        lora_weight = self.lora_B(self.lora_A(eye)).T.to(x.dtype)
        weight = self.base_layer.weight.to(x.dtype)
        weight_norm = torch.linalg.norm(weight + self.scaling * lora_weight.detach(), dim=1).to(weight.dtype)
        scale = (self.magnitude / weight_norm.detach()).view(1, -1)
        lora_result = self.lora_B(self.lora_A(x))
        if base_result is None:
            base_result = F.linear(x, weight)
        elif self.base_layer.bias is not None:
            base_result = base_result - self.base_layer.bias
        return result + (scale - 1) * base_result + scale * lora_result * self.scaling


def dora_providers(case: DoraCase, device: torch.device) -> tuple[dict[str, Callable[[], None]], str]:
    """Step functions for eager (PEFT's DoRA layer), peftkern (dora_linear), peftkern_lora (lora_linear on the
    same adapters) and the floor; plus the eager provider's name."""
    import peftkern

    gen = torch.Generator(device="cpu").manual_seed(0)
    alpha = 2 * case.r
    scaling = alpha / case.r
    base = torch.nn.Linear(case.k, case.n, bias=case.bias, device=device, dtype=case.dtype)
    base.requires_grad_(False)
    if peft_available():
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear as PeftLinear

        config = LoraConfig(r=case.r, lora_alpha=alpha, lora_dropout=case.dropout, use_dora=True)
        layer = PeftLinear(base, "default", config=config, r=case.r, lora_alpha=alpha)
        layer.base_layer.requires_grad_(False)
        lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        magnitude = layer.lora_magnitude_vector["default"].weight
        eager_name = f"peft {__import__('peft').__version__} (use_dora=True)"
    else:
        layer = _EagerDora(base, case.r, alpha, case.dropout)
        lora_a, lora_b, magnitude = layer.lora_A.weight, layer.lora_B.weight, layer.magnitude
        eager_name = "eager DoRA (peft not installed)"
    layer.to(device).train()
    with torch.no_grad():  # a trained adapter: PEFT's zero-init B made nonzero, magnitude / norm away from 1
        lora_b.copy_(torch.randn(lora_b.shape, generator=gen).to(lora_b) * 0.01)
        magnitude.mul_(torch.rand(magnitude.shape, generator=gen).to(magnitude) + 0.5)

    x = torch.randn(case.m, case.k, generator=gen).to(device=device, dtype=case.dtype).requires_grad_()
    dy = torch.randn(case.m, case.n, generator=gen).to(device=device, dtype=case.dtype)

    def zero():
        x.grad = None
        for p in (lora_a, lora_b, magnitude):
            p.grad = None

    def eager():
        layer(x).backward(dy)
        zero()

    def fused():
        peftkern.dora_linear(x, base.weight, lora_a, lora_b, magnitude, scaling=scaling, bias=base.bias,
                             dropout_p=case.dropout, training=True).backward(dy)
        zero()

    def fused_lora():
        peftkern.lora_linear(x, base.weight, lora_a, lora_b, scaling=scaling, bias=base.bias,
                             dropout_p=case.dropout, training=True).backward(dy)
        zero()

    def floor():
        F.linear(x, base.weight, base.bias).backward(dy)
        x.grad = None

    return with_variants({"eager": eager, "peftkern": fused, "peftkern_lora": fused_lora, "floor": floor},
                         device, case), eager_name


class _EagerMixedBatch(torch.nn.Module):
    """PEFT 0.21's `_mixed_batch_forward` for plain LoRA, op for op (when peft is not installed)."""

    def __init__(self, base, lora_a, lora_b, scalings):
        super().__init__()
        self.base, self.lora_a, self.lora_b, self.scalings = base, lora_a, lora_b, scalings

    def forward(self, x, adapter_names):
        result = self.base(x)
        for name in set(adapter_names):
            if name == "__base__":
                continue
            i = int(name[1:])
            rows = [j for j, item in enumerate(adapter_names) if item == name]
            sub = x[rows].to(self.lora_a[i].dtype)
            out = F.linear(F.linear(sub, self.lora_a[i]), self.lora_b[i]) * self.scalings[i]
            result[rows] += out.to(result.dtype)
        return result


def multi_lora_providers(case, device: torch.device) -> tuple[dict[str, Callable[[], None]], str]:
    """Forward-only step functions (eval, no grad) for eager (PEFT's mixed-batch forward), peftkern
    (multi_lora_linear), peftkern_single (lora_linear, one adapter on all rows) and the floor (F.linear). Checks once,
    untimed, that eager and peftkern agree."""
    import peftkern

    gen = torch.Generator(device="cpu").manual_seed(0)
    alpha = 2 * case.r
    base = torch.nn.Linear(case.k, case.n, bias=True, device=device, dtype=case.dtype)
    base.requires_grad_(False)
    names = [f"a{i}" for i in range(case.adapters)]
    if peft_available():
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear as PeftLinear

        layer = PeftLinear(base, names[0], config=LoraConfig(r=case.r, lora_alpha=alpha), r=case.r, lora_alpha=alpha)
        for name in names[1:]:
            layer.update_layer(name, r=case.r, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights=True,
                               use_rslora=False, config=LoraConfig(r=case.r, lora_alpha=alpha))
        lora_a = [layer.lora_A[name].weight for name in names]
        lora_b = [layer.lora_B[name].weight for name in names]
        scalings = [float(layer.scaling[name]) for name in names]
        eager_name = f"peft {__import__('peft').__version__} (mixed batch, adapter_names)"
    else:
        lora_a = [torch.nn.Parameter(torch.empty(case.r, case.k, device=device, dtype=case.dtype)) for _ in names]
        lora_b = [torch.nn.Parameter(torch.empty(case.n, case.r, device=device, dtype=case.dtype)) for _ in names]
        scalings = [alpha / case.r] * case.adapters
        layer = _EagerMixedBatch(base, lora_a, lora_b, scalings)
        eager_name = "eager mixed batch (peft not installed)"
    layer.to(device).eval()
    with torch.no_grad():  # trained adapters: every A and B random (PEFT's zero-init B would hide the work)
        for a, b in zip(lora_a, lora_b):
            a.copy_((torch.randn(a.shape, generator=gen) / case.k ** 0.5).to(a))
            b.copy_((torch.randn(b.shape, generator=gen) * 0.01).to(b))
    if case.kind == "prefill":
        seq_ids = [i % case.adapters for i in range(case.batch)]
    else:
        seq_ids = torch.randint(0, case.adapters, (case.batch,), generator=gen).tolist()
    adapter_names = [names[i] for i in seq_ids]
    ids = torch.tensor(seq_ids, device=device)
    x = torch.randn(case.batch, case.seq, case.k, generator=gen).to(device=device, dtype=case.dtype)

    def eager():
        with torch.no_grad():
            return layer(x, adapter_names=adapter_names)

    def fused():
        with torch.no_grad():
            return peftkern.multi_lora_linear(x, base.weight, lora_a, lora_b, ids, scalings=scalings, bias=base.bias,
                                              training=False)

    def single():
        with torch.no_grad():
            return peftkern.lora_linear(x, base.weight, lora_a[0], lora_b[0], scaling=scalings[0], bias=base.bias,
                                        training=False)

    def floor():
        with torch.no_grad():
            return F.linear(x, base.weight, base.bias)

    want, got = eager().double(), fused().double()
    err = ((got - want).norm() / want.norm()).item()
    bound = 1e-5 if case.dtype == torch.float32 else 1e-2
    if not err <= bound:
        raise AssertionError(f"multi_lora bench {case.label}: peftkern and {eager_name} disagree (relative error "
                             f"{err:.3g} > {bound:g}); refusing to time them")
    return {"eager": eager, "peftkern": fused, "peftkern_single": single, "floor": floor}, eager_name


def adapter_providers(case, device: torch.device) -> tuple[dict[str, Callable[[], None]], str]:
    import peftkern
    from peftkern.adapter import activations as act

    gen = torch.Generator(device="cpu").manual_seed(0)
    down = torch.nn.Linear(case.d, case.k, device=device, dtype=case.dtype)
    up = torch.nn.Linear(case.k, case.d, device=device, dtype=case.dtype)
    code, scaling = act.CODES[case.activation], 1.0
    h = torch.randn(case.m, case.d, generator=gen).to(device=device, dtype=case.dtype).requires_grad_()
    dy = torch.randn(case.m, case.d, generator=gen).to(device=device, dtype=case.dtype)
    params = list(down.parameters()) + list(up.parameters())

    def zero():
        h.grad = None
        for p in params:
            p.grad = None

    def eager():
        (h + scaling * up(act.activate(down(h), code))).backward(dy)
        zero()

    def fused():
        peftkern.bottleneck_adapter(h, down.weight, down.bias, up.weight, up.bias, activation=case.activation,
                                    scaling=scaling).backward(dy)
        zero()

    def fused_fwd():
        with torch.no_grad():
            peftkern.bottleneck_adapter(h, down.weight, down.bias, up.weight, up.bias, activation=case.activation,
                                        scaling=scaling)

    def floor():
        (h * scaling).backward(dy)
        zero()

    return (with_variants({"eager": eager, "peftkern": fused, "floor": floor, "peftkern_fwd": fused_fwd}, device),
            "AdapterHub-style eager")


def sparse_providers(case, device: torch.device) -> tuple[dict[str, Callable[[], None]], str]:
    import peftkern

    gen = torch.Generator(device="cpu").manual_seed(0)
    numel = case.n_out * case.n_in
    nnz = max(1, round(case.density * numel))
    weight = torch.randn(case.n_out, case.n_in, generator=gen).to(device=device, dtype=case.dtype)
    idx = torch.randperm(numel, generator=gen)[:nnz].sort().values.to(device)
    values = (torch.randn(nnz, generator=gen) * 1e-3).to(device=device, dtype=case.dtype)
    if case.kind == "apply":
        flat = weight.view(-1)

        def eager():
            weight.clone().view(-1).index_put_((idx,), values, accumulate=True)

        def eager_inplace():
            flat[idx]  # the backup a reversible apply keeps (advanced indexing copies)
            flat.index_add_(0, idx, values)

        def fused():
            peftkern.sparse_diff_apply_(weight, idx, values)

        def fused_fresh():
            peftkern.sparse_diff_apply_(weight, idx.clone(), values)

        def floor():
            flat.index_put_((idx,), values, accumulate=True)

        return ({"eager": eager, "eager_inplace": eager_inplace, "peftkern": fused, "peftkern_fresh": fused_fresh,
                 "floor": floor},
                "index_put_(accumulate=True) into a copy")

    x = torch.randn(case.m, case.n_in, generator=gen).to(device=device, dtype=case.dtype).requires_grad_()
    dy = torch.randn(case.m, case.n_out, generator=gen).to(device=device, dtype=case.dtype)
    values.requires_grad_()

    def zero():
        x.grad = None
        values.grad = None

    def eager():
        w = weight.clone().view(-1).scatter_add(0, idx, values).view(weight.shape)
        F.linear(x, w).backward(dy)
        zero()

    def fused():
        peftkern.sparse_diff_linear(x, weight, idx, values).backward(dy)
        zero()

    def floor():
        F.linear(x, weight).backward(dy)
        zero()

    return (with_variants({"eager": eager, "peftkern": fused, "floor": floor}, device),
            "SpIEL-style eager (clone, scatter, dense grad)")


def bnb_available() -> bool:
    return _importable("bitsandbytes")


def qlora_providers(case: QLoraCase, device: torch.device) -> tuple[dict[str, Callable[[], None]], str]:
    """Step functions for eager (PEFT + bitsandbytes), peftkern and the dense floor over the same 4-bit bytes."""
    import peftkern

    gen = torch.Generator(device="cpu").manual_seed(0)
    alpha = 2 * case.r
    dense = (torch.randn(case.n, case.k, generator=gen) / case.k ** 0.5).to(device=device, dtype=case.dtype)
    qw = peftkern.QuantizedWeight.quantize(dense, quant_type=case.quant_type, blocksize=case.blocksize,
                                           double_quant=case.double_quant)
    floor_w = qw.dequantize()
    # float32 adapters, as PEFT keeps them over a 4-bit base
    lora_a = (torch.randn(case.r, case.k, generator=gen) / case.k ** 0.5).to(device=device)
    lora_b = (torch.randn(case.n, case.r, generator=gen) * 0.01).to(device=device)
    lora_a.requires_grad_()
    lora_b.requires_grad_()
    x = torch.randn(case.m, case.k, generator=gen).to(device=device, dtype=case.dtype).requires_grad_()
    dy = torch.randn(case.m, case.n, generator=gen).to(device=device, dtype=case.dtype)
    scaling = alpha / case.r

    if peft_available() and bnb_available():
        import bitsandbytes as bnb
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear as PeftLinear

        base = bnb.nn.Linear4bit(case.k, case.n, bias=False, compute_dtype=case.dtype, quant_type=case.quant_type,
                                 compress_statistics=case.double_quant, device="meta")
        base.weight = bnb.nn.Params4bit(dense.cpu(), requires_grad=False, quant_type=case.quant_type,
                                        blocksize=case.blocksize, compress_statistics=case.double_quant)
        base = base.to(device)
        layer = PeftLinear(base, "default", config=LoraConfig(r=case.r, lora_alpha=alpha, lora_dropout=case.dropout),
                           r=case.r, lora_alpha=alpha)
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(lora_a)
            layer.lora_B["default"].weight.copy_(lora_b)
        layer.to(device).train()
        eager_params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        eager_name = f"peft {__import__('peft').__version__} + bitsandbytes {bnb.__version__}"

        def eager_step():
            layer(x).backward(dy)
    else:
        drop = torch.nn.Dropout(case.dropout)
        eager_params = [lora_a, lora_b]
        eager_name = "eager (dequantize + F.linear; peft or bitsandbytes not installed)"

        def eager_step():
            low = F.linear(F.linear(drop(x).float(), lora_a), lora_b) * scaling
            y = (F.linear(x, qw.dequantize().to(case.dtype)) + low).to(case.dtype)
            y.backward(dy)

    def zero():
        x.grad = None
        for p in eager_params + [lora_a, lora_b]:
            p.grad = None

    def eager():
        eager_step()
        zero()

    def fused():
        peftkern.lora_linear(x, qw, lora_a, lora_b, scaling=scaling, dropout_p=case.dropout,
                             training=True).backward(dy)
        zero()

    def floor():
        F.linear(x, floor_w).backward(dy)
        x.grad = None

    return with_variants({"eager": eager, "peftkern": fused, "floor": floor}, device), eager_name
