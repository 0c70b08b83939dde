"""The two ceilings every GPU number is read against (device/METHOD.md): dense bf16 matmul rate and
device-to-device copy bandwidth (bytes read + bytes written), measured once per bench run."""
from __future__ import annotations

import torch


def measure_ceilings(device: torch.device) -> dict | None:
    if device.type != "cuda":
        return None
    import triton.testing

    def median_ms(fn) -> float:
        return triton.testing.do_bench(fn, warmup=100, rep=500, return_mode="median")

    n = 8192
    mat_a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    mat_b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    tflops = 2 * n**3 / (median_ms(lambda: torch.mm(mat_a, mat_b)) * 1e-3) / 1e12
    src = torch.randn(256 * 2**20, device=device, dtype=torch.float32)  # 1 GiB: far beyond L2
    dst = torch.empty_like(src)
    copy_bytes = 2 * src.numel() * src.element_size()  # read + write
    gbps = copy_bytes / (median_ms(lambda: dst.copy_(src)) * 1e-3) / 1e9
    return {"bf16_matmul_tflops": tflops, "copy_gb_per_s": gbps, "matmul_n": n, "copy_bytes": copy_bytes}
