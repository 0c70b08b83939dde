"""peftkern.QuantizedWeight: bitsandbytes' 4-bit format, bit for bit.

bitsandbytes is optional: the tests that compare against it import it with pytest.importorskip and skip (saying
why) where it is missing; the format's own tests (layout, nearest-code property, error bound, row slices,
validation) run without it.
"""
import ast
import contextlib
import itertools
import pathlib

import pytest
import torch

import peftkern.quant as quant
from peftkern.quant import QuantizedWeight

NO_BNB = "bitsandbytes is not installed (pip install bitsandbytes): the bit-exactness checks need it"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# odd element counts (a padding nibble), in_features odd / even / not a multiple of the block, one element
SHAPES = [(7, 96), (5, 33), (1, 1), (3, 200), (13, 257), (4, 128)]


def bnb_functional():
    return pytest.importorskip("bitsandbytes.functional", reason=NO_BNB)


def bnb_eager():
    """bitsandbytes wraps its plain-torch dequantize (used for odd in_features) in torch.compile, which compiles
    anew for every shape (seconds each, more than this whole file's budget for the first one); eager runs the
    same two float32 ops (code·absmax, then the cast), and gives the same bits as the compiled function."""
    if hasattr(torch.compiler, "set_stance"):
        return torch.compiler.set_stance("force_eager")
    return contextlib.nullcontext()


def bnb_dequantize_is_right(shape, blocksize) -> bool:
    """bitsandbytes' CPU dequantize_4bit (its AVX512 C++ kernel, taken when in_features is even, a multiple of 16
    and the CPU has AVX512F) reads absmax per row, as if blocks never straddled rows: wrong when in_features is
    even and not a multiple of the block size. There the tests compare with the format's definition instead
    (blocks over the flattened weight), whatever this CPU is."""
    return shape[1] % 2 == 1 or shape[1] % blocksize == 0


def weight(shape, dtype=torch.float32):
    # rows of different scales, so blocks that straddle rows see more than one magnitude
    return (torch.randn(*shape) * (0.1 + 3 * torch.rand(shape[0], 1))).to(dtype)


def codes_of(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The n 4-bit indices of a packed tensor, first element in the high nibble."""
    e = torch.arange(n)
    byte = packed[e // 2].long()
    return torch.where(e % 2 == 0, byte >> 4, byte & 0xF)


def definition_absmax(qw: QuantizedWeight) -> torch.Tensor:
    """absmax per block from the format's definition, in float64 arithmetic rounded to float32 after the product
    and after the offset (both exact in float64 for these magnitudes, so each rounds once like float32 ops)."""
    if not qw.double_quant:
        return qw.absmax
    b = torch.arange(qw.nblocks)
    prod = (qw.code2.double()[qw.absmax.long()] * qw.absmax2.double()[b // 256]).float()
    return (prod.double() + qw.offset.double()).float()


def definition_dequantize(qw: QuantizedWeight, dtype=None) -> torch.Tensor:
    """w[e] = code[q[e]] · absmax[e // blocksize]: a float64 product rounded to float32, then to the dtype."""
    n = qw.shape.numel()
    e = torch.arange(n)
    values = qw.code.double()[codes_of(qw.packed, n)] * definition_absmax(qw).double()[e // qw.blocksize]
    return values.float().to(dtype or qw.dtype).view(qw.shape)


def assert_same_as_bnb(qw, packed, state):
    assert torch.equal(qw.packed, packed.reshape(-1))
    assert torch.equal(qw.absmax, state.absmax)
    assert torch.equal(qw.code, state.code)
    assert qw.double_quant == state.nested
    if state.nested:
        assert torch.equal(qw.absmax2, state.state2.absmax)
        assert torch.equal(qw.code2, state.state2.code)
        assert qw.blocksize2 == state.state2.blocksize == 256
        assert torch.equal(qw.offset, state.offset)


# ------------------------------------------------------------------ bit-exactness against bitsandbytes
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_matches_bnb(quant_type, double_quant, blocksize):
    F = bnb_functional()
    for shape, dtype in itertools.product(SHAPES, DTYPES):
        w = weight(shape, dtype)
        packed, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                                        quant_type=quant_type)
        qw = QuantizedWeight.quantize(w, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
        assert (qw.shape, qw.dtype, qw.blocksize, qw.quant_type) == (w.shape, dtype, blocksize, quant_type)
        assert_same_as_bnb(qw, packed, state)
        out = qw.dequantize()
        assert out.dtype == dtype and out.shape == w.shape
        assert torch.equal(out, definition_dequantize(qw))
        if bnb_dequantize_is_right(shape, blocksize):
            with bnb_eager():
                assert torch.equal(out, F.dequantize_4bit(packed, state))


@pytest.mark.parametrize("blocksize", [32, 512, 1024, 2048, 4096])
def test_matches_bnb_other_blocksizes(blocksize):
    F = bnb_functional()
    for shape, quant_type, double_quant in itertools.product([(9, 515), (3, 4096)], ["nf4", "fp4"], [False, True]):
        w = weight(shape, torch.bfloat16)
        packed, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                                        quant_type=quant_type)
        qw = QuantizedWeight.quantize(w, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
        assert_same_as_bnb(qw, packed, state)
        assert torch.equal(qw.dequantize(), definition_dequantize(qw))
        if bnb_dequantize_is_right(shape, blocksize):
            with bnb_eager():
                assert torch.equal(qw.dequantize(), F.dequantize_4bit(packed, state))


def test_matches_bnb_many_blocks():
    """More than 256 blocks: several absmax2 groups, the last one short."""
    F = bnb_functional()
    w = weight((67, 1000))  # 67000 elements = 1046.9 blocks of 64 -> 5 groups of 256
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    qw = QuantizedWeight.quantize(w)
    assert_same_as_bnb(qw, packed, state)
    assert qw.absmax2.numel() == 5
    assert torch.equal(qw.dequantize(), definition_dequantize(qw))


def test_absmax_float_matches_bnb():
    """The resolved absmax is bitsandbytes' dequantize_blockwise(qabsmax, state2) + offset, bit for bit."""
    F = bnb_functional()
    for quant_type in ("nf4", "fp4"):
        w = weight((37, 300))
        _, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=quant_type)
        qw = QuantizedWeight.quantize(w, quant_type=quant_type)
        expected = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
        assert torch.equal(qw.absmax_float(), expected)
        assert torch.equal(qw.absmax_float(), definition_absmax(qw))
    plain = QuantizedWeight.quantize(w, double_quant=False)
    assert torch.equal(plain.absmax_float(), plain.absmax)


@pytest.mark.parametrize("scale", [1e-4, 1.0, 300.0])
def test_double_quant_step_matches_bnb_blockwise(scale):
    """The absmax quantization mirrors bitsandbytes' C++ quantize_blockwise (a 65536-entry lookup table and a
    fused multiply-add, not an exact nearest-entry search), checked on many values, an all-zero block, exact
    ±max values and a short last block."""
    F = bnb_functional()
    x = torch.randn(200_000) * scale * torch.rand(200_000)
    x[256:512] = 0.0
    x[512:768] = 0.5 * scale
    x[768] = -x[769:1024].abs().max() * 2
    packed, state = F.quantize_blockwise(x[:-37], blocksize=256)
    codes, absmax2 = quant._quantize_absmax(x[:-37])
    assert torch.equal(codes, packed.reshape(-1))
    assert torch.equal(absmax2, state.absmax)
    assert torch.equal(quant._dynamic_map_cpu(), F.create_dynamic_map())


def test_tables_match_bnb():
    F = bnb_functional()
    for quant_type in ("nf4", "fp4"):
        assert torch.equal(quant._code_cpu(quant_type), F.get_4bit_type(quant_type, device="cpu"))


# ------------------------------------------------------------------ the format, without bitsandbytes
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_layout(quant_type):
    """First element in the high nibble; the padding nibble of an odd count encodes 0.0 (nf4: index 7; fp4: index
    0, +0, the one torch.argsort puts first, as in bitsandbytes)."""
    code = quant._code_cpu(quant_type)
    top, bottom = int(code.argmax()), int(code.argmin())
    w = torch.tensor([[2.0, -2.0, 2.0]])  # one block: absmax 2, values +1, -1, +1
    qw = QuantizedWeight.quantize(w, quant_type=quant_type, double_quant=False)
    pad = 7 if quant_type == "nf4" else 0
    assert qw.packed.tolist() == [top << 4 | bottom, top << 4 | pad]
    assert qw.absmax.tolist() == [2.0]
    assert torch.equal(qw.dequantize(), w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_nearest_code_and_error_bound(quant_type, dtype):
    """Each element is stored as the table entry nearest to w/absmax, and the round trip is within half the
    largest gap of the table times the block's absmax (plus the change double quantization makes to absmax and
    the rounding to the dense dtype)."""
    blocksize = 64
    w = weight((11, 190), dtype)
    n = w.numel()
    plain = QuantizedWeight.quantize(w, quant_type=quant_type, blocksize=blocksize, double_quant=False)
    wf = w.reshape(-1).double()
    e = torch.arange(n)
    a = plain.absmax.double()[e // blocksize]
    assert torch.equal(plain.absmax.double(), torch.nn.functional.pad(wf, (0, -n % blocksize)).view(
        -1, blocksize).abs().amax(1))
    code = plain.code.double()
    dist = ((wf / a)[:, None] - code[None, :]).abs()
    chosen = dist.gather(1, codes_of(plain.packed, n)[:, None]).squeeze(1)
    assert (chosen <= dist.min(1).values + 1e-6).all()

    half_gap = (code.sort().values.diff().max() / 2).item()
    eps = torch.finfo(dtype).eps
    drift = None
    for qw in (plain, QuantizedWeight.quantize(w, quant_type=quant_type, blocksize=blocksize)):
        out = qw.dequantize().reshape(-1).double()
        drift = (qw.absmax_float().double() - plain.absmax.double()).abs()[e // blocksize]
        bound = (half_gap * a + drift) * (1 + 1e-6) + out.abs() * eps
        assert ((out - wf).abs() <= bound).all()
    assert (drift > 0).any()  # (of the double-quantized weight) the bound's second term is exercised


def test_float64():
    """A float64 weight is quantized from its float32 rounding; dequantize returns float64 (exactly the float32
    product, widened)."""
    w = weight((6, 70), torch.float64)
    qw = QuantizedWeight.quantize(w, blocksize=128)
    ref = QuantizedWeight.quantize(w.float(), blocksize=128)
    assert qw.dtype == torch.float64
    assert torch.equal(qw.packed, ref.packed) and torch.equal(qw.absmax, ref.absmax)
    assert torch.equal(qw.absmax2, ref.absmax2) and torch.equal(qw.offset, ref.offset)
    out = qw.dequantize()
    assert out.dtype == torch.float64
    assert torch.equal(out, ref.dequantize().double())
    assert torch.equal(out, definition_dequantize(qw))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape,blocksize", [((7, 96), 64), ((9, 33), 32), ((5, 200), 128), ((3, 7), 64),
                                             ((6, 64), 64)])
def test_dequantize_rows(shape, blocksize, double_quant):
    """Every row range equals the same rows of dequantize(), blocks straddling rows included; and it reads only
    the blocks of those rows (the rest of packed and absmax is scrambled and the result does not change)."""
    w = weight(shape, torch.bfloat16)
    qw = QuantizedWeight.quantize(w, blocksize=blocksize, double_quant=double_quant)
    full = qw.dequantize()
    in_ = shape[1]
    as64 = QuantizedWeight(qw.packed, qw.absmax, shape=qw.shape, quant_type=qw.quant_type, blocksize=blocksize,
                           dtype=torch.float64, offset=qw.offset, absmax2=qw.absmax2, code2=qw.code2)
    for start in range(shape[0] + 1):
        for stop in range(start, shape[0] + 1):
            rows = qw.dequantize_rows(start, stop)
            assert rows.shape == (stop - start, in_) and rows.dtype == torch.bfloat16
            assert torch.equal(rows, full[start:stop])
            assert torch.equal(qw.dequantize_rows(start, stop, dtype=torch.float64),
                               as64.dequantize()[start:stop])
            if start == stop:
                continue
            b0, b1 = start * in_ // blocksize, -(-stop * in_ // blocksize)
            packed, absmax = qw.packed.clone(), qw.absmax.clone()
            keep_p = torch.zeros_like(packed, dtype=torch.bool)
            keep_p[b0 * blocksize // 2:b1 * blocksize // 2] = True
            keep_a = torch.zeros_like(absmax, dtype=torch.bool)
            keep_a[b0:b1] = True
            packed[~keep_p] = torch.randint_like(packed[~keep_p], 256)
            absmax[~keep_a] = absmax[~keep_a].flip(0) + (1 if not double_quant else 0)
            scrambled = QuantizedWeight(packed, absmax, shape=qw.shape, quant_type=qw.quant_type,
                                        blocksize=blocksize, dtype=qw.dtype, offset=qw.offset,
                                        absmax2=qw.absmax2, code2=qw.code2)
            assert torch.equal(scrambled.dequantize_rows(start, stop), full[start:stop])


def test_dequantize_rows_bad_range():
    qw = QuantizedWeight.quantize(weight((4, 10)))
    for start, stop in [(-1, 2), (3, 2), (0, 5), (5, 5)]:
        with pytest.raises(ValueError, match=r"start <= stop <= out_features \(4\)"):
            qw.dequantize_rows(start, stop)
    with pytest.raises(TypeError, match="start"):
        qw.dequantize_rows(0.0, 2)
    with pytest.raises(TypeError, match="stop"):
        qw.dequantize_rows(0, torch.tensor(2))
    with pytest.raises(TypeError, match="dtype"):
        qw.dequantize_rows(0, 2, dtype=torch.int32)


def test_to_repr_nbytes():
    w = weight((5, 300))
    for double_quant in (False, True):
        qw = QuantizedWeight.quantize(w, double_quant=double_quant)
        moved = qw.to("cpu")
        assert moved.device == torch.device("cpu") == qw.device
        assert moved.double_quant == double_quant and moved.shape == qw.shape
        assert torch.equal(moved.packed, qw.packed) and torch.equal(moved.dequantize(), qw.dequantize())
        nblocks = -(-1500 // 64)
        assert qw.nblocks == nblocks
        expected = 750 + 16 * 4 + (nblocks + 4 + 4 + 256 * 4 if double_quant else 4 * nblocks)
        assert qw.nbytes == expected
        text = repr(qw)
        for part in ("(5, 300)", "'nf4'", "blocksize=64", f"double_quant={double_quant}", "float32", "cpu"):
            assert part in text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to move the weight to")
def test_to_cuda_round_trip():
    qw = QuantizedWeight.quantize(weight((7, 96), torch.bfloat16))
    on_gpu = qw.to("cuda")
    assert on_gpu.device.type == "cuda" and on_gpu.offset.device.type == "cuda"
    assert torch.equal(on_gpu.dequantize().cpu(), qw.dequantize())
    assert torch.equal(on_gpu.dequantize_rows(2, 5).cpu(), qw.dequantize()[2:5])
    back = on_gpu.to("cpu")
    assert torch.equal(back.packed, qw.packed) and torch.equal(back.absmax2, qw.absmax2)


def test_bitsandbytes_imported_only_in_from_bnb():
    """peftkern.quant works without bitsandbytes: its only import of it is inside from_bnb (in every module of the
    package)."""
    where = []
    for path in sorted(pathlib.Path(quant.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                child.parent = node
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(name.split(".")[0] == "bitsandbytes" for name in names):
                scope = node
                while not isinstance(scope, (ast.FunctionDef, ast.Module)):
                    scope = scope.parent
                where.append(getattr(scope, "name", "<module>"))
    assert where == ["from_bnb"]


# ------------------------------------------------------------------ from_bnb
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_from_bnb_shares_storage(quant_type, double_quant):
    pytest.importorskip("bitsandbytes", reason=NO_BNB)
    import bitsandbytes as bnb
    F = bnb.functional
    dense = weight((64, 96))
    layer = bnb.nn.Linear4bit(96, 64, bias=False, compress_statistics=double_quant, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(dense.clone(), requires_grad=False, compress_statistics=double_quant,
                                     quant_type=quant_type, module=layer)
    layer = layer.to("cpu")  # bitsandbytes quantizes here
    param, state = layer.weight, layer.weight.quant_state
    for source in (param, layer):
        qw = QuantizedWeight.from_bnb(source)
        assert qw.packed.data_ptr() == param.data_ptr()
        assert qw.absmax.data_ptr() == state.absmax.data_ptr()
        if double_quant:
            assert qw.absmax2.data_ptr() == state.state2.absmax.data_ptr()
        assert (qw.shape, qw.quant_type, qw.blocksize, qw.dtype) == ((64, 96), quant_type, 64, torch.float32)
        assert_same_as_bnb(qw, param.data, state)
    ours = QuantizedWeight.quantize(dense, quant_type=quant_type, double_quant=double_quant)
    assert torch.equal(ours.packed, qw.packed) and torch.equal(ours.absmax, qw.absmax)
    assert torch.equal(qw.dequantize(), definition_dequantize(qw))
    # in_features 96 is even and not a multiple of 64: bitsandbytes' AVX512 CPU dequantize gets this wrong
    if bnb_dequantize_is_right((64, 96), 64):
        assert torch.equal(qw.dequantize(), F.dequantize_4bit(param.data, state))


def test_from_bnb_other_quant_storage():
    """A Params4bit stored in bfloat16 words (bitsandbytes' quant_storage, used with FSDP) holds the same bytes."""
    pytest.importorskip("bitsandbytes", reason=NO_BNB)
    import bitsandbytes as bnb
    layer = bnb.nn.Linear4bit(128, 8, quant_type="nf4", quant_storage=torch.bfloat16).to("cpu")
    assert layer.weight.dtype == torch.bfloat16
    qw = QuantizedWeight.from_bnb(layer.weight)
    assert qw.packed.dtype == torch.uint8 and qw.packed.data_ptr() == layer.weight.data_ptr()
    with bnb_eager():
        assert torch.equal(qw.dequantize(), bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state))


def test_from_bnb_refuses():
    pytest.importorskip("bitsandbytes", reason=NO_BNB)
    import bitsandbytes as bnb
    with pytest.raises(TypeError, match="param must be a bitsandbytes Params4bit"):
        QuantizedWeight.from_bnb(torch.randn(4, 4))
    with pytest.raises(TypeError, match="param must be a bitsandbytes Params4bit"):
        QuantizedWeight.from_bnb(torch.nn.Linear(4, 4))
    fresh = bnb.nn.Linear4bit(64, 32, quant_type="nf4")  # built, not yet moved to a device: not quantized
    with pytest.raises(ValueError, match="param has no quant_state"):
        QuantizedWeight.from_bnb(fresh.weight)


def test_from_bnb_refuses_cpu_repacked_layout():
    """On CPUs with AVX512-BF16 a Linear4bit in eval mode, on an input that does not require grad, rewrites its
    weight into a CPU-specific layout with bfloat16 absmax (lossy). On other CPUs the test sets the flag
    bitsandbytes set from has_avx512bf16() at construction, so the same conversion runs."""
    pytest.importorskip("bitsandbytes", reason=NO_BNB)
    import bitsandbytes as bnb
    layer = bnb.nn.Linear4bit(128, 64, quant_type="nf4", compress_statistics=True).to("cpu")
    if not hasattr(layer, "support_avx512bf16_for_cpu"):
        pytest.skip("this bitsandbytes version has no CPU-repacked layout")
    layer.support_avx512bf16_for_cpu = True
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(3, 128))
    assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    with pytest.raises(RuntimeError, match="packing_format_for_cpu") as info:
        QuantizedWeight.from_bnb(layer.weight)
    assert "bfloat16" in str(info.value) and "checkpoint" in str(info.value)


# ------------------------------------------------------------------ validation
def good_parts(double_quant=True, shape=(5, 33), blocksize=64):
    qw = QuantizedWeight.quantize(weight(shape), blocksize=blocksize, double_quant=double_quant)
    kw = dict(shape=qw.shape, quant_type=qw.quant_type, blocksize=qw.blocksize, dtype=qw.dtype, code=qw.code)
    if double_quant:
        kw.update(offset=qw.offset, absmax2=qw.absmax2, code2=qw.code2)
    return qw.packed, qw.absmax, kw


QUANTIZE_BAD = [
    # (weight, keyword arguments, exception, words the message must hold)
    (torch.randn(12), {}, ValueError, ["weight", "2-D", "(12,)"]),
    (torch.randn(2, 3, 4), {}, ValueError, ["weight", "2-D", "(2, 3, 4)"]),
    (torch.randn(0, 4), {}, ValueError, ["weight", "zero dimension"]),
    (torch.ones(3, 4, dtype=torch.int32), {}, TypeError, ["weight", "torch.int32"]),
    ([[1.0, 2.0]], {}, TypeError, ["weight", "torch.Tensor", "list"]),
    (torch.randn(3, 4), {"quant_type": "int4"}, ValueError, ["quant_type", "'int4'"]),
    (torch.randn(3, 4), {"blocksize": 48}, ValueError, ["blocksize", "48"]),
    (torch.randn(3, 4), {"blocksize": 16}, ValueError, ["blocksize", "16"]),
    (torch.randn(3, 4), {"blocksize": 8192}, ValueError, ["blocksize", "8192"]),
    (torch.randn(3, 4), {"blocksize": 64.0}, ValueError, ["blocksize", "64.0"]),
    (torch.randn(3, 4), {"double_quant": 1}, TypeError, ["double_quant", "bool"]),
    (torch.tensor([[1.0, float("nan")]]), {}, ValueError, ["weight", "finite"]),
    (torch.tensor([[1.0, 1e300]], dtype=torch.float64), {}, ValueError, ["weight", "finite"]),
]


@pytest.mark.parametrize("w,kw,exc,words", QUANTIZE_BAD, ids=lambda v: None)
def test_quantize_bad_input(w, kw, exc, words):
    with pytest.raises(exc) as info:
        QuantizedWeight.quantize(w, **kw)
    for word in words:
        assert word in str(info.value)


def _replace(double_quant, **change):
    packed, absmax, kw = good_parts(double_quant)
    parts = dict(packed=packed, absmax=absmax, **kw)
    parts.update(change)
    return parts


CONSTRUCT_BAD = [
    # (double-quantized?, change, exception, words the message must hold)
    (True, dict(packed=torch.zeros(84, dtype=torch.uint8)), ValueError, ["packed", "83", "84"]),
    (True, dict(packed=torch.zeros(83, dtype=torch.int8)), TypeError, ["packed", "torch.uint8", "torch.int8"]),
    (True, dict(absmax=torch.zeros(2, dtype=torch.uint8)), ValueError, ["absmax", "3", "2"]),
    (False, dict(absmax=torch.ones(4)), ValueError, ["absmax", "3", "4"]),
    (False, dict(absmax=torch.ones(3, dtype=torch.float16)), TypeError, ["absmax", "torch.float32"]),
    (True, dict(absmax=torch.ones(3)), TypeError, ["absmax", "torch.uint8"]),
    (True, dict(code=torch.zeros(15)), ValueError, ["code", "16", "15"]),
    (True, dict(code=torch.linspace(-1, 1, 16)), ValueError, ["code", "nf4 table"]),
    (True, dict(absmax2=torch.ones(2)), ValueError, ["absmax2", "1", "2"]),
    (True, dict(code2=torch.ones(255)), ValueError, ["code2", "256", "255"]),
    (True, dict(offset=None), ValueError, ["offset", "absmax2", "code2"]),
    (False, dict(absmax2=torch.ones(1)), ValueError, ["offset", "absmax2", "code2"]),
    (True, dict(offset="0.5"), TypeError, ["offset", "str"]),
    (True, dict(offset=torch.ones(2)), ValueError, ["offset", "1", "2"]),
    (True, dict(shape=(5, 33, 1)), ValueError, ["shape", "2-D"]),
    (True, dict(shape=(5, 0)), ValueError, ["shape", "zero dimension"]),
    (True, dict(quant_type="af4"), ValueError, ["quant_type", "'af4'"]),
    (True, dict(blocksize=100), ValueError, ["blocksize", "100"]),
    (True, dict(dtype=torch.int8), TypeError, ["dtype", "torch.int8"]),
    (True, dict(absmax2=torch.ones(1, device="meta")), RuntimeError, ["absmax2", "meta", "cpu"]),
    (False, dict(absmax=torch.ones(3, device="meta")), RuntimeError, ["absmax", "meta", "cpu"]),
    # shapes that are not two ints: named, never truncated or left to torch.Size
    (True, dict(shape=None), TypeError, ["shape", "NoneType"]),
    (True, dict(shape=(5.0, 33)), TypeError, ["shape[0]", "float", "5.0"]),
    (True, dict(shape=(5, 33.0)), TypeError, ["shape[1]", "float", "33.0"]),
    (True, dict(shape=(5, True)), TypeError, ["shape[1]", "bool"]),
    (True, dict(shape="5x33"), TypeError, ["shape", "str"]),
    # a uint8 absmax alone, or part of the double-quantization state
    (True, dict(offset=None, absmax2=None, code2=None), ValueError,
     ["double quantization is incomplete", "absmax is uint8", "offset/absmax2/code2 are missing"]),
    (True, dict(code2=None), ValueError, ["double quantization is incomplete", "code2 is missing"]),
    # values the format cannot hold
    (False, dict(absmax=torch.tensor([1.0, float("nan"), 1.0])), ValueError, ["absmax", "finite", "nan"]),
    (False, dict(absmax=torch.tensor([1.0, float("inf"), 1.0])), ValueError, ["absmax", "finite", "inf"]),
    (False, dict(absmax=torch.tensor([1.0, -0.5, 1.0])), ValueError, ["absmax", ">= 0", "-0.5"]),
    (True, dict(offset=float("nan")), ValueError, ["offset", "finite"]),
    (True, dict(offset=torch.tensor(float("-inf"))), ValueError, ["offset", "finite", "inf"]),
    (True, dict(absmax2=torch.tensor([float("inf")])), ValueError, ["absmax2", "finite"]),
    (True, dict(code2=torch.linspace(-1, 1, 256)), ValueError, ["code2", "dynamic map"]),
    # a frozen weight: nothing may require grad
    (False, dict(absmax=torch.ones(3, requires_grad=True)), ValueError, ["absmax", "requires grad", "detach"]),
    (True, dict(absmax2=torch.ones(1, requires_grad=True)), ValueError, ["absmax2", "requires grad"]),
    (True, dict(offset=torch.tensor(0.5, requires_grad=True)), ValueError, ["offset", "requires grad"]),
]


@pytest.mark.parametrize("double_quant,change,exc,words", CONSTRUCT_BAD, ids=lambda v: None)
def test_constructor_bad_input(double_quant, change, exc, words):
    parts = _replace(double_quant, **change)
    with pytest.raises(exc) as info:
        QuantizedWeight(parts.pop("packed"), parts.pop("absmax"), **parts)
    for word in words:
        assert word in str(info.value)


def test_constructor_accepts_a_checkpoint():
    """The raw tensors round-trip through the constructor (a python float offset too, as a checkpoint stores it),
    and packed is kept as a view of the tensor it was given."""
    for double_quant in (False, True):
        packed, absmax, kw = good_parts(double_quant)
        if double_quant:
            kw["offset"] = kw["offset"].item()
        as_column = packed.clone().view(-1, 1)  # bitsandbytes' [ceil(n/2), 1]
        qw = QuantizedWeight(as_column, absmax, **kw)
        assert qw.packed.data_ptr() == as_column.data_ptr() and qw.packed.shape == (83,)
        assert torch.equal(qw.dequantize(), QuantizedWeight(packed, absmax, **kw).dequantize())


def test_constructor_changes_none_of_its_inputs():
    """A refused construction leaves every tensor it was given as it was (no in-place cast, reshape or detach)."""
    packed, absmax, kw = good_parts(True)
    before = {k: v.clone() for k, v in dict(packed=packed, absmax=absmax, offset=kw["offset"],
                                              absmax2=kw["absmax2"], code2=kw["code2"]).items()}
    bad_code2 = kw["code2"].clone().requires_grad_()
    with pytest.raises(ValueError, match="code2 requires grad"):
        QuantizedWeight(packed, absmax, **{**kw, "code2": bad_code2})
    assert bad_code2.requires_grad
    with pytest.raises(TypeError, match="shape"):
        QuantizedWeight(packed, absmax, **{**kw, "shape": (5.0, 33)})
    for name, t in dict(packed=packed, absmax=absmax, offset=kw["offset"], absmax2=kw["absmax2"],
                        code2=kw["code2"]).items():
        assert torch.equal(t, before[name]) and t.dtype == before[name].dtype, name


def test_shape_accepts_any_sequence_of_ints():
    packed, absmax, kw = good_parts(False)
    want = QuantizedWeight(packed, absmax, **kw).dequantize()
    for shape in ([5, 33], torch.Size([5, 33]), (torch.tensor(5), 33)):
        qw = QuantizedWeight(packed, absmax, **{**kw, "shape": shape})
        assert qw.shape == torch.Size([5, 33]) and type(qw.shape[0]) is int
        assert torch.equal(qw.dequantize(), want)


# ------------------------------------------------------------------ .to(), meta
def test_to_dtype_changes_the_dense_dtype_only():
    """to(dtype) is the dtype dequantize() returns; the packed codes and scales stay bitsandbytes' bytes, shared."""
    qw = QuantizedWeight.quantize(weight((7, 96)), double_quant=True)
    half = qw.to(torch.float16)
    assert half.dtype == torch.float16 and qw.dtype == torch.float32  # self unchanged
    assert half.packed is qw.packed and half.absmax is qw.absmax and half.absmax2 is qw.absmax2
    assert torch.equal(half.dequantize(), qw.dequantize().to(torch.float16))
    assert torch.equal(half.dequantize_rows(2, 5), qw.dequantize()[2:5].to(torch.float16))
    both = qw.to("cpu", torch.bfloat16)
    assert both.dtype == torch.bfloat16 and torch.equal(both.dequantize(), qw.dequantize().to(torch.bfloat16))
    assert qw.to(dtype=torch.float64).dequantize().dtype == torch.float64
    assert qw.to(torch.empty(1, dtype=torch.float16)).dtype == torch.float16  # to(tensor): its device and dtype
    assert qw.to("cpu") is qw and qw.to(torch.float32) is qw  # nothing to change: self, as Tensor.to
    copied = qw.to("cpu", copy=True)
    assert copied is not qw and copied.packed.data_ptr() != qw.packed.data_ptr()
    assert torch.equal(copied.packed, qw.packed) and torch.equal(copied.dequantize(), qw.dequantize())


@pytest.mark.parametrize("args,kwargs,exc,words", [
    ((torch.int8,), {}, TypeError, ["dtype", "torch.int8"]),
    ((torch.uint8,), {}, TypeError, ["dtype", "torch.uint8"]),
    ((torch.float16, torch.float32), {}, TypeError, ["two dtypes"]),
    ((1.5,), {}, TypeError, ["float"]),
    ((), {"dtype": "float16"}, TypeError, ["dtype", "str"]),
    ((), {"memory_format": torch.contiguous_format}, TypeError, ["memory_format"]),
    (("cpu",), {"copy": 1}, TypeError, ["copy", "bool"]),
], ids=lambda v: None)
def test_to_bad_arguments_change_nothing(args, kwargs, exc, words):
    qw = QuantizedWeight.quantize(weight((5, 33)))
    before = (qw.dtype, qw.device, qw.packed.clone(), qw.absmax.clone())
    with pytest.raises(exc) as info:
        qw.to(*args, **kwargs)
    for word in words:
        assert word in str(info.value)
    assert (qw.dtype, qw.device) == before[:2]
    assert torch.equal(qw.packed, before[2]) and torch.equal(qw.absmax, before[3])


def test_meta_weight_infers_shapes_and_refuses_to_leave_meta():
    qw = QuantizedWeight.quantize(weight((7, 96)), double_quant=True)
    meta = qw.to("meta")
    assert meta.device.type == "meta" and meta.shape == qw.shape and meta.double_quant
    assert qw.device.type == "cpu"
    deq = meta.dequantize()
    assert deq.device.type == "meta" and deq.shape == (7, 96) and deq.dtype == torch.float32
    rows = meta.to(torch.bfloat16).dequantize_rows(2, 5)
    assert rows.device.type == "meta" and rows.shape == (3, 96) and rows.dtype == torch.bfloat16
    with pytest.raises(NotImplementedError, match="meta device and holds no data"):
        meta.to("cpu")
    # built from meta tensors (a checkpoint's skeleton): no values to check, the sizes still are
    n = 7 * 96
    built = QuantizedWeight(torch.empty(n // 2, dtype=torch.uint8, device="meta"),
                            torch.empty(-(-n // 64), device="meta"), shape=(7, 96), quant_type="fp4", blocksize=64,
                            dtype=torch.float16)
    assert built.device.type == "meta" and built.code.device.type == "meta"
    assert built.dequantize().shape == (7, 96) and built.dequantize().dtype == torch.float16
    with pytest.raises(ValueError, match="absmax must have 11 elements"):
        QuantizedWeight(torch.empty(n // 2, dtype=torch.uint8, device="meta"), torch.empty(10, device="meta"),
                        shape=(7, 96), quant_type="fp4", blocksize=64, dtype=torch.float16)


# ------------------------------------------------------------------ state dict entries (bitsandbytes' names)
@pytest.mark.parametrize("quant_type,double_quant,blocksize,dtype", [
    ("nf4", True, 64, torch.float32), ("fp4", False, 128, torch.bfloat16), ("nf4", True, 32, torch.float16)])
def test_quant_state_dict_round_trips(quant_type, double_quant, blocksize, dtype):
    qw = QuantizedWeight.quantize(weight((13, 257), dtype), quant_type=quant_type, blocksize=blocksize,
                                  double_quant=double_quant)
    state = qw.quant_state_dict()
    keys = {"absmax", "quant_map", f"quant_state.bitsandbytes__{quant_type}"}
    if double_quant:
        keys |= {"nested_absmax", "nested_quant_map"}
    assert set(state) == keys and all(isinstance(v, torch.Tensor) for v in state.values())
    back = QuantizedWeight.from_quant_state_dict(qw.packed.view(-1, 1), state)
    assert (back.shape, back.quant_type, back.blocksize, back.dtype, back.double_quant) == \
        (qw.shape, quant_type, blocksize, dtype, double_quant)
    for name, t in qw._tensors().items():
        assert torch.equal(getattr(back, name), t), name
    assert torch.equal(back.dequantize(), qw.dequantize())


def test_quant_state_dict_is_bitsandbytes_own():
    """Both ways: bitsandbytes' QuantState.from_dict reads what quant_state_dict() writes, and from_quant_state_dict
    reads bitsandbytes' as_dict (packed=True, its state-dict form, and packed=False)."""
    pytest.importorskip("bitsandbytes", reason=NO_BNB)
    import bitsandbytes as bnb
    dense = weight((64, 128))
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.clone(), requires_grad=False, compress_statistics=True, quant_type="nf4",
                                     module=layer)
    layer = layer.to("cpu")
    qw = QuantizedWeight.from_bnb(layer)
    theirs = {k.removeprefix("weight."): v for k, v in layer.state_dict().items() if k.startswith("weight.")}
    ours = qw.quant_state_dict()
    assert set(ours) == set(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]) or key.startswith("quant_state"), key
    qs = bnb.functional.QuantState.from_dict(dict(ours), device="cpu")
    assert (tuple(qs.shape), qs.quant_type, qs.blocksize, qs.dtype) == ((64, 128), "nf4", 64, torch.float32)
    assert torch.equal(qs.absmax, qw.absmax) and torch.equal(qs.state2.absmax, qw.absmax2)
    assert qs.offset.item() == qw.offset.item() and qs.state2.blocksize == 256
    for packed_form in (True, False):
        state = layer.weight.quant_state.as_dict(packed=packed_form)
        back = QuantizedWeight.from_quant_state_dict(layer.weight.data, state)
        assert torch.equal(back.dequantize(), qw.dequantize()) and back.offset.item() == qw.offset.item()


def _blob(state):
    key = next(k for k in state if k.startswith("quant_state."))
    import json
    return key, json.loads(bytes(state[key].tolist()).decode())


def _with_blob(state, **change):
    import json
    key, values = _blob(state)
    values.update(change)
    return {**state, key: torch.tensor(list(json.dumps(values).encode()), dtype=torch.uint8)}


STATE_BAD = [
    # (how the good state is broken, exception, words the message must hold)
    (lambda s: {k: v for k, v in s.items() if k != "absmax"}, ValueError, ["missing", "absmax"]),
    (lambda s: {k: v for k, v in s.items() if not k.startswith("quant_state")}, ValueError,
     ["missing", "quant_type", "blocksize", "shape"]),
    (lambda s: {k: v for k, v in s.items() if k != "nested_absmax"}, ValueError,
     ["double quantization is incomplete", "nested_absmax"]),
    (lambda s: {**s, "bias": torch.ones(3)}, ValueError, ["unknown", "bias"]),
    (lambda s: {("quant_state.bitsandbytes__fp4" if k.startswith("quant_state") else k): v for k, v in s.items()},
     ValueError, ["fp4", "nf4"]),
    (lambda s: {**s, "quant_state.bitsandbytes__nf4": torch.tensor([1, 2, 3], dtype=torch.uint8)}, ValueError,
     ["JSON"]),
    (lambda s: _with_blob(s, blocksize=128), ValueError, ["absmax", "elements"]),
    (lambda s: _with_blob(s, shape=[5, 34]), ValueError, ["packed", "elements"]),
    (lambda s: _with_blob(s, shape=[5.0, 33]), TypeError, ["shape[0]", "float"]),
    (lambda s: _with_blob(s, dtype="int8"), ValueError, ["dtype", "'int8'"]),
    (lambda s: _with_blob(s, nested_blocksize=128), ValueError, ["nested_blocksize", "256", "128"]),
    (lambda s: _with_blob(s, nested_offset=float("nan")), ValueError, ["offset", "finite"]),
    (lambda s: {**s, "absmax": s["absmax"].float()}, TypeError, ["absmax", "torch.uint8"]),
    (lambda s: {**s, "nested_quant_map": s["nested_quant_map"] * 2}, ValueError, ["code2", "dynamic map"]),
    (lambda s: {**s, "quant_map": s["quant_map"].flip(0)}, ValueError, ["code", "nf4 table"]),
]


@pytest.mark.parametrize("breaks,exc,words", STATE_BAD, ids=lambda v: None)
def test_from_quant_state_dict_refuses_missing_or_inconsistent_state(breaks, exc, words):
    qw = QuantizedWeight.quantize(weight((5, 33)), double_quant=True)
    with pytest.raises(exc) as info:
        QuantizedWeight.from_quant_state_dict(qw.packed, breaks(qw.quant_state_dict()))
    for word in words:
        assert word in str(info.value)


def test_from_bnb_takes_a_params4bit_back_from_pickle_and_torch_save(tmp_path):
    """torch's Parameter pickling drops the Params4bit subclass: the weight comes back as a plain Parameter
    carrying bitsandbytes' quant_state, which from_bnb reads (a tensor without one is still refused)."""
    pytest.importorskip("bitsandbytes", reason=NO_BNB)
    import pickle

    import bitsandbytes as bnb
    layer = bnb.nn.Linear4bit(128, 48, quant_type="nf4", compress_statistics=True).to("cpu")
    want = QuantizedWeight.from_bnb(layer)
    torch.save(layer, tmp_path / "layer.pt")
    for back in (pickle.loads(pickle.dumps(layer)), torch.load(tmp_path / "layer.pt", weights_only=False)):
        param = back.weight
        assert isinstance(param.__dict__.get("quant_state"), bnb.functional.QuantState)
        for source in (param, back):
            qw = QuantizedWeight.from_bnb(source)
            assert qw.packed.data_ptr() == param.data_ptr()  # its own storage, not a copy
            assert (qw.shape, qw.quant_type, qw.blocksize, qw.double_quant) == ((48, 128), "nf4", 64, True)
            assert torch.equal(qw.dequantize(), want.dequantize())
    plain = torch.nn.Parameter(torch.zeros(64, 1, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(TypeError, match="param must be a bitsandbytes Params4bit"):
        QuantizedWeight.from_bnb(plain)
