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

Each stage can be switched off for the paper's ablation (`search=false` uses `fallback_allocation`,
`objective=kl` uses plain Hinton KD, `dst=false` keeps the masks fixed, `epochs=0` stops after the
search). Where the released code (xjjxmu/UniPTS) differs from what we do, the docstrings say so; see
shared/reference/pts-algorithms.md section 2.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from algorithms.base import PruneContext, PruneResult, PTSAlgorithm
from ptsbench.bn import batchnorm_layers, recalibrate_batchnorm
from ptsbench.data import CalibrationSet, InMemoryImages
from ptsbench.distill import base_decayed_kl, kd_kl, tau_schedule
from ptsbench.errors import ConfigError, ensure_finite, unknown_choice
from ptsbench.sparsity import (
    PrunableLayer,
    allocate,
    apply_masks,
    bake_masks,
    check_sparsity,
    counts_from_rates,
    magnitude_mask,
    magnitude_masks,
    rates,
)
from ptsbench.train import random_translate_flip

log = logging.getLogger(__name__)

FALLBACK_ALLOCATIONS = ("erk", "uniform")
OBJECTIVES = ("base_decayed", "kl")
EVAL_BATCH_SIZE = 500  # fitness evaluation runs in eval mode, so the batch size does not change the score
THRESHOLD_BAND = 0.02  # relative half-width of the band searched around last step's magnitude threshold
AUGMENT_MAX_SHIFT = 2  # pixels; the harness's in-memory stand-in for the reference's RandomResizedCrop

# Independent random streams, each from ctx.generator(offset).
STREAM_GENOME, STREAM_FITNESS_SET, STREAM_BN_NOISE, STREAM_SHUFFLE, STREAM_AUGMENT = 101, 102, 103, 104, 105


# ======================================================================= 1. reduce-regrow decoding


def regrow_rates(genome: torch.Tensor, numels: Sequence[int], target: float, delta: float) -> torch.Tensor:
    """Per-layer sparsities decoded from a genome: reduce every layer to P + delta, regrow delta * N.

    The regrow budget is split in proportion to softmax(genome). A layer cannot regrow more than it lost
    in the reduce step; the reference clips such layers at sparsity 0 and lets the global sparsity drift
    above P. Here the clipped excess is water-filled over the unclipped layers (in proportion to their
    softmax shares, repeated until nothing more clips), so the decoded distribution averages to exactly P.
    """
    n = torch.tensor([float(v) for v in numels], dtype=torch.float64)
    genes = genome.detach().to(torch.float64).cpu()
    reduced = target + delta
    capacity = reduced * n  # everything a layer lost in the reduce step
    regrow = torch.zeros_like(n)
    free = torch.ones_like(n, dtype=torch.bool)
    remaining = delta * float(n.sum())
    while bool(free.any()):
        share = torch.softmax(genes.masked_fill(~free, -math.inf), dim=0)  # softmax over the free layers only
        proposal = remaining * share
        full = free & (proposal > capacity)
        if not bool(full.any()):
            regrow = torch.where(free, proposal, regrow)
            break
        regrow = torch.where(full, capacity, regrow)
        remaining -= float(capacity[full].sum())
        free &= ~full
    return (reduced - regrow / n).clamp(0.0, 1.0)


def decode_genome(genome: torch.Tensor, layers: list[PrunableLayer], target: float, delta: float) -> dict[str, int]:
    """Exact per-layer counts of removed weights for a genome; they sum to round(P * N)."""
    layer_rates = regrow_rates(genome, [ly.numel for ly in layers], target, delta).tolist()
    return counts_from_rates(layers, {ly.name: r for ly, r in zip(layers, layer_rates, strict=True)}, target)


# ============================================================================== fitness of a candidate


class CandidateProbe:
    """Scores per-layer counts on the pretrained weights without copying the model.

    The dense weights and each layer's magnitude ranks are kept once; a candidate's masked weights are
    written into the layers in place, its BatchNorm statistics are reset and re-estimated on the fitness
    set (train mode, input noise), and its top-1 on the same set is measured in inference mode. Leaving
    the `with` block restores the dense weights and the original BatchNorm statistics.
    """

    def __init__(self, model: nn.Module, layers: list[PrunableLayer], fitness_set: CalibrationSet, batch_size: int,
                 noise_std: float, generator: torch.Generator):
        self.model, self.layers, self.fitness_set = model, layers, fitness_set
        self.batch_size, self.noise_std, self.generator = batch_size, noise_std, generator
        with torch.no_grad():
            self.dense = [ly.weight.detach().clone() for ly in layers]
            self.rank = [magnitude_rank(w) for w in self.dense]
        self.bn_state = [(m, [b.detach().clone() for b in m.buffers()]) for m in batchnorm_layers(model)]
        self.was_training = model.training

    def __enter__(self) -> CandidateProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for ly, w in zip(self.layers, self.dense, strict=True):
                ly.weight.copy_(w)
            for module, saved in self.bn_state:
                for buf, value in zip(module.buffers(), saved, strict=True):
                    buf.copy_(value)
        self.model.train(self.was_training)

    @torch.no_grad()
    def load(self, counts: dict[str, int]) -> None:
        """Write the dense weights with each layer's `counts` smallest magnitudes zeroed (ties by position)."""
        for ly, w, rank in zip(self.layers, self.dense, self.rank, strict=True):
            torch.mul(w, rank >= counts[ly.name], out=ly.weight)

    def __call__(self, counts: dict[str, int]) -> float:
        self.load(counts)
        recalibrate_batchnorm(self.model, self.fitness_set, self.fitness_set.data.images.device, self.batch_size,
                              noise_std=self.noise_std, generator=self.generator)
        return top1_accuracy(self.model, self.fitness_set.data)


def magnitude_rank(weight: torch.Tensor) -> torch.Tensor:
    """Each entry's position in the stable ascending order of |w|: the mask that removes the k smallest
    (as `magnitude_mask` does) is then `rank >= k`, a comparison instead of a sort per candidate."""
    order = torch.sort(weight.detach().abs().reshape(-1), stable=True).indices
    rank = torch.empty(order.numel(), dtype=torch.int32, device=order.device)
    rank[order] = torch.arange(order.numel(), dtype=torch.int32, device=order.device)
    return rank.view_as(weight)


def top1_accuracy(model: nn.Module, data: InMemoryImages, batch_size: int = EVAL_BATCH_SIZE) -> float:
    """Top-1 (percent) on in-memory tensors, eval mode, inference mode."""
    was_training = model.training
    model.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            logits = model(data.images[start:start + batch_size])
            correct += int((logits.argmax(dim=1) == data.labels[start:start + batch_size]).sum())
    model.train(was_training)
    return 100.0 * correct / max(len(data), 1)


def draw_fitness_set(calib: CalibrationSet, size: int | None, generator: torch.Generator) -> CalibrationSet:
    """The images for BN re-estimation and fitness: `size` draws with replacement, as the reference does
    (10,240 draws from its 10,240 calibration images), or the calibration set itself when `size` is None."""
    if size is None:
        return calib
    idx = torch.randint(len(calib), (int(size),), generator=generator)
    picked = idx.tolist()
    idx = idx.to(calib.data.images.device)
    data = InMemoryImages(calib.data.images[idx], calib.data.labels[idx])
    return CalibrationSet(data, [calib.indices[i] for i in picked], calib.seed)


# ====================================================================================== genetic search


@dataclass(frozen=True)
class SearchSettings:
    """The genetic algorithm's sizes (reference: 25 individuals, 25 generations, 10 parents, p = 0.1)."""

    population: int = 25
    generations: int = 25
    parents: int = 10
    mutation_prob: float = 0.1
    immigrants: int = 1
    elites: int = 1

    def check(self) -> None:
        if self.population < 2 or self.generations < 1:
            raise ConfigError(f"UniPTS search needs population_size >= 2 and generations >= 1, got "
                              f"{self.population} and {self.generations}.")
        if not 1 <= self.parents <= self.population:
            raise ConfigError(f"num_parents={self.parents} must be between 1 and population_size={self.population}.")
        if not 0.0 <= self.mutation_prob <= 1.0:
            raise ConfigError(f"mutation_prob={self.mutation_prob} must be a probability in [0, 1].")
        if self.elites < 0 or self.immigrants < 0 or self.elites > self.parents:
            raise ConfigError(f"elites={self.elites} and immigrants={self.immigrants} must be >= 0, elites <= num_parents.")
        if self.elites + self.immigrants + 1 > self.population:
            raise ConfigError(f"population_size={self.population} has no room for {self.elites} elites, "
                              f"the constant individual and {self.immigrants} immigrants.")


@dataclass
class SearchOutcome:
    genome: torch.Tensor
    counts: dict[str, int]
    fitness: float
    constant_fitness: float = math.nan  # the equal-regrow genome [P, ..., P], scored first
    history: list[dict[str, float]] = field(default_factory=list)
    evaluations: int = 0
    cache_hits: int = 0
    seconds: float = 0.0


def initial_population(size: int, genes: int, target: float, generator: torch.Generator) -> torch.Tensor:
    """The constant genome [P, ..., P] (an equal count regrown per layer) and size - 1 draws from U[0, 1)."""
    constant = torch.full((1, genes), float(target), dtype=torch.float64)
    return torch.cat([constant, torch.rand(size - 1, genes, generator=generator, dtype=torch.float64)])


def crossover(parents: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform crossover: each gene from one of two randomly chosen parents."""
    pick = torch.randint(len(parents), (n, 2), generator=generator)
    take_first = torch.rand(n, parents.shape[1], generator=generator) < 0.5
    return torch.where(take_first, parents[pick[:, 0]], parents[pick[:, 1]])


def mutate(parents: torch.Tensor, n: int, prob: float, generator: torch.Generator) -> torch.Tensor:
    """Each gene of a random parent becomes gene * (1 + N(0, 1)) with probability `prob`."""
    children = parents[torch.randint(len(parents), (n,), generator=generator)]
    hit = torch.rand(children.shape, generator=generator) < prob
    scale = 1.0 + torch.randn(children.shape, generator=generator, dtype=torch.float64)
    return torch.where(hit, children * scale, children)


def next_generation(population: torch.Tensor, fitness: torch.Tensor, settings: SearchSettings, target: float,
                    generator: torch.Generator) -> torch.Tensor:
    """Elites, the constant genome, crossover and mutation children of the top parents, random immigrants.

    The reference builds constant + 11 crossovers + 12 mutants (24 individuals): the random immigrants it
    means to add are overwritten by a bug. Here the immigrants are kept, and the best individual is carried
    over unchanged (elitism, so the best fitness never decreases), which takes one mutant's place.
    """
    ranked = population[torch.sort(fitness, descending=True, stable=True).indices]
    parents = ranked[:settings.parents]
    genes = population.shape[1]
    bred = settings.population - settings.elites - 1 - settings.immigrants
    n_cross = (bred + 1) // 2
    return torch.cat([
        ranked[:settings.elites],
        torch.full((1, genes), float(target), dtype=torch.float64),
        crossover(parents, n_cross, generator),
        mutate(parents, bred - n_cross, settings.mutation_prob, generator),
        torch.rand(settings.immigrants, genes, generator=generator, dtype=torch.float64),
    ])


def genetic_search(decode: Callable[[torch.Tensor], dict[str, int]], score: Callable[[dict[str, int]], float],
                   genes: int, target: float, settings: SearchSettings, generator: torch.Generator,
                   progress: bool = False,
                   log_metrics: Callable[[dict[str, float], int | None], None] | None = None) -> SearchOutcome:
    """Evolve genomes for `settings.generations` generations and return the fittest of the last one.

    Identical decoded counts give identical masks, so each distinct allocation is scored once (the
    constant genome, the elites and unmutated children recur every generation).
    """
    settings.check()
    start = time.perf_counter()
    cache: dict[tuple[int, ...], float] = {}
    outcome = SearchOutcome(genome=torch.empty(0), counts={}, fitness=-math.inf)
    population = initial_population(settings.population, genes, target, generator)
    fitness = torch.empty(0)
    bar = tqdm(range(settings.generations), desc="UniPTS search", disable=not progress, leave=False)
    for gen in bar:
        if gen > 0:
            population = next_generation(population, fitness, settings, target, generator)
        gen_start, evaluated = time.perf_counter(), 0
        scores = []
        for genome in population:
            counts = decode(genome)
            key = tuple(counts.values())
            if key not in cache:
                cache[key] = score(counts)
                evaluated += 1
            scores.append(cache[key])
        fitness = torch.tensor(scores, dtype=torch.float64)
        if gen == 0:
            outcome.constant_fitness = scores[0]
        row = {"generation": gen, "best_fitness": float(fitness.max()), "mean_fitness": float(fitness.mean()),
               "evaluated": evaluated, "cached": len(scores) - evaluated, "seconds": time.perf_counter() - gen_start}
        outcome.history.append(row)
        outcome.evaluations += evaluated
        outcome.cache_hits += len(scores) - evaluated
        bar.set_postfix(best=f"{row['best_fitness']:.2f}", mean=f"{row['mean_fitness']:.2f}", refresh=False)
        if log_metrics is not None:
            log_metrics({"unipts/generation": gen, "unipts/search_best_fitness": row["best_fitness"],
                         "unipts/search_mean_fitness": row["mean_fitness"]}, None)
    bar.close()
    best = int(torch.argmax(fitness))  # first of equals
    outcome.genome = population[best].clone()
    outcome.counts = decode(outcome.genome)
    outcome.fitness = float(fitness[best])
    outcome.seconds = time.perf_counter() - start
    return outcome


# ============================================================================= 3. dynamic sparse training


def kth_smallest(scores: torch.Tensor, k: int, hint: torch.Tensor | None = None) -> torch.Tensor:
    """The k-th smallest of a flat tensor (1-based). With `hint`, last step's value, the selection runs on
    the narrow band of scores around it: weights move little per step, so the band nearly always holds it."""
    if hint is not None:
        lo, hi = hint * (1.0 - THRESHOLD_BAND), hint * (1.0 + THRESHOLD_BAND)
        n_lo = int((scores < lo).sum())
        if n_lo < k:
            band = scores[(scores >= lo) & (scores <= hi)]
            if n_lo + band.numel() >= k:
                return band.kthvalue(k - n_lo).values
    return scores.kthvalue(k).values


def topk_magnitude_mask(weight: torch.Tensor, n_zero: int,
                        hint: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The mask of `magnitude_mask` (exactly `n_zero` zeros, ties broken by position) and its threshold,
    found by selection instead of a full sort: it is recomputed for every layer at every step."""
    if n_zero <= 0 or n_zero >= weight.numel():
        return magnitude_mask(weight, n_zero), None
    scores = weight.detach().abs().reshape(-1)
    if hint is not None:
        pruned = scores <= hint
        if int(pruned.sum()) == n_zero:  # still exactly the n_zero smallest: every kept score is above them
            return (~pruned).to(weight.dtype).view_as(weight), hint
    threshold = kth_smallest(scores, n_zero, hint)
    pruned = scores <= threshold
    excess = int(pruned.sum()) - n_zero
    if excess > 0:  # ties at the threshold: the later positions stay, as in a stable sort
        ties = (scores == threshold).nonzero().squeeze(1)
        pruned[ties[-excess:]] = False
    return (~pruned).to(weight.dtype).view_as(weight), threshold


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
        parametrize.register_parametrization(ly.module, "weight", DynamicMagnitudeMask(counts[ly.name], decay, mask))


@torch.no_grad()
def current_masks(layers: list[PrunableLayer]) -> dict[str, torch.Tensor]:
    """Each layer's mask for its current weights (reading the weight runs the parametrization)."""
    masks = {}
    for ly in layers:
        ly.module.weight  # noqa: B018 - recomputes a dynamic mask from the current weights
        masks[ly.name] = ly.module.parametrizations.weight[0].mask.clone()
    return masks


# ============================================================================= 2. distillation training


def distillation_loss(objective: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float, tau: float) -> torch.Tensor:
    """UniPTS's base-decayed KL, or plain Hinton KD at the same temperature (the ablation)."""
    if objective == "base_decayed":
        return base_decayed_kl(student_logits, teacher_logits, temperature, tau)
    return kd_kl(student_logits, teacher_logits, temperature)


def reference_optimizer_defaults(model: nn.Module) -> tuple[float, float]:
    """(lr, weight decay) of the reference configs: 0.05 / 4e-5 for MobileNetV2, 0.01 / 1e-4 otherwise
    (the ResNet setting, also used for architectures the paper did not train)."""
    architecture = str(getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__)
    if "mobilenetv2" in architecture.lower():
        return 0.05, 4e-5
    return 0.01, 1e-4


@dataclass(frozen=True)
class TrainSettings:
    """Distillation and optimiser settings (reference: 100 epochs of batch 64, SGD m0.9, cosine, T = 4)."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    momentum: float
    warmup_epochs: float
    min_lr: float
    objective: str
    temperature: float
    tau_start: float
    tau_decay: float
    augment: bool


def calibration_batches(calib: CalibrationSet, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """One shuffled epoch of full batches (a batch of one would break BatchNorm in train mode)."""
    for images, _ in calib.batches(batch_size, shuffle=True, generator=generator, drop_last=True):
        yield images


def distill_sparse(model: nn.Module, teacher: nn.Module, layers: list[PrunableLayer], calib: CalibrationSet,
                   settings: TrainSettings, ctx: PruneContext) -> list[dict[str, float]]:
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
                                  warmup_t=round(settings.warmup_epochs * steps_per_epoch), warmup_lr_init=0.0,
                                  t_in_epochs=False)
    shuffle, augment = ctx.generator(STREAM_SHUFFLE), ctx.generator(STREAM_AUGMENT)
    device = calib.data.images.device
    model.train()
    teacher.train()
    history: list[dict[str, float]] = []
    before = current_masks(layers)
    mask_entries = sum(m.numel() for m in before.values())
    step = 0
    bar = tqdm(total=total, desc="UniPTS distillation", disable=not ctx.progress, leave=False, mininterval=1.0)
    for epoch in range(settings.epochs):
        tau = tau_schedule(epoch, settings.tau_start, settings.tau_decay)
        epoch_start, running = time.perf_counter(), 0.0
        for images in calibration_batches(calib, batch_size, shuffle):
            if settings.augment:
                images = random_translate_flip(images.cpu(), AUGMENT_MAX_SHIFT, True, augment).to(device)
            with torch.no_grad():
                teacher_logits = teacher(images)
            loss = distillation_loss(settings.objective, model(images), teacher_logits, settings.temperature, tau)
            running += ensure_finite(loss.item(), "UniPTS distillation loss", step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(step)
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


# =============================================================================================== plug-in


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
        opts: dict[str, Any] = {"search": self.search}
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
        return "-".join(parts)

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
        stats: dict[str, Any] = {"fitness_set_images": len(fitness_set), "calib_images": len(ctx.calib)}
        tables: dict[str, pd.DataFrame] = {}

        # 1. The sparsity distribution.
        if self.search:
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
        history = distill_sparse(model, teacher, layers, ctx.calib, settings, ctx)
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

