"""FCPTS: fine-grained controllable post-training sparsity (Gong et al., AAAI 2024, arXiv 2405.05808).

The method, as `FCPTS.prune` runs it:

1. **One learnable threshold per layer** (`thresholds`). Layer l keeps the weights with |w| > t_l,
   t_l = sigmoid(s_l); the thresholds start at the ERK allocation of the target P.
2. **The bridge function** S_l(t_l) (`bridge`): the exact fraction of layer l's weights at or below t_l
   in the forward pass, the density of |w| at t_l as its derivative, so the global sparsity can be
   steered by gradient descent.
3. **The controllable objective** L = L_rec + lambda * |S - P|, S the parameter-weighted mean of the
   layer sparsities: thresholds are learned jointly over the whole network, so layers trade sparsity
   against each other instead of each being fixed in advance.
4. **Reconstruction by distillation** from the frozen dense model (KL on logits at temperature 4,
   optional block-output MSE), training thresholds, weights and BatchNorm affine parameters on
   (augmented) calibration batches (`calibration`).
5. **An exact ending.** The soft objective holds S near P but not on it, so one logit shift shared by all
   thresholds lands the count on round(P * N); where that changes the masks the network was trained
   with, BatchNorm statistics are re-estimated for the masks it will run with.

Paper vs released code (reference digest, section 1.3) are two presets of the same class: `fcpts`
(the paper: Gaussian-KDE bridge, the reconstruction loss reaches the thresholds through a
straight-through mask) and `fcpts_code` (the code: 100-bin histogram bridge, mask built under no_grad,
so thresholds move only through the sparsity loss). Everything else is the released code's recipe.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from timm.scheduler import CosineLRScheduler
from torch import nn
from tqdm.auto import tqdm

from algorithms.base import PruneContext, PruneResult, PTSAlgorithm
from algorithms.fcpts.bridge import BANDWIDTHS, BRIDGES
from algorithms.fcpts.calibration import calibration_stream
from algorithms.fcpts.thresholds import (
    SPARSITY_LOSSES,
    THRESHOLD_GRADS,
    Correction,
    ThresholdMask,
    attach_thresholds,
    count_masks,
    exact_counts,
    global_sparsity,
    layer_magnitudes,
    layer_size,
    layer_sparsities,
    sparsity_loss,
    zeros_at_thresholds,
)
from ptsbench.errors import ConfigError, ensure_finite
from ptsbench.settings import (
    COUNT,
    NON_NEGATIVE,
    POSITIVE,
    Range,
    Settings,
    budget_option,
    count_text,
    node,
    option,
    read_budget,
    scaled,
)
from ptsbench.toolkit.bn import recalibrate_batchnorm
from ptsbench.toolkit.distill import BlockOutputs, block_mse, find_blocks, kd_kl
from ptsbench.toolkit.sparsity import (
    PrunableLayer,
    apply_masks,
    bake_masks,
    counts_from_rates,
    erk_allocation,
    rates,
)

log = logging.getLogger(__name__)

REFERENCE_BATCH = 64  # the batch the reference lr is quoted for (0.04 x 64 / 256 = 0.01)
REFERENCE_ITERATIONS = 1600  # 100 epochs x 16 batches of 64 images
QUICK_ITERATIONS = 64  # the quick presets' budget (CPU benchmarks)
# ctx.generator streams (ptsbench/streams.py): batch order, torch's RNG, crops
DATA_STREAM, RNG_STREAM, AUGMENT_STREAM = "fcpts.data", "fcpts.torch", "fcpts.augment"


def budget_name(iterations: int) -> str:
    """'reference' (1,600 iterations), 'quick' (64), or the fraction of the reference, e.g. '0.25x'."""
    if iterations == REFERENCE_ITERATIONS:
        return "reference"
    if iterations == QUICK_ITERATIONS:
        return "quick"
    return f"{iterations / REFERENCE_ITERATIONS:.4g}x"


@dataclass
class Stopwatch:
    """Seconds spent per phase of an iteration (on CUDA the split is approximate: kernels run async)."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def time(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def frozen_teacher(model: nn.Module) -> nn.Module:
    """A deep copy of the dense model, without gradients, in train() mode like the student: the reference
    keeps both in BatchNorm train mode, so both normalise with the same batch's statistics.

    Its outputs are recomputed every step rather than cached: in train mode they depend on which images
    share the batch, and batches are reshuffled (and re-augmented) every epoch as in the reference.
    """
    teacher = copy.deepcopy(model)
    teacher.requires_grad_(False)
    return teacher.train()


@dataclass(frozen=True)
class OptimizationSettings(Settings):
    """The `optimization` node: the released code's recipe (run.sh): 1,600 SGD steps of batch 64 (100
    epochs of 1,024 images), lr 0.04 x 64/256, momentum 0.9, weight decay 3e-4, one warmup epoch, then
    cosine per iteration; RandomResizedCrop + flip on every batch. algorithm.budget scales the steps."""

    iterations: int = option(REFERENCE_ITERATIONS, COUNT)  # the reference budget (100 epochs x 16 batches)
    # full batches only (drop_last); needs calib.n >= batch_size
    batch_size: int = option(REFERENCE_BATCH, COUNT)
    lr: float = option(0.01, NON_NEGATIVE)  # SGD at batch 64 (code: 0.04 x 64/256), scaled by batch_size / 64
    momentum: float = option(0.9, Range(0, 1, high_open=True), record=False)
    # weights, biases and BatchNorm affine; thresholds get none
    weight_decay: float = option(3e-4, NON_NEGATIVE, record=False)
    # linear warmup from 0, then timm cosine to 0, stepped per iteration
    warmup_epochs: float = option(1.0, NON_NEGATIVE, record=False)
    # RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, bilinear) + flip per batch, as the code
    augment: bool = True

    @property
    def scaled_lr(self) -> float:
        return self.lr * self.batch_size / REFERENCE_BATCH


@dataclass(frozen=True)
class BridgeSettings(Settings):
    """The `bridge` node: how the layer sparsity S_l(t_l) gets its slope, and what reaches the thresholds."""

    # dS/dt estimator: kde (paper: Gaussian KDE of |w|) | histogram (code: 100 bins of signed w)
    kind: str = option("kde", BRIDGES, record="bridge")
    # silverman | scott, on the layer's signed weights (KDE of |w| reflected at 0); with kind=kde
    kde_bandwidth: str = option("silverman", BANDWIDTHS, when=lambda bridge: bridge.kind == "kde")
    threshold_grad: str = option("ste", THRESHOLD_GRADS)  # ste (paper) | sparsity_only (code)


@dataclass(frozen=True)
class ObjectiveSettings(Settings):
    """The `objective` node: L = KL(teacher || student) at T [+ w * block MSE] + lambda * |S - P|."""

    sparsity_loss: str = option("abs", SPARSITY_LOSSES)  # abs: |S - P| (code's run.sh) | pow2: (S - P)^2
    sparsity_lambda: float = option(1.0, NON_NEGATIVE)
    temperature: float = option(4.0, POSITIVE)  # KL distillation on logits from the frozen dense model
    # > 0 adds MSE on block outputs (the first code release's layer loss); 0 = off
    block_loss_weight: float = option(0.0, NON_NEGATIVE)


@dataclass(frozen=True)
class FCPTSSettings(Settings):
    """The whole `algorithm` node of FCPTS: every default lives here; conf/algorithm/fcpts*.yaml start from it
    (Hydra's ConfigStore, `schema/algorithm/fcpts`) and hold only what a preset changes."""

    budget: float | str = budget_option()  # factor on optimization.iterations (reference = 1)
    # thresholds start at the ERK allocation of the target, density ~ (sum dims / prod dims) ** power_scale
    erk_power_scale: float = option(1.0, POSITIVE, when=lambda s: s.erk_power_scale != 1.0, shown=float)
    bn_recalibration: bool = True  # re-estimate BatchNorm when the exact final correction changes the masks
    # iterations between allocation_trajectory rows and W&B metrics
    log_every: int = option(20, COUNT, record=False)
    channels_last: bool = option(True, record=False)  # NHWC convolutions (faster for CNNs on CPU; speed only)
    optimization: OptimizationSettings = node(OptimizationSettings)
    bridge: BridgeSettings = node(BridgeSettings)
    objective: ObjectiveSettings = node(ObjectiveSettings)


class FCPTS(PTSAlgorithm):
    """Learn per-layer thresholds (hence the allocation) and the weights jointly, under a global target."""

    name = "fcpts"
    settings = FCPTSSettings  # the constructor's keys

    def __init__(self, **config: Any):
        given = FCPTSSettings.read(config, "algorithm")
        self.budget_scale = read_budget(given.budget)
        optim = given.optimization
        optim = optim.replace(iterations=scaled(optim.iterations, self.budget_scale))
        self.config = given.replace(optimization=optim)
        self.optim, self.bridge, self.objective = optim, given.bridge, given.objective
        self.erk_power_scale = float(given.erk_power_scale)
        self.bn_recalibration = bool(given.bn_recalibration)  # after an exact correction that moved weights
        self.log_every = int(given.log_every)
        self.channels_last = bool(given.channels_last)  # NHWC convolutions: speed only

    def options(self) -> dict[str, Any]:
        """FCPTSSettings's recorded fields, and the budget by name ('reference', 'quick', '0.25x')."""
        return {**self.config.options(), "budget": budget_name(self.optim.iterations)}

    @property
    def family(self) -> str:
        """e.g. 'fcpts-ste-kde' (the paper's mode) or 'fcpts-sparsity_only-hist' (the released code's): the
        two modes and any departure from the recipe (loss, block loss, no augmentation)."""
        parts = ["fcpts", self.bridge.threshold_grad, "kde" if self.bridge.kind == "kde" else "hist"]
        if self.objective.sparsity_loss != "abs":
            parts.append(self.objective.sparsity_loss)
        if self.objective.block_loss_weight > 0:
            parts.append(f"block{self.objective.block_loss_weight:g}")
        if not self.optim.augment:
            parts.append("noaug")
        return "-".join(parts)

    def budget_tags(self) -> list[str]:
        """The iteration count unless it is the reference 1,600 (e.g. '64it' for the quick presets)."""
        return [] if self.optim.iterations == REFERENCE_ITERATIONS else [f"{self.optim.iterations}it"]

    @property
    def budget_fraction(self) -> float:
        return self.optim.iterations / REFERENCE_ITERATIONS

    def budget_work(self) -> str:
        iterations = count_text(self.optim.iterations)
        return f"{iterations} optimisation iterations (reference: {REFERENCE_ITERATIONS:,})"

    def validate(self, layers: list[PrunableLayer], target: float) -> None:
        erk_allocation(layers, target, self.erk_power_scale)

    # ------------------------------------------------------------------------------------ prune

    def prune(self, model: nn.Module, layers: list[PrunableLayer], target: float,
              ctx: PruneContext) -> PruneResult:
        self.validate(layers, target)
        if len(ctx.calib) < self.optim.batch_size:
            raise ConfigError(f"FCPTS needs at least one full batch: calib.n={len(ctx.calib)} is below "
                              f"algorithm.batch_size={self.optim.batch_size}.")
        was_training = model.training
        run = self.start(model, layers, target, ctx)
        init_sparsity = zeros_at_thresholds(layers, run.gates) / sum(layer_size(ly) for ly in layers)

        rng_devices = [ctx.device] if ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(ctx.generator(RNG_STREAM).initial_seed())
            history, last = self._optimise(run, ctx)
        gates, watch = run.gates, run.watch
        del run

        correction, masks = self._exact_ending(model, layers, gates, target)
        bn_layers = self._recalibrate_if_masks_changed(model, correction, ctx)
        model.to(memory_format=torch.contiguous_format)
        model.train(was_training)

        learned = sum(correction.learned_counts.values()) / sum(ly.numel for ly in layers)
        stats = {
            "iterations": self.optim.iterations,
            "budget": budget_name(self.optim.iterations),
            "iterations_per_epoch": len(ctx.calib) // self.optim.batch_size,
            "calib_passes": self.optim.iterations * self.optim.batch_size / len(ctx.calib),
            "lr_scaled": self.optim.scaled_lr,
            "augment": self.optim.augment,
            "init_global_sparsity": init_sparsity,
            "learned_global_sparsity": learned,
            "residual_before_correction": learned - target,
            "correction_logit_shift": correction.logit_shift,
            "correction_weights_moved": correction.weights_moved,
            "bn_recalibrated_layers": bn_layers,
            "final_rec_loss": last["rec_loss"],
            "final_sparsity_loss": last["sparsity_loss"],
            **{f"seconds_{k}": v for k, v in watch.seconds.items()},
            "seconds_per_iteration": sum(watch.seconds.values()) / self.optim.iterations,
        }
        log.info("FCPTS: learned global sparsity %.5f (target %.5f, residual %+.2e), corrected by logit "
                 "shift %+.3e moving %d weights; BatchNorm re-estimated in %d layers", learned, target,
                 learned - target, correction.logit_shift, correction.weights_moved, bn_layers)
        return PruneResult(model=model, allocation=rates(layers, correction.counts), masks=masks, stats=stats,
                           tables={"allocation_trajectory": pd.DataFrame(history)})

    def _init_thresholds(self, layers: list[PrunableLayer], target: float, compiled: bool = False
                         ) -> list[ThresholdMask]:
        """Thresholds that start at the ERK allocation of the target, as the released code's do."""
        counts = counts_from_rates(layers, erk_allocation(layers, target, self.erk_power_scale), target)
        return attach_thresholds(layers, counts, self.bridge.threshold_grad, compiled)

    @staticmethod
    def _exact_ending(model: nn.Module, layers: list[PrunableLayer], gates: list[ThresholdMask], target: float
                      ) -> tuple[Correction, dict[str, torch.Tensor]]:
        """Land exactly on the target (one shared logit shift) and bake the masks into the weights."""
        sorted_abs = layer_magnitudes(layers)
        correction = exact_counts(layers, gates, sorted_abs, target)
        masks = count_masks(layers, sorted_abs, correction.counts)
        del sorted_abs
        apply_masks(layers, masks)  # drops the threshold parametrizations, keeps the trained weights
        bake_masks(model)
        return correction, masks

    def _recalibrate_if_masks_changed(self, model: nn.Module, correction: Correction,
                                      ctx: PruneContext) -> int:
        """Re-estimate BatchNorm statistics on the (unaugmented) calibration set when the correction pruned
        or restored weights the optimisation did not run with: the running statistics gathered during
        training describe the learned masks, not the corrected ones. Returns the BN layers updated."""
        if not self.bn_recalibration or correction.weights_moved == 0:
            return 0
        return recalibrate_batchnorm(model, ctx.calib, ctx.device, batch_size=self.optim.batch_size)

    def _optimizer(self, model: nn.Module, gates: list[ThresholdMask], iters_per_epoch: int
                   ) -> tuple[torch.optim.Optimizer, CosineLRScheduler]:
        """SGD with momentum: thresholds without weight decay, every other parameter (weights, biases,
        BatchNorm affine) with it; timm cosine per iteration after a linear warmup from zero."""
        score_ids = {id(g.score) for g in gates}
        others = [p for p in model.parameters() if id(p) not in score_ids]
        groups = [{"params": others, "weight_decay": self.optim.weight_decay},
                  {"params": [g.score for g in gates], "weight_decay": 0.0}]
        optimizer = torch.optim.SGD(groups, lr=self.optim.scaled_lr, momentum=self.optim.momentum)
        warmup = min(round(self.optim.warmup_epochs * iters_per_epoch), self.optim.iterations - 1)
        scheduler = CosineLRScheduler(optimizer, t_initial=self.optim.iterations, lr_min=0.0, warmup_t=warmup,
                                      warmup_lr_init=0.0, t_in_epochs=False)
        return optimizer, scheduler

    def _batches(self, ctx: PruneContext) -> Iterator[torch.Tensor]:
        augment = ctx.generator(AUGMENT_STREAM) if self.optim.augment else None
        return calibration_stream(ctx.calib, self.optim.batch_size, ctx.device, ctx.generator(DATA_STREAM),
                                  augment)

    def start(self, model: nn.Module, layers: list[PrunableLayer], target: float, ctx: PruneContext
              ) -> Optimisation:
        """Everything before the first iteration: the working memory format, the frozen teacher, the
        thresholds at the ERK allocation, the optimiser and its schedule."""
        if self.channels_last:  # NHWC convolutions: faster for CNNs on CPU; restored at the end (speed only)
            model.to(memory_format=torch.channels_last)
        teacher = frozen_teacher(model)
        gates = self._init_thresholds(layers, target, ctx.compile)
        model.requires_grad_(True).train()
        optimizer, scheduler = self._optimizer(model, gates, len(ctx.calib) // self.optim.batch_size)
        blocks = find_blocks(teacher) if self.objective.block_loss_weight > 0 else []
        return Optimisation(self, model, teacher, layers, gates, target, ctx.compile, optimizer, scheduler,
                            blocks)

    def _optimise(self, run: Optimisation, ctx: PruneContext
                  ) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """The joint optimisation of thresholds, weights and BN affine parameters on calibration batches."""
        history: list[dict[str, Any]] = []
        last: dict[str, float] = {}
        bar = tqdm(total=self.optim.iterations, desc=self.label, disable=not ctx.progress, leave=False)
        batches = self._batches(ctx)
        for step in range(self.optim.iterations):
            with run.watch.time("data"):
                images = next(batches)
            last, per_layer = run.step(step, images)
            bar.update()
            bar.set_postfix(rec=f"{last['rec_loss']:.4f}", sp=f"{last['sparsity_loss']:.2e}",
                            S=f"{last['global_sparsity']:.4f}", refresh=False)
            if step % self.log_every == 0 or step == self.optim.iterations - 1:
                history.extend(self._trajectory_rows(step, run.layers, run.gates, per_layer))
                ctx.log_metrics({f"fcpts/{k}": v for k, v in last.items()}
                                | {"fcpts/lr": run.optimizer.param_groups[0]["lr"]}, step)
        bar.close()
        return history, last

    @staticmethod
    def _hooks(model: nn.Module, blocks: list[str]):
        return BlockOutputs(model, blocks) if blocks else nullcontext(None)

    @staticmethod
    def _trajectory_rows(step: int, layers: list[PrunableLayer], gates: list[ThresholdMask],
                         per_layer: list[torch.Tensor]) -> list[dict[str, Any]]:
        """Per-layer sparsity and threshold at this iteration (before the optimiser step's update)."""
        return [{"iteration": step, "layer": ly.name, "sparsity": s.item(), "threshold": g.threshold().item()}
                for ly, g, s in zip(layers, gates, per_layer, strict=True)]


@dataclass
class Optimisation:
    """The state of one FCPTS optimisation; `step` is one iteration (teacher, student, bridge, update),
    the unit `FCPTS._optimise` loops and the reference benchmark times."""

    algo: FCPTS
    model: nn.Module
    teacher: nn.Module
    layers: list[PrunableLayer]
    gates: list[ThresholdMask]
    target: float
    compiled: bool
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler
    blocks: list[str]
    watch: Stopwatch = field(default_factory=Stopwatch)

    def step(self, step: int, images: torch.Tensor) -> tuple[dict[str, float], list[torch.Tensor]]:
        """One iteration on a batch: the losses it saw and the bridged per-layer sparsities (before the
        update)."""
        objective, bridge, watch = self.algo.objective, self.algo.bridge, self.watch
        with watch.time("teacher"), torch.no_grad(), FCPTS._hooks(self.teacher, self.blocks) as t_blocks:
            t_logits = self.teacher(images)
        with watch.time("student"), FCPTS._hooks(self.model, self.blocks) as s_blocks:
            s_logits = self.model(images)
            rec = kd_kl(s_logits, t_logits, objective.temperature)
            if self.blocks:
                rec = rec + objective.block_loss_weight * block_mse(s_blocks.outputs, t_blocks.outputs)
            ensure_finite(rec.item(), "FCPTS reconstruction loss", step)
            self.optimizer.zero_grad(set_to_none=True)
            rec.backward()
        with watch.time("bridge"):
            per_layer = layer_sparsities(self.layers, self.gates, bridge.kind, bridge.kde_bandwidth,
                                         self.compiled)
            s_global = global_sparsity(self.layers, per_layer)
            l_c = sparsity_loss(s_global, self.target, objective.sparsity_loss)
            ensure_finite(l_c.item(), "FCPTS sparsity loss", step)
            (objective.sparsity_lambda * l_c).backward()
        last = {"rec_loss": rec.item(), "sparsity_loss": l_c.item(), "global_sparsity": s_global.item()}
        with watch.time("student"):
            self.optimizer.step()
        self.scheduler.step_update(step + 1)
        return last, per_layer
