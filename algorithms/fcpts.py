"""FCPTS: fine-grained controllable post-training sparsity (Gong et al., AAAI 2024, arXiv 2405.05808).

The method in four parts, each a short function below:

1. **One learnable threshold per layer.** Layer l keeps the weights with |w| > t_l, t_l = sigmoid(s_l) in
   absolute-weight units (the released code's `v1` mode). The score s_l is what the optimiser moves.
2. **The bridge function** S_l(t_l): the fraction of layer l's weights with |w| <= t_l. Its forward value
   is that exact count; its derivative is the density of |w| at t_l, estimated either by a Gaussian KDE
   (the paper) or by the released code's 100-bin histogram of the signed weights. Without it the count is
   a step function and the global sparsity could not be steered by gradient descent.
3. **The controllable objective** L = L_rec + lambda * |S - P|, S the parameter-weighted mean of the
   layer sparsities: the thresholds are learned jointly over the whole network, so layers trade sparsity
   against each other instead of each being fixed in advance.
4. **Reconstruction by distillation** from the frozen dense model (KL on logits at temperature 4, optional
   block-output MSE), training thresholds, weights and BatchNorm affine parameters on the calibration set.

The soft objective holds S near P but not exactly on it, so the method ends with an exact correction:
one logit-space shift shared by all thresholds, found by bisection, then per-layer top-k masks on the
final weights. The residual it removes is reported in the stats.

Paper vs code (see the reference digest, section 1.3) is exposed as options: `bridge=kde|histogram` and
`threshold_grad=ste|sparsity_only` (the released code computes the mask under `no_grad`, so thresholds
only feel the sparsity loss).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from algorithms.base import PruneContext, PruneResult, PTSAlgorithm
from ptsbench.distill import BlockOutputs, block_mse, find_blocks, kd_kl
from ptsbench.errors import ConfigError, ensure_finite, unknown_choice
from ptsbench.sparsity import (
    PrunableLayer,
    apply_masks,
    bake_masks,
    check_sparsity,
    counts_from_rates,
    erk_allocation,
    magnitude_mask,
    rates,
)

log = logging.getLogger(__name__)

BRIDGES = ("kde", "histogram")
BANDWIDTHS = ("silverman", "scott")
THRESHOLD_GRADS = ("ste", "sparsity_only")
SPARSITY_LOSSES = ("abs", "pow2")

REFERENCE_BATCH = 64  # the batch the reference lr is quoted for (0.04 x 64 / 256 = 0.01)
REFERENCE_ITERATIONS = 1600  # 100 epochs x 16 batches of 64 images
MIN_SCORE = -30.0  # the reference clamps initial scores here: sigmoid(-30) ~ 1e-13
HISTOGRAM_BINS = 100  # the released code's bridge histogram
KDE_BINS = 8192  # binned KDE grid over [-max|w|, max|w|]; bin width is a small fraction of the bandwidth
DATA_STREAM, RNG_STREAM = 1, 2  # ctx.generator offsets: calibration batch order, torch's global RNG


# ---------------------------------------------------------------------------------------- the bridge


def histogram_density(weight: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Density of |w| at t from the released code's estimator: f(t) + f(-t), f a 100-bin histogram of the
    signed weights over [min w, max w] normalised to integrate to one (zero outside that range)."""
    w = weight.detach().reshape(-1).float()
    lo, hi = (float(v) for v in torch.aminmax(w))
    if hi <= lo:
        return torch.zeros((), device=w.device)
    width = (hi - lo) / HISTOGRAM_BINS
    counts = torch.histc(w, bins=HISTOGRAM_BINS, min=lo, max=hi)
    density = counts / (w.numel() * width)

    def at(x: torch.Tensor) -> torch.Tensor:
        inside = (x >= lo) & (x <= hi)
        idx = ((x - lo) / width).floor().clamp(0, HISTOGRAM_BINS - 1).long()
        return torch.where(inside, density[idx], torch.zeros_like(x))

    t = t.detach().float()
    return at(t) + at(-t)


def kde_bandwidth(weight: torch.Tensor, rule: str, counts: torch.Tensor, edges_lo: float, width: float) -> float:
    """Gaussian-kernel bandwidth from the layer's signed weights.

    silverman: 0.9 * min(std, IQR / 1.349) * n^(-1/5), robust to the heavy tails of trained weights;
    scott: 1.059 * std * n^(-1/5). The quartiles are read off the binned CDF (`counts`), which is exact
    to within one bin, far below the bandwidth, and avoids two O(n) selections per layer and step.
    """
    n = weight.numel()
    std = float(weight.std()) if n > 1 else 0.0
    if rule == "scott":
        return 1.059 * std * n ** -0.2
    cdf = counts.cumsum(0)

    def quantile(q: float) -> float:
        j = int(torch.searchsorted(cdf, torch.tensor(q * n, device=cdf.device)).clamp(max=len(cdf) - 1))
        below = float(cdf[j - 1]) if j > 0 else 0.0
        inside = float(counts[j])
        frac = (q * n - below) / inside if inside > 0 else 0.5
        return edges_lo + (j + frac) * width

    iqr = quantile(0.75) - quantile(0.25)
    spread = min(std, iqr / 1.349) if iqr > 0 else std
    return 0.9 * spread * n ** -0.2


def kde_density(weight: torch.Tensor, t: torch.Tensor, bandwidth: str = "silverman") -> torch.Tensor:
    """Density of |w| at t from a Gaussian KDE of the signed weights: f(t) + f(-t).

    Summed over the signed weights this is the KDE of |w| reflected at zero, so there is no boundary
    bias near t = 0. The kernel sum runs over a fine histogram (binned KDE): O(n) per layer and step
    with one pass, instead of n kernel evaluations.
    """
    w = weight.detach().reshape(-1).float()
    lo, hi = (float(v) for v in torch.aminmax(w))
    m = max(-lo, hi)
    if m == 0.0:
        return torch.zeros((), device=w.device)
    width = 2 * m / KDE_BINS
    counts = torch.histc(w, bins=KDE_BINS, min=-m, max=m)
    h = kde_bandwidth(w, bandwidth, counts, -m, width)
    if h <= 0:
        return torch.zeros((), device=w.device)
    centres = -m + width * (torch.arange(KDE_BINS, device=w.device, dtype=torch.float32) + 0.5)
    t = t.detach().float()
    norm = w.numel() * h * math.sqrt(2 * math.pi)
    kernel = torch.exp(-0.5 * ((t - centres) / h) ** 2) + torch.exp(-0.5 * ((t + centres) / h) ** 2)
    return (counts * kernel).sum() / norm


def abs_weight_density(weight: torch.Tensor, t: torch.Tensor, bridge: str, bandwidth: str = "silverman") -> torch.Tensor:
    """dS/dt for one layer: the density of |w| at the threshold, by the chosen estimator."""
    if bridge == "kde":
        return kde_density(weight, t, bandwidth)
    return histogram_density(weight, t)


class BridgeSparsity(torch.autograd.Function):
    """S(t) = #{|w| <= t} / n in the forward pass, dS/dt = density of |w| at t in the backward pass.

    The weights receive no gradient through this path: the bridge only tells each threshold how fast
    its layer's sparsity moves with it.
    """

    @staticmethod
    def forward(ctx, threshold: torch.Tensor, weight: torch.Tensor, bridge: str, bandwidth: str) -> torch.Tensor:
        w = weight.detach()
        ctx.save_for_backward(threshold.detach(), w)
        ctx.bridge, ctx.bandwidth = bridge, bandwidth
        return (w.abs() <= threshold.detach()).sum().to(threshold.dtype) / w.numel()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        threshold, w = ctx.saved_tensors
        slope = abs_weight_density(w, threshold, ctx.bridge, ctx.bandwidth)
        return grad * slope.to(grad.dtype), None, None, None


def bridge_sparsity(threshold: torch.Tensor, weight: torch.Tensor, bridge: str = "kde",
                    bandwidth: str = "silverman") -> torch.Tensor:
    return BridgeSparsity.apply(threshold, weight, bridge, bandwidth)


# ------------------------------------------------------------------------------------ the thresholds


class MaskSTE(torch.autograd.Function):
    """M = 1[x > 0] for x = |w| - t, i.e. 0.5 * sign(x) + 0.5, with the clipped-identity straight-through
    gradient of sign: dM/dx = 0.5 where |x| < 1. Since |w| and t are both below one in practice, this
    gives dL/dt = -0.5 * sum_i w_i * dL/dW_eff_i: the threshold rises when shrinking the layer helps."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * 0.5 * (x.abs() < 1).to(grad.dtype)


class ThresholdMask(nn.Module):
    """Parametrization W -> W * 1[|W| > sigmoid(s)] with the learnable score s of one layer.

    `threshold_grad="ste"` lets the reconstruction loss reach s (and |W|) through the mask (the paper's
    joint optimisation); `"sparsity_only"` builds the mask without gradient, as the released code does,
    so s moves only through the sparsity loss and the bridge.
    """

    def __init__(self, score: float, threshold_grad: str, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.score = nn.Parameter(torch.tensor(score, device=device, dtype=dtype))
        self.threshold_grad = threshold_grad

    def threshold(self) -> torch.Tensor:
        return torch.sigmoid(self.score)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.threshold_grad == "ste":
            return weight * MaskSTE.apply(weight.abs() - self.threshold())
        with torch.no_grad():
            mask = (weight.abs() > self.threshold()).to(weight.dtype)
        return weight * mask


def original_weight(layer: PrunableLayer) -> torch.Tensor:
    """The trained dense weight under a layer's parametrization (the mask is not applied)."""
    if parametrize.is_parametrized(layer.module, "weight"):
        return layer.module.parametrizations.weight.original
    return layer.module.weight


def layer_size(layer: PrunableLayer) -> int:
    """The layer's weight count, read without running its parametrization (`layer.numel` would)."""
    return original_weight(layer).numel()


def score_for_count(weight: torch.Tensor, k: int) -> float:
    """s = logit(t) with t between the k-th and (k+1)-th smallest |w|, so exactly k weights fall at or
    below it; t is half the smallest |w| for k = 0 (dense, yet the score can still move). Clamped at -30."""
    a = weight.detach().abs().reshape(-1)
    k = min(max(int(k), 0), a.numel() - 1)
    if k == 0:
        t = float(a.min()) / 2
    else:
        t = (float(torch.kthvalue(a, k).values) + float(torch.kthvalue(a, k + 1).values)) / 2
    t = min(max(t, 1e-300), 1.0 - 1e-7)
    return max(math.log(t) - math.log1p(-t), MIN_SCORE)


def attach_thresholds(layers: list[PrunableLayer], counts: dict[str, int], threshold_grad: str) -> list[ThresholdMask]:
    """Register one ThresholdMask per layer, initialised to prune `counts[name]` weights (ERK in prune)."""
    gates = []
    for ly in layers:
        w = original_weight(ly)
        gate = ThresholdMask(score_for_count(w, counts[ly.name]), threshold_grad, w.device, w.dtype)
        parametrize.register_parametrization(ly.module, "weight", gate)
        gates.append(gate)
    return gates


def layer_sparsities(layers: list[PrunableLayer], gates: list[ThresholdMask], bridge: str,
                     bandwidth: str) -> list[torch.Tensor]:
    """The bridged sparsity of every layer (exact counts forward, densities backward)."""
    return [bridge_sparsity(g.threshold(), original_weight(ly), bridge, bandwidth)
            for ly, g in zip(layers, gates, strict=True)]


def global_sparsity(layers: list[PrunableLayer], per_layer: list[torch.Tensor]) -> torch.Tensor:
    """S = sum_l n_l S_l / sum_l n_l: prunable weights only, biases excluded, as in the reference."""
    sizes = [layer_size(ly) for ly in layers]
    total = sum(sizes)
    return sum(s * (n / total) for n, s in zip(sizes, per_layer, strict=True))


def sparsity_loss(s: torch.Tensor, target: float, kind: str) -> torch.Tensor:
    """L_c: |S - P| (the reference run's choice) or (S - P)^2."""
    return (s - target).abs() if kind == "abs" else (s - target) ** 2


# --------------------------------------------------------------------------------- exact correction


@dataclass
class Correction:
    counts: dict[str, int]  # zeros per layer after the correction
    learned_counts: dict[str, int]  # zeros per layer at the learned thresholds
    logit_shift: float  # the shared shift added to every score


def sorted_magnitudes(layers: list[PrunableLayer]) -> list[torch.Tensor]:
    """Each layer's |w| in ascending order: counts at any threshold by binary search, k-th values by index."""
    return [torch.sort(original_weight(ly).detach().abs().reshape(-1)).values for ly in layers]


def exact_counts(layers: list[PrunableLayer], gates: list[ThresholdMask], sorted_abs: list[torch.Tensor],
                 target: float, max_steps: int = 200) -> Correction:
    """Per-layer zero counts summing exactly to round(target * N), by one shared logit shift.

    Adding the same delta to every score moves each threshold in proportion to sigma'(s_l), as the
    sparsity loss would, so the learned allocation keeps its shape; delta = 0 when the soft objective
    already hit the target. The count is a step function of delta: bisection brackets the target, and a
    remainder left by tied magnitudes is split in layer order (the masks resolve ties by position).
    """
    scores = torch.tensor([g.score.item() for g in gates], dtype=torch.float64)
    sizes = [a.numel() for a in sorted_abs]
    want = round(target * sum(sizes))

    def counts_at(delta: float) -> list[int]:
        t = torch.sigmoid(scores + delta)
        return [int(torch.searchsorted(a, torch.tensor([float(tl)], dtype=a.dtype, device=a.device), right=True))
                for a, tl in zip(sorted_abs, t, strict=True)]

    learned = counts_at(0.0)
    lo, hi = -60.0, 60.0
    c_lo, c_hi = counts_at(lo), counts_at(hi)
    if sum(learned) == want:
        lo, c_lo, c_hi = 0.0, learned, learned
    elif sum(c_lo) > want or sum(c_hi) < want:
        log.warning("FCPTS: thresholds cannot reach %d zeros (exact zeros or |w| >= 1); distributing the rest.", want)
        lo = hi if sum(c_hi) < want else lo
        c_lo = c_lo if sum(c_lo) <= want else [0] * len(sizes)
        c_hi = c_hi if sum(c_hi) >= want else sizes
    else:
        for _ in range(max_steps):
            mid = 0.5 * (lo + hi)
            c_mid = counts_at(mid)
            if sum(c_mid) <= want:
                lo, c_lo = mid, c_mid
            else:
                hi, c_hi = mid, c_mid
            if sum(c_lo) == want or hi - lo < 1e-12:
                break
    counts = list(c_lo)
    short = want - sum(counts)
    for i in range(len(counts)):
        add = min(short, c_hi[i] - counts[i])
        counts[i] += add
        short -= add
    names = [ly.name for ly in layers]
    return Correction(dict(zip(names, counts, strict=True)), dict(zip(names, learned, strict=True)), lo)


def count_masks(layers: list[PrunableLayer], sorted_abs: list[torch.Tensor], counts: dict[str, int]
                ) -> dict[str, torch.Tensor]:
    """{0,1} masks removing exactly counts[name] smallest |w| per layer: one comparison with the k-th
    magnitude, or `magnitude_mask` (position tie-break) where that magnitude is tied at the boundary."""
    masks = {}
    for ly, a in zip(layers, sorted_abs, strict=True):
        w, k = original_weight(ly).detach(), counts[ly.name]
        if k == 0:
            masks[ly.name] = torch.ones_like(w)
        elif k == a.numel() or a[k - 1] == a[k]:
            masks[ly.name] = magnitude_mask(w, k)
        else:
            masks[ly.name] = (w.abs() > a[k - 1]).to(w.dtype)
    return masks


# -------------------------------------------------------------------------------------- bookkeeping


@dataclass
class Stopwatch:
    """Seconds spent per phase of an iteration (on CUDA the split is approximate: kernels run async)."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def time(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def calibration_batches(ctx: PruneContext, batch_size: int) -> Iterator[torch.Tensor]:
    """Endless epochs of shuffled, full calibration batches (drop_last, as the reference loader)."""
    generator = ctx.generator(DATA_STREAM)
    while True:
        for images, _ in ctx.calib.batches(batch_size, shuffle=True, generator=generator, drop_last=True):
            yield images.to(ctx.device, non_blocking=True)


def frozen_teacher(model: nn.Module) -> nn.Module:
    """A deep copy of the dense model, without gradients, in train() mode like the student: the reference
    keeps both in BatchNorm train mode, so both normalise with the same batch's statistics.

    Its outputs are recomputed every step rather than cached: in train mode they depend on which images
    share the batch, and batches are reshuffled every epoch as in the reference, so a cache would only be
    valid with fixed batches, a different method.
    """
    teacher = copy.deepcopy(model)
    teacher.requires_grad_(False)
    return teacher.train()


# --------------------------------------------------------------------------------------- the method


class FCPTS(PTSAlgorithm):
    """Learn per-layer thresholds (hence the allocation) and the weights jointly, under a global target."""

    name = "fcpts"

    def __init__(self, iterations: int = REFERENCE_ITERATIONS, batch_size: int = REFERENCE_BATCH,
                 lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 3e-4, warmup_epochs: float = 1.0,
                 bridge: str = "kde", kde_bandwidth: str = "silverman", threshold_grad: str = "ste",
                 sparsity_loss: str = "abs", sparsity_lambda: float = 1.0, temperature: float = 4.0,
                 block_loss_weight: float = 0.0, erk_power_scale: float = 1.0, log_every: int = 20,
                 channels_last: bool = True):
        self.iterations = int(iterations)
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.warmup_epochs = float(warmup_epochs)
        self.bridge = bridge
        self.kde_bandwidth = kde_bandwidth
        self.threshold_grad = threshold_grad
        self.sparsity_loss = sparsity_loss
        self.sparsity_lambda = float(sparsity_lambda)
        self.temperature = float(temperature)
        self.block_loss_weight = float(block_loss_weight)
        self.erk_power_scale = float(erk_power_scale)
        self.log_every = int(log_every)
        self.channels_last = bool(channels_last)
        self._check_options()

    def _check_options(self) -> None:
        for what, value, allowed in (("bridge", self.bridge, BRIDGES), ("kde_bandwidth", self.kde_bandwidth, BANDWIDTHS),
                                     ("threshold_grad", self.threshold_grad, THRESHOLD_GRADS),
                                     ("sparsity_loss", self.sparsity_loss, SPARSITY_LOSSES)):
            if value not in allowed:
                raise unknown_choice(f"algorithm.{what}", value, allowed)
        for what, value in (("iterations", self.iterations), ("batch_size", self.batch_size),
                            ("log_every", self.log_every)):
            if value < 1:
                raise ConfigError(f"algorithm.{what}={value} must be a positive whole number.")
        for what, value in (("lr", self.lr), ("weight_decay", self.weight_decay), ("sparsity_lambda", self.sparsity_lambda),
                            ("block_loss_weight", self.block_loss_weight), ("warmup_epochs", self.warmup_epochs)):
            if not value >= 0:
                raise ConfigError(f"algorithm.{what}={value} must be >= 0.")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"algorithm.momentum={self.momentum} must be in [0, 1).")
        if not self.temperature > 0:
            raise ConfigError(f"algorithm.temperature={self.temperature} must be > 0.")

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "bridge": self.bridge, "threshold_grad": self.threshold_grad, "sparsity_loss": self.sparsity_loss,
            "sparsity_lambda": self.sparsity_lambda, "temperature": self.temperature,
            "block_loss_weight": self.block_loss_weight, "iterations": self.iterations,
            "batch_size": self.batch_size, "lr": self.lr,
        }
        if self.bridge == "kde":
            opts["kde_bandwidth"] = self.kde_bandwidth
        if self.erk_power_scale != 1.0:
            opts["erk_power_scale"] = self.erk_power_scale
        return opts

    @property
    def label(self) -> str:
        parts = ["fcpts", self.threshold_grad, "kde" if self.bridge == "kde" else "hist"]
        if self.sparsity_loss != "abs":
            parts.append(self.sparsity_loss)
        if self.block_loss_weight > 0:
            parts.append(f"block{self.block_loss_weight:g}")
        if self.iterations != REFERENCE_ITERATIONS:
            parts.append(f"{self.iterations}it")
        return "-".join(parts)

    def validate(self, layers: list[PrunableLayer], target: float) -> None:
        self._check_options()
        erk_allocation(layers, check_sparsity(target), self.erk_power_scale)

    # ------------------------------------------------------------------------------------ prune

    def prune(self, model: nn.Module, layers: list[PrunableLayer], target: float, ctx: PruneContext) -> PruneResult:
        target = check_sparsity(target)
        self.validate(layers, target)
        if len(ctx.calib) < self.batch_size:
            raise ConfigError(f"FCPTS needs at least one full batch: calib.n={len(ctx.calib)} is below "
                              f"algorithm.batch_size={self.batch_size}.")
        was_training = model.training
        if self.channels_last:  # NHWC convolutions: faster for CNNs on CPU; restored at the end (speed only)
            model.to(memory_format=torch.channels_last)
        teacher = frozen_teacher(model)
        init_counts = counts_from_rates(layers, erk_allocation(layers, target, self.erk_power_scale), target)
        gates = attach_thresholds(layers, init_counts, self.threshold_grad)
        init_sparsity = sum(int((original_weight(ly).abs() <= g.threshold()).sum())
                            for ly, g in zip(layers, gates, strict=True)) / sum(layer_size(ly) for ly in layers)
        model.requires_grad_(True).train()

        rng_devices = [ctx.device] if ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(ctx.generator(RNG_STREAM).initial_seed())
            history, watch, last = self._optimise(model, teacher, layers, gates, target, ctx)
        del teacher

        sorted_abs = sorted_magnitudes(layers)
        correction = exact_counts(layers, gates, sorted_abs, target)
        masks = count_masks(layers, sorted_abs, correction.counts)
        del sorted_abs
        apply_masks(layers, masks)  # drops the threshold parametrizations, keeps the trained weights
        bake_masks(model)
        model.to(memory_format=torch.contiguous_format)
        model.train(was_training)

        total = sum(ly.numel for ly in layers)
        learned = sum(correction.learned_counts.values()) / total
        changed = sum(abs(correction.counts[n] - correction.learned_counts[n]) for n in correction.counts)
        stats = {
            "iterations": self.iterations,
            "iterations_per_epoch": len(ctx.calib) // self.batch_size,
            "calib_passes": self.iterations * self.batch_size / len(ctx.calib),
            "lr_scaled": self._scaled_lr(),
            "init_global_sparsity": init_sparsity,
            "learned_global_sparsity": learned,
            "residual_before_correction": learned - target,
            "correction_logit_shift": correction.logit_shift,
            "correction_weights_moved": changed,
            "final_rec_loss": last["rec_loss"],
            "final_sparsity_loss": last["sparsity_loss"],
            **{f"seconds_{k}": v for k, v in watch.seconds.items()},
            "seconds_per_iteration": sum(watch.seconds.values()) / self.iterations,
        }
        log.info("FCPTS: learned global sparsity %.5f (target %.5f, residual %+.2e), corrected by logit shift "
                 "%+.3e moving %d weights", learned, target, learned - target, correction.logit_shift, changed)
        return PruneResult(model=model, allocation=rates(layers, correction.counts), masks=masks, stats=stats,
                           tables={"allocation_trajectory": pd.DataFrame(history)})

    def _scaled_lr(self) -> float:
        return self.lr * self.batch_size / REFERENCE_BATCH

    def _optimizer(self, model: nn.Module, gates: list[ThresholdMask], iters_per_epoch: int
                   ) -> tuple[torch.optim.Optimizer, CosineLRScheduler]:
        """SGD with momentum: thresholds without weight decay, every other parameter (weights, biases,
        BatchNorm affine) with it; timm cosine per iteration after a linear warmup from zero."""
        score_ids = {id(g.score) for g in gates}
        others = [p for p in model.parameters() if id(p) not in score_ids]
        groups = [{"params": others, "weight_decay": self.weight_decay},
                  {"params": [g.score for g in gates], "weight_decay": 0.0}]
        optimizer = torch.optim.SGD(groups, lr=self._scaled_lr(), momentum=self.momentum)
        warmup = min(round(self.warmup_epochs * iters_per_epoch), self.iterations - 1)
        scheduler = CosineLRScheduler(optimizer, t_initial=self.iterations, lr_min=0.0, warmup_t=warmup,
                                      warmup_lr_init=0.0, t_in_epochs=False)
        return optimizer, scheduler

    def _optimise(self, model: nn.Module, teacher: nn.Module, layers: list[PrunableLayer],
                  gates: list[ThresholdMask], target: float, ctx: PruneContext
                  ) -> tuple[list[dict[str, Any]], Stopwatch, dict[str, float]]:
        """The joint optimisation of thresholds, weights and BN affine parameters on calibration batches."""
        optimizer, scheduler = self._optimizer(model, gates, len(ctx.calib) // self.batch_size)
        blocks = find_blocks(teacher) if self.block_loss_weight > 0 else []
        watch = Stopwatch()
        history: list[dict[str, Any]] = []
        last: dict[str, float] = {}
        bar = tqdm(total=self.iterations, desc=self.label, disable=not ctx.progress, leave=False)
        batches = calibration_batches(ctx, self.batch_size)
        for step in range(self.iterations):
            images = next(batches)
            with watch.time("teacher"), torch.no_grad(), self._hooks(teacher, blocks) as t_blocks:
                t_logits = teacher(images)
            with watch.time("student"), self._hooks(model, blocks) as s_blocks:
                s_logits = model(images)
                rec = kd_kl(s_logits, t_logits, self.temperature)
                if blocks:
                    rec = rec + self.block_loss_weight * block_mse(s_blocks.outputs, t_blocks.outputs)
                ensure_finite(rec.item(), "FCPTS reconstruction loss", step)
                optimizer.zero_grad(set_to_none=True)
                rec.backward()
            with watch.time("bridge"):
                per_layer = layer_sparsities(layers, gates, self.bridge, self.kde_bandwidth)
                s_global = global_sparsity(layers, per_layer)
                l_c = sparsity_loss(s_global, target, self.sparsity_loss)
                ensure_finite(l_c.item(), "FCPTS sparsity loss", step)
                (self.sparsity_lambda * l_c).backward()
            last = {"rec_loss": rec.item(), "sparsity_loss": l_c.item(), "global_sparsity": s_global.item()}
            with watch.time("student"):
                optimizer.step()
            scheduler.step_update(step + 1)
            bar.update()
            bar.set_postfix(rec=f"{last['rec_loss']:.4f}", sp=f"{last['sparsity_loss']:.2e}",
                            S=f"{last['global_sparsity']:.4f}", refresh=False)
            if step % self.log_every == 0 or step == self.iterations - 1:
                history.extend(self._trajectory_rows(step, layers, gates, per_layer))
                ctx.log_metrics({f"fcpts/{k}": v for k, v in last.items()}
                                | {"fcpts/lr": optimizer.param_groups[0]["lr"]}, step)
        bar.close()
        return history, watch, last

    @staticmethod
    def _hooks(model: nn.Module, blocks: list[str]):
        return BlockOutputs(model, blocks) if blocks else nullcontext(None)

    @staticmethod
    def _trajectory_rows(step: int, layers: list[PrunableLayer], gates: list[ThresholdMask],
                         per_layer: list[torch.Tensor]) -> list[dict[str, Any]]:
        """Per-layer sparsity and threshold at this iteration (before the optimiser step's update)."""
        return [{"iteration": step, "layer": ly.name, "sparsity": s.item(), "threshold": g.threshold().item()}
                for ly, g, s in zip(layers, gates, per_layer, strict=True)]
