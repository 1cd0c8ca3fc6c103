"""The reduce-regrow evolutionary search of the layer-wise sparsity distribution.

A genetic algorithm over genomes (decoded by `decoding.py`). A candidate's fitness is its top-1 on a
fitness set drawn from the calibration images, after its BatchNorm statistics are re-estimated on that
set (with a little input noise): without that re-estimation a pruned network's accuracy says more about
stale BN statistics than about the distribution. The search runs on the pretrained weights; nothing is
trained during it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ptsbench.data import CalibrationSet, InMemoryImages
from ptsbench.errors import ConfigError
from ptsbench.evaluate import evaluate
from ptsbench.settings import (
    COUNT,
    FRACTION,
    NON_NEGATIVE,
    NON_NEGATIVE_COUNT,
    OPTIONAL_COUNT,
    PROBABILITY,
    Range,
    Settings,
    option,
)
from ptsbench.toolkit.bn import batchnorm_layers, recalibrate_batchnorm
from ptsbench.toolkit.sparsity import PrunableLayer

EVAL_BATCH_SIZE = 500  # fitness evaluation runs in eval mode, so the batch size does not change the score


# ============================================================================== fitness of a candidate


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


def magnitude_rank(weight: torch.Tensor) -> torch.Tensor:
    """Each entry's position in the stable ascending order of |w|: the mask that removes the k smallest
    (as `magnitude_mask` does) is then `rank >= k`, a comparison instead of a sort per candidate."""
    order = torch.sort(weight.detach().abs().reshape(-1), stable=True).indices
    rank = torch.empty(order.numel(), dtype=torch.int32, device=order.device)
    rank[order] = torch.arange(order.numel(), dtype=torch.int32, device=order.device)
    return rank.view_as(weight)


class CandidateProbe:
    """Scores per-layer counts on the pretrained weights without copying the model.

    The dense weights and each layer's magnitude ranks are kept once; a candidate's masked weights are
    written into the layers in place, its BatchNorm statistics are reset and re-estimated on the fitness
    set (train mode, input noise), and its top-1 on the same set is measured by the harness's evaluation.
    Leaving the `with` block restores the dense weights and the original BatchNorm statistics.
    """

    def __init__(self, model: nn.Module, layers: list[PrunableLayer], fitness_set: CalibrationSet,
                 batch_size: int, noise_std: float, generator: torch.Generator):
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
        """Write the dense weights with each layer's `counts` smallest magnitudes zeroed (ties by
        position)."""
        for ly, w, rank in zip(self.layers, self.dense, self.rank, strict=True):
            torch.mul(w, rank >= counts[ly.name], out=ly.weight)

    def __call__(self, counts: dict[str, int]) -> float:
        self.load(counts)
        device = self.fitness_set.data.images.device
        recalibrate_batchnorm(self.model, self.fitness_set, device, self.batch_size,
                              noise_std=self.noise_std, generator=self.generator)
        # The model is already in its working memory format (the method sets NHWC for the whole run).
        return evaluate(self.model, self.fitness_set.data, device, EVAL_BATCH_SIZE).top1


# ====================================================================================== genetic search


# The search-off ablation's allocations (`ptsbench.toolkit.allocations`): the paper's ERK and uniform, a
# chosen subset of the weight-only registry rather than all of it, so the ablation stays the paper's.
FALLBACK_ALLOCATIONS = ("erk", "uniform")


def searching(search: SearchSettings) -> bool:
    """Whether the search runs: its own options are recorded only then."""
    return search.enabled


@dataclass(frozen=True)
class SearchSettings(Settings):
    """The `search` node: the reduce-regrow genetic search (reference: 25 individuals, 25 generations, 10
    parents, p = 0.1). `enabled: false` takes `fallback_allocation` instead (the paper's ablation)."""

    # Recorded as `search` (true/false); the search's own keys only when it runs, the fallback when it
    # does not.
    enabled: bool = option(True, record="search")  # false: use fallback_allocation instead (ablation)
    # erk | uniform, with enabled=false
    fallback_allocation: str = option("erk", FALLBACK_ALLOCATIONS, when=lambda s: not s.enabled)
    # every layer reduced to P + delta, then delta * N weights regrown
    delta: float = option(0.05, FRACTION, when=searching)
    population_size: int = option(25, Range(2, whole=True), when=searching)
    generations: int = option(25, COUNT, when=searching)  # algorithm.budget scales them
    num_parents: int = option(10, COUNT, when=searching)
    mutation_prob: float = option(0.1, PROBABILITY, when=searching)  # per gene: gene * (1 + N(0, 1))
    # random newcomers per generation (the reference's bug drops them)
    immigrants: int = option(1, NON_NEGATIVE_COUNT, when=searching)
    # best individuals carried over unchanged (the reference keeps none)
    elites: int = option(1, NON_NEGATIVE_COUNT, when=searching)
    # BN/fitness images drawn with replacement from the calibration set; null: the set itself (recorded
    # whether the search runs or not)
    fitness_set_size: int | None = option(10240, OPTIONAL_COUNT)
    # input noise while re-estimating a candidate's BatchNorm statistics
    bn_noise_std: float = option(1e-6, NON_NEGATIVE, when=searching)

    def check_together(self, key: str) -> None:
        if self.num_parents > self.population_size:
            raise ConfigError(f"{key}.num_parents={self.num_parents} must be at most "
                              f"{key}.population_size={self.population_size}.")
        if self.elites > self.num_parents:
            raise ConfigError(f"{key}.elites={self.elites} must be at most "
                              f"{key}.num_parents={self.num_parents}.")
        if self.elites + self.immigrants + 1 > self.population_size:
            raise ConfigError(f"{key}.population_size={self.population_size} has no room for {self.elites} "
                              f"elites, the constant individual and {self.immigrants} immigrants.")


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
    """Uniform crossover: each gene from one of two different parents, the pair drawn without replacement
    as the reference does (`main.py: crossover`, `np.random.choice(num_parents, 2, replace=False)`), so a
    child is never a copy of one parent. With a single parent there is no pair: the children are copies."""
    first = torch.randint(len(parents), (n,), generator=generator)
    if len(parents) < 2:
        return parents[first]
    second = torch.randint(len(parents) - 1, (n,), generator=generator)
    second += (second >= first).long()  # uniform over the other parents
    take_first = torch.rand(n, parents.shape[1], generator=generator) < 0.5
    return torch.where(take_first, parents[first], parents[second])


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
    parents = ranked[:settings.num_parents]
    genes = population.shape[1]
    bred = settings.population_size - settings.elites - 1 - settings.immigrants
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
                   log_metrics: Callable[[dict[str, float], int | None], None] | None = None,
                   ) -> SearchOutcome:
    """Evolve genomes for `settings.generations` generations and return the fittest of the last one.

    As in the reference (`main.py: genetic_algorithm`), each generation scores its population and breeds
    the next, and the population bred by the last generation is scored too before its best is returned:
    generations + 1 populations in all (history row `generations` is that final one). Identical decoded
    counts give identical masks, so each distinct allocation is scored once (the constant genome, the
    elites and unmutated children recur every generation).
    """
    settings.check("algorithm.search")
    start = time.perf_counter()
    cache: dict[tuple[int, ...], float] = {}
    outcome = SearchOutcome(genome=torch.empty(0), counts={}, fitness=-math.inf)
    population = initial_population(settings.population_size, genes, target, generator)
    fitness = torch.empty(0)
    bar = tqdm(range(settings.generations + 1), desc="UniPTS search", disable=not progress, leave=False)
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
               "evaluated": evaluated, "cached": len(scores) - evaluated,
               "seconds": time.perf_counter() - gen_start}
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
