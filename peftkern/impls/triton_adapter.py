"""bottleneck_adapter on the Triton backend, two variants:

  fused      kernels/adapter.py: one pass over h computes pre, act and the up-projection with the
             residual added in the epilogue; backward one pass over dy (dh, dpre) plus the split-M
             weight gradients of kernels/rank.py. Bottlenecks up to kernels.adapter.MAX_K wide.
  composite  the plain-torch path (peftkern/reference/adapter.py): library GEMMs in the accumulation
             dtype, any width; it keeps the same activation (pre) for backward.
"""
import torch

from ..core import backend as _backend, dispatch
from ..reference import adapter as ref


def _kernels():
    return _backend.kernels("adapter"), _backend.kernels("rank")


def forward_fused(h, w_down, b_down, w_up, b_up, residual, code, scaling):
    adapter, _ = _kernels()
    return adapter.adapter_fwd(h, w_down, b_down, w_up, b_up, residual, code, scaling)


def backward_fused(dy, h, w_down, w_up, pre, code, scaling, residual_is_h, need_h, need_wd, need_bd, need_wu,
                   need_bu):
    adapter, rank = _kernels()
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


def _too_wide(phase: str, *args) -> str | None:
    from peftkern.kernels.adapter import MAX_K
    w_down = args[1] if phase == "forward" else args[2]  # forward: (h, w_down, ...); backward: (dy, h, w_down, ...)
    k = w_down.shape[0]
    if k > MAX_K:
        return f"the fused kernel supports bottleneck widths up to {MAX_K}, got w_down with {k} rows"
    return None


dispatch.register("bottleneck_adapter", "triton", "fused", forward=forward_fused, backward=backward_fused,
                  unsupported=_too_wide)
dispatch.register("bottleneck_adapter", "triton", "composite", forward=ref.adapter_fwd, backward=ref.adapter_bwd)
