"""The reference backend: plain torch for every family (CPU's default path, any device and dtype, and
the tests' float64 oracle). The math lives in peftkern/reference/; this module only registers it."""
from ..core import dispatch
from ..reference import adapter, multi_lora, sparse_diff

dispatch.register("multi_lora_linear", "reference", forward=multi_lora.multi_fwd, backward=multi_lora.multi_bwd)
dispatch.register("multi_qlora_linear", "reference", forward=multi_lora.multi_qfwd, backward=multi_lora.multi_qbwd)
dispatch.register("bottleneck_adapter", "reference", forward=adapter.adapter_fwd, backward=adapter.adapter_bwd)
dispatch.register("sparse_diff_linear", "reference", forward=sparse_diff.linear_fwd, backward=sparse_diff.linear_bwd)
# apply/restore: "forward" applies (returns the backup), "backward" restores
dispatch.register("sparse_diff_apply", "reference", forward=sparse_diff.apply_, backward=sparse_diff.restore_)
