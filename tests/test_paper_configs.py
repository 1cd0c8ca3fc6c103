"""The paper-setting presets (conf/experiment/*_imagenet.yaml, msbench_reconstruction.yaml): each composes
with its published values pinned, and each runs end to end for a few iterations on a tiny ImageFolder
made here, with the dense weights from a local checkpoint (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image
from safetensors.torch import save_file

from ptsbench.runner import build_algorithm, run_job
from tests.conftest import CONF

ALL_CONV_AND_LINEAR = {"first_conv": True, "classifier": True, "depthwise": True, "attention": True}

# experiment -> (pinned values by dotted key, the sweep grid)
PINNED = {
    "fcpts_imagenet": (
        {"data.name": "imagenet", "data.crop_pct": 1.0, "calib.n": 1024, "calib.batch_size": 64, "seed": 0,
         "algorithm._target_": "algorithms.fcpts.FCPTS", "algorithm.optimization.iterations": 1600,
         "algorithm.optimization.batch_size": 64,
         "algorithm.optimization.lr": 0.01, "algorithm.objective.temperature": 4.0,
         "algorithm.objective.sparsity_lambda": 1.0},
        {"model": "resnet18_tv_in1k,resnet50_tv_in1k,mobilenetv2_in1k,regnetx_006",
         "sparsity": "0.5,0.6,0.7,0.8,0.9"},
    ),
    "unipts_imagenet": (
        {"data.name": "imagenet", "data.crop_pct": 0.875, "calib.n": 10240, "seed": 0,
         "algorithm._target_": "algorithms.unipts.UniPTS", "algorithm.search.population_size": 25,
         "algorithm.search.generations": 25, "algorithm.training.epochs": 100,
         "algorithm.search.fitness_set_size": 10240,
         "algorithm.objective.kind": "base_decayed", "algorithm.training.dst": True},
        {"model": "resnet18_tv_in1k,resnet50_tv_in1k", "sparsity": "0.9"},
    ),
    "unipts_imagenet_mobilenetv2": (
        {"data.name": "imagenet", "calib.n": 10240, "algorithm._target_": "algorithms.unipts.UniPTS",
         "algorithm.search.generations": 25, "algorithm.training.epochs": 100,
         "experiment_name": "unipts_imagenet_mobilenetv2"},
        {"model": "mobilenetv2_in1k", "sparsity": "0.5"},
    ),
    "pot_imagenet": (
        {"data.name": "imagenet", "data.crop_pct": 0.875, "calib.n": 10240,
         "algorithm._target_": "algorithms.pot.POT",
         "algorithm.allocation": "global_l2norm", "algorithm.fold_bn": True,
         "algorithm.reconstruction.mode": "layer",
         "algorithm.reconstruction.iterations": 20000, "algorithm.reconstruction.lr": 1e-5},
        {"model": "resnet18_tv_in1k,resnet50_tv_in1k,mobilenetv2_in1k", "sparsity": "0.5,0.6,0.7,0.8,0.9"},
    ),
    "msbench_reconstruction": (
        {"data.name": "imagenet", "data.crop_pct": 0.875, "calib.n": 1024, "calib.batch_size": 64,
         "algorithm._target_": "algorithms.magnitude.MagnitudePruning", "algorithm.allocation": "uniform",
         "algorithm.bn_recalibration": False, "algorithm.reconstruction.iterations": 20000,
         "algorithm.reconstruction.lr": 1e-5,
         "algorithm.reconstruction.inputs": "dense"},
        {"model": "resnet18_tv_in1k,resnet50_tv_in1k,mobilenetv2_in1k,regnetx_006",
         "algorithm.reconstruction.mode": "none,layer,block", "sparsity": "0.3,0.4,0.5,0.6"},
    ),
}

# model config -> the timm weights it names (torchvision's ResNets: the papers' dense models)
PAPER_MODELS = {
    "resnet18_tv_in1k": "resnet18.tv_in1k",
    "resnet50_tv_in1k": "resnet50.tv_in1k",
    "mobilenetv2_in1k": "mobilenetv2_100.ra_in1k",
    "regnetx_006": "regnetx_006.pycls_in1k",
}


def compose_with_hydra(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("experiment", sorted(PINNED))
def test_paper_preset_pins_its_setting(experiment):
    cfg = compose_with_hydra([f"experiment={experiment}"])
    values, grid = PINNED[experiment]
    for key, expected in values.items():
        assert OmegaConf.select(cfg, key) == expected, key
    assert OmegaConf.to_container(cfg.prune_policy) == ALL_CONV_AND_LINEAR
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert OmegaConf.to_container(cfg.hydra.sweeper.params) == grid
    # every grid point composes, and its algorithm builds
    for model in grid["model"].split(","):
        point = compose_with_hydra([f"experiment={experiment}", f"model={model}"])
        assert point.model.name == PAPER_MODELS[model] and point.model.pretrained is True
        assert type(build_algorithm(point)).__name__ == cfg.algorithm._target_.rsplit(".", 1)[1]


def test_msbench_reconstruction_labels_match_the_reference_families():
    from ptsbench.analysis.reference import method_family

    families = {
        mode: method_family(build_algorithm(compose_with_hydra(
            ["experiment=msbench_reconstruction", f"algorithm.reconstruction.mode={mode}"])).label)
        for mode in ("none", "layer", "block")
    }
    assert families == {"none": "uniform mag no-recon", "layer": "uniform mag + layer recon",
                        "block": "uniform mag + block recon"}


# ------------------------------------------------------------------------------- tiny ImageFolder runs


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory) -> Path:
    """2 classes x 8 random 32x32 PNG images in each of train/ and val/ (the ImageNet folder layout)."""
    root = tmp_path_factory.mktemp("tiny-imagenet")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("n01440764", "n01443537"):
            (root / split / cls).mkdir(parents=True)
            for i in range(8):
                pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{cls}_{i}.png")
    return root


def local_checkpoint(timm_name: str, path: Path) -> Path:
    """Random 2-class weights for `timm_name` in a local file: stands in for the real checkpoint offline."""
    model = timm.create_model(timm_name, pretrained=False, num_classes=2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


TINY_IMAGEFOLDER = ["data.img_size=32", "data.num_workers=0", "calib.n=8", "calib.batch_size=4",
                    "progress=false",
                    "eval.batch_size=8"]

# (experiment, model, sparsity, overrides that cut the budget to a few steps)
RUNS = [
    ("fcpts_imagenet", "resnet18_tv_in1k", 0.8, ["algorithm.optimization.iterations=2",
                                                 "algorithm.optimization.batch_size=4"]),
    ("msbench_reconstruction", "mobilenetv2_in1k", 0.5,
     ["algorithm.reconstruction.mode=block", "algorithm.reconstruction.iterations=2",
      "algorithm.reconstruction.batch_size=4"]),
    ("pot_imagenet", "resnet18_tv_in1k", 0.9, ["algorithm.reconstruction.iterations=2",
                                               "algorithm.reconstruction.batch_size=4"]),
    ("unipts_imagenet", "resnet18_tv_in1k", 0.9,
     ["algorithm.search.population_size=4", "algorithm.search.generations=1",
      "algorithm.search.num_parents=2",
      "algorithm.search.fitness_set_size=8", "algorithm.training.epochs=1",
      "algorithm.training.batch_size=4"]),
]


@pytest.mark.parametrize("experiment,model,sparsity,budget", RUNS, ids=[r[0] for r in RUNS])
def test_paper_preset_runs_on_a_tiny_image_folder(experiment, model, sparsity, budget, tiny_imagenet,
                                                  tmp_path):
    ckpt = local_checkpoint(PAPER_MODELS[model], tmp_path / "dense.safetensors")
    cfg = compose_with_hydra([f"experiment={experiment}", f"model={model}", f"model.checkpoint={ckpt}",
                              f"data.root={tiny_imagenet}", f"sparsity={sparsity}", *TINY_IMAGEFOLDER,
                              *budget])
    with open_dict(cfg):
        del cfg["hydra"]  # run_job sees what a Hydra job sees
        cfg.cache_dir = str(tmp_path / "cache")
    assert cfg.model.pretrained is True  # the preset's hub setting: the local checkpoint wins, no download
    record = run_job(cfg, tmp_path / "job")
    assert record["status"] == "ok", record["error"]
    assert record["dataset"] == "imagenet" and record["model"] == PAPER_MODELS[model]
    assert record["dense_source"] == "checkpoint" and record["eval_images"] == 16
    assert record["experiment"] == experiment and record["calib_images"] == 8
    assert abs(record["achieved_sparsity"] - sparsity) < 0.02
    assert 0.0 <= record["top1"] <= 100.0
