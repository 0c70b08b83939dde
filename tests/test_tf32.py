"""kernels/tf32.py: the 3xTF32 product used for fp32 parameters.

- tf32_round against an independent definition of round-to-nearest (ties away from zero) to 10 mantissa bits,
  computed in float64 from the two neighbouring TF32 values; the split x = hi + lo is exact.
- dot_prec at "tf32x3" for every operand pairing (fp32·fp32, fp16·fp32, fp32·fp16, fp16·fp16) against float64, within
  the project's error bound (tests/conftest.py: 2x PyTorch's own fp32 error plus the fp32 floor). On the CPU
  interpreter a "tf32" product is computed in fp32, so there this checks the algebra (no term lost or doubled); on a
  GPU the same test checks the tensor-core result.
"""
import pytest
import torch
import triton
import triton.language as tl

from peftkern.kernels import interpreter_scope

from .conftest import DEVICE, ERROR_FLOOR, rel_err

with interpreter_scope():  # decorated (and, below, launched) as peftkern's own kernels are
    from peftkern.kernels.tf32 import dot_prec, tf32_round

    @triton.jit
    def _round_kernel(x_ptr, hi_ptr, lo_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        x = tl.load(x_ptr + offs)
        hi = tf32_round(x)
        tl.store(hi_ptr + offs, hi)
        tl.store(lo_ptr + offs, x - hi)

    @triton.jit
    def _dot_kernel(a_ptr, b_ptr, out_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr,
                    PRECISION: tl.constexpr):
        rows = tl.arange(0, M)
        cols = tl.arange(0, N)
        ks = tl.arange(0, K)
        a = tl.load(a_ptr + rows[:, None] * K + ks[None, :])
        b = tl.load(b_ptr + ks[:, None] * N + cols[None, :])
        acc = dot_prec(a, b, tl.zeros((M, N), dtype=tl.float32), PRECISION)
        tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc)


def _tf32_nearest(x: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest, ties away from zero, to 10 explicit mantissa bits, from first principles: the two
    TF32 neighbours of |x| (truncation, and one TF32 ulp above it), the nearer in float64."""
    bits = x.abs().view(torch.int32).to(torch.int64)
    down = (bits & ~0x1FFF).to(torch.int32).view(torch.float32).double()
    up = ((bits & ~0x1FFF) + 0x2000).to(torch.int32).view(torch.float32).double()
    mag = x.abs().double()
    nearest = torch.where(up - mag <= mag - down, up, down)  # a tie goes up: away from zero
    return (torch.sign(x.double()) * nearest).float()


def test_tf32_round_is_round_to_nearest_and_the_split_is_exact():
    n = 4096
    x = torch.randn(n) * torch.exp2(torch.randint(-30, 30, (n,)).float())
    # exact ties (bit 12 set, lower bits clear) and values that carry into the exponent
    x[:8] = torch.tensor([1 + 2**-11, -(1 + 2**-11), 1 + 3 * 2**-11, 2 - 2**-12, 2 - 2**-24, 0.0, -0.0, 1.0])
    x = x.to(DEVICE)
    hi, lo = torch.empty_like(x), torch.empty_like(x)
    with interpreter_scope():
        _round_kernel[(1,)](x, hi, lo, N=n)
    assert torch.equal(hi.cpu(), _tf32_nearest(x.cpu()))
    assert torch.equal((hi.view(torch.int32) & 0x1FFF).cpu(), torch.zeros(n, dtype=torch.int32))
    assert torch.equal((hi.double() + lo.double()).cpu(), x.double().cpu())  # lo = x - hi is exact in fp32
    assert torch.equal(hi[:2].cpu(), torch.tensor([1 + 2**-10, -(1 + 2**-10)]))  # ties away from zero


@pytest.mark.parametrize("a_dtype,b_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                             (torch.float32, torch.float16), (torch.float16, torch.float16)])
def test_dot_tf32x3_is_fp32_accurate(a_dtype, b_dtype):
    M, K, N = 32, 64, 32
    # operands with bits below TF32's 10: a single TF32 product would be off by ~1e-3 relative
    a = (torch.randn(M, K) * (1 + torch.rand(M, K) * 2**-12)).to(a_dtype).to(DEVICE)
    b = (torch.randn(K, N) * (1 + torch.rand(K, N) * 2**-12)).to(b_dtype).to(DEVICE)
    out = torch.empty(M, N, device=DEVICE)
    with interpreter_scope():
        _dot_kernel[(1,)](a, b, out, M=M, K=K, N=N, PRECISION="tf32x3")
    oracle = a.double() @ b.double()
    torch_err = rel_err(a.float() @ b.float(), oracle)
    assert rel_err(out, oracle) <= 2 * torch_err + ERROR_FLOOR[torch.float32]
