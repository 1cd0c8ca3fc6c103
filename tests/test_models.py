"""timm models sized to the data, strict checkpoint loading and its errors."""

from __future__ import annotations

import pytest
import timm
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ptsbench.data import DataSpec
from ptsbench.errors import CheckpointError, ConfigError
from ptsbench.models import (
    check_input_size,
    create_model,
    file_fingerprint,
    load_state_strict,
    read_state_dict,
)

SPEC = DataSpec("fashion_mnist", 10, 1, 28, (0.286,), (0.353,))


def model_cfg(**kw):
    base = {"name": "resnet18", "kwargs": {}, "img_size_arg": False}
    base.update(kw)
    return OmegaConf.create(base)


def test_model_follows_the_data():
    m = create_model(model_cfg(), SPEC)
    assert m.conv1.in_channels == 1 and m.fc.out_features == 10
    vit = create_model(model_cfg(name="vit_tiny_patch16_224", kwargs={"patch_size": 7}, img_size_arg=True),
                       SPEC)
    assert vit.patch_embed.num_patches == 16
    assert vit(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_unknown_model_suggests_names():
    with pytest.raises(ConfigError, match=r"Unknown timm model 'resnet181'.*Did you mean"):
        create_model(model_cfg(name="resnet181"), SPEC)


def test_image_size_the_model_cannot_take():
    vit = create_model(model_cfg(name="vit_tiny_patch16_224", kwargs={"patch_size": 7}, img_size_arg=True),
                       SPEC)
    with pytest.raises(ConfigError, match=r"cannot take 1x32x32") as refused:
        check_input_size(vit, DataSpec("x", 10, 1, 32, (0.5,), (0.5,)))
    assert "img_size_arg" not in str(refused.value)  # it is set: the hint would be wrong


def test_architecture_built_for_another_size_is_pointed_at_img_size_arg(tiny_cfg, tmp_path):
    from ptsbench.runner import JobFailed, run_job

    with pytest.raises(JobFailed, match=r"cannot take 1x56x56 inputs .* \(ViT, DeiT\) takes the data's with "
                                         r"model.img_size_arg=true"):
        run_job(tiny_cfg("model.checkpoint=null", "model.name=deit_tiny_patch16_224"), tmp_path / "deit")


def test_checkpoint_round_trip_safetensors_and_torch(tmp_path):
    src = create_model(model_cfg(), SPEC)
    st, pt = tmp_path / "w.safetensors", tmp_path / "w.pth"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(st))
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, pt)
    for path in (st, pt):
        dst = create_model(model_cfg(), SPEC)
        load_state_strict(dst, read_state_dict(path), str(path))
        assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values(),
                                                     strict=True))


def test_checkpoint_mismatch_lists_keys(tmp_path):
    other = timm.create_model("resnet34", num_classes=10, in_chans=1)
    path = tmp_path / "r34.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match=r"missing keys: none; unexpected keys: layer1\.2\."):
        load_state_strict(create_model(model_cfg(), SPEC), read_state_dict(path), str(path))
    wrong_head = timm.create_model("resnet18", num_classes=5, in_chans=1)
    path2 = tmp_path / "r18-5.safetensors"
    save_file({k: v.contiguous() for k, v in wrong_head.state_dict().items()}, str(path2))
    with pytest.raises(CheckpointError,
                       match=r"shape mismatches: fc\.weight \(5, 512\) vs model \(10, 512\)"):
        load_state_strict(create_model(model_cfg(), SPEC), read_state_dict(path2), str(path2))


def test_missing_and_unreadable_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match=r"model.checkpoint='.*nope.pt' does not exist"):
        file_fingerprint(tmp_path / "nope.pt")  # the dense cache key is computed first: same clear error
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        read_state_dict(junk)


def test_checkpoint_refuses_arbitrary_pickle(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_state_dict(path)
