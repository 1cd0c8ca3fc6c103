"""UniPTS (Xie et al., CVPR 2024): post-training sparsity in three stages.

1. **Reduce-regrow search of the sparsity distribution.** Every layer is first reduced to P + delta; a
   regrow budget of delta * N weights is then handed back in proportion to softmax(genome), one gene per
   layer. A genetic algorithm searches the genome; a candidate's fitness is its top-1 on a calibration
   fitness set after its BatchNorm statistics are re-estimated (with a little input noise), because
   without that re-estimation a pruned network's accuracy says more about stale BN statistics than about
   the distribution.
2. **Base-decayed distillation.** KL from the dense teacher (temperature T) to the student whose log-
   probabilities are divided by tau_e = 8 * 0.99^e: a logarithm in base e^tau whose base decays over
   training, so the loss scale grows as the student approaches the teacher.
3. **Dynamic sparse training** at the searched per-layer sparsities: masks are recomputed from weight
   magnitudes at every step, gradients reach pruned weights straight through, and pruned weights get an
   extra decay (SR-STE), so weights can leave and re-enter the mask.

The package follows those parts: `decoding` (genome -> layer sparsities), `search` (the genetic
algorithm and its fitness), `objective` (base-decayed distillation), `dst` (dynamic sparse training) and
this module, the method itself. Each stage can be switched off for the paper's ablation
(`search=false` uses `fallback_allocation`, `objective=kl` uses plain Hinton KD, `dst=false` keeps the
masks fixed, `epochs=0` stops after the search). Where the released code (xjjxmu/UniPTS) differs from what we do, the docstrings say so; see
shared/reference/pts-algorithms.md section 2.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import pandas as pd
import torch
from torch import nn

from algorithms.base import PruneContext, PruneResult, PTSAlgorithm
from algorithms.unipts.decoding import decode_genome
from algorithms.unipts.dst import (
    TrainSettings,
    attach_dynamic_masks,
    current_masks,
    distill_sparse,
    reference_optimizer_defaults,
)
from algorithms.unipts.objective import OBJECTIVES
from algorithms.unipts.search import (
    CandidateProbe,
    SearchOutcome,
    SearchSettings,
    draw_fitness_set,
    genetic_search,
)
from ptsbench.bn import recalibrate_batchnorm
from ptsbench.data import CalibrationSet
from ptsbench.errors import ConfigError, unknown_choice
from ptsbench.sparsity import (
    PrunableLayer,
    allocate,
    apply_masks,
    bake_masks,
    check_sparsity,
    magnitude_masks,
    rates,
)

log = logging.getLogger(__name__)

FALLBACK_ALLOCATIONS = ("erk", "uniform")
# (population, generations, epochs) of the named budgets: the reference code's and conf/algorithm/unipts_quick.yaml's.
BUDGETS = {"reference": (25, 25, 100), "quick": (8, 5, 5)}

# Independent random streams, each from ctx.generator(offset).
STREAM_GENOME, STREAM_FITNESS_SET, STREAM_BN_NOISE, STREAM_SHUFFLE, STREAM_AUGMENT = 101, 102, 103, 104, 105


class UniPTS(PTSAlgorithm):
    """Reduce-regrow evolutionary search, base-decayed distillation, dynamic sparse training.

    Defaults are the reference's (xjjxmu/UniPTS). Its calibration set is 10,240 ImageNet images; the
    harness draws calib.n (1,024 by default) and the algorithm config cannot change that, so the paper
    setting needs `calib.n=10240`. The fitness/BN set is drawn from the calibration set with replacement
    (`fitness_set_size` draws; null uses the calibration set as it is). `lr` and `weight_decay` null pick
    the reference value for the model (0.05 / 4e-5 for MobileNetV2, 0.01 / 1e-4 otherwise).

    Deliberate differences from the reference: decoding re-solves clipped layers so the global sparsity is
    exactly P; the GA keeps its random immigrants and one elite; fitness images are not augmented (the
    reference re-augments them on every pass, so its fitness is noisy) and BN statistics are re-estimated
    as exact averages (ptsbench.bn) rather than a momentum average; training augments the calibration
    images with 2-pixel shifts and flips instead of RandomResizedCrop. `channels_last` only changes speed.
    `bn_recalibration` (off in the reference) re-estimates BatchNorm statistics on the calibration set after
    training: after a short run the running statistics are a momentum average over a few batches (or, after
    a handful of steps, still mostly the dense model's), which do not fit the final pruned weights.

    As in the reference: crossover pairs two different parents, the population bred by the last
    generation is scored before the best is picked, and the learning rate of step i + 1 is the schedule's
    value at i. At sparsity 0 the search is skipped and the run is the objective and training alone (a
    control). Labels and records name the budget (`budget`: reference, quick or custom, and the counts).
    """

    name = "unipts"

    def __init__(self, search: bool = True, fallback_allocation: str = "erk", delta: float = 0.05,
                 population_size: int = 25, generations: int = 25, num_parents: int = 10,
                 mutation_prob: float = 0.1, immigrants: int = 1, elites: int = 1,
                 fitness_set_size: int | None = 10240, bn_noise_std: float = 1e-6,
                 objective: str = "base_decayed", temperature: float = 4.0, tau_start: float = 8.0,
                 tau_decay: float = 0.99, dst: bool = True, srste_decay: float = 5e-5, epochs: int = 100,
                 batch_size: int = 64, lr: float | None = None, weight_decay: float | None = None,
                 momentum: float = 0.9, warmup_epochs: float = 1.0, min_lr: float = 0.0, augment: bool = True,
                 bn_recalibration: bool = False, channels_last: bool = True):
        if fallback_allocation not in FALLBACK_ALLOCATIONS:
            raise unknown_choice("algorithm.fallback_allocation", fallback_allocation, FALLBACK_ALLOCATIONS)
        if objective not in OBJECTIVES:
            raise unknown_choice("algorithm.objective", objective, OBJECTIVES)
        if not 0.0 < float(delta) < 1.0:
            raise ConfigError(f"algorithm.delta={delta} must be in (0, 1): layers are reduced to P + delta.")
        if fitness_set_size is not None and int(fitness_set_size) < 1:
            raise ConfigError(f"algorithm.fitness_set_size={fitness_set_size} must be a positive count or null.")
        if int(epochs) < 0 or int(batch_size) < 2:
            raise ConfigError(f"algorithm.epochs={epochs} must be >= 0 and algorithm.batch_size={batch_size} >= 2.")
        if float(temperature) <= 0 or float(tau_start) <= 0 or float(tau_decay) <= 0:
            raise ConfigError("algorithm.temperature, tau_start and tau_decay must be positive.")
        self.search, self.fallback_allocation, self.delta = bool(search), fallback_allocation, float(delta)
        self.search_settings = SearchSettings(int(population_size), int(generations), int(num_parents),
                                              float(mutation_prob), int(immigrants), int(elites))
        self.search_settings.check()
        self.fitness_set_size = None if fitness_set_size is None else int(fitness_set_size)
        self.bn_noise_std = float(bn_noise_std)
        self.objective, self.temperature = objective, float(temperature)
        self.tau_start, self.tau_decay = float(tau_start), float(tau_decay)
        self.dst, self.srste_decay = bool(dst), float(srste_decay)
        self.epochs, self.batch_size = int(epochs), int(batch_size)
        self.lr = None if lr is None else float(lr)
        self.weight_decay = None if weight_decay is None else float(weight_decay)
        self.momentum, self.warmup_epochs, self.min_lr = float(momentum), float(warmup_epochs), float(min_lr)
        self.augment = bool(augment)
        self.bn_recalibration = bool(bn_recalibration)
        self.channels_last = bool(channels_last)

    # ------------------------------------------------------------------------------------- description

    def options(self) -> dict[str, Any]:
        s = self.search_settings
        opts: dict[str, Any] = {"budget": self.budget, "search": self.search}
        if self.search:
            opts.update(delta=self.delta, population_size=s.population, generations=s.generations,
                        num_parents=s.parents, mutation_prob=s.mutation_prob, immigrants=s.immigrants,
                        elites=s.elites, bn_noise_std=self.bn_noise_std)
        else:
            opts["fallback_allocation"] = self.fallback_allocation
        opts.update(fitness_set_size=self.fitness_set_size, epochs=self.epochs)
        if self.epochs > 0:
            opts.update(objective=self.objective, temperature=self.temperature, tau_start=self.tau_start,
                        tau_decay=self.tau_decay, dst=self.dst, batch_size=self.batch_size,
                        lr=self.lr if self.lr is not None else "auto",
                        weight_decay=self.weight_decay if self.weight_decay is not None else "auto",
                        momentum=self.momentum, warmup_epochs=self.warmup_epochs, augment=self.augment,
                        bn_recalibration=self.bn_recalibration)
            if self.dst:
                opts["srste_decay"] = self.srste_decay
        return opts

    @property
    def label(self) -> str:
        parts = [self.name]
        if not self.search:
            parts.append(f"nosearch-{self.fallback_allocation}")
        if self.epochs == 0:
            parts.append("notrain")
        else:
            if self.objective != "base_decayed":
                parts.append(self.objective)
            if not self.dst:
                parts.append("nodst")
        return "-".join(parts + self.budget_tags())

    @property
    def budget(self) -> str:
        """'reference' (the code's 25 x 25 search, 100 epochs), 'quick' (8 x 5, 5 epochs) or 'custom'."""
        counts = (self.search_settings.population, self.search_settings.generations, self.epochs)
        return next((name for name, preset in BUDGETS.items() if preset == counts), "custom")

    def budget_tags(self) -> list[str]:
        """What a label says of the budget: nothing for the reference one (as FCPTS's labels), else its
        name and the population x generations and epochs, so a quick run and a reference run (or a preset
        whose counts were overridden) never share a row in a table."""
        if self.budget == "reference":
            return []
        tags = [self.budget] if self.budget != "custom" else []
        if self.search:
            tags.append(f"{self.search_settings.population}x{self.search_settings.generations}")
        if self.epochs > 0:
            tags.append(f"{self.epochs}ep")
        return tags

    def validate(self, layers: list[PrunableLayer], target: float) -> None:
        target = check_sparsity(target)
        if self.search and target + self.delta > 1.0 + 1e-9:
            raise ConfigError(
                f"UniPTS reduces every layer to sparsity + delta = {target} + {self.delta} > 1. "
                f"Use algorithm.delta<={1.0 - target:.4g} for this target."
            )

    # ------------------------------------------------------------------------------------------ method

    def prune(self, model: nn.Module, layers: list[PrunableLayer], target: float, ctx: PruneContext) -> PruneResult:
        self.validate(layers, target)
        was_training = model.training
        if self.channels_last:  # NHWC convolutions: markedly faster for CNNs on CPU, restored at the end
            model.to(memory_format=torch.channels_last)
        fitness_set = draw_fitness_set(ctx.calib, self.fitness_set_size, ctx.generator(STREAM_FITNESS_SET))
        stats: dict[str, Any] = {"budget": self.budget, "fitness_set_images": len(fitness_set),
                                 "calib_images": len(ctx.calib)}
        tables: dict[str, pd.DataFrame] = {}

        # 1. The sparsity distribution. At sparsity 0 there is nothing to distribute (every genome decodes
        # to dense layers), so the search is skipped: the run is the objective and training alone, the
        # control that separates what distillation does from what pruning costs.
        if target == 0.0:
            counts = {ly.name: 0 for ly in layers}
            stats["search_skipped"] = "sparsity 0: every layer stays dense"
        elif self.search:
            outcome = self.search_distribution(model, layers, target, fitness_set, ctx)
            counts = outcome.counts
            stats.update(self.search_stats(outcome))
            tables["search_history"] = pd.DataFrame(outcome.history)
            tables["searched_allocation"] = self.allocation_table(layers, target, outcome)
        else:
            counts = allocate(layers, target, self.fallback_allocation)

        # 2 + 3. Distillation with dynamic (or fixed) masks, starting from the dense weights.
        if self.epochs > 0:
            history = self.train(model, layers, counts, ctx)
            tables["training_history"] = pd.DataFrame(history)
            stats.update(self.train_stats(history, model))
            masks = current_masks(layers)
            if self.bn_recalibration:
                stats["bn_layers_recalibrated"] = recalibrate_batchnorm(model, ctx.calib, ctx.calib.data.images.device,
                                                                        self.batch_size)
        else:
            masks = magnitude_masks(layers, counts)
            apply_masks(layers, masks)
            stats["bn_layers_recalibrated"] = recalibrate_batchnorm(
                model, fitness_set, fitness_set.data.images.device, self.batch_size, noise_std=self.bn_noise_std,
                generator=ctx.generator(STREAM_BN_NOISE))
        bake_masks(model)
        model.to(memory_format=torch.contiguous_format)
        model.train(was_training)
        return PruneResult(model=model, allocation=rates(layers, counts), masks=masks, stats=stats, tables=tables)

    def search_distribution(self, model: nn.Module, layers: list[PrunableLayer], target: float,
                            fitness_set: CalibrationSet, ctx: PruneContext) -> SearchOutcome:
        """The reduce-regrow genetic search on the pretrained weights (no training during the search)."""
        probe = CandidateProbe(model, layers, fitness_set, self.batch_size, self.bn_noise_std,
                               ctx.generator(STREAM_BN_NOISE))
        with probe:
            outcome = genetic_search(
                decode=lambda genome: decode_genome(genome, layers, target, self.delta), score=probe,
                genes=len(layers), target=target, settings=self.search_settings,
                generator=ctx.generator(STREAM_GENOME), progress=ctx.progress, log_metrics=ctx.log_metrics)
        log.info("UniPTS search: best fitness %.2f%% after %d generations (%d candidates scored, %.2f s each)",
                 outcome.fitness, self.search_settings.generations, outcome.evaluations,
                 outcome.seconds / max(outcome.evaluations, 1))
        return outcome

    def train(self, model: nn.Module, layers: list[PrunableLayer], counts: dict[str, int],
              ctx: PruneContext) -> list[dict[str, float]]:
        """Attach the masks (dynamic or fixed) and distil from a frozen copy of the dense model."""
        teacher = copy.deepcopy(model).requires_grad_(False)
        if self.dst:
            attach_dynamic_masks(layers, counts, self.srste_decay)
        else:
            apply_masks(layers, magnitude_masks(layers, counts))
        lr, weight_decay = self.resolved_optimizer(model)
        settings = TrainSettings(self.epochs, self.batch_size, lr, weight_decay, self.momentum, self.warmup_epochs,
                                 self.min_lr, self.objective, self.temperature, self.tau_start, self.tau_decay,
                                 self.augment)
        history = distill_sparse(model, teacher, layers, ctx.calib, settings, ctx,
                                 ctx.generator(STREAM_SHUFFLE), ctx.generator(STREAM_AUGMENT))
        last = history[-1]
        log.info("UniPTS distillation: %d epochs, final loss %.4f, mask change in the last epoch %.5f, %.1f s/epoch",
                 self.epochs, last["loss"], last["mask_change"], sum(r["seconds"] for r in history) / len(history))
        return history

    def resolved_optimizer(self, model: nn.Module) -> tuple[float, float]:
        default_lr, default_wd = reference_optimizer_defaults(model)
        return (self.lr if self.lr is not None else default_lr,
                self.weight_decay if self.weight_decay is not None else default_wd)

    # ------------------------------------------------------------------------------------------ records

    def allocation_table(self, layers: list[PrunableLayer], target: float, outcome: SearchOutcome) -> pd.DataFrame:
        reduced = target + self.delta
        share = torch.softmax(outcome.genome, dim=0).tolist()
        return pd.DataFrame({
            "name": [ly.name for ly in layers],
            "params": [ly.numel for ly in layers],
            "gene": outcome.genome.tolist(),
            "softmax_share": share,
            "regrown": [round(reduced * ly.numel) - outcome.counts[ly.name] for ly in layers],
            "sparsity": [outcome.counts[ly.name] / ly.numel for ly in layers],
        })

    def search_stats(self, outcome: SearchOutcome) -> dict[str, Any]:
        return {
            "search_population_size": self.search_settings.population,
            "search_generations": self.search_settings.generations,
            "search_populations_scored": len(outcome.history),
            "search_best_fitness": outcome.fitness,
            "search_constant_genome_fitness": outcome.constant_fitness,
            "search_candidates_scored": outcome.evaluations,
            "search_cache_hits": outcome.cache_hits,
            "search_seconds": outcome.seconds,
            "search_seconds_per_candidate": outcome.seconds / max(outcome.evaluations, 1),
        }

    def train_stats(self, history: list[dict[str, float]], model: nn.Module) -> dict[str, Any]:
        lr, weight_decay = self.resolved_optimizer(model)
        seconds = sum(r["seconds"] for r in history)
        return {
            "train_epochs": len(history),
            "train_lr": lr,
            "train_weight_decay": weight_decay,
            "train_final_loss": history[-1]["loss"],
            "train_loss_per_epoch": [r["loss"] for r in history],
            "train_mask_change_per_epoch": [r["mask_change"] for r in history],
            "train_seconds": seconds,
            "train_seconds_per_epoch": seconds / len(history),
        }

