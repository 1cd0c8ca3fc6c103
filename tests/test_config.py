"""Every config group option composes against the schema; typos and wrong types fail at compose time."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from ptsbench.runner import build_algorithm
from tests.conftest import CONF, compose_config

GROUPS = ["model", "data", "algorithm", "calib", "train", "logger", "experiment"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option):
    cfg = compose_config([f"{group}={option}"])
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if group == "algorithm":
        algo = build_algorithm(cfg)
        assert algo.label


def test_defaults():
    cfg = compose_config()
    assert cfg.model.name == "resnet18" and cfg.data.name == "fashion_mnist"
    assert cfg.algorithm.allocation == "uniform" and cfg.algorithm.bn_recalibration is False
    assert cfg.calib.n == 1024 and cfg.calib.seed == cfg.seed == 0
    assert cfg.logger._target_ == "ptsbench.tracking.Tracker"


def test_benchmark_presets():
    cfg = compose_config(["algorithm=magnitude_erk_bn"])
    assert build_algorithm(cfg).label == "magnitude-erk+bn"


def test_typo_in_override_fails_at_compose():
    with pytest.raises(ConfigCompositionException, match="sparsty"):
        compose_config(["sparsty=0.5"])


def test_wrong_type_fails_at_compose():
    with pytest.raises(ConfigCompositionException, match="calib.n"):
        compose_config(["calib.n=many"])


def test_unknown_group_option_lists_available():
    with pytest.raises(ConfigCompositionException, match=r"Could not find 'model/resnet9'.*resnet18"):
        compose_config(["model=resnet9"])
