"""Structured-config schemas and the checks that run on a composed config before any work starts.

A misspelt key in a config file or a value of the wrong type fails when Hydra composes the config. Two
things get past composition and are caught by `check_config` instead: keys added with `+` or `++` (Hydra
adds them with `OmegaConf.update(..., force_add=True)`, which ignores the struct flag of a structured
node) and values of the right type but outside their range (`calib.n=0`, `train.lr=-1`). The algorithm
group is free-form: an algorithm's `settings` dataclass is its schema where it has one (every shipped
method: its defaults are in the ConfigStore as `schema/algorithm/<name>`, `algorithm_schemas`), its
constructor otherwise (`check_constructor_keys`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import MISSING, DictConfig, OmegaConf

from ptsbench.errors import ConfigError, unknown_key
from ptsbench.settings import (
    COUNT,
    NON_NEGATIVE,
    OPTIONAL_COUNT,
    POSITIVE,
    Range,
    Settings,
    settings_type,
)
from ptsbench.toolkit.sparsity import PrunePolicy

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"  # the harness's Hydra config directory


def within(default: Any, allowed: Range) -> Any:
    """A schema field with its allowed range: Hydra checks its type, `check_ranges` its range."""
    return field(default=default, metadata={"allowed": allowed})


def compose_job_config(overrides: list[str]) -> DictConfig:
    """One job's config from the harness's config directory, for drivers that call `run_job` in-process."""
    register_configs()  # the schema the config's defaults name, whoever calls first
    if GlobalHydra.instance().is_initialized():
        # inside the ptsbench app (its end-of-sweep callback): Hydra is set up on this config directory,
        # and initialising it again would raise
        return compose("config", overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@dataclass
class ModelConfig:
    name: str = MISSING  # a timm architecture name
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model
    img_size: int | None = within(None, OPTIONAL_COUNT)  # input size; None follows the dataset
    img_size_arg: bool = False  # the architecture takes img_size (ViT)
    # dense weights: safetensors or a weights-only torch file, or pkg:<module>/<path>
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None  # pins the checkpoint file's content (the shipped zoo weights)
    checkpoint_layout: str = "timm"  # key names in the checkpoint: timm | lukemelas_efficientnet
    pretrained: bool = False  # timm hub weights (needs network)
    train_overrides: dict[str, Any] = field(default_factory=dict)  # per-model changes to the train recipe
    sweep_sparsities: list[float] | None = None  # the default benchmark's accuracy-against-sparsity range
    # where the strongest heuristic has lost about 1-60 points of dense, so methods can separate; written by
    # `python -m ptsbench.analysis.discriminating --write` from the records, read by the leaderboard
    discriminating_sparsities: list[float] | None = None


@dataclass
class DataConfig:
    name: str = MISSING
    root: str | None = None
    img_size: int | None = within(None, OPTIONAL_COUNT)  # None: the dataset's native size
    download: bool = False
    limit_train: int | None = within(None, OPTIONAL_COUNT)  # use only the first N train images (tests)
    limit_test: int | None = within(None, OPTIONAL_COUNT)  # evaluate on the first N test images only
    num_workers: int = within(0, Range(0, whole=True))
    train_split: str = "train"
    val_split: str = "val"
    crop_pct: float | None = within(None, Range(0, 1, low_open=True, nullable=True))
    # a handful of labelled images: jobs also record top-1 agreement and KL to the dense model
    probe: bool = False


@dataclass
class CalibConfig:
    n: int = within(1024, COUNT)
    seed: int = 0  # any whole number (typed int by the schema)
    batch_size: int = within(64, COUNT)


@dataclass
class TrainConfig:
    """The harness's dense training recipe (used when no checkpoint or hub weights are given)."""

    epochs: float = within(1, POSITIVE)
    batch_size: int = within(64, COUNT)
    lr: float = within(2e-3, POSITIVE)
    min_lr: float = within(0.0, NON_NEGATIVE)
    weight_decay: float = within(0.05, NON_NEGATIVE)
    warmup_epochs: float = within(0.1, NON_NEGATIVE)
    warmup_lr: float = within(1e-6, NON_NEGATIVE)
    label_smoothing: float = within(0.0, Range(0, 1, high_open=True))
    max_shift: int = within(0, Range(0, whole=True))
    hflip: bool = False
    zero_init_head: bool = True
    channels_last: bool = True  # NHWC training for CNNs (a few percent faster on this CPU); no gain for ViTs
    seed: int = 0


@dataclass
class EvalConfig:
    batch_size: int = within(500, COUNT)
    channels_last: bool = True  # NHWC convolutions: faster on CPU for CNNs, same accuracy


@dataclass
class PtsbenchConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    calib: CalibConfig = field(default_factory=CalibConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    prune_policy: PrunePolicy = field(default_factory=PrunePolicy)  # the policy class is its own schema
    algorithm: Any = MISSING
    logger: Any = None
    # sparsity stays untyped here so that a bad value reaches ptsbench's own check, which names it
    sparsity: Any = 0.5
    pattern: str = "unstructured"  # unstructured | N:M (N kept of every M consecutive weights of a row)
    seed: int = 0
    device: str = "auto"
    threads: int | None = within(None, OPTIONAL_COUNT)
    compile: bool = False  # torch.compile the methods' weight-sized elementwise chains (speed only)
    progress: bool = True
    save_sparse: bool = False  # write the pruned model (safetensors + compact bit-mask form) and re-check it
    resume: bool = False  # skip jobs whose identical config already finished in this sweep
    resume_studies: list[str] = field(default_factory=list)  # and those already in these collected studies
    # the most work a job may ask of a method, in multiples of its reference budget
    max_budget: float = within(10.0, POSITIVE)
    cache_dir: str = MISSING
    experiment_name: str = "default"


SCHEMA_PREFIX = "/schema/algorithm/"


@functools.cache
def algorithm_schemas() -> dict[str, str]:
    """Schema name -> method class, for every method whose `settings` dataclass is the schema of its
    `algorithm` node: its base yaml (conf/algorithm/<name>.yaml) lists `/schema/algorithm/<name>@_here_`
    first in its defaults and names the class in `_target_`, and the ConfigStore then holds the dataclass's
    defaults under that name. Read from the yaml files, so a new method needs no edit here."""
    found: dict[str, str] = {}
    for path in sorted((CONF_DIR / "algorithm").glob("*.yaml")):
        cfg = OmegaConf.load(path)
        target = cfg.get("_target_")
        for entry in cfg.get("defaults") or []:
            if isinstance(entry, str) and entry.startswith(SCHEMA_PREFIX) and target:
                found[entry.removeprefix(SCHEMA_PREFIX).partition("@")[0]] = str(target)
    return found


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="ptsbench_schema", node=PtsbenchConfig)
    from ptsbench.toolkit.reconstruct import ReconstructionSettings  # imports torch: not at module import

    # the full `reconstruction` node at msbench's settings, under conf/reconstruction/'s presets
    cs.store(group="schema", name="reconstruction", node=ReconstructionSettings.defaults())
    for name, target in algorithm_schemas().items():
        cs.store(group="schema/algorithm", name=name, node=hydra.utils.get_class(target).settings.schema())


# ------------------------------------------------------------------------------------------- checks


def ranged_fields(schema: type, prefix: str = "") -> list[tuple[str, Range]]:
    """(dotted key, its range) for every numeric field of a schema dataclass and its nested ones."""
    found: list[tuple[str, Range]] = []
    hints = typing.get_type_hints(schema)  # the annotations are strings here (postponed evaluation)
    for f in dataclasses.fields(schema):
        allowed, kind = f.metadata.get("allowed"), hints.get(f.name)
        if isinstance(allowed, Range):
            found.append((f"{prefix}{f.name}", allowed))
        elif isinstance(kind, type) and dataclasses.is_dataclass(kind):
            found += ranged_fields(kind, f"{prefix}{f.name}.")
    return found


def unknown_keys(node: DictConfig, prefix: str = "") -> list[tuple[str, list[str]]]:
    """(dotted key, the keys its schema allows) for every key a structured node's dataclass lacks.

    Hydra's `+key=value` adds keys with `force_add=True`, so the schema's struct flag does not stop them;
    the node keeps its dataclass type, which is what this compares against.
    """
    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return []
    allowed = [f.name for f in dataclasses.fields(schema)]
    found: list[tuple[str, list[str]]] = []
    for key in node:
        if key not in allowed:
            found.append((f"{prefix}{key}", allowed))
        elif dataclasses.is_dataclass(OmegaConf.get_type(node, key)):
            found.extend(unknown_keys(node[key], f"{prefix}{key}."))
    return found


def check_schema_keys(cfg: DictConfig) -> None:
    """Fail on the first key the schema does not declare, naming every unknown key found."""
    found = unknown_keys(cfg)
    overrides = cfg.model.get("train_overrides") if "model" in cfg else None
    train_fields = [f.name for f in dataclasses.fields(TrainConfig)]
    found += [(f"model.train_overrides.{k}", train_fields)
              for k in (overrides or {}) if k not in train_fields]
    if found:
        key, allowed = found[0]
        parent = key.rpartition(".")[0]
        others = f" Also unknown: {', '.join(k for k, _ in found[1:])}." if len(found) > 1 else ""
        raise unknown_key(key, parent or "the top level of the config", allowed,
                          hint="Keys added with + are checked against the schema too." + others)


def check_ranges(cfg: DictConfig) -> None:
    """Every numeric option inside its range; the training recipe both as given and as overridden by the
    model."""
    overrides = cfg.model.get("train_overrides") or {}
    checks = ranged_fields(PtsbenchConfig)
    checks += [(f"model.train_overrides.{key.removeprefix('train.')}", allowed) for key, allowed in checks
               if key.startswith("train.") and key.removeprefix("train.") in overrides]
    for key, allowed in checks:
        allowed.check(key, OmegaConf.select(cfg, key, default=None))
    lr, min_lr = (overrides.get(k, cfg.train.get(k)) for k in ("lr", "min_lr"))
    if min_lr > lr:
        raise ConfigError(f"train.min_lr={min_lr} is above train.lr={lr}: the cosine schedule decays from lr "
                          "to min_lr.")


def check_constructor_keys(node: DictConfig, key: str) -> None:
    """Every option of an instantiated node (`algorithm`, `logger`) must be a constructor argument.

    Those groups have no dataclass schema; without this, `+algorithm.foo=1` would only surface as a
    TypeError from inside `hydra.utils.instantiate`.
    """
    target = node.get("_target_")
    if not target:
        raise ConfigError(f"{key} has no _target_: pick a config from conf/{key}/.")
    try:
        cls = hydra.utils.get_class(str(target))
    except Exception as exc:  # hydra wraps import errors in several exception types
        raise ConfigError(f"{key}._target_={target!r} cannot be imported: {exc}") from None
    settings = getattr(cls, "settings", None)
    if isinstance(settings, type) and issubclass(settings, Settings):  # the node's own dataclass
        plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        settings.read({k: v for k, v in plain.items() if not str(k).startswith("_")}, key)
        return
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = [name for name in params if name != "self"]
    unknown = [k for k in node if not str(k).startswith("_") and k not in allowed]
    if unknown:
        others = f"Also unknown: {', '.join(f'{key}.{k}' for k in unknown[1:])}." if len(unknown) > 1 else ""
        raise unknown_key(f"{key}.{unknown[0]}", f"{key}._target_={target} ({cls.__name__})", allowed,
                          hint=others)
    try:
        hints = typing.get_type_hints(cls.__init__)
    except (NameError, TypeError):  # annotations that do not resolve at run time name no settings node
        hints = {}
    for name in allowed:  # nested settings nodes: their own keys and ranges
        schema = settings_type(hints.get(name))
        if schema is not None and name in node:
            value = node[name]
            plain = OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value
            schema.read(plain, f"{key}.{name}")


def check_config(cfg: DictConfig) -> None:
    """Keys and numeric ranges of a composed job config, before anything is loaded or trained."""
    check_schema_keys(cfg)
    check_ranges(cfg)
    check_constructor_keys(cfg.algorithm, "algorithm")
    if cfg.get("logger"):
        check_constructor_keys(cfg.logger, "logger")
