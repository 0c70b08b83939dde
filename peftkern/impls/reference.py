"""The reference backend: plain torch for every family (CPU's default path, any device and dtype, and
the tests' float64 oracle). The math lives in peftkern/reference/; this module only registers it."""
from ..core import dispatch
from ..reference import adapter, dora, sparse_diff

dispatch.register("dora_linear", "reference", forward=dora.dora_fwd, backward=dora.dora_bwd)
dispatch.register("qdora_linear", "reference", forward=dora.qdora_fwd, backward=dora.qdora_bwd)
dispatch.register("bottleneck_adapter", "reference", forward=adapter.adapter_fwd, backward=adapter.adapter_bwd)
dispatch.register("sparse_diff_linear", "reference", forward=sparse_diff.linear_fwd, backward=sparse_diff.linear_bwd)
# apply/restore: "forward" applies (returns the backup), "backward" restores
dispatch.register("sparse_diff_apply", "reference", forward=sparse_diff.apply_, backward=sparse_diff.restore_)
