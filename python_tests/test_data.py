"""easier_ext.app.data: the digits split and preprocessing against an independent recomputation, the
CIFAR and ImageFolder loaders on generated files, and the loaders' seeded, resumable order."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import DistributedSampler, TensorDataset
from torchvision import transforms as T

from easier_ext.app.data import (
    DATASETS,
    NORMALIZATION,
    SeededSampler,
    ShardSampler,
    load_cifar,
    load_dataset,
    load_digits,
    load_image_folder,
    make_loader,
    stratified_split,
)

sklearn_datasets = pytest.importorskip("sklearn.datasets")

N_DIGITS = 1797


@pytest.fixture(scope="module")
def raw_digits():
    """sklearn's digits, straight from sklearn: (float64 (N, 8, 8) images 0..16, int64 labels)."""
    bunch = sklearn_datasets.load_digits()
    return np.asarray(bunch.images, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64)


def reference_digits(images: np.ndarray, size: int) -> torch.Tensor:
    """The unnormalized inputs: [0, 1], bilinear upsampling, 3 equal channels."""
    x = torch.from_numpy(images / 16.0).float()[:, None]
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)


# -- digits -----------------------------------------------------------------------------------


def test_digits_shapes_and_dtypes():
    train, val = load_digits()
    for ds in (train, val):
        x, y = ds.tensors
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (3, 32, 32) and y.shape == (len(x),)
    assert len(train) + len(val) == N_DIGITS
    assert len(val) == 359  # sum over classes of round(0.2 * n_c)
    assert set(train.tensors[1].tolist()) == set(range(10))
    x, _ = train[0]
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])


def test_digits_stratified(raw_digits):
    _, labels = raw_digits
    per_class = np.bincount(labels, minlength=10)
    for fraction in (0.2, 0.5):
        train, val = load_digits(8, val_fraction=fraction)
        expected_val = np.array([round(n * fraction) for n in per_class])
        assert np.array_equal(np.bincount(val.tensors[1].numpy(), minlength=10), expected_val)
        assert np.array_equal(np.bincount(train.tensors[1].numpy(), minlength=10), per_class - expected_val)


def test_digits_normalized_with_train_statistics(raw_digits):
    train, val = load_digits(16)
    x = train.tensors[0]
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3), correction=0), torch.ones(3), atol=1e-5, rtol=0)
    # The validation images use the training statistics, so they are not exactly standardized.
    assert not torch.allclose(val.tensors[0].mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)


@pytest.mark.parametrize("size", [8, 16, 32])
def test_digits_upsampling_matches_interpolate(raw_digits, size):
    images, labels = raw_digits
    train_idx, val_idx = stratified_split(labels, 0.2, seed=3)
    up = reference_digits(images, size)
    mean = up[train_idx].mean(dim=(0, 2, 3)).view(1, 3, 1, 1)
    std = up[train_idx].std(dim=(0, 2, 3), correction=0).view(1, 3, 1, 1)
    train, val = load_digits(size, seed=3)
    torch.testing.assert_close(train.tensors[0] * std + mean, up[train_idx], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(val.tensors[0] * std + mean, up[val_idx], atol=1e-5, rtol=1e-5)
    assert np.array_equal(train.tensors[1].numpy(), labels[train_idx])
    assert np.array_equal(val.tensors[1].numpy(), labels[val_idx])
    if size == 8:  # bilinear resampling to the same size is the identity: the raw pixels
        torch.testing.assert_close(train.tensors[0][:, 0] * std[0, 0] + mean[0, 0],
                                   torch.from_numpy(images[train_idx] / 16.0).float(), atol=1e-5, rtol=0)


def test_split_is_a_disjoint_cover(raw_digits):
    _, labels = raw_digits
    train_idx, val_idx = stratified_split(labels, 0.2, seed=0)
    assert len(np.intersect1d(train_idx, val_idx)) == 0
    assert np.array_equal(np.sort(np.concatenate([train_idx, val_idx])), np.arange(N_DIGITS))
    assert np.all(np.diff(train_idx) > 0) and np.all(np.diff(val_idx) > 0)


def test_digits_deterministic():
    a_train, a_val = load_digits(8, seed=0)
    b_train, b_val = load_digits(8, seed=0)
    c_train, c_val = load_digits(8, seed=1)
    for a, b in ((a_train, b_train), (a_val, b_val)):
        assert all(torch.equal(s, t) for s, t in zip(a.tensors, b.tensors))
    assert not torch.equal(a_val.tensors[0], c_val.tensors[0])
    assert not torch.equal(a_train.tensors[0], c_train.tensors[0])


def test_digits_bad_arguments():
    with pytest.raises(ValueError, match="val_fraction"):
        load_digits(8, val_fraction=0.0)
    with pytest.raises(ValueError, match="val_fraction"):
        load_digits(8, val_fraction=1.0)
    with pytest.raises(ValueError, match="image_size"):
        load_digits(0)


# -- CIFAR ------------------------------------------------------------------------------------


def test_cifar_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True") as info:
        load_cifar(tmp_path, 10)
    assert str(tmp_path / "cifar-10-batches-py") in str(info.value)
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_cifar(tmp_path, 100)


def test_cifar_incomplete_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="missing data_batch_2") as info:
        load_cifar(tmp_path, 10)
    assert "test_batch" in str(info.value) and "batches.meta" in str(info.value)


def test_cifar_corrupted_folder(tmp_path):
    cls = torchvision.datasets.CIFAR100
    folder = tmp_path / cls.base_folder
    folder.mkdir()
    for name in [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]:
        (folder / name).write_bytes(b"not cifar")
    with pytest.raises(ValueError, match="corrupted"):
        load_cifar(tmp_path, 100)


def test_cifar_which():
    with pytest.raises(ValueError, match="10 or 100"):
        load_cifar("unused", 20)


def write_fake_cifar10(root, per_batch: int = 2) -> np.ndarray:
    """The CIFAR-10 files with ``per_batch`` random images each; returns the test images (HWC)."""
    cls = torchvision.datasets.CIFAR10
    folder = root / cls.base_folder
    folder.mkdir()
    rng = np.random.default_rng(0)
    test_images = None
    for name, _ in cls.train_list + cls.test_list:
        data = rng.integers(0, 256, size=(per_batch, 3 * 32 * 32), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": list(range(per_batch))}, f)
        test_images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # the last one is test_batch
    with open(folder / cls.meta["filename"], "wb") as f:
        pickle.dump({cls.meta["key"]: [f"class{i}" for i in range(10)]}, f)
    return test_images


def test_cifar_transforms_on_fake_data(tmp_path, monkeypatch):
    # The checksums of the real archive cannot match generated files: skip torchvision's check.
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    test_images = write_fake_cifar10(tmp_path)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in NORMALIZATION["cifar10"])

    train, val = load_cifar(tmp_path, 10, augment=False)
    assert len(train) == 10 and len(val) == 2
    x, y = val[1]
    expected = (torch.from_numpy(test_images[1]).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)
    assert y == 1
    assert torch.equal(train[0][0], train[0][0])

    train, _ = load_cifar(tmp_path, 10, augment=True)
    kinds = [type(t) for t in train.transform.transforms]
    assert kinds[:2] == [T.RandomCrop, T.RandomHorizontalFlip]
    assert train.transform.transforms[0].padding == 4
    assert train[0][0].shape == (3, 32, 32)


# -- ImageFolder ------------------------------------------------------------------------------


def write_image_folder(root, splits: dict[str, list[str]], per_class: int = 2) -> None:
    rng = np.random.default_rng(0)
    for split, classes in splits.items():
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")


def test_image_folder(tmp_path):
    write_image_folder(tmp_path, {"train": ["cat", "dog", "eel"], "val": ["cat", "dog", "eel"]}, per_class=2)
    train, val = load_image_folder(tmp_path, image_size=8)
    assert train.classes == val.classes == ["cat", "dog", "eel"]
    assert len(train) == len(val) == 6
    for ds in (train, val):
        x, y = ds[5]
        assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and y == 2
    # Validation preprocessing is deterministic; augmented training is not.
    assert torch.equal(val[0][0], val[0][0])
    train_plain, _ = load_image_folder(tmp_path, image_size=8, augment=False)
    assert torch.equal(train_plain[0][0], train_plain[0][0])
    assert [type(t) for t in train.transform.transforms][:2] == [T.RandomResizedCrop, T.RandomHorizontalFlip]

    train_ds, val_ds, classes = load_dataset("imagefolder", tmp_path, image_size=8)
    assert classes == 3 and len(train_ds) == 6


def test_image_folder_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.*val"):
        load_image_folder(tmp_path)
    write_image_folder(tmp_path, {"train": ["cat"]})
    with pytest.raises(FileNotFoundError) as info:
        load_image_folder(tmp_path)
    assert str(info.value).startswith(f"image folder dataset: {tmp_path / 'val'} not found;")


def test_image_folder_class_mismatch(tmp_path):
    write_image_folder(tmp_path, {"train": ["cat", "dog"], "val": ["bird", "cat"]}, per_class=1)
    with pytest.raises(ValueError, match="different classes") as info:
        load_image_folder(tmp_path, image_size=8)
    assert "dog" in str(info.value) and "bird" in str(info.value)


# -- load_dataset -----------------------------------------------------------------------------


def test_load_dataset_digits():
    train, val, classes = load_dataset("digits", image_size=16, seed=2)
    assert classes == 10 and train.tensors[0].shape[1:] == (3, 16, 16)
    reference_train, _ = load_digits(16, seed=2)
    assert torch.equal(train.tensors[0], reference_train.tensors[0])


def test_load_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="digits, cifar10, cifar100, imagefolder"):
        load_dataset("mnist")
    for name in ("cifar10", "cifar100", "imagefolder"):
        with pytest.raises(ValueError, match="needs root"):
            load_dataset(name)
    with pytest.raises(ValueError, match="32x32"):
        load_dataset("cifar10", tmp_path, image_size=64)
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_dataset("cifar100", tmp_path, image_size=32)
    with pytest.raises(ValueError, match="CIFAR only"):
        load_dataset("imagefolder", tmp_path, download=True)
    assert DATASETS == ("digits", "cifar10", "cifar100", "imagefolder")


# -- make_loader ------------------------------------------------------------------------------


def indices(n: int) -> TensorDataset:
    return TensorDataset(torch.arange(n))


def order(loader) -> list[int]:
    return [i for (batch,) in loader for i in batch.tolist()]


def test_loader_seeded_order():
    data = indices(50)
    first = order(make_loader(data, 10, train=True, seed=7))
    assert first == order(make_loader(data, 10, train=True, seed=7))
    assert sorted(first) == list(range(50)) and first != list(range(50))
    assert first != order(make_loader(data, 10, train=True, seed=8))
    # The order does not depend on (or consume) the global RNG.
    torch.manual_seed(123)
    state = torch.get_rng_state()
    assert order(make_loader(data, 10, train=True, seed=7)) == first
    assert torch.equal(torch.get_rng_state(), state)


def test_loader_set_epoch_reproducible():
    data = indices(50)
    loader = make_loader(data, 10, train=True, seed=7)
    assert isinstance(loader.sampler, SeededSampler)
    epochs = []
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        epochs.append(order(loader))
    assert epochs[0] != epochs[1] != epochs[2]
    assert order(loader) == epochs[2]  # without set_epoch, the same epoch again
    resumed = make_loader(data, 10, train=True, seed=7)
    resumed.sampler.set_epoch(1)
    assert order(resumed) == epochs[1]


def test_loader_eval_in_order():
    loader = make_loader(indices(23), 10, train=False, seed=7)
    loader.sampler.set_epoch(5)  # exists, and changes nothing
    assert order(loader) == list(range(23))
    assert [len(b) for (b,) in loader] == [10, 10, 3]


def test_loader_batch_sizes():
    data = indices(23)
    assert [len(b) for (b,) in make_loader(data, 10, train=True)] == [10, 10]
    assert [len(b) for (b,) in make_loader(data, 10, train=True, drop_last=False)] == [10, 10, 3]
    assert [len(b) for (b,) in make_loader(data, 10, train=False, drop_last=True)] == [10, 10]
    # Dropping the only (incomplete) batch by default would train on nothing; explicitly, it may.
    assert [len(b) for (b,) in make_loader(indices(3), 10, train=True)] == [3]
    assert list(make_loader(indices(3), 10, train=True, drop_last=True)) == []
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(data, 0, train=True)
    with pytest.raises(ValueError, match="workers"):
        make_loader(data, 1, train=True, workers=-1)


def test_loader_with_a_worker_same_order():
    data = indices(20)
    assert order(make_loader(data, 4, train=True, seed=3, workers=1)) == order(make_loader(data, 4, train=True, seed=3))


def test_loader_digits_batches():
    train, val = load_digits(8)
    x, y = next(iter(make_loader(train, 64, train=True)))
    assert x.shape == (64, 3, 8, 8) and y.dtype == torch.int64
    assert sum(len(b) for b, _ in make_loader(val, 64, train=False)) == len(val)


@pytest.fixture
def gloo_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_loader_distributed(gloo_group):
    data = indices(50)
    train = make_loader(data, 10, train=True, seed=7)
    assert isinstance(train.sampler, DistributedSampler)
    assert train.sampler.shuffle and train.sampler.seed == 7 and train.sampler.drop_last
    assert train.sampler.num_replicas == 1 and train.sampler.rank == 0
    val = make_loader(data, 10, train=False, seed=7)
    assert isinstance(val.sampler, ShardSampler)
    assert order(val) == list(range(50))
    # unpadded shards: over 3 ranks, every sample exactly once
    shards = [list(ShardSampler(50, r, 3)) for r in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(50)) and [len(x) for x in shards] == [17, 17, 16]

    epochs = []
    for epoch in range(2):
        train.sampler.set_epoch(epoch)
        epochs.append(order(train))
    assert epochs[0] != epochs[1] and sorted(epochs[0]) == list(range(50))
    assert [len(b) for (b,) in train] == [10] * 5
    # On one rank, the same permutations as without torch.distributed (both seed with seed + epoch).
    for epoch, expected in enumerate(epochs):
        plain = SeededSampler(50, seed=7)
        plain.set_epoch(epoch)
        assert list(plain) == expected


def test_seeded_sampler():
    sampler = SeededSampler(6, shuffle=True, seed=1)
    assert len(sampler) == 6 and sorted(sampler) == list(range(6))
    generator = torch.Generator().manual_seed(1 + 4)
    sampler.set_epoch(4)
    assert list(sampler) == torch.randperm(6, generator=generator).tolist()
    assert list(SeededSampler(4, shuffle=False)) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        SeededSampler(-1)
