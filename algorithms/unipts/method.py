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
masks fixed, `epochs=0` stops after the search). Where the released code (xjjxmu/UniPTS) differs from
what we do, the docstrings say so; see shared/reference/pts-algorithms.md section 2.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
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
from algorithms.unipts.objective import ObjectiveSettings
from algorithms.unipts.search import (
    CandidateProbe,
    SearchOutcome,
    SearchSettings,
    draw_fitness_set,
    genetic_search,
)
from ptsbench.data import CalibrationSet
from ptsbench.errors import ConfigError
from ptsbench.settings import Settings, check_budget, count_text, node, option, read_budget, scaled
from ptsbench.toolkit.allocations import allocate
from ptsbench.toolkit.bn import recalibrate_batchnorm
from ptsbench.toolkit.sparsity import (
    PrunableLayer,
    apply_masks,
    bake_masks,
    magnitude_masks,
    rates,
)

log = logging.getLogger(__name__)

# (population, generations, epochs) of the named budgets: the reference code's and
# conf/algorithm/unipts_quick.yaml's.
BUDGETS = {"reference": (25, 25, 100), "quick": (8, 5, 5)}


def preset_name(population: int, generations: int, epochs: int) -> str:
    counts = (population, generations, epochs)
    return next((name for name, preset in BUDGETS.items() if preset == counts), "custom")


# Independent random streams, each from ctx.generator(name) (ptsbench/streams.py).
STREAM_GENOME, STREAM_FITNESS_SET, STREAM_BN_NOISE = "unipts.genome", "unipts.fitness_set", "unipts.bn_noise"
STREAM_SHUFFLE, STREAM_AUGMENT = "unipts.shuffle", "unipts.augment"


@dataclass(frozen=True)
class UniPTSSettings(Settings):
    """The whole `algorithm` node of UniPTS: every default lives here (the reference code's budgets);
    conf/algorithm/unipts*.yaml start from it (Hydra's ConfigStore, `schema/algorithm/unipts`) and hold only
    what a preset changes. The objective is recorded only when training runs."""

    # factor on search.generations and training.epochs (reference = 1); recorded as budget_scale unless 1
    budget: float | str = option(1.0, check_budget, record="budget_scale",
                                 when=lambda s: read_budget(s.budget) != 1.0, shown=read_budget)
    channels_last: bool = option(True, record=False)  # NHWC convolutions (faster for CNNs on CPU; speed only)
    search: SearchSettings = node(SearchSettings)  # 1. the sparsity distribution (search.py)
    # 2. distillation (objective.py), recorded only when training runs
    objective: ObjectiveSettings = node(ObjectiveSettings, when=lambda s: s.training.epochs > 0)
    training: TrainSettings = node(TrainSettings)  # 3. dynamic sparse training (dst.py)


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
    as exact averages (ptsbench.toolkit.bn) rather than a momentum average; training augments the calibration
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
    settings = UniPTSSettings  # the constructor's keys

    def __init__(self, **config: Any):
        given = UniPTSSettings.read(config, "algorithm")
        self.budget_scale = read_budget(given.budget)
        search, training = given.search, given.training
        self.preset = preset_name(search.population_size, search.generations, training.epochs)
        # The budget scales the preset's generations and epochs; the population (and so the parents, elites
        # and immigrants it has room for) stays as configured.
        self.search = search.replace(generations=scaled(search.generations, self.budget_scale))
        self.training = training.replace(epochs=scaled(training.epochs, self.budget_scale))
        self.objective = given.objective
        self.config = given.replace(search=self.search, training=self.training)
        self.channels_last = bool(given.channels_last)  # NHWC convolutions: speed only

    # ------------------------------------------------------------------------------------- description

    def options(self) -> dict[str, Any]:
        """UniPTSSettings's recorded fields (the stages that run), and the budget by name."""
        return {"budget": self.budget, **self.config.options()}

    @property
    def family(self) -> str:
        parts = [self.name]
        if not self.search.enabled:
            parts.append(f"nosearch-{self.search.fallback_allocation}")
        if self.training.epochs == 0:
            parts.append("notrain")
        else:
            if self.objective.kind != "base_decayed":
                parts.append(self.objective.kind)
            if not self.training.dst:
                parts.append("nodst")
        return "-".join(parts)

    @property
    def budget(self) -> str:
        """'reference' (the code's 25 x 25 search, 100 epochs), 'quick' (8 x 5, 5 epochs) or 'custom'; a
        budget factor other than 1 is appended ('quick x0.5')."""
        return self.preset + (f" x{self.budget_scale:g}" if self.budget_scale != 1.0 else "")

    @property
    def budget_fraction(self) -> float:
        """The share of the reference's work: search candidates (population x generations) and training
        epochs, each against the reference's, averaged over the stages that run."""
        ref_population, ref_generations, ref_epochs = BUDGETS["reference"]
        shares = []
        if self.search.enabled:
            candidates = self.search.population_size * self.search.generations
            shares.append(candidates / (ref_population * ref_generations))
        if self.training.epochs > 0:
            shares.append(self.training.epochs / ref_epochs)
        return sum(shares) / len(shares) if shares else 0.0

    def budget_work(self) -> str:
        ref_population, ref_generations, ref_epochs = BUDGETS["reference"]
        generations, epochs = count_text(self.search.generations), count_text(self.training.epochs)
        return (f"{generations} search generations of {self.search.population_size} candidates and {epochs} "
                f"training epochs (reference: {ref_generations} generations of {ref_population}, "
                f"{ref_epochs} epochs)")

    def budget_tags(self) -> list[str]:
        """What a label says of the budget: nothing for the reference one (as FCPTS's labels), else its
        name and the population x generations and epochs, so a quick run and a reference run (or a preset
        whose counts were overridden) never share a row in a table."""
        if self.budget == "reference":
            return []
        tags = [self.preset] if self.preset not in ("custom", "reference") else []
        if self.budget_scale != 1.0:
            tags.append(f"x{self.budget_scale:g}")
        if self.search.enabled:
            tags.append(f"{self.search.population_size}x{self.search.generations}")
        if self.training.epochs > 0:
            tags.append(f"{self.training.epochs}ep")
        return tags

    def validate(self, layers: list[PrunableLayer], target: float) -> None:
        if self.search.enabled and target + self.search.delta > 1.0 + 1e-9:
            raise ConfigError(
                f"UniPTS reduces every layer to sparsity + delta = {target} + {self.search.delta} > 1. "
                f"Use algorithm.search.delta<={1.0 - target:.4g} for this target."
            )

    # ------------------------------------------------------------------------------------------ method

    def prune(self, model: nn.Module, layers: list[PrunableLayer], target: float,
              ctx: PruneContext) -> PruneResult:
        self.validate(layers, target)
        was_training = model.training
        if self.channels_last:  # NHWC convolutions: markedly faster for CNNs on CPU, restored at the end
            model.to(memory_format=torch.channels_last)
        fitness_set = draw_fitness_set(ctx.calib, self.search.fitness_set_size,
                                       ctx.generator(STREAM_FITNESS_SET))
        stats: dict[str, Any] = {"budget": self.budget, "fitness_set_images": len(fitness_set),
                                 "calib_images": len(ctx.calib)}
        tables: dict[str, pd.DataFrame] = {}

        # 1. The sparsity distribution. At sparsity 0 there is nothing to distribute (every genome decodes
        # to dense layers), so the search is skipped: the run is the objective and training alone, the
        # control that separates what distillation does from what pruning costs.
        if target == 0.0:
            counts = {ly.name: 0 for ly in layers}
            stats["search_skipped"] = "sparsity 0: every layer stays dense"
        elif self.search.enabled:
            outcome = self.search_distribution(model, layers, target, fitness_set, ctx)
            counts = outcome.counts
            stats.update(self.search_stats(outcome))
            tables["search_history"] = pd.DataFrame(outcome.history)
            tables["searched_allocation"] = self.allocation_table(layers, target, outcome)
        else:
            counts = allocate(layers, target, self.search.fallback_allocation)

        # 2 + 3. Distillation with dynamic (or fixed) masks, starting from the dense weights.
        if self.training.epochs > 0:
            history = self.train(model, layers, counts, ctx)
            tables["training_history"] = pd.DataFrame(history)
            stats.update(self.train_stats(history, model))
            masks = current_masks(layers)
            if self.training.bn_recalibration:
                stats["bn_layers_recalibrated"] = recalibrate_batchnorm(
                    model, ctx.calib, ctx.calib.data.images.device, self.training.batch_size)
        else:
            masks = magnitude_masks(layers, counts)
            apply_masks(layers, masks)
            stats["bn_layers_recalibrated"] = recalibrate_batchnorm(
                model, fitness_set, fitness_set.data.images.device, self.training.batch_size,
                noise_std=self.search.bn_noise_std,
                generator=ctx.generator(STREAM_BN_NOISE))
        bake_masks(model)
        model.to(memory_format=torch.contiguous_format)
        model.train(was_training)
        return PruneResult(model=model, allocation=rates(layers, counts), masks=masks, stats=stats,
                           tables=tables)

    def search_distribution(self, model: nn.Module, layers: list[PrunableLayer], target: float,
                            fitness_set: CalibrationSet, ctx: PruneContext) -> SearchOutcome:
        """The reduce-regrow genetic search on the pretrained weights (no training during the search)."""
        probe = CandidateProbe(model, layers, fitness_set, self.training.batch_size, self.search.bn_noise_std,
                               ctx.generator(STREAM_BN_NOISE))
        with probe:
            outcome = genetic_search(
                decode=lambda genome: decode_genome(genome, layers, target, self.search.delta), score=probe,
                genes=len(layers), target=target, settings=self.search,
                generator=ctx.generator(STREAM_GENOME), progress=ctx.progress, log_metrics=ctx.log_metrics)
        log.info("UniPTS search: best fitness %.2f%% after %d generations (%d candidates scored, %.2f s "
                 "each)",
                 outcome.fitness, self.search.generations, outcome.evaluations,
                 outcome.seconds / max(outcome.evaluations, 1))
        return outcome

    def train(self, model: nn.Module, layers: list[PrunableLayer], counts: dict[str, int],
              ctx: PruneContext) -> list[dict[str, float]]:
        """Attach the masks (dynamic or fixed) and distil from a frozen copy of the dense model."""
        teacher = copy.deepcopy(model).requires_grad_(False)
        if self.training.dst:
            attach_dynamic_masks(layers, counts, self.training.srste_decay)
        else:
            apply_masks(layers, magnitude_masks(layers, counts))
        lr, weight_decay = self.resolved_optimizer(model)
        settings = self.training.replace(lr=lr, weight_decay=weight_decay)
        history = distill_sparse(model, teacher, layers, ctx.calib, settings, self.objective, ctx,
                                 ctx.generator(STREAM_SHUFFLE), ctx.generator(STREAM_AUGMENT))
        last = history[-1]
        log.info("UniPTS distillation: %d epochs, final loss %.4f, mask change in the last epoch %.5f, "
                 "%.1f s/epoch", self.training.epochs, last["loss"], last["mask_change"],
                 sum(r["seconds"] for r in history) / len(history))
        return history

    def resolved_optimizer(self, model: nn.Module) -> tuple[float, float]:
        default_lr, default_wd = reference_optimizer_defaults(model)
        return (self.training.lr if self.training.lr is not None else default_lr,
                self.training.weight_decay if self.training.weight_decay is not None else default_wd)

    # ------------------------------------------------------------------------------------------ records

    def allocation_table(self, layers: list[PrunableLayer], target: float,
                         outcome: SearchOutcome) -> pd.DataFrame:
        reduced = target + self.search.delta
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
            "search_population_size": self.search.population_size,
            "search_generations": self.search.generations,
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

