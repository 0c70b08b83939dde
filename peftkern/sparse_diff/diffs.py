"""SparseDiff: a sparse fine-tune of one weight, (indices, values, shape), and model-level helpers.

    diff = SparseDiff.from_dense(finetuned.weight - base.weight, density=0.01)
    diff.save("layer.safetensors"); diff = SparseDiff.load("layer.safetensors")
    backups = apply_sparse_diffs_(model, {"layers.0.mlp.up.weight": diff})   # one call per task switch
    restore_sparse_diffs_(model, backups)                                    # bit-exact original
"""
from __future__ import annotations

import contextlib
import json
import math
import os

import torch

from ..core import checks as _checks
from ..core.checks import index_range as check_range
from .op import INT32_LIMIT, ensure_unique as _ensure_unique, sparse_diff_apply_, sparse_diff_restore_

FORMAT = "peftkern.SparseDiff/1"


def _check_shape(shape) -> torch.Size:
    if isinstance(shape, torch.Size):
        return shape
    if isinstance(shape, (int, float, str, bytes)) or not hasattr(shape, "__iter__"):
        raise TypeError(f"shape must be a sequence of ints such as (out_features, in_features), got "
                        f"{type(shape).__name__} {shape!r}")
    dims = list(shape)
    ints = [_checks.as_int(d) for d in dims]  # ints and numpy integers; never a float, a bool or a tensor
    if any(d is None or d < 0 for d in ints):
        raise TypeError(f"shape must be a sequence of non-negative ints, got {tuple(dims)!r}")
    return torch.Size(ints)


class SparseDiff:
    """A sparse fine-tune of one weight: `values` added at flat row-major `indices` of a weight of `shape`.

    Args:
        indices: 1-D int32 or int64 tensor of positions in `weight.view(-1)`, each in
            [0, prod(shape)) and each at most once (int64 required above 2**31 - 1 elements).
        values: 1-D floating tensor, one value per index, on the indices' device.
        shape: the dense weight's shape, a sequence of ints (e.g. `(out_features, in_features)`).

    Raises `TypeError` for wrong types/dtypes (including an int `shape`), `ValueError` for mismatched
    lengths, devices or repeated indices, `IndexError` for an index outside the weight. The indices are
    validated once here, so `to_dense()`, `apply_()` and a file written by `save()` always agree.
    `from_dense` builds one from a dense delta, `load` reads one written by `save`.
    """

    def __init__(self, indices: torch.Tensor, values: torch.Tensor, shape):
        if not isinstance(indices, torch.Tensor) or not isinstance(values, torch.Tensor):
            raise TypeError(f"indices and values must be torch.Tensors, got {type(indices).__name__} and "
                            f"{type(values).__name__}")
        if indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"indices must be int32 or int64, got {indices.dtype}")
        if not values.is_floating_point():
            raise TypeError(f"values must be a floating-point tensor, got {values.dtype}")
        if indices.dim() != 1 or values.dim() != 1 or indices.numel() != values.numel():
            raise ValueError(f"indices and values must be 1-D of one length, got {tuple(indices.shape)} and "
                             f"{tuple(values.shape)}")
        if indices.device != values.device:
            raise ValueError(f"indices are on {indices.device} but values on {values.device}; move them to one device")
        self.shape = _check_shape(shape)
        numel = math.prod(self.shape)
        if indices.dtype == torch.int32 and numel > INT32_LIMIT:
            raise TypeError(f"indices must be int64 for a weight of {numel} elements (more than 2**31 - 1), got int32")
        _ensure_unique(indices, numel)  # IndexError out of range, ValueError for a repeat
        self.indices, self.values = indices, values

    def __repr__(self) -> str:
        n = math.prod(self.shape)
        return (f"SparseDiff(shape={tuple(self.shape)}, nnz={self.indices.numel()} "
                f"({100 * self.indices.numel() / max(n, 1):.3g}%), values={self.values.dtype}, "
                f"device={self.values.device})")

    @property
    def nnz(self) -> int:
        """Number of stored positions."""
        return self.indices.numel()

    @classmethod
    def from_dense(cls, delta: torch.Tensor, *, k: int | None = None, density: float | None = None) -> "SparseDiff":
        """Keep the `k` largest-|delta| entries of `delta` (or a `density` fraction in (0, 1] of them).

        Indices come out sorted, int32 when the weight has at most 2**31 - 1 elements, else int64;
        values keep `delta`'s dtype. Give exactly one of `k` and `density` (ValueError otherwise).
        A delta holding NaN or inf raises ValueError: which entries are "largest" would be meaningless.
        """
        if not isinstance(delta, torch.Tensor) or not delta.is_floating_point():
            raise TypeError(f"delta must be a floating-point torch.Tensor, got {getattr(delta, 'dtype', type(delta))}")
        if (k is None) == (density is None):
            raise ValueError("give exactly one of k (number of entries) or density (fraction in (0, 1])")
        n = delta.numel()
        if density is not None:
            if not _checks.is_real(density) or not 0.0 < float(density) <= 1.0:
                raise ValueError(f"density must be in (0, 1], got {density!r}")
            k = max(1, round(float(density) * n)) if n else 0
        k_int = _checks.as_int(k)  # an int or a numpy integer
        if k_int is None or not 0 <= k_int <= n:
            raise ValueError(f"k must be an int in [0, {n}], got {k!r}")
        k = k_int
        flat = delta.detach().reshape(-1)
        bad = int((~torch.isfinite(flat)).sum())
        if bad:
            raise ValueError(f"delta has {bad} non-finite entries (NaN or inf); a sparse diff of them is "
                             f"meaningless (check the fine-tune that produced it)")
        top = torch.topk(flat.abs(), k, sorted=False).indices if k else flat.new_empty(0, dtype=torch.int64)
        top, _ = torch.sort(top)
        index_dtype = torch.int32 if n <= INT32_LIMIT else torch.int64
        return cls(top.to(index_dtype), flat[top].clone(), delta.shape)

    def to_dense(self) -> torch.Tensor:
        """The dense delta: zeros of `shape` in the values' dtype with the values at their positions."""
        numel = math.prod(self.shape)
        _ensure_unique(self.indices, numel)
        check_range(self.indices, numel)  # every call: the indices may have been changed through .numpy()
        out = torch.zeros(numel, dtype=self.values.dtype, device=self.values.device)
        out[self.indices.to(torch.int64)] = self.values
        return out.view(self.shape)

    def to(self, *args, **kwargs) -> "SparseDiff":
        """Move (and, for a dtype, cast the values of) the diff, like Tensor.to; indices keep their dtype."""
        values = self.values.to(*args, **kwargs)
        return SparseDiff(self.indices.to(values.device), values, self.shape)

    def save(self, path) -> None:
        """Write a safetensors file: tensors "indices" and "values"; metadata keeps format, shape and dtype.

        FileNotFoundError if the directory does not exist."""
        from safetensors.torch import save_file

        parent = os.path.dirname(os.path.abspath(os.fspath(path)))
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"cannot save to {os.fspath(path)!r}: directory {parent!r} does not exist "
                                    f"(create it first, e.g. os.makedirs)")
        metadata = {"format": FORMAT, "shape": json.dumps(list(self.shape)),
                    "dtype": str(self.values.dtype).replace("torch.", "")}
        save_file({"indices": self.indices.contiguous().cpu(), "values": self.values.contiguous().cpu()},
                  os.fspath(path), metadata=metadata)

    @classmethod
    def load(cls, path, device="cpu") -> "SparseDiff":
        """Read a file written by `save` onto `device`. Every field is checked: a file that is not a
        SparseDiff, lacks a tensor, has unreadable or inconsistent metadata (a shape too small for its
        indices, a dtype that is not the values'), or holds repeated indices raises ValueError naming
        the file and the field."""
        from safetensors import safe_open

        name = os.fspath(path)
        with safe_open(name, framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{name} is not a peftkern SparseDiff file (format {meta.get('format')!r})")
            missing = [t for t in ("indices", "values") if t not in f.keys()]
            if missing:
                raise ValueError(f"{name}: tensor {missing[0]!r} is missing")
            indices, values = f.get_tensor("indices"), f.get_tensor("values")
        try:
            shape = _check_shape(json.loads(meta.get("shape", "")))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{name}: metadata field 'shape' must be a JSON list of non-negative ints, got "
                             f"{meta.get('shape')!r}") from err
        dtype = meta.get("dtype")
        if dtype != str(values.dtype).replace("torch.", ""):
            raise ValueError(f"{name}: metadata field 'dtype' is {dtype!r} but the values tensor is {values.dtype}")
        try:
            return cls(indices, values, shape)
        except (IndexError, ValueError, TypeError) as err:
            raise ValueError(f"{name}: field 'indices' does not fit metadata field 'shape' {list(shape)}: "
                             f"{err}") from err

    def apply_(self, weight: torch.Tensor, *, alpha: float = 1.0) -> torch.Tensor:
        """Add `alpha`·values into `weight` (of this diff's shape) in place; returns the backup for restore_.

        Same rounding and errors as peftkern.sparse_diff_apply_; ValueError if the shape differs."""
        self._check_weight(weight)
        return sparse_diff_apply_(weight, self.indices, self.values, alpha=alpha)

    def restore_(self, weight: torch.Tensor, backup: torch.Tensor) -> None:
        """Write `backup` (from apply_) back into `weight`: the original weight, bit for bit."""
        self._check_weight(weight)
        sparse_diff_restore_(weight, self.indices, backup)

    def _check_weight(self, weight: torch.Tensor) -> None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        if tuple(weight.shape) != tuple(self.shape):
            raise ValueError(f"weight must have the diff's shape {tuple(self.shape)}, got {tuple(weight.shape)}")


def _parameters(model: torch.nn.Module, names) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"model has no parameter or buffer named {missing[0]!r} "
                       f"({len(missing)} of the diffs' names are missing)")
    return {n: params[n] for n in names}


def apply_sparse_diffs_(model: torch.nn.Module, diffs: dict[str, SparseDiff], *, alpha: float = 1.0
                        ) -> dict[str, torch.Tensor]:
    """Apply every diff to the model in place; returns the backups for restore_sparse_diffs_.

    Args:
        model: any nn.Module.
        diffs: {parameter or buffer name (as in model.named_parameters()) -> SparseDiff of its shape}.
        alpha: a finite real number scaling every diff's values.

    All names and shapes are checked first (KeyError for an unknown name, ValueError for a shape that
    differs); if a diff fails midway, the ones already applied are restored before the error
    propagates, so the model is never left half-patched. Returns {name -> backup tensor}.
    """
    params = _parameters(model, diffs)
    for name, diff in diffs.items():
        diff._check_weight(params[name])
    backups: dict[str, torch.Tensor] = {}
    try:
        for name, diff in diffs.items():
            backups[name] = diff.apply_(params[name], alpha=alpha)
    except Exception:
        restore_sparse_diffs_(model, {n: backups[n] for n in backups}, _diffs=diffs)
        raise
    model._peftkern_sparse_diffs = diffs  # restore_sparse_diffs_ needs the indices
    return backups


def restore_sparse_diffs_(model: torch.nn.Module, backups: dict[str, torch.Tensor], *, _diffs=None) -> None:
    """Undo apply_sparse_diffs_(model, ...): write every backup back, bit-exact.

    `backups` is what apply_sparse_diffs_ returned. RuntimeError if no diffs were applied to this model
    with apply_sparse_diffs_, KeyError for a name the model does not have."""
    diffs = _diffs if _diffs is not None else getattr(model, "_peftkern_sparse_diffs", None)
    if diffs is None:
        raise RuntimeError("no sparse diffs were applied to this model with apply_sparse_diffs_")
    params = _parameters(model, backups)
    for name, backup in backups.items():
        diffs[name].restore_(params[name], backup)
    if _diffs is None:
        del model._peftkern_sparse_diffs


@contextlib.contextmanager
def sparse_diffs_applied(model: torch.nn.Module, diffs: dict[str, SparseDiff], *, alpha: float = 1.0):
    """`with sparse_diffs_applied(model, task_diffs): ...` runs the block on the fine-tuned model and
    restores the original weights bit for bit when the block exits, also on an exception. Arguments
    and errors as apply_sparse_diffs_; yields the model."""
    backups = apply_sparse_diffs_(model, diffs, alpha=alpha)
    try:
        yield model
    finally:
        restore_sparse_diffs_(model, backups)
