"""UniPTS: exact reduce-regrow decoding, the genetic search on a real model, dynamic sparse training, the
base-decayed objective, and whole jobs through the runner on tiny real Fashion-MNIST."""

from __future__ import annotations

import copy
import json
import math

import pandas as pd
import pytest
import torch
from torch import nn

from algorithms.base import PruneContext
from algorithms.unipts import (
    SearchSettings,
    UniPTS,
    attach_dynamic_masks,
    decode_genome,
    distill_sparse,
    distillation_loss,
    draw_fitness_set,
    genetic_search,
    regrow_rates,
)
from algorithms.unipts.dst import TrainSettings
from algorithms.unipts.method import STREAM_FITNESS_SET
from algorithms.unipts.objective import ObjectiveSettings
from algorithms.unipts.search import crossover
from ptsbench.data import CalibrationSet, InMemoryImages
from ptsbench.errors import ConfigError
from ptsbench.runner import build_algorithm, run_job
from ptsbench.toolkit.distill import tau_schedule
from ptsbench.toolkit.sparsity import PrunableLayer, find_prunable_layers
from tests.conftest import compose_config

# A search small enough for a test: 4 generations of 6, scored on 64 calibration images.
SMALL_SEARCH = dict(population_size=6, generations=4, num_parents=3, fitness_set_size=64)


def linear_layers(shapes: list[tuple[int, int]]) -> list[PrunableLayer]:
    torch.manual_seed(0)
    return [PrunableLayer(f"l{i}", nn.Linear(cin, cout, bias=False), "linear")
            for i, (cout, cin) in enumerate(shapes)]


# ------------------------------------------------------------------------------------------- decoding

MIXED = [(1, 9), (10, 10), (50, 100), (200, 100), (300, 300)]  # 9 to 90,000 weights


@pytest.mark.parametrize("target", [0.0, 0.5, 0.7, 0.9, 0.95])
@pytest.mark.parametrize("genome", [
    [0.5] * 5,
    [0.3, 0.9, 0.1, 0.7, 0.2],
    [40.0, 35.0, 30.0, 0.0, -5.0],  # the small layers ask for far more than they lost: clipping
    [0.0, 0.0, 0.0, 0.0, 60.0],  # everything to the big layer: it clips, the rest must absorb it
    [-3.0, 12.5, 1e3, -1e3, 2.0],  # extreme genes after many mutations
])
def test_any_genome_decodes_to_exactly_the_target(target, genome):
    layers = linear_layers(MIXED)
    counts = decode_genome(torch.tensor(genome), layers, target, delta=0.05)
    total = sum(ly.numel for ly in layers)
    assert sum(counts.values()) == round(target * total)
    assert all(0 <= counts[ly.name] <= ly.numel for ly in layers)


def test_clipped_layers_are_water_filled_instead_of_overshooting():
    layers = linear_layers(MIXED)
    numels = [ly.numel for ly in layers]
    genome = torch.tensor([40.0, 35.0, 30.0, 0.0, -5.0])
    target, delta = 0.7, 0.05
    share = torch.softmax(genome.double(), 0)
    n = torch.tensor(numels, dtype=torch.float64)
    naive = (target + delta - delta * n.sum() * share / n).clamp_min(0)  # the reference's decoding
    assert float((naive * n).sum() / n.sum()) > target + 0.01, "this genome must force clipping"
    rates = regrow_rates(genome, numels, target, delta)
    assert (rates == 0).sum() >= 1
    assert float((rates * n).sum() / n.sum()) == pytest.approx(target, abs=1e-12)
    assert float(rates.max()) <= target + delta + 1e-12


def test_constant_genome_regrows_an_equal_count_per_layer():
    layers = linear_layers([(10, 100), (20, 100), (40, 100), (80, 100)])  # large enough that nothing clips
    target, delta = 0.6, 0.05
    total = sum(ly.numel for ly in layers)
    counts = decode_genome(torch.full((4,), target), layers, target, delta)
    regrown = [(target + delta) * ly.numel - counts[ly.name] for ly in layers]
    assert all(abs(r - delta * total / len(layers)) <= 1.0 for r in regrown)
    assert sum(counts.values()) == round(target * total)


def test_target_plus_delta_above_one_is_refused():
    layers = linear_layers(MIXED)
    with pytest.raises(ConfigError, match="delta"):
        UniPTS(search={"delta": 0.05}).validate(layers, 0.97)
    UniPTS(search={"delta": 0.05}).validate(layers, 0.95)  # reduce to exactly 1.0, regrow from there


# --------------------------------------------------------------------------------- search on a real model


def search(tiny_dense, seed: int):
    model, calib = tiny_dense
    layers = find_prunable_layers(model)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = PruneContext(calib=calib, device=torch.device("cpu"), seed=seed, progress=False)
    fitness_set = draw_fitness_set(calib, SMALL_SEARCH["fitness_set_size"], ctx.generator(STREAM_FITNESS_SET))
    outcome = UniPTS(search=SMALL_SEARCH).search_distribution(model, layers, 0.9, fitness_set, ctx)
    restored = all(torch.equal(v, model.state_dict()[k]) for k, v in dense.items())
    return outcome, restored


@pytest.fixture(scope="module")
def searched(tiny_dense):
    return search(tiny_dense, seed=0)


def test_search_keeps_the_best_and_restores_the_model(searched):
    outcome, restored = searched
    best = [row["best_fitness"] for row in outcome.history]
    # the population bred by the last generation is scored too
    assert len(best) == SMALL_SEARCH["generations"] + 1
    assert all(b >= a for a, b in zip(best, best[1:], strict=False)), f"best fitness fell: {best}"
    assert outcome.fitness == best[-1] >= outcome.constant_fitness
    assert 10.0 < outcome.fitness <= 100.0
    assert sum(row["evaluated"] for row in outcome.history) == outcome.evaluations > \
        SMALL_SEARCH["population_size"]
    assert restored, "dense weights and BatchNorm statistics must come back after the search"


def test_same_seed_same_searched_distribution(tiny_dense, searched):
    again, _ = search(tiny_dense, seed=0)
    first, _ = searched
    assert again.counts == first.counts
    assert torch.equal(again.genome, first.genome)
    assert [r["best_fitness"] for r in again.history] == [r["best_fitness"] for r in first.history]


@pytest.mark.slow
def test_same_seed_bit_identical_masks_after_training(tiny_dense):
    dense, calib = tiny_dense
    results = []
    for _ in range(2):
        model = copy.deepcopy(dense)
        ctx = PruneContext(calib=calib, device=torch.device("cpu"), seed=3, progress=False)
        algo = UniPTS(search={"population_size": 4, "generations": 2, "num_parents": 2,
                              "fitness_set_size": 64},
                      training={"epochs": 1})
        results.append(algo.prune(model, find_prunable_layers(model), 0.8, ctx))
    first, second = results
    assert first.allocation == second.allocation
    assert all(torch.equal(first.masks[name], second.masks[name]) for name in first.masks)
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(),
                                                 second.model.state_dict().values(), strict=True))


# ------------------------------------------------------------------------------------ dynamic sparse training


def test_dst_regrows_a_pruned_weight_pushed_above_the_threshold():
    layer = linear_layers([(8, 16)])[0]
    attach_dynamic_masks([layer], {layer.name: 64}, decay=5e-5)
    mask = layer.module.parametrizations.weight[0]
    x = torch.ones(1, 16)
    layer.module(x)
    pruned = int((mask.mask.reshape(-1) == 0).nonzero()[0])
    original = layer.module.parametrizations.weight.original
    optimizer = torch.optim.SGD(layer.module.parameters(), lr=1.0)
    # A loss that rewards the pruned weight: its gradient reaches it straight through the mask.
    loss = -10.0 * layer.module.weight.reshape(-1)[pruned]
    loss.backward()
    assert float(original.grad.reshape(-1)[pruned]) == \
        pytest.approx(-10.0 + 5e-5 * float(original.detach().reshape(-1)[pruned]))
    optimizer.step()
    kth_largest = original.detach().abs().reshape(-1).topk(64).values[-1]
    assert abs(float(original.detach().reshape(-1)[pruned])) >= float(kth_largest)
    layer.module(x)  # the next step recomputes the mask
    assert mask.mask.reshape(-1)[pruned] == 1
    assert int(mask.mask.sum()) == 128 - 64


def test_srste_decay_acts_on_pruned_weights_only():
    layer = linear_layers([(4, 8)])[0]
    attach_dynamic_masks([layer], {layer.name: 20}, decay=0.1)
    layer.module.weight.sum().backward()
    mask = layer.module.parametrizations.weight[0].mask
    original = layer.module.parametrizations.weight.original
    expected = 1.0 + 0.1 * (1 - mask) * original.detach()
    assert torch.allclose(original.grad, expected)
    assert int((mask == 0).sum()) == 20


# ----------------------------------------------------------------------------------------- objective


def test_base_decayed_loss_equals_its_formula():
    student = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])
    teacher = torch.tensor([[3.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    T, epoch = 4.0, 10
    tau = tau_schedule(epoch, 8.0, 0.99)
    assert tau == pytest.approx(8.0 * 0.99**10)
    expected = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
        p = [math.exp(v / T) / sum(math.exp(u / T) for u in t_row) for v in t_row]
        q = [math.exp(v) / sum(math.exp(u) for u in s_row) for v in s_row]
        expected += sum(pc * (math.log(pc) - math.log(qc) / tau) for pc, qc in zip(p, q, strict=True))
    expected *= T * T / len(student)
    got = distillation_loss("base_decayed", student, teacher, T, tau)
    assert float(got) == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------------------- whole jobs


def test_labels_tell_the_ablations_apart():
    labels = {
        build_algorithm(compose_config(["algorithm=unipts", *extra])).label
        for extra in ([], ["algorithm.search.enabled=false"], ["algorithm.training.dst=false"],
                      ["algorithm.objective.kind=kl"],
                      ["algorithm.search.enabled=false", "algorithm.search.fallback_allocation=uniform"],
                      ["algorithm.training.epochs=0"])
    }
    assert labels == {"unipts", "unipts-nosearch-erk", "unipts-nodst", "unipts-kl", "unipts-nosearch-uniform",
                      "unipts-notrain-25x25"}


def test_records_name_the_budget():
    quick = build_algorithm(compose_config(["algorithm=unipts_quick"]))
    assert quick.label == "unipts-quick-8x5-5ep" and quick.options()["budget"] == "quick"
    assert build_algorithm(compose_config(["algorithm=unipts_quick_kl"])).label == "unipts-kl-quick-8x5-5ep"
    assert build_algorithm(compose_config(["algorithm=unipts_quick_nosearch"])).label == \
        "unipts-nosearch-erk-quick-5ep"
    custom = build_algorithm(compose_config(["algorithm=unipts_quick", "algorithm.search.generations=2"]))
    assert custom.label == "unipts-8x2-5ep" and custom.options()["budget"] == "custom"
    assert build_algorithm(compose_config(["algorithm=unipts"])).options()["budget"] == "reference"
    scaled = build_algorithm(compose_config(["algorithm=unipts", "algorithm.budget=0.2"]))
    assert (scaled.search.generations, scaled.training.epochs, scaled.search.population_size) == (5, 20, 25)
    assert scaled.label == "unipts-x0.2-25x5-20ep" and scaled.family == "unipts"
    assert scaled.options()["budget"] == "reference x0.2" and scaled.budget_fraction == pytest.approx(0.2)
    assert quick.budget_fraction == pytest.approx((8 * 5 / 625 + 5 / 100) / 2)


def test_nested_settings_are_checked_by_key():
    with pytest.raises(ConfigError, match=r"'algorithm.search.generatons'.*Did you mean: generations"):
        build_algorithm(compose_config(["algorithm=unipts_quick", "+algorithm.search.generatons=3"]))
    with pytest.raises(ConfigError,
                       match=r"algorithm.training.momentum=1.5 is not allowed: "
                             r"it must be a number in \[0, 1\)"):
        build_algorithm(compose_config(["algorithm=unipts_quick", "algorithm.training.momentum=1.5"]))
    with pytest.raises(ConfigError,
                       match=r"algorithm.search.num_parents=9 must be at most "
                             r"algorithm.search.population_size=8"):
        build_algorithm(compose_config(["algorithm=unipts_quick", "algorithm.search.num_parents=9"]))
    with pytest.raises(ConfigError, match=r"Unknown algorithm.objective.kind 'kd'.*Did you mean: kl"):
        build_algorithm(compose_config(["algorithm=unipts_quick", "algorithm.objective.kind=kd"]))
    with pytest.raises(ConfigError, match=r"algorithm.budget=0 is not allowed"):
        build_algorithm(compose_config(["algorithm=unipts_quick", "algorithm.budget=0"]))


def assert_exact_sparsity(job_dir, target: float) -> pd.DataFrame:
    alloc = pd.read_csv(job_dir / "allocation.csv")
    assert ((alloc["achieved_sparsity"] - alloc["target_sparsity"]).abs() * alloc["params"]).max() < 1.0
    assert abs((alloc["achieved_sparsity"] * alloc["params"]).sum() - target * alloc["params"].sum()) <= 1.0
    return alloc


@pytest.mark.slow
def test_unipts_quick_job_end_to_end(tiny_cfg, tmp_path):
    cfg = tiny_cfg("algorithm=unipts_quick", "sparsity=0.8", "algorithm.search.population_size=4",
                   "algorithm.search.generations=2", "algorithm.search.num_parents=2",
                   "algorithm.search.fitness_set_size=128", "algorithm.training.epochs=2")
    record = run_job(cfg, tmp_path)
    assert record["status"] == "ok" and record["method"] == "unipts-4x2-2ep"
    assert abs(record["achieved_sparsity"] - 0.8) < 1e-6
    assert_exact_sparsity(tmp_path, 0.8)
    history = pd.read_csv(tmp_path / "search_history.csv")
    assert list(history["generation"]) == [0, 1, 2]
    searched = pd.read_csv(tmp_path / "searched_allocation.csv")
    assert len(searched) == 21
    training = pd.read_csv(tmp_path / "training_history.csv")
    assert len(training) == 2 and training["loss"].notna().all()
    stats = json.loads((tmp_path / "result.json").read_text())["stats"]
    assert stats["search_seconds_per_candidate"] > 0 and stats["train_lr"] == 0.01
    assert (stats["budget"], stats["search_generations"], stats["search_populations_scored"]) == \
        ("custom", 2, 3)
    assert record["top1"] > 60.0, "distilled resnet18 at 80% keeps most of its dense accuracy"


def test_ablation_without_search_and_dst_runs(tiny_cfg, tmp_path):
    cfg = tiny_cfg("algorithm=unipts_quick", "sparsity=0.7", "algorithm.search.enabled=false",
                   "algorithm.training.dst=false", "algorithm.training.epochs=1")
    record = run_job(cfg, tmp_path)
    assert record["status"] == "ok" and record["method"] == "unipts-nosearch-erk-nodst-1ep"
    assert_exact_sparsity(tmp_path, 0.7)
    assert not (tmp_path / "search_history.csv").exists()


def test_unipts_at_sparsity_zero_is_distillation_alone(tiny_cfg, tmp_path):
    """The control for the objective: no search, no pruning, only base-decayed distillation with DST."""
    cfg = tiny_cfg("algorithm=unipts_quick", "sparsity=0", "algorithm.training.epochs=1")
    record = run_job(cfg, tmp_path)
    assert record["status"] == "ok", record["error"]
    # nothing pruned: the only zeros are those the dense weights already hold
    assert record["achieved_sparsity"] == record["dense_zero_weights"] / record["prunable_params"]
    stats = json.loads((tmp_path / "result.json").read_text())["stats"]
    assert stats["search_skipped"].startswith("sparsity 0") and "search_best_fitness" not in stats
    assert not (tmp_path / "search_history.csv").exists()
    assert len(pd.read_csv(tmp_path / "training_history.csv")) == 1
    assert record["top1"] > 50.0  # one epoch of distillation from the dense model keeps it a classifier


# ------------------------------------------------------------------------------- faithful to the code


def test_crossover_pairs_two_different_parents():
    parents = torch.arange(5, dtype=torch.float64)[:, None].expand(5, 64)  # parent i: every gene equals i
    children = crossover(parents, 300, torch.Generator().manual_seed(0))
    assert all(len(set(child.tolist())) == 2 for child in children)  # 2**-63 odds of a one-sided mask
    assert torch.equal(crossover(parents[:1], 3, torch.Generator()), parents[:1].expand(3, 64))


def test_search_scores_the_population_bred_by_the_last_generation():
    scored: list[tuple[int, ...]] = []

    def score(counts: dict[str, int]) -> float:
        scored.append(tuple(counts.values()))
        return float(counts["a"])

    settings = SearchSettings(population_size=5, generations=3, num_parents=2, immigrants=0, elites=0)
    outcome = genetic_search(lambda g: {"a": int(g[0] * 1000)}, score, genes=2, target=0.5, settings=settings,
                             generator=torch.Generator().manual_seed(0))
    assert [row["generation"] for row in outcome.history] == [0, 1, 2, 3]
    assert outcome.evaluations == len(scored) == len(set(scored))
    assert outcome.fitness == outcome.history[-1]["best_fitness"]


def test_learning_rate_runs_one_step_behind_as_in_the_code():
    """The reference calls step_update(i) after step i: after the first epoch (the warmup) the rate is
    lr * (S - 1) / S, not lr; training at lr(S) would be one step ahead."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3))
    layers = find_prunable_layers(model)
    images = torch.randn(32, 1, 8, 8)
    calib = CalibrationSet(InMemoryImages(images, torch.zeros(32, dtype=torch.long)), list(range(32)), 0)
    ctx = PruneContext(calib=calib, device=torch.device("cpu"), seed=0, progress=False)
    counts = {ly.name: ly.numel // 2 for ly in layers}
    attach_dynamic_masks(layers, counts, 5e-5)
    settings = TrainSettings(epochs=2, batch_size=8, lr=0.1, weight_decay=0.0, momentum=0.9,
                             warmup_epochs=1.0, min_lr=0.0, augment=False)
    teacher = copy.deepcopy(model).requires_grad_(False)
    history = distill_sparse(model, teacher, layers, calib, settings, ObjectiveSettings(), ctx,
                             torch.Generator(), torch.Generator())
    assert history[0]["lr"] == pytest.approx(0.1 * 3 / 4)  # 4 steps per epoch, warmup_t = 4
    half = 0.5 * (1 + math.cos(math.pi * 7 / 8))  # timm's cosine after warmup: t over t_initial, t = 7 of 8
    assert history[1]["lr"] == pytest.approx(0.1 * half)
