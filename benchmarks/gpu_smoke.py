"""Correctness smoke of every op family on the device at hand, in minutes: step 2 of benchmarks/gpu_session.sh.

    python benchmarks/gpu_smoke.py --out DIR               # every family, one process each, in parallel
    python benchmarks/gpu_smoke.py --out DIR --family lora  # one family in this process

Each family runs forward and backward through the Triton backend, each dispatch variant forced (fused,
composite), in the half-precision dtypes of the device (bf16 and fp16 on CUDA; fp16 and fp32 on CPU, where
Triton's interpreter cannot do bf16 dots), with and without dropout. Every output and gradient is compared
with the float64 reference on CPU; the bound is the test suite's: twice the error plain PyTorch (the
reference implementation in the same dtype on the same device) makes against that oracle, plus the dtype's
floor. Sizes are odd (masks and tails exercised), small enough that one autotune config per kernel
(PEFTKERN_AUTOTUNE=first, set here unless already set) keeps the compile count low.

Results go to DIR/smoke-<family>.jsonl, one line per check as soon as it is made, so a run cut short by a
timeout still says what passed. The exit status is 1 when any check failed or errored.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

os.environ.setdefault("PEFTKERN_AUTOTUNE", "first")

FLOOR = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 1e-2}
FAMILIES = ("lora", "qlora", "dora", "multi_lora", "adapter", "sparse_linear", "sparse_apply")


def _tensors(torch, device):
    """Input builders per family: f(dtype, gen) -> (call, float tensors, flags of which need grad, extras)."""
    M, K, N, R = (77, 96, 80, 5) if device.type == "cpu" else (333, 320, 272, 16)

    def rnd(*shape, scale=1.0, gen):
        return torch.randn(*shape, generator=gen) * scale

    def lora(gen, p):
        ts = [rnd(3, M // 3, K, gen=gen), rnd(N, K, scale=K ** -0.5, gen=gen), rnd(R, K, scale=0.3, gen=gen),
              rnd(N, R, scale=0.3, gen=gen), rnd(N, gen=gen)]

        def call(pk, x, w, a, b, bias):
            return pk.lora_linear(x, w, a, b, scaling=0.7, bias=bias, dropout_p=p, seed=1234)
        return call, ts, [True, False, True, True, False]

    def qlora(gen, p):
        call, ts, need = lora(gen, p)

        def qcall(pk, x, w, a, b, bias):
            # the same 4-bit bytes on every side: quantized once on CPU from the float32 master, moved per run
            q = pk.QuantizedWeight.quantize(ts[1], quant_type="nf4", blocksize=64, double_quant=True)
            return pk.lora_linear(x, q.to(x.device), a, b, scaling=0.7, bias=bias, dropout_p=p, seed=1234)
        return qcall, ts, need

    def dora(gen, p):
        ts = [rnd(3, M // 3, K, gen=gen), rnd(N, K, scale=K ** -0.5, gen=gen), rnd(R, K, scale=0.3, gen=gen),
              rnd(N, R, scale=0.3, gen=gen), rnd(N, gen=gen).abs() + 0.5, rnd(N, gen=gen)]

        def call(pk, x, w, a, b, mag, bias):
            return pk.dora_linear(x, w, a, b, mag, scaling=0.7, bias=bias, dropout_p=p, seed=1234)
        return call, ts, [True, False, True, True, True, False]

    def multi_lora(gen, p):
        ranks = (R, 3, 2 * R)
        ts = [rnd(6, M // 6, K, gen=gen), rnd(N, K, scale=K ** -0.5, gen=gen)]
        ts += [rnd(r, K, scale=0.3, gen=gen) for r in ranks] + [rnd(N, r, scale=0.3, gen=gen) for r in ranks]
        ids = torch.tensor([0, 2, -1, 1, 2, 0])

        def call(pk, x, w, a0, a1, a2, b0, b1, b2):
            return pk.multi_lora_linear(x, w, [a0, a1, a2], [b0, b1, b2], ids.to(x.device), scalings=[0.5, 2.0, 1.0],
                                        dropout_p=p, seed=99)
        return call, ts, [True, False] + [True] * 6

    def adapter(gen, p):
        k = 24 if device.type == "cpu" else 64
        ts = [rnd(M, K, gen=gen), rnd(k, K, scale=K ** -0.5, gen=gen), rnd(k, gen=gen),
              rnd(K, k, scale=k ** -0.5, gen=gen), rnd(K, gen=gen), rnd(M, K, gen=gen)]

        def call(pk, h, wd, bd, wu, bu, res):
            return pk.bottleneck_adapter(h, wd, bd, wu, bu, activation="gelu", scaling=0.8, residual=res)
        return call, ts, [True, True, True, True, True, True]

    def sparse_linear(gen, p):
        nnz = N * K // 50
        idx = torch.randperm(N * K, generator=gen)[:nnz].sort().values.to(torch.int32)
        ts = [rnd(M, K, gen=gen), rnd(N, K, scale=K ** -0.5, gen=gen), rnd(nnz, scale=0.1, gen=gen), rnd(N, gen=gen)]

        def call(pk, x, w, values, bias):
            return pk.sparse_diff_linear(x, w, idx.to(x.device), values, bias)
        return call, ts, [True, False, True, False]

    return {"lora": lora, "qlora": qlora, "dora": dora, "multi_lora": multi_lora, "adapter": adapter,
            "sparse_linear": sparse_linear}


def _run(torch, pk, call, ts, need, dtype, device, backend, dy_master):
    """y and the gradients of the tensors in `need`, as float64 on CPU."""
    args = []
    for t, n in zip(ts, need):
        a = t.to(device=device, dtype=dtype).detach()
        args.append(a.requires_grad_() if n else a)
    with pk.use_backend(backend):
        y = call(pk, *args)
        y.backward(dy_master.to(device=device, dtype=y.dtype))
    out = {"y": y.detach()}
    out.update({f"grad{i}": a.grad for i, (a, n) in enumerate(zip(args, need)) if n})
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {k: v.detach().double().cpu() for k, v in out.items()}


def _rel(torch, out, ref):
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def smoke_family(family: str, out_dir: str) -> int:
    import torch

    import peftkern as pk

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = (torch.bfloat16, torch.float16) if device.type == "cuda" else (torch.float16, torch.float32)
    path = os.path.join(out_dir, f"smoke-{family}.jsonl")
    failures = 0
    with open(path, "w") as log:
        def record(entry):
            nonlocal failures
            failures += entry["status"] in ("FAIL", "ERROR")
            log.write(json.dumps(entry) + "\n")
            log.flush()
            detail = entry.get("worst") or entry.get("error", "")[:200]
            print(f"{entry['status']:5s} {family} {entry.get('dtype', '')} {entry.get('variant', '')} "
                  f"p={entry.get('dropout', '')} {detail}", flush=True)

        if family == "sparse_apply":
            return _smoke_apply(torch, pk, device, record) + failures
        build = _tensors(torch, device)[family]
        for dtype in dtypes:
            for p in ((0.0, 0.1) if family in ("lora", "qlora", "dora", "multi_lora") else (0.0,)):
                gen = torch.Generator().manual_seed(hash((family, str(dtype), p)) % 2**31)
                call, ts, need = build(gen, p)
                t0 = time.perf_counter()
                try:
                    with torch.no_grad():
                        probe = call(pk, *[t.to(torch.float64) for t in ts])
                    dy = torch.randn(probe.shape, generator=gen)
                    oracle = _run(torch, pk, call, ts, need, torch.float64, torch.device("cpu"), "reference", dy)
                    plain = _run(torch, pk, call, ts, need, dtype, device, "reference", dy)
                except Exception as e:
                    record({"family": family, "dtype": str(dtype)[6:], "dropout": p, "variant": "-",
                            "status": "ERROR", "error": f"reference: {type(e).__name__}: {e}"})
                    continue
                for variant in ("fused", "composite"):
                    entry = {"family": family, "dtype": str(dtype)[6:], "dropout": p, "variant": variant,
                             "device": str(device)}
                    os.environ["PEFTKERN_DISPATCH"] = variant
                    try:
                        got = _run(torch, pk, call, ts, need, dtype, device, "triton", dy)
                    except RuntimeError as e:
                        if f"cannot run the {variant} variant" in str(e):
                            record({**entry, "status": "n/a", "error": str(e)[:300]})
                            continue
                        record({**entry, "status": "ERROR", "error": f"{type(e).__name__}: {e}"[:3000],
                                "trace": traceback.format_exc()[-3000:]})
                        continue
                    except Exception as e:
                        record({**entry, "status": "ERROR", "error": f"{type(e).__name__}: {e}"[:3000],
                                "trace": traceback.format_exc()[-3000:]})
                        continue
                    finally:
                        os.environ.pop("PEFTKERN_DISPATCH", None)
                    checks = {}
                    for name, ref in oracle.items():
                        err, torch_err = _rel(torch, got[name], ref), _rel(torch, plain[name], ref)
                        bound = 2 * torch_err + FLOOR[str(dtype)[6:]]
                        checks[name] = {"err": err, "torch_err": torch_err, "bound": bound, "ok": err <= bound}
                    worst = max(checks, key=lambda n: checks[n]["err"] / checks[n]["bound"])
                    ok = all(c["ok"] for c in checks.values())
                    record({**entry, "status": "PASS" if ok else "FAIL", "checks": checks,
                            "seconds": round(time.perf_counter() - t0, 1),
                            "worst": f"{worst}: err {checks[worst]['err']:.2e} {'<=' if ok else '>'} "
                                     f"{checks[worst]['bound']:.2e}"})
    return failures


def _smoke_apply(torch, pk, device, record) -> int:
    """sparse_diff_apply_/restore_ on the device's own backend: bit-exact against index_add_ and back."""
    gen = torch.Generator().manual_seed(7)
    for dtype in ((torch.bfloat16, torch.float16) if device.type == "cuda" else (torch.float16, torch.float32)):
        entry = {"family": "sparse_apply", "dtype": str(dtype)[6:], "variant": "-", "dropout": 0.0,
                 "device": str(device), "backend": pk.core.backend.auto_choice("sparse_diff_apply", device, dtype)}
        try:
            w = torch.randn(513, 257, generator=gen).to(device=device, dtype=dtype)
            idx = torch.randperm(w.numel(), generator=gen)[:5000].to(device=device, dtype=torch.int64)
            vals = torch.randn(5000, generator=gen).to(device=device, dtype=dtype)
            want = w.clone().view(-1).index_add_(0, idx, vals, alpha=0.5).view_as(w)
            orig = w.clone()
            backup = pk.sparse_diff_apply_(w, idx, vals, alpha=0.5)
            applied = torch.equal(w, want)
            pk.sparse_diff_restore_(w, idx, backup)
            restored = torch.equal(w, orig)
            record({**entry, "status": "PASS" if applied and restored else "FAIL",
                    "worst": f"apply bit-exact {applied}, restore bit-exact {restored}"})
        except Exception as e:
            record({**entry, "status": "ERROR", "error": f"{type(e).__name__}: {e}"[:3000]})
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for smoke-<family>.jsonl (created)")
    ap.add_argument("--family", choices=FAMILIES, action="append", help="run only these (repeatable)")
    ap.add_argument("--jobs", type=int, default=min(len(FAMILIES), os.cpu_count() or 1),
                    help="families run at once, each in its own process (default: one per core, at most 7)")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    families = a.family or list(FAMILIES)
    if len(families) == 1:
        return 1 if smoke_family(families[0], a.out) else 0
    # one process per family: each compiles its own kernels, so the compiles (CPU-bound) run side by side
    t0 = time.time()
    running, pending, status = {}, list(families), {}
    while pending or running:
        while pending and len(running) < a.jobs:
            fam = pending.pop(0)
            running[fam] = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--out", a.out,
                                             "--family", fam])
        for fam, proc in list(running.items()):
            if proc.poll() is not None:
                status[fam] = proc.returncode
                del running[fam]
        time.sleep(0.2)
    bad = sorted(f for f, rc in status.items() if rc != 0)
    print(f"smoke: {len(families)} families in {time.time() - t0:.0f} s; "
          f"{'all passed' if not bad else 'FAILED: ' + ', '.join(bad)} (details in {a.out}/smoke-*.jsonl)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
