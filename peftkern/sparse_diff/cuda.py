"""The compiled extension's sparse-diff apply/restore (peftkern._C): its CUDA kernels are the "cuda" backend, its
C++ loops serve the "cpu" backend (cpu.py). Each checks every index against the weight's size itself before
writing anything and reports the first bad position, raised here as IndexError."""
from ..core import backend as _backend, checks, dispatch


def _raise_if_out_of_range(indices, numel: int, first_bad) -> None:
    """The kernels report the first out-of-range position (== len(indices) if none); on CUDA reading it
    waits for the launch."""
    pos = int(first_bad)
    if pos < indices.numel():
        raise checks.out_of_range_error(indices, pos, numel)


def apply_(a):
    backup, first_bad = _backend.call_extension("sparse_diff_apply", a.weight.device, a.weight,
                                                a.indices.contiguous(), a.values.contiguous(), a.alpha)
    _raise_if_out_of_range(a.indices, a.weight.numel(), first_bad)
    return backup


def restore_(a):
    first_bad = _backend.call_extension("sparse_diff_restore", a.weight.device, a.weight, a.indices.contiguous(),
                                        a.backup.contiguous())
    _raise_if_out_of_range(a.indices, a.weight.numel(), first_bad)


dispatch.register("sparse_diff_apply", "cuda", forward=apply_, backward=restore_)
