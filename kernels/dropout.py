"""In-kernel dropout mask: the Triton spelling of peftkern/core/dropout.py.

`keep_tile` returns the keep mask of a [BLOCK_M, BLOCK_C] tile of the logical 2-D input x[M, C]
(C = x's last dim); the tile's first column must be a multiple of 8. One `tl.philox` call yields four
32-bit words whose eight 16-bit halves feed eight neighbouring columns, so the integer work is an
eighth of one call per element (Philox4x32-10 is ~100 integer instructions: at a quarter call per
element it made a memory-bound skinny kernel compute-bound, and it is most of a GEMM epilogue's work).
"""
import triton
import triton.language as tl


@triton.jit
def keep_tile(seed, offs_m, col_start, C, threshold, BLOCK_C: tl.constexpr):
    # offs_m: [BLOCK_M] row indices (any int dtype); col_start: first column of the tile, % 8 == 0
    groups = (C + 7) // 8
    offs_g = col_start // 8 + tl.arange(0, BLOCK_C // 8)
    counter = offs_m.to(tl.int64)[:, None] * groups + offs_g.to(tl.int64)[None, :]
    c_lo = (counter & 0xFFFFFFFF).to(tl.uint32)
    c_hi = ((counter >> 32) & 0xFFFFFFFF).to(tl.uint32)
    zero = c_lo * 0
    r0, r1, r2, r3 = tl.philox(seed, c_lo, c_hi, zero, zero)
    # group j's words side by side (interleave twice puts r0 r1 r2 r3 in order), then each word's low and
    # high halves side by side: column 8j + 2w + h takes half h of word r_w
    words = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))
    uniforms = tl.interleave(words & 0xFFFF, words >> 16)
    return uniforms >= threshold
