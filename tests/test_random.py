"""Random pruning, the method added with only its module, its yaml and this test: seeded masks, exact
per-layer counts, valid N:M groups, and a control that magnitude pruning beats."""

from __future__ import annotations

import copy

import torch

from algorithms.base import PruneContext
from algorithms.magnitude import MagnitudePruning
from algorithms.random_pruning import RandomPruning
from ptsbench.evaluate import evaluate
from ptsbench.runner import build_algorithm
from ptsbench.toolkit.patterns import Pattern, audit_pattern
from ptsbench.toolkit.sparsity import find_prunable_layers
from tests.conftest import compose_config

CPU = torch.device("cpu")


def prune(algorithm, tiny_dense, seed: int, target: float = 0.7):
    model, calib = copy.deepcopy(tiny_dense[0]), tiny_dense[1]
    layers = find_prunable_layers(model)
    result = algorithm.prune(model, layers, target,
                             PruneContext(calib=calib, device=CPU, seed=seed, progress=False))
    return result, layers


def test_same_seed_same_masks_exact_counts_and_nm_groups(tiny_dense):
    algo = build_algorithm(compose_config(["algorithm=random", "algorithm.allocation=erk"]))
    assert algo.label == "random-erk"
    (a, layers), (b, _), (c, _) = (prune(algo, tiny_dense, s) for s in (0, 0, 1))
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert any(not torch.equal(a.masks[k], c.masks[k]) for k in a.masks)
    for ly in layers:  # the masks' counts (a zero of the dense weights the draw missed stays a zero too)
        assert int((a.masks[ly.name] == 0).sum()) == round(a.allocation[ly.name] * ly.numel)
    nm = RandomPruning()
    nm.set_pattern(Pattern(2, 4))
    result, layers = prune(nm, tiny_dense, 0, target=0.5)
    audit_pattern(layers, Pattern(2, 4))  # raises PatternViolation on a group with more than 2 of 4 kept
    fitting = [ly for ly in layers if Pattern(2, 4).fits(ly)]
    assert fitting and all(int((result.masks[ly.name] == 0).sum()) == ly.numel // 2 for ly in fitting)
    assert nm.label == "random-2:4"


def test_magnitude_beats_the_random_control(tiny_dense):
    calib = tiny_dense[1]
    top1 = {}
    for name, algo in {"random": RandomPruning(bn_recalibration=True),
                       "magnitude": MagnitudePruning(bn_recalibration=True)}.items():
        result, _ = prune(algo, tiny_dense, 0, target=0.9)
        top1[name] = evaluate(result.model.eval(), calib.data, CPU).top1
    assert top1["magnitude"] > top1["random"] + 10, top1
