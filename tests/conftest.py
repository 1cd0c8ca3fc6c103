"""Shared fixtures: real Hydra configs composed with the Compose API, tiny real-data overrides on the
shipped dense ResNet-18, and one session-wide cache (dense accuracies, the recipe models a test trains)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from ptsbench.config import register_configs

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
FMNIST = Path("/usr/share/datasets/fashion-mnist")

register_configs()

# Under pytest-xdist (scripts/test.sh runs one worker per core) each worker is one core's share: torch in
# the worker and the ptsbench processes the CLI tests start (OMP_NUM_THREADS is read at torch's import)
# keep to one thread, so two workers do not oversubscribe two cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# Small but real: the shipped dense ResNet-18 (the zoo's weights, the ones every benchmark prunes), 128
# calibration images drawn from the first 2,000 Fashion-MNIST train images, evaluated on 500 test images.
TINY = [
    "data.limit_train=2000",
    "data.limit_test=500",
    "calib.n=128",
    "progress=false",
]
# The training path itself (the recipe, the dense cache): one epoch of the recipe on 256 images, seconds.
TINY_RECIPE = [
    "model.checkpoint=null",
    "data.limit_train=256",
    "data.limit_test=100",
    "train.epochs=1",
    "calib.n=64",
    "progress=false",
]


def compose_config(overrides: list[str] | None = None, cache_dir: Path | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides or []), return_hydra_config=False)
    if cache_dir is not None:
        with open_dict(cfg):
            cfg.cache_dir = str(cache_dir)
    return cfg


@pytest.hookimpl(trylast=True)  # after -m has deselected
def pytest_collection_modifyitems(config, items):
    """Under xdist benchmarks are skipped: they time themselves, and beside another worker their figures
    would measure the neighbour."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    skip = pytest.mark.skip(reason="benchmarks run in one process: add -n 0 (scripts/test.sh does for "
                                   "-m bench)")
    for item in items:
        if item.get_closest_marker("bench"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache for the whole run. Under xdist every worker has its own temporary root below a shared
    one; the cache sits in the shared root so the dense accuracies and the recipe models a test trains are
    computed once for all workers (the dense cache takes a file lock per model, so a second worker waits for
    the first one's entry)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = tmp_path_factory.getbasetemp().parent / "ptsbench-cache"
        shared.mkdir(exist_ok=True)
        return shared
    return tmp_path_factory.mktemp("ptsbench-cache")


@pytest.fixture(scope="session")
def require_fmnist() -> Path:
    if not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.fail("Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist (scripts/setup.sh "
                    "does it)")
    return FMNIST


@pytest.fixture
def tiny_cfg(cache_dir, require_fmnist):
    def make(*overrides: str) -> DictConfig:
        return compose_config(TINY + list(overrides), cache_dir=cache_dir)

    return make


@pytest.fixture(scope="session")
def tiny_dense(cache_dir, require_fmnist):
    """The dense ResNet-18 of the test session (the shipped zoo weights, evaluated once on 500 test images)
    and its 128 calibration images. Tests that change the model deep-copy it first."""
    from ptsbench.data import sample_calibration
    from ptsbench.dense import build_model, load_data, load_dense_weights

    cfg = compose_config(TINY, cache_dir=cache_dir)
    data = load_data(cfg, cache_dir)
    model = build_model(cfg, data)
    load_dense_weights(cfg, model, data, cache_dir, torch.device("cpu"), progress=False)
    calib = sample_calibration(data.train, int(cfg.calib.n), int(cfg.calib.seed), int(cfg.calib.batch_size))
    return model.eval(), calib


@pytest.fixture(autouse=True)
def clean_commit(monkeypatch):
    """Jobs run by tests record a fixed clean commit: collecting a study leaves out records of a dirty tree,
    and the suite must not depend on whether the checkout it runs in has uncommitted changes."""
    from ptsbench import runner

    monkeypatch.setattr(runner, "git_commit", lambda: "0" * 40)
