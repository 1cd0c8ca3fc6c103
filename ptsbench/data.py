"""Datasets, batching and the seeded calibration draw.

Small datasets (Fashion-MNIST, CIFAR-10) are held in memory as normalised float tensors, so batching is
a slice and evaluation runs at the speed of the model. Folder datasets (ImageNet layout) go through a
DataLoader with timm's preprocessing for the model.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ptsbench.errors import ConfigError, DataError, unknown_choice
from ptsbench.paths import safe_subdir
from ptsbench.streams import stream_seed

log = logging.getLogger(__name__)

FASHION_MNIST_DEB = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about the data: classes, channels, input size, normalisation."""

    name: str
    num_classes: int
    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


class InMemoryImages(Dataset):
    """Normalised float images [N, C, H, W] and int64 labels, batched by slicing."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]

    def subset(self, indices: torch.Tensor) -> InMemoryImages:
        return InMemoryImages(self.images[indices], self.labels[indices])

    def copy(self) -> InMemoryImages:
        return InMemoryImages(self.images.clone(), self.labels.clone())


@dataclass
class DataBundle:
    spec: DataSpec
    train: Dataset
    test: Dataset


@dataclass
class CalibrationSet:
    """The calibration images an algorithm may see, with the train-split indices they were drawn from."""

    data: InMemoryImages
    indices: list[int]
    seed: int

    def __len__(self) -> int:
        return len(self.data)

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
                drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iterate_batches(self.data, batch_size, shuffle=shuffle, generator=generator,
                               drop_last=drop_last)


def iterate_batches(dataset: Dataset, batch_size: int, shuffle: bool = False,
                    generator: torch.Generator | None = None, drop_last: bool = False,
                    num_workers: int = 0,
                    pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images, labels) batches; in-memory sets are sliced, others go through a DataLoader.

    `pin_memory` (DataLoader only) page-locks the batches so that non_blocking copies to a GPU overlap.
    """
    if isinstance(dataset, InMemoryImages):
        n = len(dataset)
        order = torch.randperm(n, generator=generator) if shuffle else None
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            if order is None:
                yield dataset.images[start:start + batch_size], dataset.labels[start:start + batch_size]
            else:
                # index_select copies these rows about 4x faster than images[idx]
                idx = order[start:start + batch_size]
                yield (dataset.images.index_select(0, idx.to(dataset.images.device)),
                       dataset.labels.index_select(0, idx.to(dataset.labels.device)))
        return
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                        drop_last=drop_last, num_workers=num_workers, pin_memory=pin_memory)
    yield from loader


# ---------------------------------------------------------------------------------------------- readers


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic with the dim count in byte 3, big-endian sizes, uint8."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number {raw[:4].hex()}).")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} but holds {data.size} bytes of data.")
    return data.reshape(dims)


def _find_idx(root: Path, stem: str) -> Path | None:
    for candidate in (root / f"{stem}.gz", root / stem, root / "FashionMNIST" / "raw" / stem):
        if candidate.exists():
            return candidate
    return None


@lru_cache(maxsize=4)
def load_fashion_mnist_arrays(root: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The four Fashion-MNIST IDX files under `root` as uint8 images and labels (read once per process)."""
    out = {}
    for split, (img_stem, lbl_stem) in FASHION_MNIST_FILES.items():
        img_path, lbl_path = _find_idx(Path(root), img_stem), _find_idx(Path(root), lbl_stem)
        if img_path is None or lbl_path is None:
            raise DataError(
                f"Fashion-MNIST not found under {root!r}: expected {img_stem}.gz and {lbl_stem}.gz. "
                f"Install the Debian package (apt-get install dataset-fashion-mnist, files land in "
                f"{FASHION_MNIST_DEB}), point data.root at a folder holding the IDX files, or set "
                f"data.download=true on a machine with network access."
            )
        images, labels = read_idx(img_path), read_idx(lbl_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"Fashion-MNIST {split} under {root!r} has images {images.shape}, labels "
                            f"{labels.shape}.")
        out[split] = (images, labels)
    return out


def _download_fashion_mnist(cache_dir: Path) -> Path:
    from torchvision.datasets import FashionMNIST

    root = safe_subdir(cache_dir, "datasets")
    try:
        FashionMNIST(str(root), train=True, download=True)
        FashionMNIST(str(root), train=False, download=True)
    except Exception as exc:  # network errors come in many types
        raise DataError(
            f"Fashion-MNIST could not be downloaded to {root} ({exc}). Install the Debian package "
            f"dataset-fashion-mnist instead."
        ) from exc
    return root / "FashionMNIST" / "raw"


def _to_tensor_set(images: np.ndarray, labels: np.ndarray, mean, std, img_size: int) -> InMemoryImages:
    """uint8 [N, H, W] or [N, H, W, C] to normalised float [N, C, img_size, img_size]."""
    x = torch.from_numpy(np.array(images, copy=True))
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    x = x.float().div_(255.0)
    if x.shape[-1] != img_size or x.shape[-2] != img_size:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True)
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    x = x.sub_(mean_t).div_(std_t).contiguous()
    return InMemoryImages(x, torch.from_numpy(labels.astype(np.int64)))


def _limit(ds: Dataset, limit: int | None) -> Dataset:
    if limit is None or limit >= len(ds):
        return ds
    if isinstance(ds, InMemoryImages):
        return ds.subset(torch.arange(limit))
    return torch.utils.data.Subset(ds, range(limit))


@lru_cache(maxsize=4)
def fashion_mnist_tensors(root: str, size: int) -> tuple[InMemoryImages, InMemoryImages]:
    """Normalised train and test tensors at `size`, built once per process so a sweep reuses them; callers
    take copies (`build_fashion_mnist`), so no job can change what the next one reads."""
    arrays = load_fashion_mnist_arrays(root)
    train = _to_tensor_set(*arrays["train"], FASHION_MNIST_MEAN, FASHION_MNIST_STD, size)
    test = _to_tensor_set(*arrays["test"], FASHION_MNIST_MEAN, FASHION_MNIST_STD, size)
    return train, test


def build_fashion_mnist(cfg, img_size: int | None, cache_dir: Path,
                        model_name: str | None = None) -> DataBundle:
    root = Path(cfg.root)
    if _find_idx(root, FASHION_MNIST_FILES["train"][0]) is None and cfg.get("download", False):
        root = _download_fashion_mnist(cache_dir)
    size = int(img_size or 28)
    # a job's own tensors, not the cache's
    train, test = (ds.copy() for ds in fashion_mnist_tensors(str(root), size))
    spec = DataSpec("fashion_mnist", 10, 1, size, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    return DataBundle(spec, train, test)


def build_cifar10(cfg, img_size: int | None, cache_dir: Path, model_name: str | None = None) -> DataBundle:
    from torchvision.datasets import CIFAR10

    if cfg.root is None:
        raise DataError("data=cifar10 needs data.root: a folder holding cifar-10-batches-py (torchvision's "
                        "format).")
    try:
        tr = CIFAR10(str(cfg.root), train=True, download=bool(cfg.get("download", False)))
        te = CIFAR10(str(cfg.root), train=False, download=False)
    except RuntimeError as exc:  # torchvision's own hint names its argument, not this config's key
        raise DataError(
            f"CIFAR-10 not found under data.root={cfg.root!r}: expected {cfg.root}/cifar-10-batches-py with "
            f"the python batches (torchvision's on-disk format). Set data.download=true to download it there "
            f"(needs network), or point data.root at a folder holding it."
        ) from exc
    size = img_size or 32
    spec = DataSpec("cifar10", 10, 3, size, CIFAR10_MEAN, CIFAR10_STD)
    return DataBundle(
        spec,
        _to_tensor_set(tr.data, np.asarray(tr.targets), spec.mean, spec.std, size),
        _to_tensor_set(te.data, np.asarray(te.targets), spec.mean, spec.std, size),
    )


def timm_eval_transform(cfg, img_size: int | None, model_name: str | None):
    """timm's evaluation preprocessing for the model's pretrained config (resize, crop_pct, mean/std), and
    that config; `img_size` and `data.crop_pct` override the model's values."""
    import timm.data

    pretrained_cfg = timm.get_pretrained_cfg(model_name) if model_name and timm.is_model(model_name) else None
    data_cfg = (dict(timm.data.resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict()))
                if pretrained_cfg else {})
    if img_size:
        data_cfg["input_size"] = (3, img_size, img_size)
    data_cfg.setdefault("input_size", (3, 224, 224))
    if cfg.get("crop_pct") is not None:
        data_cfg["crop_pct"] = float(cfg.crop_pct)
    return timm.data.create_transform(**data_cfg, is_training=False), data_cfg


def build_image_folder(cfg, img_size: int | None, cache_dir: Path, model_name: str | None) -> DataBundle:
    """ImageNet layout: root/train/<class>/*.JPEG and root/val/<class>/*.JPEG, timm preprocessing."""
    from torchvision.datasets import ImageFolder

    if cfg.root is None:
        raise DataError(f"data={cfg.name} needs data.root: a folder with train/ and val/ class folders.")
    root = Path(cfg.root)
    missing = [s for s in (cfg.train_split, cfg.val_split) if not (root / s).is_dir()]
    if missing:
        raise DataError(
            f"{root} does not have the ImageFolder layout: missing {', '.join(missing)}/ (expected "
            f"{root}/{cfg.train_split}/<class>/<image> and {root}/{cfg.val_split}/<class>/<image>)."
        )
    transform, data_cfg = timm_eval_transform(cfg, img_size, model_name)
    try:
        train = ImageFolder(str(root / cfg.train_split), transform=transform)
        val = ImageFolder(str(root / cfg.val_split), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"Could not read the image folders under {root}: {exc}") from exc
    if train.classes != val.classes:
        raise DataError(f"{root}: the train and val splits have different class folders.")
    spec = DataSpec(cfg.name, len(train.classes), 3, data_cfg["input_size"][-1],
                    tuple(data_cfg.get("mean", (0.485, 0.456, 0.406))),
                    tuple(data_cfg.get("std", (0.229, 0.224, 0.225))))
    return DataBundle(spec, train, val)


PROBE_FILE = re.compile(r"^imagenet_(\d+)_(\d+)\.(?:jpe?g|png)$", re.IGNORECASE)


def foolbox_data_dir() -> Path:
    """foolbox's bundled sample folder, found without importing foolbox (whose import pulls in eagerpy,
    GitPython, requests and scipy only to read 20 files)."""
    found = importlib.util.find_spec("foolbox")
    if found is None or not found.submodule_search_locations:
        raise DataError(
            "data=imagenet_probe reads the ImageNet validation images shipped in the PyPI package foolbox, "
            "which is not installed: pip install -e '.[realweights]' (scripts/setup.sh does it), or point "
            "data.root at a folder of imagenet_<index>_<label>.jpg files."
        )
    return Path(list(found.submodule_search_locations)[0]) / "data"


def build_imagenet_probe(cfg, img_size: int | None, cache_dir: Path, model_name: str | None) -> DataBundle:
    """A few labelled ImageNet validation images (foolbox's 20: `imagenet_<index>_<label>.jpg`), held in
    memory after timm's evaluation preprocessing for the model.

    There is no separate train split: calibration draws from the same images (data.probe marks the set
    as too small for accuracy alone, so jobs also record agreement and KL with the dense model).
    """
    from PIL import Image

    root = Path(cfg.root) if cfg.get("root") else foolbox_data_dir()
    files = sorted(p for p in root.glob("*") if PROBE_FILE.match(p.name)) if root.is_dir() else []
    if not files:
        raise DataError(
            f"No probe images under {str(root)!r}: expected files named imagenet_<index>_<label>.jpg with "
            f"the ImageNet class index (0-999) as <label>, as in foolbox's data folder."
        )
    transform, data_cfg = timm_eval_transform(cfg, img_size, model_name)
    images, labels = [], []
    for path in files:
        label = int(PROBE_FILE.match(path.name).group(2))
        if not 0 <= label < 1000:
            raise DataError(f"{path.name}: label {label} is not an ImageNet-1k class index (0-999).")
        with Image.open(path) as img:
            images.append(transform(img.convert("RGB")))
        labels.append(label)
    probe = InMemoryImages(torch.stack(images), torch.tensor(labels, dtype=torch.int64))
    spec = DataSpec("imagenet_probe", 1000, 3, data_cfg["input_size"][-1],
                    tuple(data_cfg.get("mean", (0.485, 0.456, 0.406))),
                    tuple(data_cfg.get("std", (0.229, 0.224, 0.225))))
    return DataBundle(spec, probe, probe)


# name -> builder(cfg, img_size, cache_dir, model_name): the `data.name` choices
DATASET_BUILDERS = {
    "fashion_mnist": build_fashion_mnist,
    "cifar10": build_cifar10,
    "imagenet": build_image_folder,
    "image_folder": build_image_folder,
    "imagenet_probe": build_imagenet_probe,
}


def build_data(cfg, cache_dir: Path, img_size: int | None = None,
               model_name: str | None = None) -> DataBundle:
    """Build the dataset named by `cfg.name`; `img_size` overrides the native size (from the model config).

    Folder datasets take their preprocessing from timm's pretrained config for `model_name`.
    """
    builder = DATASET_BUILDERS.get(cfg.name)
    if builder is None:
        raise unknown_choice("dataset", cfg.name, DATASET_BUILDERS)
    bundle = builder(cfg, img_size, cache_dir, model_name)
    bundle.train = _limit(bundle.train, cfg.get("limit_train"))
    bundle.test = _limit(bundle.test, cfg.get("limit_test"))
    return bundle


def sample_calibration(train: Dataset, n: int, seed: int, batch_size: int = 1) -> CalibrationSet:
    """Draw `n` train images without replacement with a seeded generator; indices are kept for the record."""
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"calib.n={n!r} must be a positive whole number of images.")
    if n > len(train):
        raise ConfigError(f"calib.n={n} is larger than the train split ({len(train)} images).")
    if n < batch_size:
        raise ConfigError(f"calib.n={n} is below one calibration batch (calib.batch_size={batch_size}).")
    g = torch.Generator().manual_seed(stream_seed("calib.draw", seed))
    indices = torch.randperm(len(train), generator=g)[:n]
    if isinstance(train, InMemoryImages):
        subset = train.subset(indices)
    else:
        pairs = [train[int(i)] for i in indices]
        subset = InMemoryImages(torch.stack([p[0] for p in pairs]), torch.tensor([int(p[1]) for p in pairs]))
    return CalibrationSet(subset, indices.tolist(), int(seed))
