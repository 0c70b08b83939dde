"""Fine-tune a small random-init Llama-style model with Hugging Face PEFT LoRA, once on PEFT's own
forward and once patched by peftkern, and print tokens/s and peak memory side by side.

    python examples/finetune.py                       # CPU-sized model, 10 steps
    python examples/finetune.py --size 1b --batch 1 --seq 2048 --steps 20   # on a GPU
The same comparison is `python -m peftkern bench --op e2e`. What patching takes is one call:

    from peftkern.integrations.peft import patch
    patch(peft_model)
"""
import sys

from peftkern.bench.e2e import main

if __name__ == "__main__":
    sys.exit(main())
