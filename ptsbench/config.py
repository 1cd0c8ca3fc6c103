"""Structured-config schemas: a misspelt key in a config file or a value of the wrong type fails when
Hydra composes the config, before any work starts. The algorithm group is free-form: each algorithm's
constructor is its schema."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelConfig:
    name: str = MISSING  # a timm architecture name
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model
    img_size: int | None = None  # input size; None follows the dataset
    img_size_arg: bool = False  # the architecture takes img_size (ViT)
    checkpoint: str | None = None  # dense weights: safetensors or a weights-only torch file, or pkg:<module>/<path>
    checkpoint_layout: str = "timm"  # key names in the checkpoint: timm | lukemelas_efficientnet
    pretrained: bool = False  # timm hub weights (needs network)
    train_overrides: dict[str, Any] = field(default_factory=dict)  # per-model changes to the train recipe


@dataclass
class DataConfig:
    name: str = MISSING
    root: str | None = None
    img_size: int | None = None  # None: the dataset's native size
    download: bool = False
    limit_train: int | None = None  # use only the first N train images (quick runs, tests)
    limit_test: int | None = None  # evaluate on the first N test images only
    num_workers: int = 0
    train_split: str = "train"
    val_split: str = "val"
    crop_pct: float | None = None
    probe: bool = False  # a handful of labelled images: jobs also record top-1 agreement and KL to the dense model


@dataclass
class CalibConfig:
    n: int = 1024
    seed: int = 0
    batch_size: int = 64


@dataclass
class TrainConfig:
    """The harness's dense training recipe (used when no checkpoint or hub weights are given)."""

    epochs: float = 1
    batch_size: int = 64
    lr: float = 2e-3
    min_lr: float = 0.0
    weight_decay: float = 0.05
    warmup_epochs: float = 0.1
    warmup_lr: float = 1e-6
    label_smoothing: float = 0.0
    max_shift: int = 0
    hflip: bool = False
    zero_init_head: bool = True
    channels_last: bool = True  # NHWC training for CNNs (a few percent faster on this CPU); no gain for ViTs
    seed: int = 0


@dataclass
class EvalConfig:
    batch_size: int = 500
    channels_last: bool = True  # NHWC convolutions: faster on CPU for CNNs, same accuracy


@dataclass
class PrunePolicyConfig:
    first_conv: bool = True
    classifier: bool = True
    depthwise: bool = True
    attention: bool = True


@dataclass
class PtsbenchConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    calib: CalibConfig = field(default_factory=CalibConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    prune_policy: PrunePolicyConfig = field(default_factory=PrunePolicyConfig)
    algorithm: Any = MISSING
    logger: Any = None
    # sparsity stays untyped here so that a bad value reaches ptsbench's own check, which names it
    sparsity: Any = 0.5
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    progress: bool = True
    save_sparse: bool = False  # write the pruned model (safetensors + compact bit-mask form) and re-check it
    resume: bool = False  # skip jobs whose identical config already finished in this sweep
    cache_dir: str = MISSING
    experiment_name: str = "default"


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="ptsbench_schema", node=PtsbenchConfig)
