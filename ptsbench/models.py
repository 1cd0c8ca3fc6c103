"""Dense models: timm architectures sized to the data, with weights from a checkpoint, timm's hub, or the
harness's own training recipe (cached by a hash of everything that determines the result)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ptsbench.data import DataSpec
from ptsbench.errors import CheckpointError, ConfigError, unknown_choice

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: seeded initialisation


def plain(node) -> dict:
    """A DictConfig (possibly empty or None) as a plain, resolved dict."""
    if node is None:
        return {}
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node)


def model_names_in_conf() -> list[str]:
    conf = Path(__file__).resolve().parent.parent / "conf" / "model"
    return sorted(p.stem for p in conf.glob("*.yaml"))


def create_model(model_cfg: DictConfig, spec: DataSpec, pretrained: bool = False) -> nn.Module:
    """A timm model with classes, channels and (where the architecture takes it) image size from the data."""
    name = model_cfg.name
    if not timm.is_model(name):
        raise unknown_choice(
            "timm model", name, model_names_in_conf() + timm.list_models(f"*{str(name).split('_')[0]}*")[:20],
            hint="Pick a config with model=<name> or any timm architecture with model.name=<timm name> "
                 "(see timm.list_models()).",
        )
    kwargs = plain(model_cfg.get("kwargs"))
    if model_cfg.get("img_size_arg", False):
        kwargs["img_size"] = spec.img_size
    if pretrained:
        try:
            return timm.create_model(name, pretrained=True, num_classes=spec.num_classes,
                                     in_chans=spec.in_chans, **kwargs)
        except Exception as exc:  # hub and network errors come in many types
            raise CheckpointError(
                f"timm pretrained weights for {name!r} could not be loaded ({type(exc).__name__}: {exc}). "
                f"Without network access, pass a local file with model.checkpoint=PATH."
            ) from exc
    try:
        return timm.create_model(name, pretrained=False, num_classes=spec.num_classes,
                                 in_chans=spec.in_chans, **kwargs)
    except (TypeError, AssertionError, ValueError, RuntimeError) as exc:
        raise ConfigError(
            f"timm could not build {name!r} with num_classes={spec.num_classes}, in_chans={spec.in_chans}, "
            f"kwargs={kwargs}, image size {spec.img_size}: {exc}"
        ) from exc


def check_input_size(model: nn.Module, spec: DataSpec) -> None:
    """Run one tiny forward so an image size the model cannot take fails before any expensive work."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model(torch.zeros(1, spec.in_chans, spec.img_size, spec.img_size, device=next(model.parameters()).device))
    except Exception as exc:
        raise ConfigError(
            f"The model cannot take {spec.in_chans}x{spec.img_size}x{spec.img_size} inputs ({exc}). "
            f"Change model.img_size or data.img_size."
        ) from exc
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------------- checkpoints


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a weights-only torch file (common wrappers unwrapped)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {str(path)!r} does not exist (model.checkpoint).")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{str(path)!r} is not a readable checkpoint (safetensors, or a torch file that loads with "
            f"weights_only=True): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{str(path)!r} does not hold a state dict of tensors.")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_state_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict loading with an error that lists missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mis_shaped = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mis_shaped:
        def show(keys):
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "") if keys else "none"
        raise CheckpointError(
            f"Checkpoint {source} does not match {type(model).__name__}: missing keys: {show(missing)}; "
            f"unexpected keys: {show(unexpected)}; shape mismatches: {show(mis_shaped)}."
        )
    model.load_state_dict(state, strict=True)


def save_state(model: nn.Module, path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------ cache


def stable_hash(obj: object, length: int = 12) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def file_fingerprint(path: str | Path) -> dict:
    p = Path(path).expanduser().resolve()
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def dense_key(model_cfg: DictConfig, data_cfg: DictConfig, spec: DataSpec, recipe: Mapping, seed: int) -> dict:
    """Everything that determines the dense weights and hence the dense accuracy."""
    if model_cfg.get("checkpoint"):
        source: object = {"checkpoint": file_fingerprint(model_cfg.checkpoint)}
    elif model_cfg.get("pretrained"):
        source = {"pretrained": True}
    else:
        source = {"recipe": dict(recipe), "seed": seed, "limit_train": data_cfg.get("limit_train")}
    return {
        "version": CACHE_VERSION,
        "model": model_cfg.name,
        "kwargs": plain(model_cfg.get("kwargs")),
        "data": spec.name,
        "data_root": str(data_cfg.get("root")),
        "img_size": spec.img_size,
        "source": source,
    }
