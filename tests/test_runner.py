"""One job through the runner on real (tiny) Fashion-MNIST: files, fields, accounting, failures."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from ptsbench.runner import JobFailed, run_job
from tests.conftest import TINY_RECIPE, compose_config

REQUIRED_FIELDS = {
    "model", "dataset", "algorithm", "method", "algorithm_options", "target_sparsity", "achieved_sparsity",
    "achieved_sparsity_all", "dense_top1", "top1", "top5", "prune_seconds", "calib_images", "calib_seed",
    "seed", "status", "error", "ptsbench_version", "git_commit", "config_hash", "rng_scheme",
}


def test_magnitude_job_writes_record_allocation_and_indices(tiny_cfg, tmp_path):
    cfg = tiny_cfg("sparsity=0.7", "algorithm.allocation=erk", "algorithm.bn_recalibration=true")
    record = run_job(cfg, tmp_path)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert set(saved) >= REQUIRED_FIELDS
    assert saved["status"] == "ok" and saved["error"] is None
    assert saved["method"] == "magnitude-erk+bn" == record["method"]
    assert abs(saved["achieved_sparsity"] - 0.7) < 1e-6
    assert saved["achieved_sparsity_all"] < saved["achieved_sparsity"]
    assert saved["dense_top1"] > 85.0, "the shipped ResNet-18 has 92.5% on the whole test split"
    assert saved["dense_source"] == "checkpoint"
    assert 0.0 <= saved["top1"] <= 100.0 and saved["top5"] >= saved["top1"]
    alloc = pd.read_csv(tmp_path / "allocation.csv")
    assert list(alloc.columns[:6]) == ["name", "type", "shape", "params", "target_sparsity",
                                       "achieved_sparsity"]
    assert len(alloc) == 21
    assert ((alloc["achieved_sparsity"] - alloc["target_sparsity"]).abs() * alloc["params"]).max() < 1.0
    calib = json.loads((tmp_path / "calib_indices.json").read_text())
    assert calib["n"] == 128 and len(set(calib["indices"])) == 128 and calib["seed"] == 0


def test_same_seed_same_result(tiny_cfg, tmp_path):
    cfg = tiny_cfg("sparsity=0.8", "algorithm.allocation=global", "algorithm.bn_recalibration=true")
    a = run_job(cfg, tmp_path / "a")
    b = run_job(cfg, tmp_path / "b")
    assert a["top1"] == b["top1"] and a["config_hash"] == b["config_hash"]
    assert pd.read_csv(tmp_path / "a" / "allocation.csv").equals(
        pd.read_csv(tmp_path / "b" / "allocation.csv"))


def test_dense_model_is_trained_once_and_cached(tmp_path, cache_dir, require_fmnist):
    def recipe_cfg(*overrides: str):
        return compose_config([*TINY_RECIPE, *overrides], cache_dir=cache_dir)

    first = run_job(recipe_cfg("sparsity=0.5"), tmp_path / "a")
    # the session cache is shared with other tests (and other xdist workers): look at this model's entry only
    weights = cache_dir / "dense" / f"{first['dense_key']}.safetensors"
    mtime = weights.stat().st_mtime_ns
    record = run_job(recipe_cfg("sparsity=0.6"), tmp_path / "b")
    assert record["dense_key"] == first["dense_key"] and weights.stat().st_mtime_ns == mtime
    # a retrained model would record its own training time; the cached one repeats the first's
    assert record["dense_train_seconds"] == first["dense_train_seconds"] > 0
    assert record["dense_source"] == "recipe" and record["dense_sha256"] == first["dense_sha256"]


@pytest.mark.parametrize("override,match", [
    ("sparsity=1.2", r"sparsity=1.2 is outside \[0, 1\)"),
    ("sparsity=abc", r"sparsity='abc' is not a number"),
    ("algorithm.allocation=ekr", r"Unknown allocation 'ekr'"),
    ("calib.n=100000", r"calib.n=100000 is larger than the train split"),
    ("model.checkpoint=null model.name=resnet181", r"Unknown timm model 'resnet181'"),
    ("model.name=resnet34", r"holds weights trained for the architecture 'resnet18'"),
])
def test_bad_input_is_recorded_with_a_clear_error(tiny_cfg, tmp_path, override, match):
    with pytest.raises(JobFailed, match=match):
        run_job(tiny_cfg(*override.split()), tmp_path)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["status"] == "failed"
    assert "traceback" not in saved  # user errors are one paragraph, not a stack trace
    import re

    assert re.search(match, saved["error"])
    if "allocation" not in override:  # the method is named even when the job fails on other input
        assert saved["method"] == "magnitude-uniform"
