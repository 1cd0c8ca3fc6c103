"""The keys and values of a job's record (result.json): committed studies and the analysis read them, so a
change to how the runner builds a record must leave them as they are."""

from __future__ import annotations

import json

import pytest

from ptsbench.runner import JobFailed, run_job

# Every record starts with these; a job refused before any work (a bad config) records only them.
REFUSED_KEYS = {
    "algorithm", "algorithm_options", "budget_fraction", "calib_images", "calib_seed", "config_hash",
    "dataset", "error", "experiment", "finished_at", "git_commit", "host", "job_dir", "method",
    "method_family", "model", "pattern", "ptsbench_version", "rng_scheme", "seed", "started_at", "status",
    "target_sparsity", "timm_version", "torch_version",
}
OK_KEYS = REFUSED_KEYS | {
    "achieved_sparsity", "achieved_sparsity_all", "backward_calls", "backward_passes", "compile",
    "dense_dead_fraction", "dense_key", "dense_sha256", "dense_source", "dense_top1", "dense_top5",
    "dense_train_seconds", "dense_zero_layers", "dense_zero_weights", "device", "effective_sparsity",
    "eval_images", "eval_images_per_second", "eval_seconds", "forward_calls", "forward_passes", "macs_dense",
    "macs_model", "macs_sparse", "mask_hash", "max_layer_count_error", "peak_memory_mb", "peak_memory_source",
    "peak_rss_mb", "peak_rss_source", "prunable_params", "prune_seconds", "sparsity_error", "speed", "stats",
    "top1", "top5", "torch_threads", "total_params", "zero_weights",
}


@pytest.mark.parametrize("overrides, target, method, error", [
    (["sparsity=1.5"], 1.5, "magnitude-uniform",
     "ConfigError: sparsity=1.5 is outside [0, 1): a sparsity is the fraction of weights removed."),
    (["sparsity=abc"], "abc", "magnitude-uniform",
     "ConfigError: sparsity='abc' is not a number; it must be a float in [0, 1)."),
    # the pattern is set on the method before the target is checked: the record names the N:M method
    (["pattern=2:4", "sparsity=0.6"], 0.6, "magnitude-2:4",
     "ConfigError: pattern=2:4 keeps 2 of every 4 weights, i.e. sparsity 1 - 2/4 = 0.5 in every layer it "
     "applies to, but sparsity=0.6. Set sparsity=0.5 (or use pattern=unstructured)."),
    (["calib.n=8", "calib.batch_size=64"], 0.5, "magnitude-uniform",
     "ConfigError: calib.n=8 is below one calibration batch (calib.batch_size=64)."),
])
def test_a_refused_job_records_what_it_named(tiny_cfg, tmp_path, overrides, target, method, error):
    with pytest.raises(JobFailed) as failure:
        run_job(tiny_cfg(*overrides), tmp_path)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert set(saved) == REFUSED_KEYS and failure.value.record == saved
    pattern = "2:4" if "pattern=2:4" in overrides else "unstructured"
    assert {k: saved[k] for k in ("model", "dataset", "algorithm", "method", "method_family",
                                  "target_sparsity", "pattern", "seed", "calib_seed", "calib_images",
                                  "status", "error", "experiment", "rng_scheme", "git_commit",
                                  "budget_fraction")} == {
        "model": "resnet18", "dataset": "fashion_mnist", "algorithm": "magnitude", "method": method,
        "method_family": method, "target_sparsity": target, "pattern": pattern, "seed": 0, "calib_seed": 0,
        "calib_images": 8 if "calib.n=8" in overrides else 128, "status": "failed", "error": error,
        "experiment": "default", "rng_scheme": "streams-v1", "git_commit": "0" * 40, "budget_fraction": None}


def test_an_ok_record_has_every_stage_and_a_skipped_one_is_the_earlier(tiny_cfg, tmp_path):
    record = run_job(tiny_cfg("algorithm=magnitude_erk_bn", "sparsity=0.7"), tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "result.json").read_text())
    assert set(saved) == OK_KEYS and saved["status"] == "ok" and saved["error"] is None
    assert saved["target_sparsity"] == 0.7 and saved["method"] == "magnitude-erk+bn"
    again = run_job(tiny_cfg("algorithm=magnitude_erk_bn", "sparsity=0.7", "resume=true"), tmp_path / "b",
                    resume_dirs=[tmp_path / "a"])
    assert again == {**saved, "skipped": True} and set(record) == OK_KEYS
