"""Launch helpers shared by every Triton kernel family: the launch configuration the launchers size their launches
for, output allocation, dot precision, occupancy.

`LaunchConfig` is the one place a launcher asks what it launches for: Triton's CPU interpreter (small tiles, few
programs) or a GPU (the GPU's tiles and warps), how many programs a split reduction aims for, how many SMs a
persistent kernel spreads over, which compute capability. By default it follows the device (kernels/_mode.py
decides once whether kernels are interpreted); `launch_config(...)` overrides it for a block of code, which is how
the ahead-of-time check (scripts/aot_check.py) records the GPU's launches on CPU and how the grid-limit tests size
launches for an H100.
"""
import contextlib
import dataclasses
import functools
from typing import Optional

import torch
import triton

from ._mode import INTERPRET


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """What the launchers size their launches for.

    interpret: pick the interpreter's small tiles (True where kernels/_mode.py interprets them);
    programs:  how many programs a split reduction aims for (None: 4 per SM of the device, 4 when interpreting);
    num_sms:   SMs a persistent kernel spreads over (None: the device's);
    arch:      compute capability as 10·major + minor (None: the device's)."""
    interpret: bool = INTERPRET
    programs: Optional[int] = None
    num_sms: Optional[int] = None
    arch: Optional[int] = None


_CONFIG = LaunchConfig()


def config() -> LaunchConfig:
    """The launch configuration in force."""
    return _CONFIG


def interpreting() -> bool:
    """Whether launchers pick the interpreter's tiles (read at every launch, never cached)."""
    return _CONFIG.interpret


@contextlib.contextmanager
def launch_config(**changes):
    """Within the block, launchers size for the configuration in force with `changes` (LaunchConfig's fields)."""
    global _CONFIG
    previous = _CONFIG
    _CONFIG = dataclasses.replace(previous, **changes)
    try:
        yield _CONFIG
    finally:
        _CONFIG = previous


def empty(shape, device, dtype) -> torch.Tensor:
    """Every kernel output is allocated here (tests replace it with a NaN-filled allocation to prove
    that the kernels write every element)."""
    return torch.empty(shape, device=device, dtype=dtype)


def pow2_at_least_16(n: int, cap: int) -> int:
    """Block size for a small dimension: tl.dot needs >= 16, powers of two, and a cap on registers."""
    return max(16, min(cap, triton.next_power_of_2(n)))


def dot_precision(exact_fp32: bool) -> str:
    """tl.dot precision. `exact_fp32`: an operand is an fp32 value (an fp32 input, or an fp32 adapter
    parameter beside half-precision activations) whose full precision the result must keep, as an fp32
    F.linear would: then "tf32x3" unless the user allowed TF32 for fp32 matmuls
    (torch.backends.cuda.matmul.allow_tf32). Otherwise "tf32", which is exact for fp16/bf16 operands.

    "tf32x3" splits each fp32 operand into a TF32 high part and a TF32 remainder and sums three
    tensor-core products (hi·hi + hi·lo + lo·hi): about 21 significant bits per product, an error far
    under an fp32 error floor of 1e-5 and, for a bf16 activation beside an fp32 adapter, exact
    on the activation's side (its remainder is zero). "ieee" would run on the CUDA cores' FFMA instead,
    roughly an order of magnitude below tensor-core throughput (an estimate), and
    its fp32 tiles were the worst register spillers of the ahead-of-time check."""
    if exact_fp32 and not torch.backends.cuda.matmul.allow_tf32:
        return "tf32x3"
    return "tf32"


@functools.lru_cache(maxsize=None)
def _device_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def num_sms(device: torch.device) -> int:
    """SMs of the device a persistent kernel spreads over (LaunchConfig.num_sms when set)."""
    if _CONFIG.num_sms is not None:
        return _CONFIG.num_sms
    return _device_sms(_index(device))


def capability(device: torch.device) -> tuple:
    """(major, minor) compute capability the launchers size for (LaunchConfig.arch when set)."""
    if _CONFIG.arch is not None:
        return divmod(_CONFIG.arch, 10)
    return torch.cuda.get_device_capability(device)


def target_programs(device: torch.device) -> int:
    """How many programs a split reduction should launch to fill the device (LaunchConfig.programs when set)."""
    if _CONFIG.programs is not None:
        return _CONFIG.programs
    if _CONFIG.interpret or device.type != "cuda":
        return 4  # few programs: the interpreter runs each one in numpy, and >1 split still gets tested
    return 4 * num_sms(device)


def split_reduction(n: int, block: int, tiles: int, device: torch.device) -> tuple:
    """(parts, length of a part) for a reduction over n elements in blocks of `block`, cut into parts so that
    `tiles` x parts programs fill the device (target_programs); each part but the last is a whole number of
    blocks, so a part's partial sum covers the same elements whatever the split."""
    blocks = triton.cdiv(n, block)
    parts = max(1, min(blocks, triton.cdiv(target_programs(device), tiles)))
    per_part = triton.cdiv(blocks, parts) * block
    return triton.cdiv(n, per_part), per_part


def dropout_args(seed: int, p: float):
    """(seed, integer keep threshold, 1/(1-p)) for the in-kernel mask; p == 0 means no dropout."""
    from peftkern.core.rules import keep_threshold  # the one definition of the threshold
    if p > 0.0:
        return seed, keep_threshold(p), 1.0 / (1.0 - p)
    return 0, 0, 1.0


def tuning_prune(prune):
    """The early_config_prune given to triton.autotune: `prune`, and then, when PEFTKERN_AUTOTUNE=first, only
    the first config it keeps. Triton benchmarks nothing when one config is left, so a correctness smoke on a
    GPU compiles one kernel per specialization instead of the whole tile list (~0.7 CPU-s each); timings
    keep the default (PEFTKERN_AUTOTUNE unset or "all"). Read at every tuning decision."""
    @functools.wraps(prune)
    def pruned(configs, named_args, **kwargs):
        kept = prune(configs, named_args, **kwargs)
        return kept[:1] if autotune_mode() == "first" else kept
    return pruned


def autotune_mode() -> str:
    import os

    mode = os.environ.get("PEFTKERN_AUTOTUNE", "all").strip().lower() or "all"
    if mode not in ("all", "first"):
        raise ValueError(f"PEFTKERN_AUTOTUNE must be 'all' (tune over every config) or 'first' (one config per "
                         f"kernel, for smoke tests), got {mode!r}")
    return mode
