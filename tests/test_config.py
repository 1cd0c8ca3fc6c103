"""Every config group option composes against the schema; typos and wrong types fail at compose time."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from ptsbench.config import check_config
from ptsbench.errors import ConfigError
from ptsbench.runner import build_algorithm
from tests.conftest import CONF, compose_config

GROUPS = ["model", "data", "algorithm", "calib", "train", "logger", "experiment"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option):
    cfg = compose_config([f"{group}={option}"])
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    check_config(cfg)  # every shipped option passes the key and range checks a job runs first
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
    assert threads_per_job(OmegaConf.create({"threads": 3}),
                           OmegaConf.create({"launcher": {"n_jobs": 4}})) == 3


def test_parallel_jobs_take_the_gpus_in_turn():
    from omegaconf import OmegaConf

    from ptsbench.cli import device_per_job

    def hc(job: int, n_jobs: int | None = 2):
        return OmegaConf.create({"launcher": {"n_jobs": n_jobs} if n_jobs else {"_target_": "basic"},
                                 "job": {"num": job}})

    auto = OmegaConf.create({"device": "auto"})
    assert [device_per_job(auto, hc(j), gpus=2) for j in range(5)] == \
        ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert [device_per_job(OmegaConf.create({"device": "cuda"}), hc(j, -1), gpus=3) for j in (2, 4)] == \
        ["cuda:2", "cuda:1"]
    assert device_per_job(auto, hc(3), gpus=1) is None and device_per_job(auto, hc(3), gpus=0) is None
    assert device_per_job(auto, hc(3, n_jobs=None), gpus=4) is None  # sequential: the one default GPU
    assert device_per_job(auto, hc(3, n_jobs=1), gpus=4) is None
    for fixed in ("cpu", "cuda:1"):  # what the user named stays
        assert device_per_job(OmegaConf.create({"device": fixed}), hc(2), gpus=4) is None


def test_default_benchmark_grid_runs_learned_methods_at_the_discriminating_sparsities():
    """The default benchmark's filters, applied the way hydra-filter-sweeper does it (its `_convert_="all"`:
    the resolved job config as plain containers), keep each model's own sweep and discriminating
    sparsities for the cheap methods and the learned quick presets at the discriminating ones only."""
    import itertools

    from hydra import compose, initialize_config_dir
    from hydra.utils import get_class
    from hydra_plugins.filter import FilterSweeper

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        sweep = compose("config", overrides=["experiment=fmnist_benchmark"],
                        return_hydra_config=True).hydra.sweeper
        assert sweep._target_ == "hydra_plugins.filter.FilterSweeper"
        grid = [sweep.params[k].split(",") for k in ("model", "algorithm", "sparsity")]
        filters = OmegaConf.to_container(sweep.filters)
        kept, reasons = [], set()
        # one composition per algorithm and one per model; a job is the algorithm's config with the model's
        # node and the sparsity set on a copy, as the sweep's overrides do (the filters read only those)
        composed = {a: compose("config", overrides=["experiment=fmnist_benchmark", f"algorithm={a}"])
                    for a in grid[1]}
        model_nodes = {m: compose("config", overrides=["experiment=fmnist_benchmark", f"model={m}"]).model
                       for m in grid[0]}
        for model, algorithm, sparsity in itertools.product(*grid):
            cfg = composed[algorithm].copy()  # shallow: the two keys set here are replaced, not written into
            cfg.model = model_nodes[model]
            cfg.sparsity = float(sparsity)
            plain = OmegaConf.to_container(cfg, resolve=True)
            skipped = False
            for f in filters:
                key, kwargs = FilterSweeper._split_cfg(f)
                flt = get_class(key)(config=plain, directory="unused")
                if flt.filter(**kwargs):
                    skipped = True
                    reasons.add(flt.reason(**kwargs))
            if not skipped:
                kept.append((model, algorithm, float(sparsity)))
        models_cfg = {m: compose("config", overrides=[f"model={m}"]).model for m in sorted(set(grid[0]))}
    discriminating = {m: {float(x) for x in c.discriminating_sparsities} for m, c in models_cfg.items()}
    ranges = {m: {float(x) for x in c.sweep_sparsities} | discriminating[m] for m, c in models_cfg.items()}
    learned_configs = ("fcpts_quick", "fcpts_code_quick", "unipts_quick", "pot_quick")
    learned = sorted((m, a, s) for m, a, s in kept if a in learned_configs)
    models = ("mobilenetv2", "resnet18", "vit_tiny")
    # UniPTS is not defined above 0.95 (every layer reduced to the target + 0.05): resnet18's cells go
    assert learned == sorted((m, a, s) for m in models for a in learned_configs for s in discriminating[m]
                             if not (a == "unipts_quick" and s > 0.95))
    cheap = [(m, a, s) for m, a, s in kept if a not in learned_configs]
    assert {(m, s) for m, _, s in cheap} == {(m, s) for m in models for s in ranges[m]}
    assert len(cheap) == (len(grid[1]) - len(learned_configs)) * sum(len(r) for r in ranges.values())
    assert any("fcpts runs at the model's discriminating sparsities" in r for r in reasons)


def test_sparsity_filter_keeps_unnamed_algorithms_and_bad_values():
    from ptsbench.sweep import SparsitiesFor

    def skipped(target: str, sparsity) -> bool:
        config = {"algorithm": {"_target_": target}, "sparsity": sparsity}
        return SparsitiesFor(config, "unused").filter(fcpts=[0.8, 0.9])

    assert skipped("algorithms.fcpts.FCPTS", 0.5) and not skipped("algorithms.fcpts.FCPTS", 0.8)
    assert not skipped("algorithms.magnitude.MagnitudePruning", 0.5)
    assert not skipped("algorithms.fcpts.FCPTS", "abc")  # runs, and fails with ptsbench's own message


# Each bad value fails in run_job's first step, before data, model or dense training: the cache stays empty.
BAD_INPUT = [
    ("threads=0", r"threads=0 is not allowed: it must be a whole number >= 1 or null"),
    ("data.limit_train=0", r"data.limit_train=0 is not allowed: it must be a whole number >= 1 or null"),
    ("data.limit_test=0", r"data.limit_test=0 is not allowed: it must be a whole number >= 1 or null"),
    ("data.num_workers=-1", r"data.num_workers=-1 is not allowed: it must be a whole number >= 0"),
    ("data.crop_pct=1.5", r"data.crop_pct=1.5 is not allowed: it must be a number in \(0, 1\] or null"),
    ("model.img_size=0", r"model.img_size=0 is not allowed"),
    ("calib.n=0", r"calib.n=0 is not allowed: it must be a whole number >= 1"),
    ("calib.batch_size=0", r"calib.batch_size=0 is not allowed: it must be a whole number >= 1"),
    ("eval.batch_size=0", r"eval.batch_size=0 is not allowed: it must be a whole number >= 1"),
    ("train.epochs=0", r"train.epochs=0.0 is not allowed: it must be a number > 0"),
    ("train.batch_size=0", r"train.batch_size=0 is not allowed: it must be a whole number >= 1"),
    ("train.lr=-1", r"train.lr=-1.0 is not allowed: it must be a number > 0"),
    ("train.lr=nan", r"train.lr=nan is not allowed: it must be a number > 0"),
    ("train.weight_decay=-0.1", r"train.weight_decay=-0.1 is not allowed: it must be a number >= 0"),
    ("train.label_smoothing=1", r"train.label_smoothing=1.0 is not allowed: it must be a number in \[0, 1\)"),
    ("train.min_lr=1", r"train.min_lr=1.0 is above train.lr=0.002"),
    ("model.train_overrides.epochs=-1",
     r"model.train_overrides.epochs=-1 is not allowed: it must be a number > 0"),
    ("+foo=1", r"Unknown config key 'foo': the top level of the config has no option 'foo'"),
    ("+train.foo=1", r"Unknown config key 'train.foo': train has no option 'foo'. Allowed: batch_size"),
    ("+prune_policy.depthwsie=false",
     r"Unknown config key 'prune_policy.depthwsie'.*Did you mean: depthwise"),
    ("+model.train_overrides.lrr=1", r"Unknown config key 'model.train_overrides.lrr'.*Did you mean: lr\?"),
    ("+algorithm.foo=1",
     r"Unknown config key 'algorithm.foo': algorithm \(ScoreSettings\) has no option 'foo'. Allowed: "),
    ("max_budget=0", r"max_budget=0.0 is not allowed: it must be a number > 0"),
    # the model group's shipped weights kept under another architecture or data set
    ("model.name=efficientnet_b0",
     r"model.name='efficientnet_b0', but model.checkpoint='pkg:ptsbench/zoo/resnet18-fashion_mnist"
     r".safetensors' holds weights trained for the architecture 'resnet18'.* Set model.checkpoint=null "
     r"to train 'efficientnet_b0' on fashion_mnist"),
    ("data=cifar10", r"data='cifar10', but model.checkpoint=.* trained for the data set 'fashion_mnist'"),
]


@pytest.mark.parametrize("override,match", BAD_INPUT, ids=[o for o, _ in BAD_INPUT])
def test_bad_value_fails_before_any_work(tmp_path, override, match):
    import json

    from ptsbench.runner import JobFailed, run_job

    cfg = compose_config(["progress=false", override], cache_dir=tmp_path / "cache")
    with pytest.raises(JobFailed, match=match):
        run_job(cfg, tmp_path / "job")
    saved = json.loads((tmp_path / "job" / "result.json").read_text())
    assert saved["status"] == "failed" and "traceback" not in saved
    assert not (tmp_path / "cache").exists(), "nothing may be loaded or trained before the checks"


def test_unknown_logger_option_fails():
    with pytest.raises(ConfigError,
                       match=r"Unknown config key 'logger.foo'.*WandbTracker.*Allowed: entity, mode"):
        check_config(compose_config(["logger=wandb", "+logger.foo=1"]))


def test_prune_policy_schema_is_the_policy():
    from ptsbench.toolkit.sparsity import PrunePolicy

    cfg = compose_config(["prune_policy.first_conv=false"])
    policy = OmegaConf.to_object(cfg.prune_policy)
    assert isinstance(policy, PrunePolicy) and policy == PrunePolicy(first_conv=False)
    assert PrunePolicy.from_config(cfg.prune_policy) == policy


def test_execution_settings_are_not_part_of_a_jobs_identity():
    """threads and compile change speed (and reduction rounding), not the job: a committed result stays
    found by resume when they differ; the seed or the method does change the identity."""
    from ptsbench.runner import config_hash

    base = config_hash(compose_config(["algorithm=fcpts_quick"]))
    assert config_hash(compose_config(["algorithm=fcpts_quick", "compile=true", "threads=2"])) == base
    assert config_hash(compose_config(["algorithm=fcpts_quick", "seed=1"])) != base
    assert config_hash(compose_config(["algorithm=fcpts_code_quick"])) != base
    with pytest.raises(ConfigCompositionException):
        compose_config(["compile=sometimes"])


def test_any_timm_name_trains_the_recipe_without_the_shipped_weights():
    from ptsbench.jobspec import JobSpec

    spec = JobSpec.from_config(compose_config(["model.name=efficientnet_b0", "model.checkpoint=null"]))
    assert spec.target == 0.5
    assert JobSpec.from_config(compose_config(["model=mobilenetv2"])).target == 0.5  # its own shipped weights


def test_every_numeric_option_of_the_schema_carries_its_range():
    """The ranges live on the schema's fields (`within`), not in a second, string-keyed table: every int or
    float field of the job schema has one, except the seeds (any whole number) and the untyped sparsity
    (checked by the job spec, which names the value)."""
    import dataclasses
    import typing

    from ptsbench.config import PtsbenchConfig, ranged_fields

    ranged = {key for key, _ in ranged_fields(PtsbenchConfig)}
    numeric = []

    def walk(schema: type, prefix: str) -> None:
        hints = typing.get_type_hints(schema)
        for f in dataclasses.fields(schema):
            kind = hints[f.name]
            if isinstance(kind, type) and dataclasses.is_dataclass(kind):
                walk(kind, f"{prefix}{f.name}.")
            elif set(typing.get_args(kind) or (kind,)) & {int, float}:
                numeric.append(f"{prefix}{f.name}")

    walk(PtsbenchConfig, "")
    assert sorted(k for k in numeric if not k.endswith("seed")) == sorted(ranged)
    cfg = compose_config(["train.label_smoothing=1.0"])
    with pytest.raises(ConfigError, match=r"train.label_smoothing=1.0 is not allowed: it must be a number in "
                                          r"\[0, 1\)"):
        check_config(cfg)
