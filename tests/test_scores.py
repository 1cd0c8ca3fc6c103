"""The score axis: every registered score has the one signature and fills its layer's shape, a score is
chosen by name on magnitude's path (random and magnitude pruning are that path with their default score),
an unknown name fails before any work, and a module dropped into `ptsbench/toolkit/scores/` is a new score
with no edit elsewhere."""

from __future__ import annotations

import copy
import sys
import textwrap

import pytest
import torch

import ptsbench.toolkit.scores as scores_package
from algorithms.base import PruneContext
from algorithms.magnitude import MagnitudePruning
from algorithms.random_pruning import RandomPruning
from ptsbench.errors import ConfigError, PtsbenchError
from ptsbench.runner import build_algorithm
from ptsbench.toolkit.layerwise import dense_input_norms
from ptsbench.toolkit.patterns import Pattern, audit_pattern
from ptsbench.toolkit.scores import available_scores, get_score, register_score
from ptsbench.toolkit.scores.ria import ria_scores
from ptsbench.toolkit.scores.wanda import wanda_scores
from ptsbench.toolkit.sparsity import PrunableLayer, find_prunable_layers, magnitude_mask
from tests.conftest import compose_config
from tests.test_owl import small_net
from tests.test_sparsegpt import tiny_calib

CPU = torch.device("cpu")


def context(seed: int = 0) -> PruneContext:
    torch.manual_seed(1)
    return PruneContext(tiny_calib(torch.randn(24, 3, 5, 5)), CPU, seed, progress=False)


def prune(algorithm, target: float = 0.7, seed: int = 0):
    model = small_net()
    layers = find_prunable_layers(model)
    ctx = context(seed)
    dense = copy.deepcopy(model)
    return algorithm.prune(model, layers, target, ctx), dense, ctx


def test_every_score_fills_its_layer_and_says_what_it_reads():
    model = small_net()
    layers = find_prunable_layers(model)
    norms = dense_input_norms(model, layers, context().calib, 64)
    found = available_scores()
    assert {"magnitude", "random", "wanda", "ria"} <= set(found)
    for score in found.values():
        for ly in layers:
            squares = norms[ly.name] if score.needs_calibration else None
            values = score(ly, squares, torch.Generator().manual_seed(0))
            assert values.shape == ly.weight.shape and torch.isfinite(values).all(), score.name
    conv = layers[0]
    assert torch.equal(get_score("magnitude")(conv), conv.weight.detach().abs())
    squares = norms[conv.name]
    assert torch.equal(get_score("wanda")(conv, squares), wanda_scores(conv.weight, squares))
    ria = get_score("ria")
    assert torch.equal(ria(conv, squares), ria_scores(conv.weight, squares, 0.5))
    assert torch.equal(ria(conv, squares, options={"activation_exponent": 1.0}),
                       ria_scores(conv.weight, squares, 1.0))
    with pytest.raises(PtsbenchError, match="score wanda reads the layer's input norms"):
        get_score("wanda")(conv)


def test_random_and_magnitude_pruning_are_one_path_with_their_default_scores():
    random_result, dense, ctx = prune(RandomPruning(allocation="erk", bn_recalibration=True))
    # the masks the random control has always drawn: one CPU stream per job, layer after layer
    generator = ctx.generator("random.scores")
    counts = {name: round(rate * w.numel()) for name, rate, w in
              ((ly.name, random_result.allocation[ly.name], ly.weight) for ly in find_prunable_layers(dense))}
    for ly in find_prunable_layers(dense):
        drawn = torch.rand(ly.weight.shape, generator=generator)
        assert torch.equal(random_result.masks[ly.name], magnitude_mask(ly.weight, counts[ly.name], drawn))
    on_magnitude = MagnitudePruning(allocation="erk", bn_recalibration=True, score="random")
    control = RandomPruning(allocation="erk", bn_recalibration=True)
    assert on_magnitude.label == "random-erk+bn" == control.label
    assert on_magnitude.options()["score"] == "random" and "score" not in RandomPruning().options()
    same, _, _ = prune(on_magnitude)
    assert all(torch.equal(same.masks[k], random_result.masks[k]) for k in same.masks)
    magnitude, _, _ = prune(MagnitudePruning(allocation="erk", bn_recalibration=True))
    for ly in find_prunable_layers(dense):
        assert torch.equal(magnitude.masks[ly.name], magnitude_mask(ly.weight, counts[ly.name]))
    assert magnitude.stats == random_result.stats == {"bn_layers_recalibrated": 1, "calib_passes": 1}


@pytest.mark.parametrize("name", ["wanda", "ria"])
def test_a_calibrated_score_on_magnitudes_path_reads_the_dense_norms_once(name):
    algorithm = MagnitudePruning(allocation="erk", score=name)
    assert algorithm.label == f"{name}_score-erk" and algorithm.options()["score"] == name
    result, dense, ctx = prune(algorithm)
    dense_layers = find_prunable_layers(dense)
    norms = dense_input_norms(dense, dense_layers, ctx.calib, 64)
    for ly in dense_layers:
        n_zero = round(result.allocation[ly.name] * ly.numel)
        expected = magnitude_mask(ly.weight, n_zero, get_score(name)(ly, norms[ly.name]))
        assert torch.equal(result.masks[ly.name], expected)
    assert result.stats["calib_passes"] == 1
    # with OWL's rates the one pass serves the allocation and the score
    owl, _, _ = prune(MagnitudePruning(allocation="owl", score=name))
    assert owl.stats["calib_passes"] == 1
    not_unfoldable = PrunableLayer("norm", torch.nn.BatchNorm2d(2), "conv")
    with pytest.raises(ConfigError, match="take Conv2d and Linear"):  # refused before the calibration pass
        algorithm.validate([*find_prunable_layers(small_net()), not_unfoldable], 0.7)
    nm = MagnitudePruning(score=name)
    nm.set_pattern(Pattern(2, 4))
    model = small_net()
    layers = find_prunable_layers(model)
    nm.prune(model, layers, 0.5, context())
    audit_pattern(layers, Pattern(2, 4))


def test_shipped_score_configs_build_with_their_labels():
    assert build_algorithm(compose_config(["algorithm=wanda_score_erk_bn"])).label == "wanda_score-erk+bn"
    assert build_algorithm(compose_config(["algorithm=ria_score_erk_bn"])).label == "ria_score-erk+bn"
    assert build_algorithm(compose_config(["algorithm=magnitude", "+algorithm.score=random"])).label == \
        "random-uniform"


def test_an_unknown_score_names_the_key_the_value_and_the_scores():
    with pytest.raises(ConfigError) as err:
        build_algorithm(compose_config(["algorithm=magnitude_erk_bn", "+algorithm.score=wandaa"]))
    message = str(err.value)
    assert "algorithm.score" in message and "'wandaa'" in message
    assert "Allowed: magnitude, random, ria, wanda" in message and "Did you mean: wanda" in message
    # the random control's score is its definition, not an option
    with pytest.raises(ConfigError, match="algorithm.score"):
        build_algorithm(compose_config(["algorithm=random", "+algorithm.score=magnitude"]))


def test_a_name_is_registered_once(monkeypatch):
    monkeypatch.setattr(scores_package, "_REGISTRY", dict(scores_package._REGISTRY))
    with pytest.raises(PtsbenchError, match="'magnitude' is registered twice"):
        register_score("magnitude")(lambda layer, inputs: layer.weight)


TOY_SCORE = '''
"""A toy score: the largest |w| go first."""

from ptsbench.toolkit.scores import ScoreInputs, register_score
from ptsbench.toolkit.sparsity import PrunableLayer


@register_score("toy_largest_first")
def largest_first(layer: PrunableLayer, inputs: ScoreInputs):
    return -layer.weight.detach().abs()
'''


def test_a_module_in_the_scores_package_is_a_new_score(tmp_path, monkeypatch):
    (tmp_path / "toy_largest_first.py").write_text(textwrap.dedent(TOY_SCORE))
    # the package folder as if the module had been dropped into ptsbench/toolkit/scores/
    monkeypatch.setattr(scores_package, "__path__", [*scores_package.__path__, str(tmp_path)])
    monkeypatch.setattr(scores_package, "_REGISTRY", dict(scores_package._REGISTRY))
    module = f"{scores_package.__name__}.toy_largest_first"
    try:
        cfg = compose_config(["algorithm=magnitude_erk_bn", "+algorithm.score=toy_largest_first"])
        algorithm = build_algorithm(cfg)
        assert algorithm.label == "toy_largest_first-erk+bn"
        result, dense, _ = prune(algorithm)
        for ly in find_prunable_layers(dense):
            n_zero = round(result.allocation[ly.name] * ly.numel)
            expected = magnitude_mask(ly.weight, n_zero, -ly.weight.detach().abs())
            assert torch.equal(result.masks[ly.name], expected)
            if 0 < n_zero < ly.numel:  # the largest weight went, the smallest stayed
                kept = ly.weight.detach().abs()[result.masks[ly.name].bool()]
                assert kept.max() < ly.weight.detach().abs().max()
    finally:
        sys.modules.pop(module, None)
        if hasattr(scores_package, "toy_largest_first"):
            delattr(scores_package, "toy_largest_first")
        monkeypatch.undo()
    assert "toy_largest_first" not in available_scores()
