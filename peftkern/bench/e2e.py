"""End-to-end: fine-tune a random-init Llama-style model with Hugging Face PEFT LoRA, unpatched and
patched by peftkern, and compare tokens/s and peak memory. Each variant trains in a fresh process
(same seed, same data), so neither inherits the other's allocator state or compiled kernels.

    python -m peftkern bench --op e2e [--quick]        python examples/finetune.py --steps 20
Sizes: "small" (CPU friendly) and "1b" (bf16, seq 2048, for a GPU); `--help` lists their parameter counts,
computed from the configs. No weights or data are downloaded: the model is random and the
tokens are synthetic.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

SIZES = {
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=2000),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R = 16


def parameter_counts(size: str) -> dict:
    """{"base", "lora"} parameter counts of the model `train` builds for `size`, from its config alone
    (no transformers import, so `--help` stays instant): LlamaForCausalLM with untied embeddings,
    no biases, RMSNorm weights, and LoRA r=16 (A [r, in] + B [out, r]) on every TARGETS projection."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    c = SIZES[size]
    h, inter, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}  # (in, out)
    per_layer = sum(i * o for i, o in shapes.values()) + 2 * h  # projections, two RMSNorms
    base = c["num_hidden_layers"] * per_layer + 2 * vocab * h + h  # embedding, lm_head, final norm
    lora = c["num_hidden_layers"] * sum(LORA_R * (i + o) for t, (i, o) in shapes.items() if t in TARGETS)
    return {"base": base, "lora": lora}


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def size_summary(size: str) -> str:
    n = parameter_counts(size)
    c = SIZES[size]
    return (f"{size}: {_count(n['base'])} parameters ({c['num_hidden_layers']} layers, hidden "
            f"{c['hidden_size']}, vocab {c['vocab_size']}) + {_count(n['lora'])} LoRA r={LORA_R}")


def bench_settings(device_type: str, quick: bool) -> dict:
    """What `python -m peftkern bench --op e2e` trains: the 1b config on a GPU, the small one on CPU."""
    if device_type == "cuda" and not quick:
        return dict(size="1b", steps=20, batch=1, seq=2048, dropout=0.1)
    return dict(size="small", steps=3 if quick else 10, batch=4, seq=128 if quick else 256, dropout=0.1)


def train(variant: str, size: str, steps: int, batch: int, seq: int, dropout: float, progress: bool = True) -> dict:
    """Train in this process; returns tokens/s, peak memory and the loss curve."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(max_position_embeddings=seq, **SIZES[size])
    model = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=dropout,
                                             target_modules=TARGETS))
    patched = 0
    if variant == "peftkern":
        from peftkern.integrations.peft import patch

        patched = patch(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    data = [torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen).to(device) for _ in range(4)]

    def one_step(i):
        ids = data[i % len(data)]
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()  # syncs the device, so wall time is compute time

    one_step(0)  # warm-up: kernel compilation and autotuning stay out of the timing
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses = []
    iterator = range(steps)
    if progress:
        from .progress import progress as progress_bar

        iterator = progress_bar(iterator, desc=f"{variant} ({size})", unit="step")
    t0 = time.perf_counter()
    for i in iterator:
        losses.append(one_step(i))
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        memory_kind = "CUDA max_memory_allocated"
    else:
        with open("/proc/self/status") as f:
            peak_mb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
        memory_kind = "process peak RSS"
    return {"variant": variant, "size": size, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else "cpu", "dtype": str(dtype).replace("torch.", ""), "steps": steps, "batch": batch, "seq": seq,
            "dropout": dropout, "layers_patched": patched, "tokens_per_s": steps * batch * seq / seconds,
            "peak_mem_mb": peak_mb, "memory_kind": memory_kind, "losses": losses,
            "parameters": sum(p.numel() for p in model.parameters())}


def compare(size: str, steps: int, batch: int, seq: int, dropout: float) -> list[dict]:
    """Both variants, each in a fresh process; the same seed and data."""
    rows = []
    for variant in ("peft", "peftkern"):
        out = subprocess.run([sys.executable, "-m", "peftkern.bench.e2e", "--variant", variant, "--size", size,
                              "--steps", str(steps), "--batch", str(batch), "--seq", str(seq),
                              "--dropout", str(dropout)], stdout=subprocess.PIPE, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def print_rows(rows: list[dict]) -> None:
    first = rows[0]
    print(f"fine-tuning a random-init Llama ({first['parameters'] / 1e6:.1f}M parameters, {first['size']}) with "
          f"PEFT LoRA r={LORA_R} on {first['device']} ({first['dtype']}), batch {first['batch']} x seq {first['seq']}, "
          f"dropout {first['dropout']}, {first['steps']} timed steps")
    for r in rows:
        print(f"  {r['variant']:<9} {r['tokens_per_s']:>10.0f} tokens/s   peak {r['peak_mem_mb']:>8.0f} MB "
              f"({r['memory_kind']})   layers on peftkern: {r['layers_patched']}   final loss {r['losses'][-1]:.4f}")
    if len(rows) == 2:
        print(f"  speedup {rows[1]['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x, peak memory "
              f"{rows[1]['peak_mem_mb'] / rows[0]['peak_mem_mb']:.2f}x of PEFT's")


def main(argv=None) -> int:
    sizes = "\n".join("  " + size_summary(size) for size in sorted(SIZES))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"Model sizes (computed from the configs):\n{sizes}")
    parser.add_argument("--variant", choices=["peft", "peftkern"], help="train one variant in this process "
                        "and print its JSON (without it: both, each in a fresh process)")
    parser.add_argument("--size", choices=sorted(SIZES), default="small",
                        help="the model config (parameter counts below)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (default 10)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--dropout", type=float, default=0.1, help="LoRA dropout (default 0.1)")
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(train(args.variant, args.size, args.steps, args.batch, args.seq, args.dropout)))
        return 0
    print_rows(compare(args.size, args.steps, args.batch, args.seq, args.dropout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
