"""In-kernel dropout mask: the Triton spelling of peftkern/reference/dropout.py.

`keep_tile` returns the keep mask of a [BLOCK_M, BLOCK_C] tile of the logical 2-D input x[M, C]
(C = x's last dim); the tile's first column must be a multiple of 4. One `tl.philox` call yields four
words that feed four neighbouring columns, so the integer work is a quarter of one call per element.
"""
import triton
import triton.language as tl


@triton.jit
def keep_tile(seed, offs_m, col_start, C, threshold, BLOCK_C: tl.constexpr):
    # offs_m: [BLOCK_M] row indices (any int dtype); col_start: first column of the tile, % 4 == 0
    groups = (C + 3) // 4
    offs_g = col_start // 4 + tl.arange(0, BLOCK_C // 4)
    counter = offs_m.to(tl.int64)[:, None] * groups + offs_g.to(tl.int64)[None, :]
    c_lo = (counter & 0xFFFFFFFF).to(tl.uint32)
    c_hi = ((counter >> 32) & 0xFFFFFFFF).to(tl.uint32)
    zero = c_lo * 0
    r0, r1, r2, r3 = tl.philox(seed, c_lo, c_hi, zero, zero)
    # column 4j + l takes word r_l: interleave twice puts r0 r1 r2 r3 side by side
    words = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))
    return (words >> 8) >= threshold
