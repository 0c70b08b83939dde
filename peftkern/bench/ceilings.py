"""The two ceilings every GPU number is read against (device/METHOD.md): dense bf16 matmul rate and
device-to-device copy bandwidth (bytes read + bytes written), measured once per bench run."""
from __future__ import annotations

import torch


def measure_ceilings(device: torch.device) -> dict | None:
    if device.type != "cuda":
        return None
    import triton.testing

    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: torch.mm(a, b), warmup=100, rep=500, return_mode="median")
    tflops = 2 * n**3 / (ms * 1e-3) / 1e12
    del a, b
    src = torch.randn(256 * 2**20, device=device, dtype=torch.float32)  # 1 GiB: far beyond L2
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=100, rep=500, return_mode="median")
    gbps = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9
    return {"bf16_matmul_tflops": tflops, "copy_gb_per_s": gbps, "matmul_n": n, "copy_bytes": 2 * src.numel() * 4}
