"""Activations of the bottleneck adapter and their derivatives inside Triton kernels; codes and formulas
match peftkern/adapter/activations.py (codes in peftkern/core/rules.py). tanh is spelled through the sigmoid
(2σ(2x) − 1): it is in every Triton version's core language, and saturates cleanly at ±1.

The derivatives never form 1 + t or 1 − t² from a rounded t = tanh(u): where |t| nears 1 that subtraction
keeps only the digits of t that survive rounding (at x ≈ −2, 1 + t ≈ 0.05 loses 4 bits, and t's own
rounding error becomes ~2e-6 relative to the derivative). They use the exact identities
1 + t = 2σ(2u), 1 − t = 2σ(−2u), 1 − t² = 4σ(2u)σ(−2u), whose factors are each accurate to an ulp."""
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def activate(x, ACT: tl.constexpr):
    # every activation maps 0 to 0, so zero-padded columns stay zero
    if ACT == 1:
        y = tl.maximum(x, 0.0)
    elif ACT == 2:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 3:
        # 0.5·(1 + tanh(u)) = σ(2u)
        y = x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
    elif ACT == 4:
        y = x * tl.sigmoid(x)
    elif ACT == 5:
        y = _tanh(x)
    else:
        y = x
    return y


@triton.jit
def derivative(x, ACT: tl.constexpr):
    if ACT == 1:
        d = tl.where(x > 0.0, 1.0, 0.0)
    elif ACT == 2:
        d = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    elif ACT == 3:
        # 0.5·(1 + t) + 0.5·x·(1 − t²)·u', t = tanh(u), u' = c·(1 + 3·0.044715·x²), spelled without 1 ± t
        two_u = 1.5957691216057308 * (x + 0.044715 * x * x * x)
        s = tl.sigmoid(two_u)
        d = s + 2.0 * x * s * tl.sigmoid(-two_u) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
    elif ACT == 4:
        sig = tl.sigmoid(x)
        d = sig * (1.0 + x * (1.0 - sig))
    elif ACT == 5:
        d = 4.0 * tl.sigmoid(2.0 * x) * tl.sigmoid(-2.0 * x)  # 1 − tanh²(x), without the cancellation
    else:
        d = x * 0.0 + 1.0
    return d
