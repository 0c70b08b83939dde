"""Activations of the bottleneck adapter and their derivatives inside Triton kernels; codes and formulas
match peftkern/reference/activations.py. tanh is spelled through the sigmoid (2σ(2x) − 1): it is in
every Triton version's core language, and saturates cleanly at ±1."""
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
        y = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
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
        t = _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
        d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
    elif ACT == 4:
        sig = tl.sigmoid(x)
        d = sig * (1.0 + x * (1.0 - sig))
    elif ACT == 5:
        t = _tanh(x)
        d = 1.0 - t * t
    else:
        d = x * 0.0 + 1.0
    return d
