"""Sparsity primitives shared by every algorithm: which layers are prunable, how a global target is split
across them (the allocation math; the registered allocations are `ptsbench.toolkit.allocations`), exact
magnitude masks, and masks attached with `torch.nn.utils.parametrize`.

An allocation is a per-layer count of weights to remove, so the achieved global sparsity equals the
target to within one weight per layer, whatever the method's own arithmetic.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ptsbench.errors import ConfigError, unknown_choice

log = logging.getLogger(__name__)

# The audit's tolerance around target x weights, in weights per prunable layer (each layer's count is rounded
# once); an allocation read from outside is held to it before any work, so a job never misses it at the end.
TARGET_SLACK_PER_LAYER = 1


@dataclass
class PrunableLayer:
    """One prunable weight: the module that owns it and how the policy classified it."""

    name: str
    module: nn.Module
    kind: str  # conv, depthwise_conv, first_conv, linear, classifier, attention

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def numel(self) -> int:
        return self.module.weight.numel()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.module.weight.shape)


@dataclass
class PrunePolicy:
    """Which Conv2d/Linear weights may be pruned. The default prunes all of them, as FCPTS and UniPTS do.

    Also the structured-config schema of `prune_policy` (ptsbench.config), so it is not frozen: OmegaConf
    makes a frozen dataclass read-only and Hydra could not merge the config files into it.
    """

    first_conv: bool = True
    classifier: bool = True
    depthwise: bool = True
    attention: bool = True

    @classmethod
    def from_config(cls, cfg: Mapping | None) -> PrunePolicy:
        cfg = dict(cfg or {})
        unknown = set(cfg) - set(cls.__dataclass_fields__)
        if unknown:
            raise unknown_choice("prune policy key", sorted(unknown)[0], cls.__dataclass_fields__)
        return cls(**{k: bool(v) for k, v in cfg.items()})


def _classifier_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_classifier", None)
    if get is None:
        return None
    head = get()
    for name, module in model.named_modules():
        if module is head:
            return name
    return None


def find_prunable_layers(model: nn.Module, policy: PrunePolicy | None = None) -> list[PrunableLayer]:
    """Conv2d and Linear layers in module order, classified and filtered by the policy."""
    policy = policy or PrunePolicy()
    classifier = _classifier_name(model)
    layers: list[PrunableLayer] = []
    seen_conv = False
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if not seen_conv:
                kind, seen_conv = "first_conv", True
            elif module.groups > 1 and module.groups == module.in_channels:
                kind = "depthwise_conv"
            else:
                kind = "conv"
        elif isinstance(module, nn.Linear):
            if name == classifier:
                kind = "classifier"
            elif ".attn." in f".{name}.":
                kind = "attention"
            else:
                kind = "linear"
        else:
            continue
        allowed = {
            "first_conv": policy.first_conv,
            "depthwise_conv": policy.depthwise,
            "classifier": policy.classifier,
            "attention": policy.attention,
        }.get(kind, True)
        if allowed:
            layers.append(PrunableLayer(name, module, kind))
    if not layers:
        raise ConfigError("The model has no prunable Conv2d or Linear weights under the current prune "
                          "policy.")
    return layers


def describe_policy(layers: list[PrunableLayer], policy: PrunePolicy) -> str:
    kinds: dict[str, int] = {}
    for layer in layers:
        kinds[layer.kind] = kinds.get(layer.kind, 0) + 1
    parts = ", ".join(f"{k}={v}" for k, v in sorted(kinds.items()))
    return f"{len(layers)} prunable layers ({parts}); policy {policy}"


# ------------------------------------------------------------------------------- allocation math (shared)


def check_sparsity(value: object, what: str = "sparsity") -> float:
    """A sparsity must be a number in [0, 1)."""
    try:
        s = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{what}={value!r} is not a number; it must be a float in [0, 1).") from None
    if not (0.0 <= s < 1.0) or math.isnan(s):
        raise ConfigError(f"{what}={value!r} is outside [0, 1): a sparsity is the fraction of weights "
                          "removed.")
    return s


def counts_from_rates(layers: list[PrunableLayer], rates: Mapping[str, float],
                      target: float | None = None) -> dict[str, int]:
    """Per-layer sparsity rates to whole counts of zeros.

    Each count is within one weight of rate * n. When `target` is given, the rounding is distributed by
    largest remainder so that the total is exactly round(target * N) whenever the rates average to target.
    """
    ideal = {ly.name: rates[ly.name] * ly.numel for ly in layers}
    counts = {name: math.floor(v) for name, v in ideal.items()}
    if target is None:
        return {name: min(round(v), ly.numel) for (name, v), ly in zip(ideal.items(), layers, strict=True)}
    total = round(target * sum(ly.numel for ly in layers))
    short = total - sum(counts.values())
    order = sorted(ideal, key=lambda n: (ideal[n] - counts[n]), reverse=True)
    caps = {ly.name: ly.numel for ly in layers}
    for name in order:
        if short <= 0:
            break
        if ideal[name] - counts[name] > 0 and counts[name] < caps[name]:
            counts[name] += 1
            short -= 1
    return counts


def erk_allocation(layers: list[PrunableLayer], target: float, power_scale: float = 1.0) -> dict[str, float]:
    """Erdos-Renyi-Kernel: keep-density proportional to (sum of dims / product of dims) ** power_scale.

    Layers whose density would exceed 1 are made dense and the scale is re-solved over the rest (RigL).
    """
    raw = {ly.name: (sum(ly.shape) / math.prod(ly.shape)) ** power_scale for ly in layers}
    n = {ly.name: ly.numel for ly in layers}
    keep_total = (1.0 - target) * sum(n.values())
    dense: set[str] = set()
    while True:
        free = [name for name in raw if name not in dense]
        budget = keep_total - sum(n[name] for name in dense)
        denom = sum(raw[name] * n[name] for name in free)
        if not free or denom <= 0:
            raise ConfigError(f"ERK cannot reach sparsity {target}: too few prunable weights outside dense "
                              "layers.")
        eps = budget / denom
        over = [name for name in free if eps * raw[name] > 1.0]
        if not over:
            break
        dense.update(over)
    return {name: 0.0 if name in dense else 1.0 - eps * raw[name] for name in raw}


def global_counts(scores: list[torch.Tensor], target: float) -> list[int]:
    """Remove the round(target * N) smallest scores over all layers; ties broken by position.

    Linear time: one k-th value for the threshold, then the tied entries in position order.
    """
    sizes = [s.numel() for s in scores]
    k = round(target * sum(sizes))
    if k == 0:
        return [0] * len(scores)
    flat = torch.cat([s.detach().reshape(-1).float().cpu() for s in scores])
    threshold = torch.kthvalue(flat, k).values
    layer_id = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    counts = torch.bincount(layer_id[flat < threshold], minlength=len(sizes))
    missing = k - int(counts.sum())
    tied = torch.nonzero(flat == threshold).squeeze(1)[:missing]
    counts += torch.bincount(layer_id[tied], minlength=len(sizes))
    return counts.tolist()


def rates(layers: list[PrunableLayer], counts: Mapping[str, int]) -> dict[str, float]:
    return {ly.name: counts[ly.name] / ly.numel for ly in layers}


# ------------------------------------------------------------------------------------------------ masks


def magnitude_mask(weight: torch.Tensor, n_zero: int, scores: torch.Tensor | None = None) -> torch.Tensor:
    """A {0,1} mask removing exactly `n_zero` entries with the smallest score (default |w|).

    Ties are broken by position (stable sort), so the same weights always give the same mask.
    """
    scores = weight.detach().abs() if scores is None else scores.detach()
    mask = torch.ones(weight.numel(), dtype=weight.dtype, device=weight.device)
    if n_zero > 0:
        idx = torch.sort(scores.reshape(-1), stable=True).indices[:n_zero]
        mask[idx] = 0
    return mask.view_as(weight)


def magnitude_masks(layers: list[PrunableLayer], counts: Mapping[str, int]) -> dict[str, torch.Tensor]:
    return {ly.name: magnitude_mask(ly.weight, counts[ly.name]) for ly in layers}


class WeightMask(nn.Module):
    """Parametrization W -> W * M with a fixed {0,1} mask buffer."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.detach().clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def apply_masks(layers: list[PrunableLayer], masks: Mapping[str, torch.Tensor]) -> None:
    """Attach each mask to its layer's weight as a parametrization (replacing an earlier mask)."""
    for ly in layers:
        if ly.name not in masks:
            continue
        if parametrize.is_parametrized(ly.module, "weight"):
            parametrize.remove_parametrizations(ly.module, "weight", leave_parametrized=False)
        parametrize.register_parametrization(ly.module, "weight",
                                             WeightMask(masks[ly.name].to(ly.weight.device)))


def bake_masks(model: nn.Module) -> None:
    """Fold every weight parametrization into a plain weight tensor (zeros stay zeros)."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


# ------------------------------------------------------------------------ exact counts on sorted |w|


def sorted_magnitudes(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each weight's |w| flattened in ascending order: the count at any threshold is one binary search,
    the k-th smallest magnitude one index, so thresholds can be scanned many times at O(log n) each."""
    return [torch.sort(w.detach().abs().reshape(-1)).values for w in weights]


def counts_at_thresholds(sorted_abs: list[torch.Tensor], thresholds: list[float]) -> list[int]:
    """Exact #{|w| <= t} per layer, from `sorted_magnitudes` and one threshold per layer."""
    return [int(torch.searchsorted(a, torch.tensor([float(t)], dtype=a.dtype, device=a.device), right=True))
            for a, t in zip(sorted_abs, thresholds, strict=True)]


def masks_from_counts(weights: list[torch.Tensor], sorted_abs: list[torch.Tensor], counts: list[int]
                      ) -> list[torch.Tensor]:
    """{0,1} masks removing exactly counts[i] smallest |w| of weights[i]: one comparison with the k-th
    magnitude, or `magnitude_mask` (position tie-break) where that magnitude is tied at the boundary."""
    masks = []
    for w, a, k in zip(weights, sorted_abs, counts, strict=True):
        w = w.detach()
        if k == 0:
            masks.append(torch.ones_like(w))
        elif k == a.numel() or a[k - 1] == a[k]:
            masks.append(magnitude_mask(w, k))
        else:
            masks.append((w.abs() > a[k - 1]).to(w.dtype))
    return masks


# ------------------------------------------------------------------- masks recomputed at every step


THRESHOLD_BAND = 0.02  # relative half-width of the band searched around last step's magnitude threshold


def kth_smallest(scores: torch.Tensor, k: int, hint: torch.Tensor | None = None) -> torch.Tensor:
    """The k-th smallest of a flat tensor (1-based). With `hint`, last step's value, the selection runs on
    the narrow band of scores around it: weights move little per step, so the band nearly always holds it."""
    if hint is not None:
        lo, hi = hint * (1.0 - THRESHOLD_BAND), hint * (1.0 + THRESHOLD_BAND)
        n_lo = int(torch.count_nonzero(scores < lo))  # a sum would copy the booleans to integers first
        if n_lo < k:
            band = scores[(scores >= lo) & (scores <= hi)]
            if n_lo + band.numel() >= k:
                return band.kthvalue(k - n_lo).values
    return scores.kthvalue(k).values


def flat_view(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's entries as one 1-D view in memory order, for what does not depend on the order (counts,
    extremes, order statistics, histograms): reshape(-1) would copy a channels_last (NHWC) conv weight into
    NCHW order, one weight-sized copy per call."""
    channels_last = tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last)
    if channels_last and not tensor.is_contiguous():
        tensor = tensor.permute(0, 2, 3, 1)
    return tensor.reshape(-1)


def topk_magnitude_mask(weight: torch.Tensor, n_zero: int,
                        hint: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The mask of `magnitude_mask` (exactly `n_zero` zeros, ties broken by position) and its threshold,
    found by selection instead of a full sort, for masks recomputed from the weights at every step
    (dynamic sparse training); pass the returned threshold back as `hint` on the next step.

    Counts and the selection read |w| in memory order (no copy of an NHWC weight, no integer copy of the
    comparison); only ties, broken by NCHW position, need the NCHW order. The mask is NCHW-contiguous."""
    if n_zero <= 0 or n_zero >= weight.numel():
        return magnitude_mask(weight, n_zero), None
    magnitude = weight.detach().abs()
    scores = flat_view(magnitude)

    def kept(threshold: torch.Tensor) -> torch.Tensor:
        mask = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        return mask.copy_(magnitude > threshold)

    if hint is not None and int(torch.count_nonzero(scores <= hint)) == n_zero:
        # still exactly the n_zero smallest: every kept score is above them
        return kept(hint), hint
    threshold = kth_smallest(scores, n_zero, hint)
    excess = int(torch.count_nonzero(scores <= threshold)) - n_zero
    if excess <= 0:
        return kept(threshold), threshold
    # ties at the threshold: the later positions stay, as in a stable sort
    scores = magnitude.reshape(-1)
    pruned = scores <= threshold
    ties = (scores == threshold).nonzero().squeeze(1)
    pruned[ties[-excess:]] = False
    return (~pruned).to(weight.dtype).view_as(weight), threshold
