"""OWL: outlier ratios of Wanda scores, the rates (the reference's formula on equal sizes, the target as the
size-weighted mean on unequal ones, clipped at extreme targets), exact counts, and the allocation under
magnitude, Wanda and SparseGPT with the norms of the dense network."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from algorithms.base import PruneContext
from algorithms.magnitude import MagnitudePruning
from algorithms.random_pruning import RandomPruning
from algorithms.sparsegpt import SparseGPT
from algorithms.wanda import Wanda
from ptsbench.errors import ConfigError
from ptsbench.toolkit.layerwise import dense_input_norms
from ptsbench.toolkit.owl import OWLSettings, outlier_ratio, owl_counts, owl_rates, owl_ratios
from ptsbench.toolkit.patterns import Pattern
from ptsbench.toolkit.sparsity import find_prunable_layers
from tests.test_sparsegpt import tiny_calib


def reference_rates(ratios: list[float], target: float, lam: float) -> list[float]:
    """The paper's rule as the OWL code states it, with the plain mean over blocks."""
    low, high = min(ratios), max(ratios)
    d = [(r - low) / (high - low) * 2 * lam for r in ratios]
    mean = sum(d) / len(d)
    return [1.0 - (x - mean + 1.0 - target) for x in d]


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.Conv2d(8, 16, 1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 25, 10))


def test_outlier_ratio_counts_scores_above_m_times_the_mean():
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 11.0])  # mean 2: only 11 > 2 x 5
    assert outlier_ratio(scores, 5.0) == pytest.approx(0.1)
    assert outlier_ratio(scores, 6.0) == 0.0


def test_equal_sizes_give_the_reference_rates_more_outliers_less_sparsity():
    ratios = {"a": 0.010, "b": 0.030, "c": 0.002, "d": 0.018}
    rates = owl_rates(dict.fromkeys(ratios, 1000), ratios, 0.7, 0.08)
    expected = reference_rates(list(ratios.values()), 0.7, 0.08)
    assert [rates[k] for k in ratios] == pytest.approx(expected, abs=1e-12)
    assert sum(rates.values()) / 4 == pytest.approx(0.7, abs=1e-12)
    assert rates["b"] < rates["d"] < rates["a"] < rates["c"]  # the more outliers, the fewer weights go
    assert max(rates.values()) - min(rates.values()) == pytest.approx(0.16)


def test_unequal_sizes_meet_the_target_weighted_and_clip_at_extreme_targets():
    ratios = {"stem": 0.001, "body": 0.05, "head": 0.02}
    sizes = {"stem": 400, "body": 90_000, "head": 5_000}
    for target in (0.5, 0.9, 0.95):
        rates = owl_rates(sizes, ratios, target, 0.08)
        weighted = sum(rates[k] * sizes[k] for k in sizes) / sum(sizes.values())
        assert weighted == pytest.approx(target, abs=1e-12)
        assert all(0.0 <= r <= 1.0 for r in rates.values())
        assert rates["body"] < rates["head"] <= rates["stem"]
    # the plain mean of the reference would miss the target: the big body sits 2 lambda below the small stem
    plain = reference_rates(list(ratios.values()), 0.5, 0.08)
    assert sum(r * n for r, n in zip(plain, sizes.values(), strict=True)) / sum(sizes.values()) < 0.5 - 0.05
    # 0.9: the stem would need 0.9 + 0.16 - a little > 1, so it is clipped and the others take the difference
    assert owl_rates(sizes, ratios, 0.9, 0.08)["stem"] == 1.0
    assert owl_rates(sizes, dict.fromkeys(sizes, 0.01), 0.6, 0.08) == dict.fromkeys(sizes, 0.6)


def test_counts_are_exact_and_follow_the_dense_wanda_scores():
    model = small_net()
    layers = find_prunable_layers(model)
    images = torch.randn(24, 3, 5, 5)
    norms = dense_input_norms(model, layers, tiny_calib(images), batch_size=10)
    counts = owl_counts(layers, 0.7, norms, OWLSettings())
    total = sum(ly.numel for ly in layers)
    assert sum(counts.values()) == round(0.7 * total)
    ratios = owl_ratios(layers, norms, 5.0)
    rates = owl_rates({ly.name: ly.numel for ly in layers}, ratios, 0.7, 0.08)
    for ly in layers:
        assert abs(counts[ly.name] - rates[ly.name] * ly.numel) < 1.0
    # the norms are those of the dense network's inputs, batch by batch
    x = model.eval()[:3](images).detach()
    unfolded = torch.nn.functional.unfold(x, 3, padding=1).view(24, 8, 9, 25)  # depthwise: 9 inputs per group
    unfolded = unfolded.permute(1, 2, 0, 3).reshape(8, 9, -1)
    assert torch.allclose(norms["3"], unfolded.pow(2).sum(-1), rtol=1e-5)


@pytest.mark.parametrize("make", [lambda: Wanda(allocation="owl", bn_recalibration=True),
                                  lambda: SparseGPT(allocation="owl", bn_recalibration=True),
                                  lambda: MagnitudePruning(allocation="owl", bn_recalibration=True)])
def test_owl_under_each_method_prunes_at_the_rates_of_the_dense_network(make):
    model = small_net()
    dense = copy.deepcopy(model)
    images = torch.randn(24, 3, 5, 5)
    ctx = PruneContext(tiny_calib(images), torch.device("cpu"), 0, progress=False)
    algorithm = make()
    layers = find_prunable_layers(model)
    result = algorithm.prune(model, layers, 0.7, ctx)
    dense_layers = find_prunable_layers(dense)
    norms = dense_input_norms(dense, dense_layers, ctx.calib, 64)
    expected = owl_counts(dense_layers, 0.7, norms, OWLSettings())
    for ly in layers:
        assert int((result.masks[ly.name] == 0).sum()) == expected[ly.name]
        assert int((ly.weight == 0).sum()) >= expected[ly.name]
        assert result.allocation[ly.name] == expected[ly.name] / ly.numel
    assert len(set(result.allocation.values())) > 1  # not uniform
    assert algorithm.label == f"{algorithm.name}-owl+bn" and algorithm.options()["owl_m"] == 5.0
    assert result.stats["calib_passes"] >= 2  # OWL's pass, then the method's and BN's


def test_owl_options_are_checked_and_named():
    assert Wanda(allocation="owl", owl={"m": 7, "lam": 0.1}).label == "wanda-owl-m7-l0.1"
    with pytest.raises(ConfigError, match="algorithm.owl sets"):
        Wanda(allocation="erk", owl={"m": 5})
    with pytest.raises(ConfigError, match="algorithm.owl.lam"):
        Wanda(allocation="owl", owl={"lam": -0.1})
    with pytest.raises(ConfigError, match="algorithm.owl.mm"):
        SparseGPT(allocation="owl", owl={"mm": 5})
    with pytest.raises(ConfigError, match="reads calibration statistics"):
        RandomPruning(allocation="owl")
    algorithm = Wanda(allocation="owl")
    algorithm.set_pattern(Pattern(2, 4))
    with pytest.raises(ConfigError, match="N:M"):
        algorithm.validate(find_prunable_layers(small_net()), 0.5)
