"""Independent accounting of what an algorithm delivered: zeros are counted in the weights themselves,
never taken from the algorithm's own report."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from ptsbench.sparsity import PrunableLayer


@dataclass
class Audit:
    target: float
    achieved: float  # zeros / weights, over prunable weights
    achieved_all: float  # zeros in all parameters / all parameters of the model
    prunable_params: int
    total_params: int
    zeros: int
    max_layer_error: float  # largest |achieved - allocated| count per layer, in weights
    mask_hash: str  # sha256 of every layer's zero pattern: equal hashes mean identical masks
    layers: pd.DataFrame

    def summary(self) -> dict:
        return {
            "target_sparsity": self.target,
            "achieved_sparsity": self.achieved,
            "achieved_sparsity_all": self.achieved_all,
            "sparsity_error": self.achieved - self.target,
            "prunable_params": self.prunable_params,
            "total_params": self.total_params,
            "zero_weights": self.zeros,
            "max_layer_count_error": self.max_layer_error,
            "mask_hash": self.mask_hash,
        }


def effective_weight(layer: PrunableLayer) -> torch.Tensor:
    """The weight the forward pass uses (parametrizations included)."""
    return layer.module.weight.detach()


def audit_model(model: nn.Module, layers: list[PrunableLayer], target: float,
                allocated: Mapping[str, float] | None = None) -> Audit:
    """Count zeros per prunable layer and over all parameters; compare with the target and the allocation.

    Call it on a model whose masks are baked, so that `model.parameters()` are the weights in use.
    """
    rows = []
    digest = hashlib.sha256()
    zeros_total = 0
    prunable = 0
    max_err = 0.0
    for ly in layers:
        w = effective_weight(ly)
        zero_pattern = (w == 0).cpu()
        digest.update(ly.name.encode())
        digest.update(np.packbits(zero_pattern.reshape(-1).numpy()).tobytes())
        zeros = int(zero_pattern.sum())
        n = w.numel()
        zeros_total += zeros
        prunable += n
        planned = None if allocated is None else float(allocated.get(ly.name, float("nan")))
        if planned is not None:
            max_err = max(max_err, abs(zeros - planned * n))
        rows.append({
            "name": ly.name,
            "type": ly.kind,
            "shape": "x".join(map(str, w.shape)),
            "params": n,
            "target_sparsity": planned,
            "achieved_sparsity": zeros / n,
            "zeros": zeros,
        })
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    zeros_all = sum(int((p.detach() == 0).sum()) for p in params)
    return Audit(
        target=float(target),
        achieved=zeros_total / prunable,
        achieved_all=zeros_all / total,
        prunable_params=prunable,
        total_params=total,
        zeros=zeros_total,
        max_layer_error=max_err,
        mask_hash=digest.hexdigest()[:16],
        layers=pd.DataFrame(rows),
    )
