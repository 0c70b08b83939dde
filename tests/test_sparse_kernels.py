"""The sparse_diff_linear kernels called directly (kernels/sparse_diff.py): results against float64, every
layout the launchers accept, masking of positions that point outside their tensor, the grid fold that keeps
CUDA's grid limits, and the roofline model's stated consequences. On CPU they run in Triton's interpreter,
with its small tiles (test_grid_limits.py checks the GPU tiles' grids)."""
import pytest
import torch

import peftkern  # noqa: F401  (picks interpreter or GPU mode before triton loads)
from peftkern.core import rules
from peftkern.kernels import sparse_diff as sk

from .conftest import DEVICE, ERROR_FLOOR, available_backends, rel_err

# bf16 too: these kernels make no tl.dot, so the interpreter's bf16 dot bug (triton-lang/triton#11584) does not apply
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _triton_runs_here():
    if "triton" not in available_backends("sparse_diff_linear", torch.float32):
        pytest.skip("the Triton kernels cannot run on this machine (no Triton, or no interpreter)")


def random_csr(n_seg, n_src, *, long_segment=0, empty_every=4):
    """(seg, cols, segment id per entry): random columns, some empty segments, optionally one long segment
    spanning several BLOCK_Z chunks."""
    counts = torch.randint(0, 6, (n_seg,))
    counts[::empty_every] = 0
    if long_segment:
        counts[n_seg // 2] = long_segment
    cols = torch.cat([torch.randperm(n_src)[:int(c)] for c in counts])
    seg = torch.zeros(n_seg + 1, dtype=torch.int64)
    seg[1:] = torch.cumsum(counts, 0)
    ids = torch.repeat_interleave(torch.arange(n_seg), counts)
    return seg.to(torch.int32), cols.to(torch.int32), ids


def dense_delta(n_seg, n_src, ids, cols, vals):
    d = torch.zeros(n_seg, n_src, dtype=torch.float64)
    d[ids, cols.long()] = vals.double().cpu()
    return d


def src_layouts(m, k, dtype):
    base = torch.randn(m, k, device=DEVICE).to(dtype)
    return {
        "row-major": base,  # the launcher makes the tokens-contiguous copy
        "tokens-contiguous": base.t().contiguous().t(),  # used as it is, no copy
        "strided": torch.randn(m, 2 * k, device=DEVICE).to(dtype)[:, ::2],
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["row-major", "tokens-contiguous", "strided"])
def test_spmm_add_matches_float64(dtype, layout):
    m, j, k = 37, 21, 29  # no dimension a multiple of the tiles
    seg, cols, ids = random_csr(j, k, long_segment=15)
    vals = torch.randn(cols.numel(), device=DEVICE)
    src = src_layouts(m, k, dtype)[layout]
    # out is a strided view inside a larger buffer: the columns between must stay untouched
    buf = torch.randn(m, 2 * j, device=DEVICE).to(dtype)
    out = buf[:, ::2]
    before = buf.clone()
    sk.spmm_add_(out, src, seg.to(DEVICE), cols.to(DEVICE), vals)
    delta = dense_delta(j, k, ids, cols, vals)
    ref = before[:, ::2].double().cpu() + src.double().cpu() @ delta.t()
    # PyTorch's own error in the same dtype: the sum in fp32, rounded once to dtype
    torch_own = (before[:, ::2].float() + src.float() @ delta.t().float().to(DEVICE)).to(dtype)
    bound = 2 * rel_err(torch_own, ref) + ERROR_FLOOR[dtype]
    assert rel_err(out, ref) <= bound, f"{rel_err(out, ref):.3g} > {bound:.3g}"
    assert torch.equal(buf[:, 1::2], before[:, 1::2]), "a column outside out was written"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("l2_window", [None, 1])
def test_sddmm_matches_float64(dtype, l2_window, poisoned, monkeypatch):
    if l2_window is not None:  # force the L2-window splits (one token block each) on a small problem
        monkeypatch.setattr(sk, "L2_WINDOW_BYTES", l2_window)
    m, n, k, nnz = 45, 13, 17, 40
    flat = torch.randperm(n * k)[:nnz]  # unsorted, as the layout passes them
    rows, cols = (flat // k).to(torch.int32), (flat % k).to(torch.int32)
    dy = src_layouts(m, n, dtype)["row-major"]
    x = src_layouts(m, k, dtype)["strided"]
    g = sk.sddmm(dy, x, rows.to(DEVICE), cols.to(DEVICE))
    assert g.dtype == torch.float32 and g.shape == (nnz,)
    ref = (dy.double().cpu()[:, rows.long()] * x.double().cpu()[:, cols.long()]).sum(0)
    torch_own = (dy.float()[:, rows.long()] * x.float()[:, cols.long()]).sum(0)
    bound = 2 * rel_err(torch_own, ref) + ERROR_FLOOR[torch.float32]
    assert rel_err(g, ref) <= bound, f"{rel_err(g, ref):.3g} > {bound:.3g}"


def guarded_tokens_contiguous(m, features):
    """[m, features] tokens-contiguous (the kernels use it without a copy) inside a buffer whose rows just
    before and after hold huge values: a position one step outside the tensor lands on them."""
    buf = torch.full((features + 8, m), 1e30, device=DEVICE)
    buf[4:4 + features] = torch.randn(features, m, device=DEVICE)
    return buf[4:4 + features].t()


def test_spmm_masks_columns_outside_src():
    """A column past src's width, or negative, contributes nothing. (Positions far outside, e.g. 10**9,
    go through the same compare; tests/test_sparse_diff.py checks those end to end in a subprocess.)"""
    m, j, k = 19, 9, 11
    seg, cols, ids = random_csr(j, k, empty_every=100)
    vals = torch.randn(cols.numel(), device=DEVICE)
    src = guarded_tokens_contiguous(m, k)
    bad = cols.clone()
    bad[0], bad[3], bad[-1] = k, -1, k + 3
    zeroed = vals.clone()
    zeroed[[0, 3, -1]] = 0
    out_bad = torch.zeros(m, j, device=DEVICE)
    out_ref = torch.zeros(m, j, device=DEVICE)
    sk.spmm_add_(out_bad, src, seg.to(DEVICE), bad.to(DEVICE), vals)
    sk.spmm_add_(out_ref, src, seg.to(DEVICE), cols.to(DEVICE), zeroed)
    assert torch.equal(out_bad, out_ref)


def test_sddmm_masks_positions_outside_dy_and_x():
    m, n, k = 21, 6, 7
    dy, x = guarded_tokens_contiguous(m, n), guarded_tokens_contiguous(m, k)
    rows = torch.tensor([0, n, 2, -1, 5, 1], dtype=torch.int32, device=DEVICE)
    cols = torch.tensor([3, 1, k, 0, -2, k + 2], dtype=torch.int32, device=DEVICE)
    g = sk.sddmm(dy, x, rows, cols)
    assert torch.equal(g[1:], torch.zeros(5, device=DEVICE)), "positions outside dy or x must give 0"
    assert g[0].item() == pytest.approx((dy[:, 0].double() * x[:, 3].double()).sum().item(), rel=1e-5)


def test_grid_fold_keeps_results_bit_for_bit(monkeypatch):
    """With axis 0 capped at 3 programs the same programs run on a 2-D grid: identical bits. (Sizes give more
    than 3 programs with the GPU tiles too, for the AOT check's recording run.)"""
    m, j, k = 40, 70, 23
    seg, cols, _ = random_csr(j, k, long_segment=9)
    vals = torch.randn(cols.numel(), device=DEVICE)
    src = torch.randn(m, k, device=DEVICE)
    dy = torch.randn(m, j, device=DEVICE)
    rows = torch.randint(0, j, (50,), dtype=torch.int32, device=DEVICE)
    pos = torch.randint(0, k, (50,), dtype=torch.int32, device=DEVICE)
    out_flat = torch.randn(m, j, device=DEVICE)
    out_fold = out_flat.clone()
    sk.spmm_add_(out_flat, src, seg.to(DEVICE), cols.to(DEVICE), vals)
    g_flat = sk.sddmm(dy, src, rows, pos)
    grids = []
    for name in ("_spmm_tiles_kernel", "_sddmm_tiles_kernel"):
        kernel = getattr(sk, name)

        class Spy:
            def __getitem__(self, grid, kernel=kernel):
                grids.append(grid)
                return kernel[grid]
        monkeypatch.setattr(sk, name, Spy())
    monkeypatch.setattr(rules, "MAX_GRID_X", 3)  # the launchers read CUDA's limits from peftkern.core.rules
    sk.spmm_add_(out_fold, src, seg.to(DEVICE), cols.to(DEVICE), vals)
    g_fold = sk.sddmm(dy, src, rows, pos)
    assert all(len(grid) == 2 and grid[0] <= 3 for grid in grids), grids
    assert torch.equal(out_fold, out_flat) and torch.equal(g_fold, g_flat)


def test_grid_helper_limits():
    assert sk._grid(1) == (1,) and sk._grid(2**31 - 1) == (2**31 - 1,)
    x, y = sk._grid(2**31)
    assert x <= 2**31 - 1 and y <= 65535 and x * y >= 2**31
    x, y = sk._grid(65535 * (2**31 - 1))
    assert x <= 2**31 - 1 and y == 65535
    with pytest.raises(ValueError, match="grid"):
        sk._grid(65535 * (2**31 - 1) + 1)


def test_launchers_name_bad_arguments():
    out, src = torch.zeros(4, 3), torch.zeros(4, 5)
    seg, cols = torch.tensor([0, 1, 1, 2], dtype=torch.int32), torch.tensor([0, 4], dtype=torch.int32)
    vals = torch.ones(2)
    with pytest.raises(ValueError, match="src"):
        sk.spmm_add_(out, torch.zeros(3, 5), seg, cols, vals)
    with pytest.raises(ValueError, match="seg"):
        sk.spmm_add_(out, src, seg[:-1], cols, vals)
    with pytest.raises(ValueError, match="cols and vals"):
        sk.spmm_add_(out, src, seg, cols, vals[:1])
    with pytest.raises(ValueError, match="same token count"):
        sk.sddmm(torch.zeros(4, 3), torch.zeros(5, 5), cols, cols)
    with pytest.raises(ValueError, match="rows and cols"):
        sk.sddmm(torch.zeros(4, 3), src, cols, cols[:1])


def test_roofline_model_says_what_the_docstring_says():
    """The composite is estimated faster at every density for training-sized batches (so
    COMPOSITE_DENSITY is 0 at the headline shape) and the fused product for decode-sized ones."""
    assert sk.COMPOSITE_DENSITY == 0.0 and sk.COMPOSITE_MIN_TOKENS == 160
    for tokens in (sk.COMPOSITE_MIN_TOKENS, 2048, 8192, 200_000):
        for n_out, n_in in ((4096, 4096), (128256, 4096), (4096, 128256)):
            for density in (1e-6, 1e-3, 1e-2, 5e-2, 0.5):
                nnz = max(1, int(density * n_out * n_in))
                assert sk.composite_estimated_faster(tokens, n_out, n_in, nnz, 2), (tokens, n_out, n_in, density)
    for tokens in (1, 16, 64):
        assert not sk.composite_estimated_faster(tokens, 4096, 4096, int(0.01 * 4096**2), 2), tokens
    # headline numbers of the docstring: ~0.55-0.6 ms fused extra against ~20 us composite extra
    assert 0.5e-3 < sk.fused_extra_seconds(8192, 4096, 4096, 167_772, 2) < 0.65e-3
    assert 10e-6 < sk.composite_extra_seconds(167_772) < 25e-6
