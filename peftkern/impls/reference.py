"""The reference backend: plain torch for every family (CPU's default path, any device and dtype, and
the tests' float64 oracle). The math lives in peftkern/reference/; this module only registers it."""
from ..core import dispatch
from ..reference import multi_lora

dispatch.register("multi_lora_linear", "reference", forward=multi_lora.multi_fwd, backward=multi_lora.multi_bwd)
dispatch.register("multi_qlora_linear", "reference", forward=multi_lora.multi_qfwd, backward=multi_lora.multi_qbwd)
