"""fp32-accurate products on TF32 tensor cores (3xTF32), written out so that 16-bit operands are not split.

Triton's `input_precision="tf32x3"` needs both operands in fp32 and always does three products with six
splits in registers. An fp16/bf16 value is already exact in TF32 (10 mantissa bits, fp32's exponent range),
so its low part is zero: beside an fp32 operand two products suffice, and the 16-bit tile is never widened
into hi/lo copies. Fewer live tiles is what keeps the LoRA and adapter kernels' epilogues from spilling
registers (scripts/aot_check.py measures it).

  a·b ≈ a_lo·b_hi + a_hi·b_lo + a_hi·b_hi     (x_hi = x rounded to TF32, x_lo = x - x_hi exactly in fp32)

The dropped a_lo·b_lo term and the TF32 truncation of the lo parts leave about 2^-21 relative error per
product, far under an fp32 error bound of 1e-5; the small terms are summed first.
"""
import triton
import triton.language as tl


@triton.jit
def tf32_round(v):
    """v (fp32) rounded to the nearest TF32 value (ties away from zero), as cvt.rna.tf32.f32 does: add half
    of the 13 dropped mantissa bits' range, then clear them (carries into the exponent are the correct
    rounding up to the next binade)."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x1000) & -8192  # -8192 == 0xFFFFE000 as int32: keep sign, exponent, 10 mantissa bits
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def dot_fp32(a, b, acc):
    """acc + a·b with fp32-class accuracy on TF32 tensor cores; a, b fp32 or 16-bit (fp16/bf16), acc fp32."""
    if a.dtype == tl.float32:
        a_hi = tf32_round(a)
        a_lo = a - a_hi
        if b.dtype == tl.float32:
            b_hi = tf32_round(b)
            acc = tl.dot(a_lo, b_hi, acc, input_precision="tf32")
            acc = tl.dot(a_hi, b - b_hi, acc, input_precision="tf32")
            acc = tl.dot(a_hi, b_hi, acc, input_precision="tf32")
        else:
            b32 = b.to(tl.float32)  # exact in TF32
            acc = tl.dot(a_lo, b32, acc, input_precision="tf32")
            acc = tl.dot(a_hi, b32, acc, input_precision="tf32")
    else:
        a32 = a.to(tl.float32)  # exact in TF32 (only converted where a product needs it)
        if b.dtype == tl.float32:
            b_hi = tf32_round(b)
            acc = tl.dot(a32, b - b_hi, acc, input_precision="tf32")
            acc = tl.dot(a32, b_hi, acc, input_precision="tf32")
        elif a.dtype == b.dtype:
            acc = tl.dot(a, b, acc)  # both 16-bit: exact products on the native MMA
        else:
            acc = tl.dot(a32, b.to(tl.float32), acc, input_precision="tf32")
    return acc


@triton.jit
def dot_prec(a, b, acc, PRECISION: tl.constexpr):
    """acc + a·b at `PRECISION` (kernels/_launch.dot_precision): "tf32x3" through dot_fp32; otherwise operands of
    one dtype go to the MMA as they are (16-bit: exact products; fp32: TF32), mixed ones in fp32 (TF32)."""
    if PRECISION == "tf32x3":
        acc = dot_fp32(a, b, acc)
    elif a.dtype == b.dtype:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    return acc
