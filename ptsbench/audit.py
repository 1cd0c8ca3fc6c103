"""Independent accounting of what an algorithm delivered: zeros are counted in the weights themselves,
never taken from the algorithm's own report."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from ptsbench.effective import EffectiveSparsityError, LayerReach, layer_reach
from ptsbench.toolkit.patterns import UNSTRUCTURED, Pattern, audit_pattern
from ptsbench.toolkit.sparsity import TARGET_SLACK_PER_LAYER, PrunableLayer

log = logging.getLogger(__name__)

# Effective sparsity above the achieved one by more than this is worth a warning: the mask (or the input
# size) leaves kept weights that cannot influence the output.
EFFECTIVE_GAP_WARNING = 0.01


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
    # Over prunable weights, at the model's input size (None when no input shape was given):
    dense_dead_fraction: float | None = None  # weights of the dense model that cannot influence the output
    effective_sparsity: float | None = None  # weights that are zero or cannot influence the output
    # the pattern and the layers it leaves dense (ptsbench.toolkit.patterns)
    pattern: dict = field(default_factory=dict)

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
            "dense_dead_fraction": self.dense_dead_fraction,
            "effective_sparsity": self.effective_sparsity,
            **self.pattern,
        }


def effective_weight(layer: PrunableLayer) -> torch.Tensor:
    """The weight the forward pass uses (parametrizations included)."""
    return layer.module.weight.detach()


def reach_or_none(model: nn.Module, layers: list[PrunableLayer],
                  input_shape: Sequence[int] | None) -> dict[str, LayerReach] | None:
    """Dense-dead and effective counts per layer; None without an input shape, or (with a warning naming the
    op) when the model calls an op whose influence the structural pass cannot vouch for: the job's other
    results stand, and no number is better than a wrong one."""
    if input_shape is None:
        return None
    try:
        return layer_reach(model, [ly.name for ly in layers], input_shape)
    except EffectiveSparsityError as exc:
        log.warning("Effective sparsity not computed: %s", exc)
        return None


def audit_model(model: nn.Module, layers: list[PrunableLayer], target: float,
                allocated: Mapping[str, float] | None = None,
                input_shape: Sequence[int] | None = None, pattern: Pattern = UNSTRUCTURED) -> Audit:
    """Count zeros per prunable layer and over all parameters; compare with the target and the allocation.
    With `input_shape` (1, C, H, W), also the dense-dead fraction and the effective sparsity
    (ptsbench.effective): zeros are not the only weights a mask or an input size can make useless.

    Call it on a model whose masks are baked, so that `model.parameters()` are the weights in use.
    Under an N:M `pattern` every group is checked, and a violated one fails the job (PatternViolation).
    """
    reach = reach_or_none(model, layers, input_shape)
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
            "dense_dead_fraction": reach[ly.name].dense_dead_fraction if reach else float("nan"),
            "effective_sparsity": reach[ly.name].effective_sparsity if reach else float("nan"),
        })
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    zeros_all = sum(int((p.detach() == 0).sum()) for p in params)
    audit = Audit(
        target=float(target),
        achieved=zeros_total / prunable,
        achieved_all=zeros_all / total,
        prunable_params=prunable,
        total_params=total,
        zeros=zeros_total,
        max_layer_error=max_err,
        mask_hash=digest.hexdigest()[:16],
        layers=pd.DataFrame(rows),
        pattern=audit_pattern(layers, pattern),
    )
    if audit.pattern.get("pattern_dense_layers"):
        log.info("pattern=%s leaves %d layer(s) dense by its rule (rows not a multiple of %d), out of the "
                 "target's count: %s", pattern, len(audit.pattern["pattern_dense_layers"]), pattern.m,
                 _names(audit.pattern["pattern_dense_layers"]))
    if reach:
        audit.dense_dead_fraction = sum(r.dense_dead for r in reach.values()) / prunable
        audit.effective_sparsity = 1.0 - sum(r.effective for r in reach.values()) / prunable
        warn_if_ineffective(audit)
    return audit


def warn_if_ineffective(audit: Audit) -> None:
    """Say so when kept weights cannot influence the output: the achieved sparsity flatters the mask."""
    if audit.effective_sparsity is None or audit.effective_sparsity <= audit.achieved + EFFECTIVE_GAP_WARNING:
        return
    log.warning("Effective sparsity %.4f exceeds the achieved %.4f: %.2f%% of the prunable weights are kept "
                "but cannot influence the output (dense model at this input size: %.2f%% dead by structure).",
                audit.effective_sparsity, audit.achieved, 100 * (audit.effective_sparsity - audit.achieved),
                100 * (audit.dense_dead_fraction or 0.0))


def _names(layers: list[str], limit: int = 6) -> str:
    return ", ".join(layers[:limit]) + (f" ... ({len(layers)} layers in all)" if len(layers) > limit else "")


def target_missed(audit: Audit, dense_zeros: Mapping[str, int]) -> str | None:
    """Why the audited zeros do not deliver the plan, or None when they do.

    The criterion, on zeros counted in the returned weights (never the method's own count): in every
    layer, the zeros are within one weight of the allocation's count (allocated sparsity x weights), and
    over all prunable layers they are within one weight per layer of target x prunable weights. Zeros the
    dense weights already held (`dense_zeros`) are a layer's floor: where the allocation asks for fewer,
    they are the count it is held to, and the global count is allowed what they add (the dense control at
    sparsity 0 of a checkpoint with a few exact zeros is not a miss of the method's).
    """
    rows = audit.layers
    planned = rows["target_sparsity"].astype(float) * rows["params"]
    already = rows["name"].map(lambda name: dense_zeros.get(name, 0)).astype(float)
    floor = planned.where(planned.isna() | (planned >= already), already)
    unplanned = rows.loc[planned.isna(), "name"].tolist()
    over = rows.loc[rows["zeros"] - floor > 1 + 1e-6, "name"].tolist()
    under = rows.loc[rows["zeros"] - planned < -1 - 1e-6, "name"].tolist()
    reasons = []
    for names, what in ((over, "more zeros than"), (under, "fewer zeros than")):
        if names:
            reasons.append(f"layers {_names(names)} have {what} their allocation")
    if unplanned:
        reasons.append(f"the method gave no allocation for layers {_names(unplanned)}")
    # An N:M pattern leaves the layers whose rows do not split into groups of M dense, by its rule.
    out_of_count = audit.pattern.get("pattern_dense_layers") or []
    counted = audit.prunable_params - audit.pattern.get("pattern_dense_params", 0)
    raised = float((floor - planned).fillna(0).sum())  # what the dense weights' own zeros add to the plan
    excess = audit.zeros - audit.target * counted
    excess = max(excess - raised, min(excess, 0.0))  # above: beyond those zeros; below: as it is
    if abs(excess) > TARGET_SLACK_PER_LAYER * len(rows) + 1e-6:
        achieved = f"achieved sparsity {audit.achieved:.6f}"
        if out_of_count:
            achieved += (f" ({audit.zeros / counted:.6f} over the {counted} weights the target counts: "
                         f"pattern {audit.pattern['pattern']} leaves layers {_names(out_of_count)} dense, "
                         f"out of the count)")
        beyond = ""
        if raised and excess > 0:
            beyond = f" beyond the {raised:.0f} zeros the dense weights already held"
        reasons.append(f"{achieved} is {abs(excess):.0f} weights {'above' if excess > 0 else 'below'} the "
                       f"target {audit.target:g}{beyond} (tolerance: {TARGET_SLACK_PER_LAYER * len(rows)} "
                       f"weights, one per layer)")
    return "Target missed: " + "; ".join(reasons) + "." if reasons else None
