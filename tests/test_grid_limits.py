"""CUDA's grid limits (axis 0 below 2**31, axes 1 and 2 at most 65535) for every Triton launcher, at the
sizes that break naive grids: an lm_head-sized layer (128256 outputs, 4096 inputs), 200k-token batches, and
one token. The interpreter does not enforce these limits, so the grids are recorded without running
anything:
- the launchers pick their GPU tiles: they run under a launch configuration (kernels/_launch.LaunchConfig)
  that sizes for a GPU, with split reductions aiming for an H100's 4 x 132 programs;
- every kernel those modules declare in kernels/registry.py is replaced by a recorder: `kernel[grid](...)`
  records the grid (for an autotuned kernel, the grid function evaluated for every GPU config it could pick,
  as the registry gives them) and runs nothing;
- tensors live on the meta device, so no memory is allocated however large the shapes.
"""
import pytest
import torch

import peftkern  # noqa: F401  (picks interpreter or GPU mode before triton loads)
from peftkern.kernels import _launch, adapter, lora, rank, registry, sparse_diff

MAX_X, MAX_YZ = 2**31 - 1, 65535
MODULES = (lora, rank, adapter, sparse_diff)
H100_PROGRAMS = 4 * 132  # _launch.target_programs on an H100 (132 SMs)
META = torch.device("meta")
BF16 = torch.bfloat16
TOKENS = (1, 200_000)
VOCAB, HIDDEN, RANK = 128256, 4096, 16

class Launches(list):
    """(kernel name, grid, launch meta-parameters) per recorded launch; `.kernels` names every recorder."""
    kernels: set


class Recorder:
    def __init__(self, name, configs, log):
        self.name, self.configs, self.log = name, configs, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            metas = [dict(kwargs, **c.kwargs) for c in self.configs] if self.configs else [kwargs]
            for meta in metas:
                self.log.append((self.name, tuple(grid(meta) if callable(grid) else grid), meta))
        return launch


def record_grids(monkeypatch, modules, log=None) -> "Launches":
    """Every kernel `modules` declare in the registry records its grids instead of running (autotuned ones: for
    every GPU config), under a launch configuration that sizes for an H100. Returns the log; `.kernels` names
    every recorder."""
    if log is None:
        log = Launches()
        log.kernels = set()
    monkeypatch.setattr(_launch, "_CONFIG", _launch.LaunchConfig(interpret=False, programs=H100_PROGRAMS))
    for module in modules:
        declared = registry.kernels(module.__name__)
        assert declared, f"{module.__name__} declares no kernel in kernels/registry.py"
        for kernel in declared:
            label = f"{module.__name__.rsplit('.', 1)[1]}.{kernel.attr}"
            log.kernels.add(label)
            configs = kernel.gpu_configs() if kernel.autotuned else None
            monkeypatch.setattr(module, kernel.attr, Recorder(label, configs, log))
    return log


@pytest.fixture
def grids(monkeypatch):
    """Launches record their grids instead of running, with the launchers' GPU tile choices."""
    return record_grids(monkeypatch, MODULES)


def meta(*shape, dtype=BF16):
    return torch.empty(shape, device=META, dtype=dtype)


def launch_every_family(m: int) -> None:
    """One call per launcher and direction, at lm_head size with m tokens."""
    # LoRA GEMM: forward y = x·Wᵀ + (x·Aᵀ)·Bᵀ (N = vocabulary) and dx = dy·W + (dy·B)·A (N = hidden)
    lora.lora_gemm(meta(m, HIDDEN), meta(VOCAB, HIDDEN).t(), meta(m, RANK), meta(VOCAB, RANK).t(), meta(VOCAB))
    lora.lora_gemm(meta(m, VOCAB), meta(VOCAB, HIDDEN), meta(m, RANK), meta(RANK, HIDDEN), None, dropout_p=0.1)
    # rank-r products over either width: x·Aᵀ (C = hidden) and dy·B (C = vocabulary); their gradients
    for c in (HIDDEN, VOCAB):
        rank.rank_down(meta(m, c), meta(RANK, c), scale=2.0, seed=1, dropout_p=0.1)
        rank.rank_grad(meta(m, RANK, dtype=torch.float32), meta(m, c), scale=2.0, exact=True)
        rank.rank_up_add_(meta(m, c), meta(m, RANK, dtype=torch.float32), meta(RANK, c), scale=2.0, exact=False)
    # bottleneck adapter over both widths, forward and backward, with its largest bottleneck
    k = adapter.MAX_K
    for d in (HIDDEN, VOCAB):
        adapter.adapter_fwd(meta(m, d), meta(k, d), meta(k), meta(d, k), meta(d), meta(m, d), 1, 1.0)
        adapter.adapter_bwd_rows(meta(m, d), meta(m, k, dtype=torch.float32), meta(d, k), meta(k, d), 1, 1.0,
                                 need_dh=True, add_dy=True, store_z=True, col_sums=True)
    # sparse diff at 1% of the lm_head: forward (segments = outputs), dx (segments = inputs), values' gradient
    nnz = VOCAB * HIDDEN // 100
    idx32 = dict(dtype=torch.int32)
    sparse_diff.spmm_add_(meta(m, VOCAB), meta(m, HIDDEN), meta(VOCAB + 1, **idx32), meta(nnz, **idx32),
                          meta(nnz, dtype=torch.float32))
    sparse_diff.spmm_add_(meta(m, HIDDEN), meta(m, VOCAB), meta(HIDDEN + 1, **idx32), meta(nnz, **idx32),
                          meta(nnz, dtype=torch.float32))
    sparse_diff.sddmm(meta(m, VOCAB), meta(m, HIDDEN), meta(nnz, **idx32), meta(nnz, **idx32))


def check(log):
    bad = [(name, grid) for name, grid, _ in log
           if not (1 <= len(grid) <= 3 and 1 <= grid[0] <= MAX_X and all(1 <= g <= MAX_YZ for g in grid[1:]))]
    assert not bad, f"grids outside CUDA's limits: {bad}"


@pytest.mark.parametrize("m", TOKENS)
def test_every_launcher_keeps_cuda_grid_limits(grids, m):
    launch_every_family(m)
    check(grids)
    launched = {name for name, _, _ in grids}
    missing = sorted(grids.kernels - launched)
    assert launched == grids.kernels, f"kernels never launched here (add their launcher): {missing}"
    # the GPU tiles were the ones recorded (not the interpreter's), and every GEMM config was evaluated
    gemm = [meta for name, _, meta in grids if name == "lora._lora_gemm_tuned"]
    assert len(gemm) == 2 * len(lora._gemm_configs()) and max(mt["BLOCK_M"] for mt in gemm) >= 128
    spmm = [meta for name, _, meta in grids if name == "sparse_diff._spmm_tiles_kernel"]
    assert spmm and all(mt["BLOCK_M"] == sparse_diff._spmm_blocks(torch.bfloat16)[0] == 128 for mt in spmm)


def test_sparse_grids_fold_past_two_to_the_31_programs(grids):
    """A shape whose program count passes axis 0's limit: the sparse launchers fold onto axis 1 (other
    launchers' 1-D grids over output tiles of >= 2048 elements reach 2**31 programs only for outputs of
    >= 8 TB in bf16, far beyond any GPU's memory)."""
    m = 2**26  # 67M tokens × 128256 outputs / (128 × 16)-token-output tiles = 4.2e9 programs
    idx32 = dict(dtype=torch.int32)
    sparse_diff.spmm_add_(meta(m, VOCAB), meta(m, HIDDEN), meta(VOCAB + 1, **idx32), meta(10, **idx32),
                          meta(10, dtype=torch.float32))
    check(grids)
    (_, grid, _), = grids
    assert len(grid) == 2 and grid[0] * grid[1] >= triton_cdiv(m, 128) * triton_cdiv(VOCAB, 16)


def triton_cdiv(a, b):
    return -(-a // b)
