"""dora_linear over a 4-bit QuantizedWeight on the Triton backend: one variant, composite, the reference path
(blocks of W dequantized by torch, the library GEMM on each, torch's rank-r products and column scales; on a GPU
these are cuBLAS and CUDA kernels). No dense [out, in] weight is written. A fused 4-bit DoRA kernel would need
kernels/qlora.py's GEMM with the DoRA epilogue; until it exists this is the path, and measured dispatch has
nothing to choose between."""
from ..core import dispatch
from ..reference import dora as reference

dispatch.register("qdora_linear", "triton", "composite", forward=reference.qdora_fwd, backward=reference.qdora_bwd)
