"""The Fashion-MNIST reader on the real Debian files, its errors, and the seeded calibration draw."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ptsbench.data import build_data, load_fashion_mnist_arrays, read_idx, sample_calibration
from ptsbench.errors import ConfigError, DataError


def test_reads_the_real_fashion_mnist(require_fmnist):
    arrays = load_fashion_mnist_arrays(str(require_fmnist))
    x_train, y_train = arrays["train"]
    x_test, y_test = arrays["test"]
    assert x_train.shape == (60000, 28, 28) and y_train.shape == (60000,)
    assert x_test.shape == (10000, 28, 28) and y_test.shape == (10000,)
    assert x_train.dtype == np.uint8
    assert np.bincount(y_train).tolist() == [6000] * 10
    assert np.bincount(y_test).tolist() == [1000] * 10
    assert abs(x_train.mean() / 255 - 0.286) < 0.001


def test_bundle_is_normalised_and_limited(require_fmnist, tmp_path):
    cfg = OmegaConf.create({"name": "fashion_mnist", "root": str(require_fmnist), "limit_train": 1000,
                            "limit_test": 200})
    bundle = build_data(cfg, tmp_path)
    assert bundle.spec.num_classes == 10 and bundle.spec.in_chans == 1 and bundle.spec.img_size == 28
    assert bundle.train.images.shape == (1000, 1, 28, 28) and len(bundle.test) == 200
    full = build_data(OmegaConf.create({"name": "fashion_mnist", "root": str(require_fmnist)}), tmp_path)
    assert abs(float(full.train.images.mean())) < 0.01 and abs(float(full.train.images.std()) - 1) < 0.01
    resized = build_data(cfg, tmp_path, img_size=32)
    assert resized.train.images.shape == (1000, 1, 32, 32)


def test_jobs_get_their_own_tensors_not_the_process_cache(require_fmnist, tmp_path):
    cfg = OmegaConf.create({"name": "fashion_mnist", "root": str(require_fmnist)})
    first = build_data(cfg, tmp_path)
    before = float(first.test.images[0].sum())
    first.test.images.mul_(0.0)  # a careless in-place edit by one job ...
    first.test.labels.fill_(3)
    second = build_data(cfg, tmp_path)  # ... does not reach the next one
    assert float(second.test.images[0].sum()) == before and int(second.test.labels[0]) == 9


def test_missing_dataset_says_how_to_install(tmp_path):
    cfg = OmegaConf.create({"name": "fashion_mnist", "root": str(tmp_path / "nowhere")})
    with pytest.raises(DataError, match=r"apt-get install dataset-fashion-mnist"):
        build_data(cfg, tmp_path)


def test_reads_uncompressed_idx_and_rejects_garbage(require_fmnist, tmp_path):
    raw = tmp_path / "t10k-labels-idx1-ubyte"
    with gzip.open(require_fmnist / "t10k-labels-idx1-ubyte.gz") as src, open(raw, "wb") as dst:
        shutil.copyfileobj(src, dst)
    assert read_idx(raw).shape == (10000,)
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x12\x34\x56\x78garbage")
    with pytest.raises(DataError, match="not an unsigned-byte IDX file"):
        read_idx(bad)


def test_unknown_dataset_lists_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"Unknown dataset 'mnist'.*fashion_mnist"):
        build_data(OmegaConf.create({"name": "mnist"}), tmp_path)


def test_image_folder_layout_error(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    cfg = OmegaConf.create({"name": "imagenet", "root": str(tmp_path), "train_split": "train",
                            "val_split": "val"})
    with pytest.raises(DataError, match=r"missing val/"):
        build_data(cfg, tmp_path, model_name="resnet18")


def test_calibration_draw_is_seeded_without_replacement(require_fmnist, tmp_path):
    cfg = OmegaConf.create({"name": "fashion_mnist", "root": str(require_fmnist), "limit_train": 5000})
    train = build_data(cfg, tmp_path).train
    a, b, c = (sample_calibration(train, 1024, s) for s in (0, 0, 1))
    assert a.indices == b.indices and a.indices != c.indices
    assert len(set(a.indices)) == 1024 and max(a.indices) < 5000
    assert torch.equal(a.data.images, train.images[torch.tensor(a.indices)])
    batches = list(a.batches(64))
    assert len(batches) == 16 and batches[0][0].shape == (64, 1, 28, 28)


@pytest.mark.parametrize("n,match", [(0, "positive"), (6001, "larger than the train split"),
                                     (10, "below one")])
def test_calibration_size_errors(require_fmnist, tmp_path, n, match):
    cfg = OmegaConf.create({"name": "fashion_mnist", "root": str(require_fmnist), "limit_train": 6000})
    train = build_data(cfg, tmp_path).train
    with pytest.raises(ConfigError, match=match):
        sample_calibration(train, n, 0, batch_size=64)


def test_image_folder_uses_timm_preprocessing(tmp_path):
    from PIL import Image

    gen = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                pixels = gen.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.JPEG")
    cfg = OmegaConf.create({"name": "imagenet", "root": str(tmp_path), "train_split": "train",
                            "val_split": "val"})
    bundle = build_data(cfg, tmp_path, model_name="resnet18")
    assert bundle.spec.num_classes == 2 and bundle.spec.in_chans == 3 and bundle.spec.img_size == 224
    image, label = bundle.test[0]
    assert image.shape == (3, 224, 224) and label == 0
    calib = sample_calibration(bundle.train, 4, 0, batch_size=2)
    assert calib.data.images.shape == (4, 3, 224, 224)
    small = build_data(cfg, tmp_path, img_size=64, model_name="resnet18")
    assert small.test[0][0].shape == (3, 64, 64)


def test_cifar10_missing_names_the_expected_layout(tmp_path):
    cfg = OmegaConf.create({"name": "cifar10", "root": str(tmp_path), "download": False})
    with pytest.raises(DataError, match=r"cifar-10-batches-py.* Set data.download=true") as missing:
        build_data(cfg, tmp_path)
    assert "download=True" not in str(missing.value)  # torchvision's argument, not a key of this config
    with pytest.raises(DataError, match=r"needs data.root"):
        build_data(OmegaConf.create({"name": "cifar10", "root": None}), tmp_path)
