"""Datasets and loaders of the ``easier-ext`` CLI and the EASIER schedule.

Three sources, all returned as ``(train, val)`` datasets of ``(float32 image (3, S, S), int64
label)``:

* ``"digits"``: scikit-learn's embedded handwritten digits (offline, 1797 images), upsampled to
  ``S x S``; small enough to run the whole schedule on a CPU in minutes.
* ``"cifar10"`` / ``"cifar100"``: torchvision's CIFAR (train / test splits).
* ``"imagefolder"``: any ``root/train`` + ``root/val`` folder of class sub-folders (e.g. ImageNet).

:func:`make_loader` wraps a dataset in a reproducible :class:`~torch.utils.data.DataLoader` whose
sampler has ``set_epoch(epoch)``, with or without ``torch.distributed``; it and its samplers live in
:mod:`easier_ext.app.loaders` and are re-exported here, where they were before.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from easier_ext.core.checks import is_int
from easier_ext.app.loaders import SeededSampler, ShardSampler, make_loader

__all__ = [
    "DATASETS",
    "NORMALIZATION",
    "SeededSampler",
    "ShardSampler",
    "load_cifar",
    "load_dataset",
    "load_digits",
    "load_image_folder",
    "make_loader",
    "stratified_split",
]

#: Names :func:`load_dataset` accepts.
DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")

#: Per-channel ``(mean, std)`` of the RGB values in [0, 1]. CIFAR: the training sets' per-pixel
#: statistics (not the often-copied ``(0.2023, 0.1994, 0.2010)``, which is a std of image means).
NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

_NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100}
_CIFAR_SIZE = 32
_DIGITS_MAX = 16.0  # sklearn's digits are counts of ON pixels in 4x4 blocks: 0..16
_DEFAULT_DIGITS_SIZE = 32
_DEFAULT_IMAGE_FOLDER_SIZE = 224

PathLike = Union[str, "os.PathLike[str]"]


# -- digits -----------------------------------------------------------------------------------


def load_digits(image_size: int = _DEFAULT_DIGITS_SIZE, *, val_fraction: float = 0.2, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's embedded handwritten digits as a small RGB image classification task.

    The 1797 8x8 images (values 0..16, 10 classes) are scaled to [0, 1], upsampled to
    ``image_size x image_size`` (bilinear, ``align_corners=False``), replicated to 3 channels and
    normalized with the training split's per-channel mean and (population) std, so the training
    images have mean 0 and std 1 and no statistic leaks from the validation images. The split is
    :func:`stratified_split`. No augmentation: the tensors are fixed.

    Args:
        image_size: side of the output images; models with CIFAR-style stems want >= 16.
        val_fraction: share of each class held out for validation, in (0, 1).
        seed: seed of the split; the same seed gives the same split on every machine.

    Returns:
        ``(train, val)`` TensorDatasets of float32 images ``(N, 3, S, S)`` and int64 labels
        ``(N,)``, each in the original order of the sklearn data (the loader shuffles).

    Raises:
        ValueError: ``image_size`` < 1 or ``val_fraction`` outside (0, 1).
        ImportError: scikit-learn is not installed.
    """
    _check_positive("image_size", image_size)
    images, labels = _sklearn_digits()
    train_idx, val_idx = stratified_split(labels, val_fraction, seed=seed)
    x = _upsample_gray(torch.from_numpy(images / _DIGITS_MAX).float(), image_size)
    mean, std = _channel_stats(x[train_idx])
    x = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    y = torch.from_numpy(labels).long()
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[val_idx], y[val_idx])


def stratified_split(labels: Sequence[int], val_fraction: float, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split that holds out the same share of every class.

    Class ``c`` with ``n_c`` samples contributes ``round(n_c * val_fraction)`` (Python rounding)
    randomly chosen samples to the validation split and the rest to the training split. Classes
    are visited in sorted order with one ``numpy.random.default_rng(seed)``, so the split depends
    only on the labels and the seed.

    Args:
        labels: integer class of each sample.
        val_fraction: share of each class held out, in (0, 1).
        seed: seed of the random choice.

    Returns:
        ``(train_indices, val_indices)``: sorted int64 arrays, disjoint, together every index.

    Raises:
        ValueError: ``val_fraction`` outside (0, 1).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        val.append(rng.permutation(members)[: int(round(len(members) * val_fraction))])
    is_val = np.zeros(len(labels), dtype=bool)
    is_val[np.concatenate(val)] = True
    return np.flatnonzero(~is_val).astype(np.int64), np.flatnonzero(is_val).astype(np.int64)


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """The raw ``(1797, 8, 8)`` float64 images (0..16) and int64 labels."""
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as e:  # only this dataset needs scikit-learn; don't make it a hard dependency
        raise ImportError("the 'digits' dataset needs scikit-learn: pip install scikit-learn") from e
    bunch = sklearn_load_digits()
    return np.asarray(bunch.images, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64)


def _upsample_gray(images: Tensor, size: int) -> Tensor:
    """``(N, H, W)`` -> ``(N, 3, size, size)``: bilinear resize, the gray value on all channels."""
    resized = F.interpolate(images.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
    return resized.expand(-1, 3, -1, -1).contiguous()


def _channel_stats(images: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and population std of ``(N, C, H, W)`` images."""
    mean = images.mean(dim=(0, 2, 3))
    std = images.std(dim=(0, 2, 3), correction=0)
    # A constant channel would divide by zero; leave it centred but unscaled.
    return mean, torch.where(std > 0, std, torch.ones_like(std))


# -- CIFAR ------------------------------------------------------------------------------------


def load_cifar(root: PathLike, which: int = 10, *, download: bool = False, augment: bool = True) -> tuple[Dataset, Dataset]:
    """torchvision's CIFAR-10 or CIFAR-100: the training set and the test set (as validation).

    Images are normalized with :data:`NORMALIZATION`; with ``augment`` the training images get the
    standard ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()``.

    Args:
        root: folder that holds (or will hold, with ``download``) the extracted
            ``cifar-10-batches-py`` / ``cifar-100-python`` folder.
        which: 10 or 100.
        download: fetch and extract the archive into ``root`` when it is not there.
        augment: random crops and flips for the training set (off: the same tensors every epoch).

    Returns:
        ``(train, val)`` datasets of float32 ``(3, 32, 32)`` images and int labels.

    Raises:
        ValueError: ``which`` is not 10 or 100, or the files are there but corrupted.
        FileNotFoundError: the data (or part of it) is missing and ``download`` is False.
    """
    import torchvision
    from torchvision import transforms as T

    classes = {10: torchvision.datasets.CIFAR10, 100: torchvision.datasets.CIFAR100}
    if which not in classes:
        raise ValueError(f"which must be 10 or 100 (CIFAR-10 or CIFAR-100), got {which!r}")
    cls, root = classes[which], Path(root)
    if not download:
        _check_cifar_files(cls, root, which)
    mean, std = NORMALIZATION[f"cifar{which}"]
    finish = [T.ToTensor(), T.Normalize(mean, std)]
    train_aug = [T.RandomCrop(_CIFAR_SIZE, padding=4), T.RandomHorizontalFlip()] if augment else []
    try:
        train = cls(str(root), train=True, transform=T.Compose(train_aug + finish), download=download)
        val = cls(str(root), train=False, transform=T.Compose(finish), download=download)
    except RuntimeError as e:
        # torchvision says "not found or corrupted" for a checksum mismatch too; the files are there.
        raise ValueError(
            f"CIFAR-{which} in {root / cls.base_folder} is corrupted ({e}); delete that folder and pass download=True"
            " (CLI: --download), or put a fresh extracted copy there"
        ) from e
    return train, val


def _check_cifar_files(cls: type, root: Path, which: int) -> None:
    """A clear error for missing data, before torchvision's generic "not found or corrupted"."""
    folder = root / cls.base_folder
    hint = (f"pass download=True (CLI: --download) to fetch it into {root}, or put the extracted "
            f"{cls.base_folder!r} folder of https://www.cs.toronto.edu/~kriz/{cls.filename} there")
    if not folder.is_dir():
        raise FileNotFoundError(f"CIFAR-{which} not found: {folder} does not exist; {hint}")
    expected = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    missing = [name for name in expected if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-{which} in {folder} is incomplete: missing {', '.join(missing)}; {hint}")


# -- ImageFolder ------------------------------------------------------------------------------


def load_image_folder(root: PathLike, image_size: int = _DEFAULT_IMAGE_FOLDER_SIZE, *, augment: bool = True) -> tuple[Dataset, Dataset]:
    """torchvision ``ImageFolder`` datasets from ``root/train`` and ``root/val``.

    Each split holds one sub-folder per class (the ImageNet layout); both must have the same class
    folders, since the label of a class is its index in the sorted folder names. Training images
    get ``RandomResizedCrop(image_size)`` + ``RandomHorizontalFlip()`` (with ``augment``);
    validation images (and training images without ``augment``) are resized to
    ``image_size * 256 / 224`` on the short side and centre-cropped, the ImageNet evaluation
    recipe. Both are normalized with the ImageNet statistics of :data:`NORMALIZATION`.

    Args:
        root: folder with ``train/`` and ``val/``.
        image_size: side of the output images.
        augment: random resized crops and flips for the training set.

    Returns:
        ``(train, val)`` ImageFolder datasets of float32 ``(3, S, S)`` images and int labels;
        ``train.classes`` names the classes.

    Raises:
        FileNotFoundError: ``root/train`` or ``root/val`` is missing, or has no class folder with
            an image.
        ValueError: the two splits have different classes, or ``image_size`` < 1.
    """
    from torchvision import datasets, transforms as T

    _check_positive("image_size", image_size)
    root = Path(root)
    missing = [str(root / split) for split in ("train", "val") if not (root / split).is_dir()]
    if missing:
        raise FileNotFoundError(f"image folder dataset: {' and '.join(missing)} not found; "
                                f"expected {root}/train/<class>/<image> and {root}/val/<class>/<image>")
    mean, std = NORMALIZATION["imagenet"]
    finish = [T.ToTensor(), T.Normalize(mean, std)]
    evaluation = T.Compose([T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size)] + finish)
    training = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()] + finish) if augment else evaluation
    train = datasets.ImageFolder(str(root / "train"), transform=training)
    val = datasets.ImageFolder(str(root / "val"), transform=evaluation)
    _check_same_classes(train.classes, val.classes, root)
    return train, val


def _check_same_classes(train: list[str], val: list[str], root: Path) -> None:
    if train == val:
        return
    only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
    raise ValueError(f"{root}/train and {root}/val have different classes (labels would not match): "
                     f"only in train: {only_train or 'none'}; only in val: {only_val or 'none'}")


# -- by name ----------------------------------------------------------------------------------


def load_dataset(
    name: str,
    root: Optional[PathLike] = None,
    *,
    image_size: Optional[int] = None,
    download: bool = False,
    seed: int = 0,
) -> tuple[Dataset, Dataset, int]:
    """One of :data:`DATASETS` by name, with its number of classes.

    Args:
        name: ``"digits"``, ``"cifar10"``, ``"cifar100"`` or ``"imagefolder"``.
        root: the data folder; required for CIFAR (see :func:`load_cifar`) and ImageFolder (see
            :func:`load_image_folder`), ignored for the embedded digits.
        image_size: side of the images (default: digits 32, ImageFolder 224); CIFAR is 32 only.
        download: fetch CIFAR into ``root`` when missing; nothing to fetch for digits, and
            refused for ImageFolder, which cannot be downloaded.
        seed: seed of the digits' train/val split (the other datasets come split).

    Returns:
        ``(train, val, num_classes)``.

    Raises:
        ValueError: unknown name, missing ``root``, an unsupported ``image_size`` or ``download``.
        FileNotFoundError: the data is not in ``root``.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if name == "digits":
        train, val = load_digits(_DEFAULT_DIGITS_SIZE if image_size is None else image_size, seed=seed)
        return train, val, _NUM_CLASSES[name]
    if root is None:
        what = "the folder of CIFAR (or where to download it)" if name.startswith("cifar") else "a folder with train/ and val/"
        raise ValueError(f"dataset {name!r} needs root (CLI: --data-root): {what}")
    if name.startswith("cifar"):
        if image_size not in (None, _CIFAR_SIZE):
            raise ValueError(f"{name} images are {_CIFAR_SIZE}x{_CIFAR_SIZE}; image_size={image_size} is not supported")
        train, val = load_cifar(root, _NUM_CLASSES[name], download=download)
        return train, val, _NUM_CLASSES[name]
    if download:
        raise ValueError("download is for CIFAR only; an image folder must already be in root")
    train, val = load_image_folder(root, _DEFAULT_IMAGE_FOLDER_SIZE if image_size is None else image_size)
    return train, val, len(train.classes)


def _check_positive(name: str, value: int) -> None:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
