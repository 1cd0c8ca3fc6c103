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
    with pytest.raises(ConfigCompositionException, match=r"(?s)Could not find 'model/resnet9'.*resnet18"):
        compose_config(["model=resnet9"])


@pytest.mark.parametrize("launcher", ["parallel", "slurm"])
def test_launcher_presets_compose(launcher):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    if launcher == "parallel":
        assert cfg.hydra.launcher.n_jobs == 2
        assert "JoblibLauncher" in cfg.hydra.launcher._target_
    else:
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.array_parallelism == 32
        assert "SlurmLauncher" in cfg.hydra.launcher._target_


def test_threads_shared_among_parallel_jobs(monkeypatch):
    from omegaconf import OmegaConf

    from ptsbench.cli import threads_per_job

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    cfg = OmegaConf.create({"threads": None})
    assert threads_per_job(cfg, OmegaConf.create({"launcher": {"n_jobs": 4}})) == 2
    assert threads_per_job(cfg, OmegaConf.create({"launcher": {"n_jobs": -1}})) == 1
    assert threads_per_job(cfg, OmegaConf.create({"launcher": {"_target_": "basic"}})) is None
    assert threads_per_job(OmegaConf.create({"threads": 3}), OmegaConf.create({"launcher": {"n_jobs": 4}})) == 3


def test_default_benchmark_grid_runs_learned_methods_at_0_9_only():
    """The default benchmark's filter, instantiated and applied the way hydra-filter-sweeper does it (the
    resolved job config, converted to plain containers), keeps every magnitude cell and the learned quick
    presets at 0.9 only."""
    import itertools

    from hydra import compose, initialize_config_dir
    from hydra_plugins.filter import FilterSweeper

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        sweep = compose("config", overrides=["experiment=fmnist_benchmark"], return_hydra_config=True).hydra.sweeper
        assert sweep._target_ == "hydra_plugins.filter.FilterSweeper"
        grid = [sweep.params[k].split(",") for k in ("model", "algorithm", "sparsity")]
        filters = OmegaConf.to_container(sweep.filters)
        kept, reasons = [], set()
        for model, algorithm, sparsity in itertools.product(*grid):
            cfg = compose("config", overrides=["experiment=fmnist_benchmark", f"model={model}",
                                                f"algorithm={algorithm}", f"sparsity={sparsity}"])
            OmegaConf.resolve(cfg)
            skipped = False
            for f in filters:
                key, kwargs = FilterSweeper._split_cfg(f)
                flt = FilterSweeper._instantiate(key, config=cfg, directory="unused")
                if flt.filter(**kwargs):
                    skipped = True
                    reasons.add(flt.reason(**kwargs))
            if not skipped:
                kept.append((model, algorithm, float(sparsity)))
    learned = sorted((m, a, s) for m, a, s in kept if not a.startswith("magnitude"))
    assert learned == [(m, a, 0.9) for m in ("mobilenetv2", "resnet18") for a in ("fcpts_quick", "unipts_quick")]
    assert len(kept) == 2 * 3 * 5 + 4
    assert reasons == {"fcpts runs only at sparsity 0.9 in this sweep", "unipts runs only at sparsity 0.9 in this sweep"}


def test_sparsity_filter_keeps_unnamed_algorithms_and_bad_values():
    from ptsbench.sweep import SparsitiesFor

    def skipped(target: str, sparsity) -> bool:
        config = {"algorithm": {"_target_": target}, "sparsity": sparsity}
        return SparsitiesFor(config, "unused").filter(fcpts=[0.8, 0.9])

    assert skipped("algorithms.fcpts.FCPTS", 0.5) and not skipped("algorithms.fcpts.FCPTS", 0.8)
    assert not skipped("algorithms.magnitude.MagnitudePruning", 0.5)
    assert not skipped("algorithms.fcpts.FCPTS", "abc")  # runs, and fails with ptsbench's own message
