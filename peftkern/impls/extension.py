"""The compiled extension (peftkern._C; backend name "cuda"): sparse-diff apply/restore, its CUDA
kernels on GPU tensors and its C++ loops on CPU tensors. Each checks every index against the weight's
size itself before writing anything and reports the first bad position, raised here as IndexError."""
from ..core import backend as _backend, dispatch
from ..reference import sparse_diff as ref


def _raise_if_out_of_range(indices, numel: int, first_bad) -> None:
    """The kernels report the first out-of-range position (== len(indices) if none); on CUDA reading it
    waits for the launch."""
    pos = int(first_bad)
    if pos < indices.numel():
        raise ref.out_of_range_error(indices, pos, numel)


def apply_(weight, indices, values, alpha):
    backup, first_bad = _backend.call_extension("sparse_diff_apply", weight.device, weight, indices.contiguous(),
                                                values.contiguous(), alpha)
    _raise_if_out_of_range(indices, weight.numel(), first_bad)
    return backup


def restore_(weight, indices, backup):
    first_bad = _backend.call_extension("sparse_diff_restore", weight.device, weight, indices.contiguous(),
                                        backup.contiguous())
    _raise_if_out_of_range(indices, weight.numel(), first_bad)


dispatch.register("sparse_diff_apply", "cuda", forward=apply_, backward=restore_)
