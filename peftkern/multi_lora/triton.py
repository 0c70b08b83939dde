"""multi_lora_linear on the Triton backend. core/dispatch.py picks one variant per call shape.

Dense base weight:
  fused           S = dropout(x)·A_iᵀ per row by the grouped rank_down kernel (kernels/multi_lora.py), then one
                  GEMM over the rows taken adapter by adapter: y = x·Wᵀ + bias + s_i·S·B_iᵀ, each row's rank-r
                  term in the accumulator
  composite       the same S, y = x·Wᵀ + bias by the library GEMM (cuBLAS through F.linear), then the grouped
                  rank_up_add_ adds s_i·S·B_iᵀ into y in place (one more read and write of y than fused, but
                  cuBLAS's GEMM)
  backward (both) dS = s_i·dy·B_i (grouped rank_down), dB_iᵀ = s_i·Sᵀ·dy and dA_i = dSᵀ·dropout(x) (grouped rank_grad
                  kernel, each adapter's rows summed in order: deterministic), dx = dy·W (library) + keep ⊙ dS·A_i
                  (grouped rank_up_add_), dW = dyᵀ·x (library)
4-bit base weight (never a dense [out, in] copy):
  composite_4bit  the fast torch path (multi_lora/cpu.py): blocks of W dequantized by torch and the library GEMM on
                  each; each adapter's rows as products of its own rank. A fused kernel would need kernels/qlora.py's
                  dequantizing GEMM with the grouped rank-r epilogue of kernels/multi_lora.py; until it exists this is
                  the path.

The adapters are never copied or concatenated: the kernels read each one through a table of data pointers.
"""
import torch

from ..core import backend as _backend, dispatch
from . import cpu
from .cpu import check_ids


def _kernels():
    return _backend.kernels("multi_lora")


def validate_ids(row_ids: torch.Tensor, n: int) -> None:
    """Every id in [-1, n). On CPU (Triton's interpreter) an IndexError now, as the cpu path raises. On a GPU
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


def _prologue(a):
    """(kernels, contiguous lora_a, contiguous lora_b, row groups, exact)."""
    kern = _kernels()
    lora_a = [t.contiguous() for t in a.lora_a]
    lora_b = [t.contiguous() for t in a.lora_b]
    groups = kern.Groups(a.row_ids, [t.shape[0] for t in lora_a], a.scalings)
    return kern, lora_a, lora_b, groups, _exact(lora_a)


def _s_down(a):
    validate_ids(a.row_ids, len(a.lora_a))  # before any kernel reads an adapter by id
    kern, lora_a, lora_b, groups, exact = _prologue(a)
    s_down = kern.rank_down(a.x, lora_a, groups, trans=False, per_adapter_scale=False, exact=exact, seed=a.seed,
                         dropout_p=a.dropout_p)
    return s_down, (kern, lora_b, groups, exact)


def forward_fused(a):
    s_down, (kern, lora_b, groups, exact) = _s_down(a)
    return kern.gemm(a.x, a.weight, s_down, lora_b, groups, a.bias, exact=exact), s_down


def forward_composite(a):
    s_down, (kern, lora_b, groups, exact) = _s_down(a)
    y = torch.nn.functional.linear(a.x, a.weight, a.bias)
    kern.rank_up_add_(y, s_down, lora_b, groups, trans=True, per_adapter_scale=True, exact=exact)
    return y, s_down


def _grads(kern, t, v, mats, need, groups, *, trans, per_adapter_scale, exact, seed, dropout_p):
    """The gradients of the adapters in `need` ([r_i, C] or, with trans, [C, r_i], in each adapter's dtype); an empty
    tensor for the others, which the kernel skips."""
    outs = [kern._launch.empty(m.shape, m.device, m.dtype) if k else m.new_empty(0)
            for m, k in zip(mats, need)]
    if any(need):
        kern.rank_grad(t, v, outs, groups, trans=trans, per_adapter_scale=per_adapter_scale, exact=exact, seed=seed,
                  dropout_p=dropout_p, need=need)
    return outs


def backward(a):
    kern, lora_a, lora_b, groups, exact = _prologue(a)
    dy, x = a.dy, a.x
    dx, dw, dbias = (x.new_empty(0) for _ in range(3))
    ds = None
    if a.need_x or any(a.need_lora_a):  # dS = s_i·dy·B_i: the gradient reaching each row's S
        ds = kern.rank_down(dy, lora_b, groups, trans=True, per_adapter_scale=True, exact=exact)
    da = _grads(kern, ds, x, lora_a, list(a.need_lora_a), groups, trans=False, per_adapter_scale=False, exact=exact,
                seed=a.seed, dropout_p=a.dropout_p)
    db = _grads(kern, a.s_down, dy, lora_b, list(a.need_lora_b), groups, trans=True, per_adapter_scale=True,
                exact=exact, seed=0, dropout_p=0.0)
    if a.need_x:  # dx = dy·W + keep ⊙ dS·A_i / (1 - p)
        dx = torch.mm(dy, a.weight)
        kern.rank_up_add_(dx, ds, lora_a, groups, trans=False, per_adapter_scale=False, exact=exact, seed=a.seed,
                         dropout_p=a.dropout_p)
    if a.need_weight:
        dw = torch.mm(dy.t(), x)
    if a.need_bias:
        dbias = dy.sum(dim=0, dtype=torch.float32).to(x.dtype)
    return dx, dw, da, db, dbias


def _dense_only(phase, a):
    if isinstance(a.weight, torch.Tensor):
        return None
    return "the base weight is 4-bit (composite_4bit runs it: there is no fused multi-adapter 4-bit kernel)"


def _four_bit_only(phase, a):
    return "the base weight is dense (the dense variants run it)" if isinstance(a.weight, torch.Tensor) else None


dispatch.register("multi_lora_linear", "triton", "fused", forward=forward_fused, backward=backward,
                  unsupported=_dense_only)
dispatch.register("multi_lora_linear", "triton", "composite", forward=forward_composite, backward=backward,
                  unsupported=_dense_only)
dispatch.register("multi_lora_linear", "triton", "composite_4bit", forward=cpu.forward, backward=cpu.backward,
                  unsupported=_four_bit_only)
