"""Dynamic sparse training: distillation of the masked student with masks that move.

At every forward each layer keeps its largest |W| (a fixed count per layer: the searched sparsity), the
gradient reaches every weight straight through, and pruned weights get an extra decay (SR-STE), so weights
can leave and re-enter the mask (the reference's `utils/conv_type.py: GetWeightSubnet`). The loop is the
reference's schedule: SGD with momentum, timm cosine stepped per iteration after one warmup epoch from 0.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from algorithms.base import PruneContext
from algorithms.unipts.objective import ObjectiveSettings, distillation_loss
from ptsbench.data import CalibrationSet
from ptsbench.errors import ensure_finite
from ptsbench.settings import NON_NEGATIVE, NON_NEGATIVE_COUNT, OPTIONAL_POSITIVE, Range, Settings, option
from ptsbench.toolkit.distill import tau_schedule
from ptsbench.toolkit.sparsity import PrunableLayer, magnitude_mask, topk_magnitude_mask
from ptsbench.train import random_translate_flip

log = logging.getLogger(__name__)

AUGMENT_MAX_SHIFT = 2  # pixels; the harness's in-memory stand-in for the reference's RandomResizedCrop


# ================================================================================= masks that move


class _MaskedStraightThrough(torch.autograd.Function):
    """W_eff = W * M; dL/dW = dL/dW_eff + decay * (1 - M) * W (dense STE with SR-STE decay)."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, mask: torch.Tensor, decay: float) -> torch.Tensor:
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay
        return weight * mask

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        weight, mask = ctx.saved_tensors
        return grad_output + ctx.decay * (1.0 - mask) * weight, None, None


class DynamicMagnitudeMask(nn.Module):
    """Parametrization for dynamic sparse training: at every forward, keep the largest |W| (a fixed count
    per layer), pass gradients to all weights, and decay the pruned ones so the mask can move both ways."""

    def __init__(self, n_zero: int, decay: float, mask: torch.Tensor):
        super().__init__()
        self.n_zero, self.decay = int(n_zero), float(decay)
        self.register_buffer("mask", mask.detach().clone())
        self.threshold: torch.Tensor | None = None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # A new tensor, not an in-place update: the previous step's autograd graph saved the old mask.
        self.mask, self.threshold = topk_magnitude_mask(weight, self.n_zero, self.threshold)
        return _MaskedStraightThrough.apply(weight, self.mask, self.decay)


def attach_dynamic_masks(layers: list[PrunableLayer], counts: dict[str, int], decay: float) -> None:
    for ly in layers:
        mask = magnitude_mask(ly.weight, counts[ly.name])
        dynamic = DynamicMagnitudeMask(counts[ly.name], decay, mask)
        parametrize.register_parametrization(ly.module, "weight", dynamic)


@torch.no_grad()
def current_masks(layers: list[PrunableLayer]) -> dict[str, torch.Tensor]:
    """Each layer's mask for its current weights (reading the weight runs the parametrization)."""
    masks = {}
    for ly in layers:
        ly.module.weight  # noqa: B018 - recomputes a dynamic mask from the current weights
        masks[ly.name] = ly.module.parametrizations.weight[0].mask.clone()
    return masks


# ==================================================================================== training loop


def reference_optimizer_defaults(model: nn.Module) -> tuple[float, float]:
    """(lr, weight decay) of the reference configs: 0.05 / 4e-5 for MobileNetV2, 0.01 / 1e-4 otherwise
    (the ResNet setting, also used for architectures the paper did not train)."""
    architecture = str(getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__)
    if "mobilenetv2" in architecture.lower():
        return 0.05, 4e-5
    return 0.01, 1e-4


def trains(settings: TrainSettings) -> bool:
    """Whether training runs (epochs > 0): its keys other than `epochs` are recorded only then."""
    return settings.epochs > 0


def auto(value: float | None) -> float | str:
    """A null lr or weight decay as records show it: 'auto' (the reference's value for the model)."""
    return "auto" if value is None else value


@dataclass(frozen=True)
class TrainSettings(Settings):
    """The `training` node: distillation with dynamic sparse training (reference: 100 epochs of batch 64,
    SGD m0.9, cosine per iteration after a linear warmup, SR-STE decay 5e-5). `lr` and `weight_decay` null
    pick the reference value for the model (`reference_optimizer_defaults`)."""

    # Recorded: `epochs` always, the other keys only when training runs (null lr / weight_decay as 'auto').
    # over the calibration set; 0 stops after the search (masks + BN re-estimation); the budget scales it
    epochs: int = option(100, NON_NEGATIVE_COUNT)
    batch_size: int = option(64, Range(2, whole=True), when=trains)
    # null: 0.05 for MobileNetV2, 0.01 otherwise (reference configs)
    lr: float | None = option(None, OPTIONAL_POSITIVE, when=trains, shown=auto)
    # null: 4e-5 for MobileNetV2, 1e-4 otherwise
    weight_decay: float | None = option(None, Range(0, nullable=True), when=trains, shown=auto)
    momentum: float = option(0.9, Range(0, 1, high_open=True), when=trains)
    # timm cosine per iteration, linear warmup from 0
    warmup_epochs: float = option(1.0, NON_NEGATIVE, when=trains)
    min_lr: float = option(0.0, NON_NEGATIVE, record=False)
    augment: bool = option(True, when=trains)  # random 2-pixel shifts and flips of the calibration images
    dst: bool = option(True, when=trains)  # false: masks fixed at the searched allocation (ablation)
    # extra decay of pruned weights: grad += lambda * (1 - M) * W; recorded with dst only
    srste_decay: float = option(5e-5, NON_NEGATIVE, when=lambda t: trains(t) and t.dst)
    # re-estimate BatchNorm statistics on the calibration set after training
    bn_recalibration: bool = option(False, when=trains)


def shuffled_epoch(calib: CalibrationSet, batch_size: int,
                   generator: torch.Generator) -> Iterator[torch.Tensor]:
    """The images of one shuffled epoch in full batches (a batch of one would break BatchNorm in train
    mode)."""
    for images, _ in calib.batches(batch_size, shuffle=True, generator=generator, drop_last=True):
        yield images


def distill_sparse(model: nn.Module, teacher: nn.Module, layers: list[PrunableLayer], calib: CalibrationSet,
                   settings: TrainSettings, objective: ObjectiveSettings, ctx: PruneContext,
                   shuffle: torch.Generator, augment: torch.Generator) -> list[dict[str, float]]:
    """Train the masked student to match the dense teacher; returns one history row per epoch.

    The teacher is the frozen dense model in train mode (its BN uses batch statistics, as in the
    reference); there is no label loss. The learning rate follows timm's per-iteration cosine with one
    warmup epoch from 0.
    """
    batch_size = min(settings.batch_size, len(calib))
    steps_per_epoch = len(calib) // batch_size
    total = settings.epochs * steps_per_epoch
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    scheduler = CosineLRScheduler(optimizer, t_initial=total, lr_min=settings.min_lr,
                                  warmup_t=int(settings.warmup_epochs * steps_per_epoch), warmup_lr_init=0.0,
                                  t_in_epochs=False)
    device = calib.data.images.device
    model.train()
    teacher.train()
    history: list[dict[str, float]] = []
    before = current_masks(layers)
    mask_entries = sum(m.numel() for m in before.values())
    step = 0
    bar = tqdm(total=total, desc="UniPTS distillation", disable=not ctx.progress, leave=False,
               mininterval=1.0)
    for epoch in range(settings.epochs):
        tau = tau_schedule(epoch, objective.tau_start, objective.tau_decay)
        epoch_start, running = time.perf_counter(), 0.0
        for images in shuffled_epoch(calib, batch_size, shuffle):
            if settings.augment:
                images = random_translate_flip(images.cpu(), AUGMENT_MAX_SHIFT, True, augment).to(device)
            with torch.no_grad():
                teacher_logits = teacher(images)
            loss = distillation_loss(objective.kind, model(images), teacher_logits, objective.temperature,
                                     tau)
            running += ensure_finite(loss.item(), "UniPTS distillation loss", step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # After step i the reference sets the rate of t = i (`trainer.py: train`,
            # step_update(epoch * num_batches + i)): step i + 1 runs at lr(i), the first two at lr(0) = 0.
            scheduler.step_update(step)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        after = current_masks(layers)
        changed = sum(int((after[k] != before[k]).sum()) for k in after) / mask_entries
        before = after
        row = {"epoch": epoch, "tau": tau, "loss": running / steps_per_epoch, "mask_change": changed,
               "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - epoch_start}
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", mask_change=f"{changed:.4f}", refresh=False)
        ctx.log_metrics({"unipts/epoch": epoch, "unipts/loss": row["loss"], "unipts/mask_change": changed,
                         "unipts/tau": tau, "unipts/lr": row["lr"]}, None)
        log.debug("UniPTS epoch %d: loss %.4f, mask change %.5f, tau %.3f", epoch, row["loss"], changed, tau)
    bar.close()
    return history
