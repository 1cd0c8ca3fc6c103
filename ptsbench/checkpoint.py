"""Sparse checkpoints that stay sparse.

Two files per job: the plain state dict as safetensors (zeros stored as zeros, loads anywhere), and a
compact form in which every prunable weight is a packed bit mask plus its non-zero values, so the file
shrinks with sparsity. Both load back into the timm model with no pickle involved.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ptsbench.errors import CheckpointError
from ptsbench.models import load_state_strict

MASK_SUFFIX = ".__mask_bits"
VALUES_SUFFIX = ".__values"


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def save_dense_form(model: nn.Module, path: Path) -> int:
    """The full state dict (zeros included); returns the file size in bytes."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _atomic_save(state, path, {"format": "ptsbench-dense"})
    return path.stat().st_size


def save_compact_form(model: nn.Module, sparse_weights: Iterable[str], path: Path) -> int:
    """Prunable weights as (packed bit mask, non-zero values); everything else as is. Returns bytes."""
    sparse = set(sparse_weights)
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu()
        if key in sparse:
            flat = value.reshape(-1)
            mask = flat != 0
            bits = np.packbits(mask.numpy().astype(np.uint8))
            tensors[key + MASK_SUFFIX] = torch.from_numpy(bits)
            tensors[key + VALUES_SUFFIX] = flat[mask].contiguous()
            shapes[key] = list(value.shape)
        else:
            tensors[key] = value.contiguous()
    _atomic_save(tensors, path, {"format": "ptsbench-compact", "shapes": json.dumps(shapes)})
    return path.stat().st_size


def is_compact_form(path: Path) -> bool:
    """Whether `path` is a safetensors file written by `save_compact_form` (read from its header only)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == "ptsbench-compact"
    except Exception:  # not safetensors at all: the caller's reader reports it
        return False


def read_compact_form(path: Path) -> dict[str, torch.Tensor]:
    """Rebuild the full state dict from a compact file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "ptsbench-compact":
                raise CheckpointError(f"{path} is not a ptsbench compact checkpoint (format={meta.get('format')!r}).")
            shapes = json.loads(meta["shapes"])
            raw = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path} could not be read as a compact checkpoint: {exc}") from exc
    state = {k: v for k, v in raw.items() if not k.endswith((MASK_SUFFIX, VALUES_SUFFIX))}
    for key, shape in shapes.items():
        numel = int(np.prod(shape))
        bits = np.unpackbits(raw[key + MASK_SUFFIX].numpy())[:numel].astype(bool)
        values = raw[key + VALUES_SUFFIX]
        if int(bits.sum()) != values.numel():
            raise CheckpointError(f"{path}: {key} has {int(bits.sum())} mask bits set but {values.numel()} values.")
        flat = torch.zeros(numel, dtype=values.dtype)
        flat[torch.from_numpy(bits)] = values
        state[key] = flat.view(shape)
    return state


def load_compact_form(model: nn.Module, path: Path) -> nn.Module:
    load_state_strict(model, read_compact_form(path), str(path))
    return model
