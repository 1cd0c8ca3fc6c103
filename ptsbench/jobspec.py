"""What one job is, read from its composed config once.

`JobIdentity` is the job as written (no checks: a job whose config is refused still records what it named);
`JobSpec` is the job once every check of its config has passed, with the target sparsity checked here and
nowhere else in the job. The job's steps (`ptsbench.runner`) read the spec, not the config; the spec keeps
the config only for the builders that take a config group whole (data, model, dense weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from ptsbench.config import check_config
from ptsbench.errors import ConfigError
from ptsbench.models import check_checkpoint_fits, stable_hash
from ptsbench.settings import count_text
from ptsbench.toolkit.patterns import Pattern, check_pattern_target, parse_pattern
from ptsbench.toolkit.sparsity import check_sparsity

if TYPE_CHECKING:
    from algorithms.base import PTSAlgorithm

# Keys that do not change a job's result, left out of its identity (`config_hash`).
NOT_IDENTITY = ("hydra", "logger", "progress", "threads", "compile", "cache_dir", "resume", "resume_studies",
                "save_sparse", "max_budget")


def config_hash(cfg: DictConfig) -> str:
    """Identity of a job: the resolved config minus what does not change the result."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    for key in NOT_IDENTITY:
        plain.pop(key, None)
    # where a model is worth sweeping is a property of the studies, not of a job: a range recomputed from
    # new records must not change the identity of the jobs already run
    (plain.get("model") or {}).pop("discriminating_sparsities", None)
    return stable_hash(plain, length=16)


@dataclass(frozen=True)
class JobIdentity:
    """The job as its config names it, unchecked: every record, a refused job's included, carries these."""

    config_hash: str
    model: str
    dataset: str
    sparsity: Any  # as written (`sparsity=abc` is recorded as it was given)
    pattern: str
    seed: Any
    calib_seed: Any
    calib_images: Any
    experiment: str | None

    @classmethod
    def from_config(cls, cfg: DictConfig) -> JobIdentity:
        return cls(config_hash=config_hash(cfg), model=cfg.model.name, dataset=cfg.data.name,
                   sparsity=cfg.sparsity, pattern=str(cfg.get("pattern", "unstructured")), seed=cfg.seed,
                   calib_seed=cfg.calib.seed, calib_images=cfg.calib.n, experiment=cfg.get("experiment_name"))


@dataclass(frozen=True)
class CalibSpec:
    n: int
    seed: int
    batch_size: int


@dataclass(frozen=True)
class EvalSpec:
    batch_size: int
    channels_last: bool
    num_workers: int  # the data loader's, data.num_workers


@dataclass(frozen=True)
class BudgetSpec:
    given: Any  # algorithm.budget as written, named in the refusal
    limit: float  # max_budget: the most work a job may ask, in multiples of the method's reference

    @classmethod
    def from_config(cls, cfg: DictConfig) -> BudgetSpec:
        return cls(given=cfg.algorithm.get("budget", 1), limit=float(cfg.get("max_budget", 10)))


@dataclass(frozen=True)
class JobSpec:
    identity: JobIdentity
    target: float  # in [0, 1); under N:M exactly 1 - N/M
    pattern: Pattern
    seed: int
    calib: CalibSpec
    eval: EvalSpec
    budget: BudgetSpec
    probe: bool  # data.probe: also measure how closely the sparse model's logits follow the dense ones
    device: str
    threads: int | None
    compile: bool  # fuse the methods' weight-sized elementwise chains
    progress: bool
    save_sparse: bool
    cfg: DictConfig = field(repr=False, compare=False)

    @property
    def model(self) -> str:
        return self.identity.model

    @property
    def dataset(self) -> str:
        return self.identity.dataset

    @classmethod
    def from_config(cls, cfg: DictConfig, identity: JobIdentity | None = None, pattern: Pattern | None = None,
                    budget: BudgetSpec | None = None) -> JobSpec:
        """Check the config and read it into a spec; each check raises ConfigError naming the key.

        `pattern` and `budget` are the ones the job's algorithm was already set to and checked against
        (`ptsbench.runner.job_spec`): their refusals come first, and name the method as the pattern labels
        it.
        """
        identity = identity or JobIdentity.from_config(cfg)
        pattern = parse_pattern(identity.pattern) if pattern is None else pattern
        budget = BudgetSpec.from_config(cfg) if budget is None else budget
        target = check_pattern_target(pattern, check_sparsity(identity.sparsity))
        check_config(cfg)
        check_checkpoint_fits(cfg.model, str(cfg.data.name))
        calib = CalibSpec(n=int(cfg.calib.n), seed=int(cfg.calib.seed), batch_size=int(cfg.calib.batch_size))
        if calib.n < calib.batch_size:
            raise ConfigError(f"calib.n={cfg.calib.n} is below one calibration batch "
                              f"(calib.batch_size={cfg.calib.batch_size}).")
        evaluation = EvalSpec(batch_size=int(cfg.eval.batch_size), channels_last=bool(cfg.eval.channels_last),
                              num_workers=int(cfg.data.get("num_workers", 0)))
        threads = cfg.get("threads")
        return cls(identity=identity, target=target, pattern=pattern, seed=int(cfg.seed), calib=calib,
                   eval=evaluation, budget=budget, probe=bool(cfg.data.get("probe")),
                   device=cfg.get("device", "auto"), threads=int(threads) if threads else None,
                   compile=bool(cfg.get("compile", False)), progress=bool(cfg.progress),
                   save_sparse=bool(cfg.get("save_sparse")), cfg=cfg)


def check_budget(algorithm: PTSAlgorithm, budget: BudgetSpec) -> None:
    """A budget far above the method's reference (algorithm.budget=1e9: years of FCPTS iterations) is a typo
    more often than a plan: refused, with the work it asks for, unless `max_budget` is raised for it."""
    fraction, limit = algorithm.budget_fraction, budget.limit
    if fraction is not None and fraction > limit:
        raise_it = f", or set max_budget={math.ceil(fraction)} to run it as asked" if fraction < 1e6 else ""
        times = count_text(fraction) if fraction >= 100 else f"{fraction:.3g}"
        raise ConfigError(
            f"algorithm.budget={budget.given} asks {algorithm.name} for "
            f"{algorithm.budget_work()}: {times} times its reference budget, above max_budget={limit:g}. "
            f"Lower algorithm.budget (or the preset's step counts){raise_it}.")
