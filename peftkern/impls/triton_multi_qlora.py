"""multi_lora_linear over a 4-bit QuantizedWeight on the Triton backend: one variant, composite, the reference path
(blocks of W dequantized by torch and the library GEMM on each; each adapter's rows as products of its own rank).
No dense [out, in] weight is written. A fused kernel would need kernels/qlora.py's dequantizing GEMM with the
grouped rank-r epilogue of kernels/multi_lora.py; until it exists this is the path, and measured dispatch has
nothing to choose between."""
from ..core import dispatch
from ..reference import multi_lora as reference

dispatch.register("multi_qlora_linear", "triton", "composite", forward=reference.multi_qfwd,
                  backward=reference.multi_qbwd)
