"""Sparse checkpoints that stay sparse.

Two files per job: the plain state dict as safetensors (zeros stored as zeros, loads anywhere), and a
compact form in which every prunable weight is a packed bit mask plus its non-zero values, so the file
shrinks with sparsity. Both load back into the timm model with no pickle involved.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ptsbench.errors import CheckpointError

MASK_SUFFIX = ".__mask_bits"
VALUES_SUFFIX = ".__values"


def show_names(names: list[str], limit: int = 8) -> str:
    """The first `limit` names, then how many there are in all ('none' for none)."""
    if not names:
        return "none"
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def non_finite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """'name (k NaN, j inf)' for every floating-point tensor that holds a NaN or an infinity."""
    bad = []
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            continue
        finite = torch.isfinite(tensor)
        if bool(finite.all()):
            continue
        nan = int(torch.isnan(tensor).sum())
        inf = tensor.numel() - int(finite.sum()) - nan
        counts = [f"{nan} NaN"] * bool(nan) + [f"{inf} inf"] * bool(inf)
        bad.append(f"{name} ({', '.join(counts)})")
    return bad


def load_state_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict loading with an error that lists missing, unexpected and mis-shaped keys.

    Like safetensors, which loads nothing but tensors, only float tensors are taken for float weights and
    statistics (an int8 or bool tensor would be cast silently), and none may hold NaN or inf: a model with
    one evaluates to NaN logits, whose argmax scores chance, and methods fail on it for misleading reasons.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mis_shaped = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mis_shaped:
        raise CheckpointError(
            f"Checkpoint {source} does not match {type(model).__name__}: missing keys: "
            f"{show_names(missing)}; unexpected keys: {show_names(unexpected)}; shape mismatches: "
            f"{show_names(mis_shaped)}."
        )
    not_float = [f"{k} ({state[k].dtype})" for k in own
                 if own[k].is_floating_point() and not state[k].is_floating_point()]
    if not_float:
        raise CheckpointError(
            f"Checkpoint {source} holds non-float tensors where {type(model).__name__} has float weights or "
            f"statistics: {show_names(not_float)}. Only float checkpoints are loaded (a quantized or integer "
            f"tensor would be cast silently); convert it to float first."
        )
    bad = non_finite_tensors({k: state[k] for k in own})
    if bad:
        raise CheckpointError(
            f"Checkpoint {source} holds NaN or infinite values in {len(bad)} tensor(s): {show_names(bad)}. "
            f"Nothing is pruned from it: such a model evaluates to NaN logits (chance accuracy). Repair or "
            f"replace the checkpoint."
        )
    model.load_state_dict(state, strict=True)


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
                raise CheckpointError(f"{path} is not a ptsbench compact checkpoint "
                                      f"(format={meta.get('format')!r}).")
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
            raise CheckpointError(f"{path}: {key} has {int(bits.sum())} mask bits set but {values.numel()} "
                                  "values.")
        flat = torch.zeros(numel, dtype=values.dtype)
        flat[torch.from_numpy(bits)] = values
        state[key] = flat.view(shape)
    return state


def load_compact_form(model: nn.Module, path: Path) -> nn.Module:
    load_state_strict(model, read_compact_form(path), str(path))
    return model
