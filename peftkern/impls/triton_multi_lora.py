"""multi_lora_linear on the Triton backend, two variants under measured dispatch:

  fused      S = dropout(x)·A_iᵀ per row by the grouped shrink kernel (kernels/multi_lora.py), then one GEMM over the
             rows taken adapter by adapter: y = x·Wᵀ + bias + s_i·S·B_iᵀ, each row's rank-r term in the accumulator
  composite  the same S, y = x·Wᵀ + bias by the library GEMM (cuBLAS through F.linear), then the grouped expand adds
             s_i·S·B_iᵀ into y in place (one more read and write of y than fused, but cuBLAS's GEMM)
  backward (both)  dS = s_i·dy·B_i (grouped shrink), dB_iᵀ = s_i·Sᵀ·dy and dA_i = dSᵀ·dropout(x) (grouped gradient
             kernel, each adapter's rows summed in order: deterministic), dx = dy·W (library) + keep ⊙ dS·A_i
             (grouped expand), dW = dyᵀ·x (library)

The adapters are never copied or concatenated: the kernels read each one through a table of data pointers.
"""
import torch

from ..core import backend as _backend, dispatch
from ..reference.multi_lora import check_ids


def _kernels():
    return _backend.kernels("multi_lora")


def validate_ids(row_ids: torch.Tensor, n: int) -> None:
    """Every id in [-1, n). On CPU (Triton's interpreter) an IndexError now, as the reference path raises. On a GPU
    an asynchronous device-side assert instead: reading the ids back would make every call wait for the stream
    (a decode step is a few hundred microseconds) and cannot happen at all inside CUDA-graph capture; a bad id
    then fails the next synchronising call with "device-side assert triggered". Either way no kernel reads an
    adapter through a bad id: kernels.multi_lora.Groups gives such rows no adapter."""
    if row_ids.device.type == "cpu":
        check_ids(row_ids, n)
    elif row_ids.numel():
        torch._assert_async(((row_ids >= -1) & (row_ids < n)).all(),
                            f"multi_lora_linear: adapter_ids holds a value outside [-1, {n}) for {n} adapter(s)")


def _exact(lora_a) -> bool:
    """fp32 adapters (or an fp32 input, whose adapters are fp32 too): the products keep fp32 precision."""
    return lora_a[0].dtype == torch.float32


def _forward(fused: bool):
    def forward(x, weight, lora_a, lora_b, row_ids, bias, scalings, dropout_p, seed):
        validate_ids(row_ids, len(lora_a))  # before any kernel reads an adapter by id
        kern = _kernels()
        lora_a = [a.contiguous() for a in lora_a]
        lora_b = [b.contiguous() for b in lora_b]
        groups = kern.Groups(row_ids, [a.shape[0] for a in lora_a], scalings)
        exact = _exact(lora_a)
        s_down = kern.shrink(x, lora_a, groups, trans=False, per_adapter_scale=False, exact=exact, seed=seed,
                             dropout_p=dropout_p)
        if fused:
            return kern.gemm(x, weight, s_down, lora_b, groups, bias, exact=exact), s_down
        y = torch.nn.functional.linear(x, weight, bias)
        kern.expand_add_(y, s_down, lora_b, groups, trans=True, per_adapter_scale=True, exact=exact)
        return y, s_down
    return forward


def _grads(kern, t, v, mats, need, groups, *, trans, per_adapter_scale, exact, seed, dropout_p):
    """The gradients of the adapters in `need` ([r_i, C] or, with trans, [C, r_i], in each adapter's dtype); an empty
    tensor for the others, which the kernel skips."""
    outs = [kern._launch.empty(m.shape, m.device, m.dtype) if k else m.new_empty(0)
            for m, k in zip(mats, need)]
    if any(need):
        kern.grad(t, v, outs, groups, trans=trans, per_adapter_scale=per_adapter_scale, exact=exact, seed=seed,
                  dropout_p=dropout_p, need=need)
    return outs


def backward(dy, x, weight, lora_a, lora_b, row_ids, s_down, scalings, dropout_p, seed, need_x, need_weight, need_a,
             need_b, need_bias):
    kern = _kernels()
    lora_a = [a.contiguous() for a in lora_a]
    lora_b = [b.contiguous() for b in lora_b]
    groups = kern.Groups(row_ids, [a.shape[0] for a in lora_a], scalings)
    exact = _exact(lora_a)
    dx, dw, dbias = (x.new_empty(0) for _ in range(3))
    ds = None
    if need_x or any(need_a):  # dS = s_i·dy·B_i: the gradient reaching each row's S
        ds = kern.shrink(dy, lora_b, groups, trans=True, per_adapter_scale=True, exact=exact)
    da = _grads(kern, ds, x, lora_a, need_a, groups, trans=False, per_adapter_scale=False, exact=exact, seed=seed,
                dropout_p=dropout_p)
    db = _grads(kern, s_down, dy, lora_b, need_b, groups, trans=True, per_adapter_scale=True, exact=exact, seed=0,
                dropout_p=0.0)
    if need_x:  # dx = dy·W + keep ⊙ dS·A_i / (1 - p)
        dx = torch.mm(dy, weight)
        kern.expand_add_(dx, ds, lora_a, groups, trans=False, per_adapter_scale=False, exact=exact, seed=seed,
                         dropout_p=dropout_p)
    if need_weight:
        dw = torch.mm(dy.t(), x)
    if need_bias:
        dbias = dy.sum(dim=0, dtype=torch.float32).to(x.dtype)
    return dx, dw, da, db, dbias


dispatch.register("multi_lora_linear", "triton", "fused", forward=_forward(True), backward=backward)
dispatch.register("multi_lora_linear", "triton", "composite", forward=_forward(False), backward=backward)
