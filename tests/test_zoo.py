"""The shipped dense weights of the embedded zoo: pinned by sha256, loaded strictly, rebuilt by one
command."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from ptsbench.errors import CheckpointError
from ptsbench.models import file_sha256, resolve_checkpoint_path, verify_checkpoint
from ptsbench.zoo import export_dense
from tests.conftest import TINY_RECIPE, compose_config

ZOO_MODELS = ("resnet18", "mobilenetv2", "vit_tiny")


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_shipped_weights_match_their_pin_and_the_architecture(name):
    cfg = compose_config([f"model={name}"])
    if not cfg.model.checkpoint:
        pytest.skip(f"{name} has no shipped weights yet")
    path = resolve_checkpoint_path(cfg.model.checkpoint)
    assert path.is_file() and cfg.model.checkpoint_sha256 == file_sha256(path)
    from ptsbench.data import DataSpec
    from ptsbench.models import create_model, load_checkpoint

    spec = DataSpec("fashion_mnist", 10, 1, int(cfg.model.img_size or 28), (0.286,), (0.353,))
    model = create_model(cfg.model, spec)
    load_checkpoint(model, cfg.model)  # strict: every key and shape
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_changed_shipped_file_is_refused_and_a_users_own_file_is_not(tmp_path, monkeypatch):
    cfg = compose_config(["model=mobilenetv2"])
    copy = tmp_path / "w.safetensors"
    copy.write_bytes(resolve_checkpoint_path(cfg.model.checkpoint).read_bytes() + b"\0")
    cfg.model.checkpoint = str(copy)  # the user's own file: the config's pin is not about it
    assert verify_checkpoint(cfg.model) == file_sha256(copy)
    import ptsbench.models as models

    monkeypatch.setattr(models, "resolve_checkpoint_path", lambda spec: copy)  # the shipped file, changed
    cfg.model.checkpoint = "pkg:ptsbench/zoo/mobilenetv2-fashion_mnist.safetensors"
    with pytest.raises(CheckpointError, match="checkpoint_sha256"):
        verify_checkpoint(cfg.model)


def test_export_writes_the_recipe_model_in_half_precision(cache_dir, require_fmnist, tmp_path):
    from ptsbench.dense import build_model, load_data, load_dense_weights

    path, sha, top1 = export_dense("resnet18", [*TINY_RECIPE, f"cache_dir={cache_dir}"], out_dir=tmp_path)
    assert path.parent == tmp_path and sha == file_sha256(path) and 0 < top1 <= 100
    # the recipe model the export rounded, from the dense cache the export filled
    cfg = compose_config([*TINY_RECIPE, "model.checkpoint_sha256=null"], cache_dir=cache_dir)
    data = load_data(cfg, cache_dir)
    model = build_model(cfg, data)
    dense = load_dense_weights(cfg, model, data, cache_dir, torch.device("cpu"), progress=False)
    assert dense.source == "recipe" and dense.top1 == top1
    state = load_file(str(path))
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            assert state[key].dtype == torch.float16
            torch.testing.assert_close(state[key].float(), value.float(), rtol=1e-3, atol=1e-3)
        else:
            assert torch.equal(state[key], value)
