"""Sparse checkpoints that stay sparse, resume, non-finite losses, and atomic result files."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from ptsbench.checkpoint import read_compact_form, save_compact_form
from ptsbench.errors import CheckpointError, NonFiniteLossError, ensure_finite
from ptsbench.results import write_json
from ptsbench.runner import run_job


def test_save_sparse_reloads_with_same_sparsity_and_accuracy(tiny_cfg, tmp_path):
    record = run_job(tiny_cfg("sparsity=0.9", "algorithm.allocation=global", "save_sparse=true"), tmp_path)
    assert record["status"] == "ok"
    assert record["reload_top1"] == record["top1"]
    assert record["reload_achieved_sparsity"] == record["achieved_sparsity"]
    assert record["compact_checkpoint_bytes"] < record["checkpoint_bytes"] / 5
    state = load_file(str(tmp_path / "sparse_model.safetensors"))
    zeros = sum(int((v == 0).sum()) for k, v in state.items() if k.endswith(".weight") and v.ndim > 1)
    assert zeros >= record["zero_weights"]


def test_compact_form_round_trip_and_corruption(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    with torch.no_grad():
        model[0].weight[torch.rand_like(model[0].weight) < 0.8] = 0
    path = tmp_path / "m.safetensors"
    save_compact_form(model, ["0.weight"], path)
    state = read_compact_form(path)
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key
    dense = tmp_path / "d.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(3)}, str(dense))
    with pytest.raises(CheckpointError, match="not a ptsbench compact checkpoint"):
        read_compact_form(dense)


def test_resume_skips_finished_identical_config(tiny_cfg, tmp_path):
    cfg = tiny_cfg("sparsity=0.6", "resume=true")
    first = run_job(cfg, tmp_path / "0", resume_dirs=[tmp_path])
    mtime = (tmp_path / "0" / "result.json").stat().st_mtime_ns
    again = run_job(cfg, tmp_path / "1", resume_dirs=[tmp_path])
    assert again.get("skipped") is True and again["config_hash"] == first["config_hash"]
    assert not (tmp_path / "1" / "result.json").exists()
    assert (tmp_path / "0" / "result.json").stat().st_mtime_ns == mtime
    other = run_job(tiny_cfg("sparsity=0.7", "resume=true"), tmp_path / "2", resume_dirs=[tmp_path])
    assert not other.get("skipped") and (tmp_path / "2" / "result.json").exists()


def test_non_finite_loss_stops():
    assert ensure_finite(1.5, "loss") == 1.5
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 3"):
        ensure_finite(float("nan"), "loss", 3)
    with pytest.raises(NonFiniteLossError, match="inf"):
        ensure_finite(float("inf"), "loss")


def test_result_files_are_replaced_atomically(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    write_json(path, {"status": "ok", "top1": 90.0})

    def broken_replace(src, dst):
        raise KeyboardInterrupt  # an interrupt between write and rename

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(KeyboardInterrupt):
        write_json(path, {"status": "ok", "top1": 10.0})
    monkeypatch.undo()
    assert json.loads(path.read_text())["top1"] == 90.0  # the old record is intact
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary file left behind


def test_paths_never_leave_their_root(tmp_path):
    from ptsbench.errors import ConfigError
    from ptsbench.paths import safe_child, safe_subdir

    root = tmp_path / "cache"
    assert safe_subdir(root, "dense").is_dir()
    assert safe_child(root, "dense", "m.safetensors") == root / "dense" / "m.safetensors"
    with pytest.raises(ConfigError, match="would leave"):
        safe_child(root, "../escape")
    with pytest.raises(ConfigError, match="would leave"):
        safe_child(root, "/etc")
    (tmp_path / "elsewhere").mkdir()
    (root / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="outside"):
        safe_child(root, "link", "file")
