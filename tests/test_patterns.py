"""The pattern axis: parsing and target rules, N:M masks, the audit of every group, and refusals of
combinations that make no sense, checked before any work."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from algorithms.fcpts import FCPTS
from algorithms.magnitude import MagnitudePruning
from ptsbench.audit import audit_model
from ptsbench.errors import ConfigError
from ptsbench.runner import JobFailed, build_algorithm, run_job
from ptsbench.toolkit.patterns import (
    UNSTRUCTURED,
    Pattern,
    PatternViolation,
    audit_pattern,
    check_pattern_target,
    nm_mask,
    parse_pattern,
)
from ptsbench.toolkit.sparsity import PrunableLayer, find_prunable_layers
from tests.conftest import compose_config


def test_parse_presets_and_any_n_below_m():
    assert parse_pattern("unstructured") is UNSTRUCTURED
    assert parse_pattern("2:4") == Pattern(2, 4) and parse_pattern("4:8").sparsity == 0.5
    assert str(parse_pattern(" 1:3 ")) == "1:3"
    for bad in ("4:2", "2:2", "0:4", "2-4", "dense"):
        with pytest.raises(ConfigError, match="pattern="):
            parse_pattern(bad)
    with pytest.raises(ConfigError, match="quote it"):
        parse_pattern(124)  # what YAML makes of an unquoted 2:4


def test_sparsity_must_be_the_patterns():
    assert check_pattern_target(Pattern(2, 4), 0.5) == 0.5
    assert check_pattern_target(Pattern(1, 3), 0.6667) == 1 - 1 / 3  # what a user types, to 4 decimals
    assert check_pattern_target(UNSTRUCTURED, 0.9) == 0.9
    with pytest.raises(ConfigError, match=r"1 - 1/3 = 0.6667 .* sparsity=0.67\. Set sparsity=0.6667"):
        check_pattern_target(Pattern(1, 3), 0.67)  # rounds to another value: refused, not met by surprise
    with pytest.raises(ConfigError,
                       match=r"pattern=2:4 keeps 2 of every 4 .* sparsity=0.7\. Set sparsity=0.5"):
        check_pattern_target(Pattern(2, 4), 0.7)


def test_nm_mask_keeps_the_n_largest_of_every_group():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.1, 0.4, 0.3, 0.2]])
    assert nm_mask(scores, 2, 4).tolist() == [[1, 0, 1, 0, 0, 1, 1, 0]]
    conv = torch.rand(8, 4, 3, 3)  # rows of 36 = 9 groups of 4 in (c, kh, kw) order
    mask = nm_mask(conv, 1, 4)
    assert mask.shape == conv.shape and torch.all(mask.reshape(-1, 4).sum(1) == 1)


def _model_and_layers() -> tuple[nn.Module, list[PrunableLayer]]:
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Flatten(), nn.Linear(8, 4))
    return model, find_prunable_layers(model)


def test_audit_passes_nm_masks_and_fails_a_broken_group():
    model, layers = _model_and_layers()
    pattern = Pattern(2, 4)
    with torch.no_grad():
        for ly in layers:
            if pattern.fits(ly):
                ly.weight.mul_(nm_mask(ly.weight.abs(), 2, 4))
    fields = audit_model(model, layers, 0.5, pattern=pattern).summary()
    assert fields["pattern"] == "2:4"
    assert fields["pattern_dense_layers"] == ["1"]  # depthwise 3x3: rows of 9 weights are left dense
    assert fields["pattern_dense_params"] == 72
    with torch.no_grad():
        first = layers[0].weight.view(8, -1)
        first[3, :4] = 1.0  # three nonzeros too many in one group
    with pytest.raises(PatternViolation, match=r"more than 2 nonzeros in 1 layer\(s\): 0 \(1 groups\)"):
        audit_pattern(layers, pattern)


def test_methods_that_choose_their_own_rates_refuse_nm():
    with pytest.raises(ConfigError,
                       match="cannot be combined with algorithm fcpts: it chooses its own per-layer"):
        FCPTS().set_pattern(Pattern(2, 4))
    _, layers = _model_and_layers()
    magnitude = MagnitudePruning(allocation="erk")
    magnitude.set_pattern(Pattern(2, 4))
    with pytest.raises(ConfigError, match="allocation=erk cannot be combined with pattern=2:4"):
        magnitude.validate(layers, 0.5)
    assert MagnitudePruning().label == "magnitude-uniform"


def test_pattern_is_a_top_level_key_in_hydra():
    cfg = compose_config(["algorithm=wanda", "pattern=2:4", "sparsity=0.5"])
    assert cfg.pattern == "2:4" and compose_config([]).pattern == "unstructured"
    algorithm = build_algorithm(cfg)
    algorithm.set_pattern(parse_pattern(cfg.pattern))
    assert algorithm.label == "wanda-2:4"


def test_nm_job_records_the_pattern_and_its_dense_layers(tiny_cfg, tmp_path):
    record = run_job(tiny_cfg("pattern=2:4", "sparsity=0.5"), tmp_path / "nm")
    assert record["status"] == "ok" and record["pattern"] == "2:4" and record["method"] == "magnitude-2:4"
    assert record["pattern_dense_layers"] == ["conv1"]  # the one-channel 7x7 stem: rows of 49
    assert 0.499 < record["achieved_sparsity"] < 0.5
    with pytest.raises(JobFailed, match="Set sparsity=0.5"):
        run_job(tiny_cfg("pattern=2:4", "sparsity=0.7"), tmp_path / "wrong")


def test_nm_sparsity_typed_to_four_decimals_is_met(tiny_cfg, tmp_path):
    """1:3 leaves the 1-channel 7x7 stem (rows of 49), the 1x1 downsampling convs and the classifier (rows of
    64-512) dense: the target counts the other layers, at exactly 2/3, so sparsity=0.6667 ends ok and the
    record names the layers left out."""
    record = run_job(tiny_cfg("pattern=1:3", "sparsity=0.6667"), tmp_path / "nm")
    assert record["status"] == "ok" and record["error"] is None
    assert record["target_sparsity"] == pytest.approx(2 / 3, abs=1e-12)
    assert record["pattern_dense_layers"][0] == "conv1" and record["pattern_dense_layers"][-1] == "fc"
    assert record["achieved_sparsity"] < 0.66  # over all prunable weights, the dense layers included


def test_missed_nm_target_names_the_layers_out_of_the_count():
    from ptsbench.audit import audit_model, target_missed
    from ptsbench.toolkit.sparsity import find_prunable_layers

    model = torch.nn.Sequential(torch.nn.Linear(7, 30), torch.nn.Linear(30, 30))  # rows of 7 do not fit 1:3
    layers = find_prunable_layers(model)
    with torch.no_grad():
        model[1].weight.mul_(nm_mask(model[1].weight.abs(), 1, 3))
    audit = audit_model(model, layers, 0.6, {"0": 0.0, "1": 2 / 3}, pattern=Pattern(1, 3))
    message = target_missed(audit, {})
    assert "over the 900 weights the target counts: pattern 1:3 leaves layers 0 dense, out of the" in message
    assert "60 weights above the target 0.6" in message
