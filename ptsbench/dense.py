"""The dense starting point of every job: data, model, weights, and the dense accuracy, each computed once
and cached on disk so a sweep trains and evaluates each dense model only once."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from omegaconf import DictConfig
from torch import nn

from ptsbench.checkpoint import load_state_strict, non_finite_tensors, show_names
from ptsbench.data import DataBundle, build_data
from ptsbench.errors import CheckpointError, NonFiniteError
from ptsbench.evaluate import evaluate
from ptsbench.models import (
    check_input_size,
    create_model,
    dense_key,
    file_sha256,
    load_checkpoint,
    plain,
    read_state_dict,
    save_state,
    stable_hash,
    verify_checkpoint,
)
from ptsbench.paths import safe_child, safe_subdir
from ptsbench.results import write_json
from ptsbench.streams import stream_seed
from ptsbench.train import train_dense

log = logging.getLogger(__name__)


@dataclass
class Dense:
    """Where the dense weights came from and how good they are."""

    source: str  # checkpoint | pretrained | recipe
    key: str  # names everything that determines the dense weights
    top1: float
    top5: float
    info: dict  # training time, cache paths ...
    sha256: str | None = None  # of the weights file the model was loaded from (None: hub weights)


def training_recipe(cfg: DictConfig) -> dict:
    """The shared recipe with the model config's own overrides applied (both recorded in the hash)."""
    recipe = plain(cfg.train)
    recipe.update(plain(cfg.model.get("train_overrides")))
    return recipe


def load_data(cfg: DictConfig, cache_dir: Path) -> DataBundle:
    img_size = cfg.model.get("img_size") or cfg.data.get("img_size")
    return build_data(cfg.data, cache_dir, img_size=img_size, model_name=cfg.model.name)


def build_model(cfg: DictConfig, data: DataBundle) -> nn.Module:
    """The architecture, checked against the input size; weights come from `load_dense_weights`.

    The initialisation is seeded (train.seed): torch's default generator is seeded differently in every
    process, and the harness's dense training must give the same weights on every machine. A checkpoint
    wins over the hub, so `model.checkpoint=PATH` works offline with configs that say `pretrained: true`.
    """
    torch.manual_seed(stream_seed("dense.init", int(cfg.train.seed)))
    from_hub = bool(cfg.model.get("pretrained")) and not cfg.model.get("checkpoint")
    model = create_model(cfg.model, data.spec, pretrained=from_hub)
    check_input_size(model, data.spec, bool(cfg.model.get("img_size_arg", False)))
    return model


def load_dense_weights(cfg: DictConfig, model: nn.Module, data: DataBundle, cache_dir: Path,
                       device: torch.device, progress: bool = True) -> Dense:
    """Fill `model` with dense weights (checkpoint, hub, or the cached recipe) and measure its accuracy."""
    recipe = training_recipe(cfg)
    key_obj = dense_key(cfg.model, cfg.data, data.spec, recipe, int(cfg.train.seed))
    key = f"{cfg.model.name}-{data.spec.name}-{stable_hash(key_obj)}"
    dense_dir = safe_subdir(cache_dir, "dense")
    info: dict = {}
    sha256 = None
    if cfg.model.get("checkpoint"):
        source = "checkpoint"
        sha256 = verify_checkpoint(cfg.model)
        load_checkpoint(model, cfg.model)
    elif cfg.model.get("pretrained"):
        source = "pretrained"
    else:
        source = "recipe"
        weights = safe_child(dense_dir, f"{key}.safetensors")
        meta_path = safe_child(dense_dir, f"{key}.train.json")
        with FileLock(str(safe_child(dense_dir, f"{key}.lock"))):
            if _load_cached(model, weights, dense_dir, key):
                info = json.loads(meta_path.read_text()) if meta_path.exists() else {}
                log.info("Dense %s: cached weights %s", cfg.model.name, weights)
            else:
                log.info("Dense %s: no cached weights, training with recipe %s", cfg.model.name, recipe)
                info = train_dense(model, data.train, recipe, int(cfg.train.seed), device, progress)
                info.update({"recipe": recipe, "key": key_obj})
                save_state(model, weights, {"key": key})
                write_json(meta_path, info)
                log.info("Dense %s trained in %.0f s, cached at %s", cfg.model.name, info["train_seconds"],
                         weights)
        info["weights"] = str(weights)
        sha256 = file_sha256(weights)
    bad = non_finite_tensors(model.state_dict())  # a checkpoint is checked as it loads; hub and recipe here
    if bad:
        raise NonFiniteError(f"The dense weights of {cfg.model.name} ({source}) hold NaN or inf in "
                             f"{len(bad)} tensor(s): {show_names(bad)}. Nothing is pruned from them.")
    model.to(device).eval()
    top1, top5 = _dense_accuracy(model, data, key, cfg, dense_dir, device)
    return Dense(source, key, top1, top5, info, sha256)


def _load_cached(model: nn.Module, weights: Path, dense_dir: Path, key: str) -> bool:
    """Load the cached dense weights; a truncated or foreign entry is dropped (with its cached accuracies)
    and reported, so the caller retrains instead of failing every job of the sweep on a broken cache file."""
    if not weights.exists():
        return False
    try:
        load_state_strict(model, read_state_dict(weights), str(weights))
        return True
    except CheckpointError as exc:
        log.warning("Dense cache entry %s is unreadable, retraining it: %s", weights, exc)
        weights.unlink(missing_ok=True)
        for stale in dense_dir.glob(f"{key}.eval-*.json"):
            stale.unlink(missing_ok=True)
        return False


def _dense_accuracy(model: nn.Module, data: DataBundle, key: str, cfg: DictConfig, dense_dir: Path,
                    device: torch.device) -> tuple[float, float]:
    eval_key = stable_hash({"dense": key, "limit_test": cfg.data.get("limit_test"), "n": len(data.test)})
    path = dense_dir / f"{key}.eval-{eval_key}.json"
    with FileLock(str(path) + ".lock"):
        if path.exists():
            cached = json.loads(path.read_text())
            return float(cached["top1"]), float(cached["top5"])
        result = evaluate(model, data.test, device, batch_size=int(cfg.eval.batch_size),
                          num_workers=int(cfg.data.get("num_workers", 0)),
                          channels_last=bool(cfg.eval.channels_last),
                          what=f"the dense model {cfg.model.name}")
        write_json(path, result.as_dict())
    log.info("Dense %s: top-1 %.2f%% top-5 %.2f%% on %d images", cfg.model.name, result.top1, result.top5,
             result.images)
    return result.top1, result.top5
