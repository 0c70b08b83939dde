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

import torch

from .ops.sparse_diff import INT32_LIMIT, sparse_diff_apply_, sparse_diff_restore_

FORMAT = "peftkern.SparseDiff/1"


class SparseDiff:
    """Flat row-major `indices` into a weight of `shape`, and the `values` added there.

    Indices are int32 when the weight has at most 2**31 - 1 elements (half the memory), else int64.
    """

    def __init__(self, indices: torch.Tensor, values: torch.Tensor, shape):
        self.indices, self.values, self.shape = indices, values, torch.Size(shape)
        if indices.dim() != 1 or values.dim() != 1 or indices.numel() != values.numel():
            raise ValueError(f"indices and values must be 1-D of one length, got {tuple(indices.shape)} and "
                             f"{tuple(values.shape)}")
        if indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"indices must be int32 or int64, got {indices.dtype}")

    def __repr__(self) -> str:
        n = math.prod(self.shape)
        return (f"SparseDiff(shape={tuple(self.shape)}, nnz={self.indices.numel()} "
                f"({100 * self.indices.numel() / max(n, 1):.3g}%), values={self.values.dtype}, "
                f"device={self.values.device})")

    @property
    def nnz(self) -> int:
        return self.indices.numel()

    @classmethod
    def from_dense(cls, delta: torch.Tensor, *, k: int | None = None, density: float | None = None) -> "SparseDiff":
        """Keep the k largest-magnitude entries of `delta` (or a `density` fraction of them), indices sorted."""
        if not isinstance(delta, torch.Tensor) or not delta.is_floating_point():
            raise TypeError(f"delta must be a floating-point torch.Tensor, got {getattr(delta, 'dtype', type(delta))}")
        if (k is None) == (density is None):
            raise ValueError("give exactly one of k (number of entries) or density (fraction in (0, 1])")
        n = delta.numel()
        if density is not None:
            if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
                raise ValueError(f"density must be in (0, 1], got {density!r}")
            k = max(1, round(density * n)) if n else 0
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
            raise ValueError(f"k must be an int in [0, {n}], got {k!r}")
        flat = delta.detach().reshape(-1)
        top = torch.topk(flat.abs(), k, sorted=False).indices if k else flat.new_empty(0, dtype=torch.int64)
        top, _ = torch.sort(top)
        index_dtype = torch.int32 if n <= INT32_LIMIT else torch.int64
        return cls(top.to(index_dtype), flat[top].clone(), delta.shape)

    def to_dense(self) -> torch.Tensor:
        out = torch.zeros(math.prod(self.shape), dtype=self.values.dtype, device=self.values.device)
        out[self.indices.to(torch.int64)] = self.values
        return out.view(self.shape)

    def to(self, *args, **kwargs) -> "SparseDiff":
        """Move (and, for a dtype, cast the values of) the diff, like Tensor.to; indices keep their dtype."""
        values = self.values.to(*args, **kwargs)
        return SparseDiff(self.indices.to(values.device), values, self.shape)

    def save(self, path) -> None:
        """A safetensors file: tensors "indices" and "values"; metadata keeps shape and dtype."""
        from safetensors.torch import save_file

        metadata = {"format": FORMAT, "shape": json.dumps(list(self.shape)),
                    "dtype": str(self.values.dtype).replace("torch.", "")}
        save_file({"indices": self.indices.contiguous().cpu(), "values": self.values.contiguous().cpu()},
                  str(path), metadata=metadata)

    @classmethod
    def load(cls, path, device="cpu") -> "SparseDiff":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a peftkern SparseDiff file (format {meta.get('format')!r})")
            return cls(f.get_tensor("indices"), f.get_tensor("values"), json.loads(meta["shape"]))

    def apply_(self, weight: torch.Tensor, *, alpha: float = 1.0) -> torch.Tensor:
        """Add this diff to `weight` in place; returns the backup for restore_."""
        self._check_weight(weight)
        return sparse_diff_apply_(weight, self.indices, self.values, alpha=alpha)

    def restore_(self, weight: torch.Tensor, backup: torch.Tensor) -> None:
        self._check_weight(weight)
        sparse_diff_restore_(weight, self.indices, backup)

    def _check_weight(self, weight: torch.Tensor) -> None:
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
    """Apply every diff (parameter name -> SparseDiff) to the model in place; returns the backups.

    All names and shapes are checked first; if a diff fails midway, the ones already applied are
    restored before the error propagates, so the model is never left half-patched.
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
    """Undo apply_sparse_diffs_: write every backup back, bit-exact."""
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
    """`with sparse_diffs_applied(model, task_diffs): ...` runs the block on the fine-tuned model."""
    backups = apply_sparse_diffs_(model, diffs, alpha=alpha)
    try:
        yield model
    finally:
        restore_sparse_diffs_(model, backups)
