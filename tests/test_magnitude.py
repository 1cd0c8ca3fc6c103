"""Magnitude PTS: allocations end to end, BN re-estimation, and allocations carried between jobs."""

from __future__ import annotations

import pandas as pd
import pytest

from ptsbench.runner import JobFailed, run_job


def test_bn_recalibration_changes_running_stats_and_helps_at_high_sparsity(tiny_cfg, tmp_path):
    plain = run_job(tiny_cfg("sparsity=0.9", "algorithm.allocation=uniform"), tmp_path / "plain")
    bn = run_job(tiny_cfg("sparsity=0.9", "algorithm.allocation=uniform", "algorithm.bn_recalibration=true"),
                 tmp_path / "bn")
    assert bn["stats"]["bn_layers_recalibrated"] == 20 and plain["stats"]["bn_layers_recalibrated"] == 0
    assert plain["mask_hash"] == bn["mask_hash"]  # same masks, different BN statistics
    assert bn["top1"] > plain["top1"]


def test_allocation_file_reproduces_another_jobs_counts(tiny_cfg, tmp_path):
    src = run_job(tiny_cfg("sparsity=0.8", "algorithm.allocation=global"), tmp_path / "src")
    path = tmp_path / "src" / "allocation.csv"
    dst = run_job(tiny_cfg("sparsity=0.8", "algorithm.allocation=from_file",
                           f"algorithm.allocation_file={path}"),
                  tmp_path / "dst")
    a, b = pd.read_csv(path), pd.read_csv(tmp_path / "dst" / "allocation.csv")
    assert a["zeros"].tolist() == b["zeros"].tolist()
    assert dst["mask_hash"] == src["mask_hash"]
    assert dst["method"] == "magnitude-from_file"


def test_allocation_file_that_does_not_fit(tiny_cfg, tmp_path):
    run_job(tiny_cfg("sparsity=0.5", "algorithm.allocation=erk"), tmp_path / "src")
    path = tmp_path / "src" / "allocation.csv"
    with pytest.raises(JobFailed, match=r"global sparsity 0.5\d* \(.* weights from the target sparsity=0.9"):
        run_job(tiny_cfg("sparsity=0.9", "algorithm.allocation=from_file",
                         f"algorithm.allocation_file={path}"),
                tmp_path / "wrong-target")
    table = pd.read_csv(path)
    table.loc[0, "name"] = "no_such_layer"
    bad = tmp_path / "bad.csv"
    table.to_csv(bad, index=False)
    with pytest.raises(JobFailed, match=r"layers the model does not have: \['no_such_layer'\]"):
        run_job(tiny_cfg("sparsity=0.5", "algorithm.allocation=from_file",
                         f"algorithm.allocation_file={bad}"),
                tmp_path / "wrong-names")


def test_allocation_file_contents_are_checked_like_the_audit(tiny_cfg, tmp_path):
    """Every content error names the key, the file and the row; a file a few weights off the target is refused
    before any work instead of ending target_missed."""
    run_job(tiny_cfg("sparsity=0.5", "algorithm.allocation=erk"), tmp_path / "src")
    good = pd.read_csv(tmp_path / "src" / "allocation.csv")

    def refused(name, content, match):
        path = tmp_path / name
        if isinstance(content, pd.DataFrame):
            content.to_csv(path, index=False)
        else:
            path.write_bytes(content)
        with pytest.raises(JobFailed, match=match) as failure:
            run_job(tiny_cfg("sparsity=0.5", "algorithm.allocation=from_file",
                             f"algorithm.allocation_file={path}"), tmp_path / f"job-{name}")
        assert f"algorithm.allocation_file='{path}'" in str(failure.value)
        assert not (tmp_path / f"job-{name}" / "calib_indices.json").exists()  # before any work

    text = good.copy()
    text["achieved_sparsity"] = text["achieved_sparsity"].astype(object)
    text.loc[3, "achieved_sparsity"] = "half"
    refused("text.csv", text, r"must hold a sparsity in \[0, 1\] .* line 5 \('.*': 'half'\)")
    refused("empty.csv", b"", r"is empty")
    refused("random.csv", bytes(range(256)) * 8, r"is not a CSV table|has no 'name'")
    refused("twice.csv", pd.concat([good, good.iloc[[2]]]), r"a layer more than once: line 4 .* line 23")
    off = good.copy()  # 0.005 below the target in the largest layer: about 12,000 weights
    largest = off["params"].idxmax()
    off.loc[largest, "achieved_sparsity"] -= 0.005 * off["params"].sum() / off.loc[largest, "params"]
    refused("off.csv", off, r"weights from the target sparsity=0.5; the audit allows 21 \(one per layer\)")
