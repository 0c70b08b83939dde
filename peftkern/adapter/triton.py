"""bottleneck_adapter on the Triton backend, two variants:

  fused      kernels/adapter.py: one pass over h computes pre, act and the up-projection with the
             residual added in the epilogue; backward one pass over dy (dh, dpre) plus the split-M
             weight gradients of kernels/rank.py. Bottlenecks up to kernels.adapter.MAX_K wide.
  composite  the fast torch path (adapter/cpu.py): library GEMMs in the accumulation dtype, any width; it keeps
             the same activation (pre) for backward.
"""
import torch

from ..core import backend as _backend, dispatch, rules
from . import cpu


def _kernels():
    return _backend.kernels("adapter"), _backend.kernels("rank")


def forward_fused(a):
    adapter, _ = _kernels()
    return adapter.adapter_fwd(a.h, a.w_down, a.b_down, a.w_up, a.b_up, a.residual,
                               rules.ACTIVATION_CODES[a.activation], a.scaling)


def backward_fused(a):
    adapter, rank = _kernels()
    dy, h, w_down, w_up, pre, scaling = a.dout, a.h, a.w_down, a.w_up, a.pre, a.scaling
    code, residual_is_h = rules.ACTIVATION_CODES[a.activation], a.residual_is_h
    need_h, need_wd, need_bd, need_wu, need_bu = a.need_h, a.need_w_down, a.need_b_down, a.need_w_up, a.need_b_up
    dh, dpre, z, dy_sum = adapter.adapter_bwd_rows(dy, pre, w_up, w_down, code, scaling, need_dh=need_h,
                                                   add_dy=residual_is_h, store_z=need_wu, col_sums=need_bu)
    # outputs must not alias one another (custom-op rule), so each unused one is its own empty tensor
    empties = [h.new_empty(0) for _ in range(5)]
    dh = dh if need_h else empties[0]
    dwd = (rank.rank_grad(dpre, h, scale=1.0, exact=w_down.dtype == torch.float32).to(w_down.dtype)
           if need_wd else empties[1])
    dbd = dpre.sum(dim=0).to(w_down.dtype) if need_bd else empties[2]
    dwu = (rank.rank_grad(z, dy, scale=scaling, exact=w_up.dtype == torch.float32).t().contiguous().to(w_up.dtype)
           if need_wu else empties[3])
    dbu = (dy_sum * scaling).to(w_up.dtype) if need_bu else empties[4]
    return dh, dwd, dbd, dwu, dbu


def _too_wide(phase: str, a) -> str | None:
    from peftkern.kernels.adapter import MAX_K
    k = a.w_down.shape[0]
    if k > MAX_K:
        return f"the fused kernel supports bottleneck widths up to {MAX_K}, got w_down with {k} rows"
    return None


dispatch.register("bottleneck_adapter", "triton", "fused", forward=forward_fused, backward=backward_fused,
                  unsupported=_too_wide)
dispatch.register("bottleneck_adapter", "triton", "composite", forward=cpu.forward, backward=cpu.backward)
