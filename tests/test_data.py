"""Tests of kdbook_utils.data: the data sets on disk and the tensor loader's augmentation."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from kdbook_utils import data
from kdbook_utils.data import (
    CIFAR10_CLASSES,
    DatasetNotFoundError,
    ImageDataset,
    TensorLoader,
    crop_and_flip,
    load_dataset,
    preset_data,
)
from kdbook_utils.presets import get_preset


@pytest.fixture(autouse=True)
def isolated_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep every test away from the user's ~/.cache/kdbook and $KDBOOK_DATA."""
    monkeypatch.setenv("KDBOOK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KDBOOK_DATA", str(tmp_path / "no-data-here"))


def make_dataset(
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    flip_ok: bool = True,
    num_classes: int | None = None,
) -> ImageDataset:
    labels = torch.zeros(len(images), dtype=torch.int64) if labels is None else labels
    num_classes = num_classes or int(labels.max()) + 1
    channels = images.shape[1]
    return ImageDataset(
        "toy",
        "train",
        images,
        labels,
        [f"c{k}" for k in range(num_classes)],
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
        flip_ok=flip_ok,
    )


def to_pixels(batch: torch.Tensor, dataset: ImageDataset) -> torch.Tensor:
    """Undo the loader's normalisation: back to uint8 pixel values."""
    mean = torch.tensor(dataset.mean).view(1, -1, 1, 1)
    std = torch.tensor(dataset.std).view(1, -1, 1, 1)
    return ((batch * std + mean) * 255).round().to(torch.uint8)


def shifted(image: torch.Tensor, down: int, right: int) -> torch.Tensor:
    """``image`` moved ``down`` rows and ``right`` columns, zeros entering (a crop of the padded image)."""
    out = torch.zeros_like(image)
    height, width = image.shape[-2:]
    target_rows, source_rows = (
        slice(max(down, 0), height + min(down, 0)),
        slice(max(-down, 0), height - max(down, 0)),
    )
    target_columns = slice(max(right, 0), width + min(right, 0))
    source_columns = slice(max(-right, 0), width - max(right, 0))
    out[..., target_rows, target_columns] = image[..., source_rows, source_columns]
    return out


def all_batches(loader: TensorLoader) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*loader)
    return torch.cat(images), torch.cat(labels)


# ----------------------------------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_and_ranges() -> None:
    from sklearn.datasets import load_digits

    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    for dataset in (train, test):
        assert dataset.images.dtype == torch.uint8 and dataset.images.shape[1:] == (3, 32, 32)
        assert dataset.labels.dtype == torch.int64 and dataset.labels.shape == (len(dataset),)
        assert dataset.classes == [str(digit) for digit in range(10)] and dataset.num_classes == 10
        assert dataset.flip_ok is False
        assert torch.equal(dataset.images[:, 0], dataset.images[:, 1])  # grey repeated over 3 channels
        assert torch.equal(dataset.images[:, 0], dataset.images[:, 2])
    assert len(train) + len(test) == 1797
    assert int(train.images.min()) == 0 and int(train.images.max()) == 255  # 16 grey levels -> 0..255
    target_counts = np.bincount(load_digits().target, minlength=10)
    assert (train.class_counts() + test.class_counts()).tolist() == target_counts.tolist()
    # mean/std are the training split's pixel statistics, in [0, 1] units
    train_pixels = train.images.double() / 255
    assert train.mean == pytest.approx((float(train_pixels.mean()),) * 3)
    assert train.std == pytest.approx((float(train_pixels.std()),) * 3)
    assert test.mean == train.mean and test.std == train.std
    assert "digits" in repr(train) and "3x32x32" in repr(train)


def test_digits_are_the_bilinear_upsampled_sklearn_digits() -> None:
    from sklearn.datasets import load_digits

    original = torch.from_numpy(load_digits().images).float().unsqueeze(1) * (255 / 16)
    expected = (
        F.interpolate(original, size=(32, 32), mode="bilinear", align_corners=False).round().to(torch.uint8)
    )
    ours = torch.cat([load_dataset("digits", split, channels=1).images for split in ("train", "test")])
    assert ours.shape == (1797, 1, 32, 32)

    def as_rows(images: torch.Tensor) -> list[bytes]:
        return sorted(bytes(row) for row in images.reshape(len(images), -1).numpy())

    assert as_rows(ours) == as_rows(expected)
    # interpolation keeps the picture: the 4x4 block means of a 32x32 digit follow the 8x8 original
    blocks = F.avg_pool2d(expected.float(), 4)
    assert torch.corrcoef(torch.stack([blocks.flatten(), original.flatten()]))[0, 1] > 0.95


def test_digits_split_is_stratified_fixed_and_independent_of_seed() -> None:
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    total = train.class_counts() + test.class_counts()
    assert test.class_counts().tolist() == [round(0.2 * int(n)) for n in total]
    again = load_dataset("digits", "train", seed=123)
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)
    train_indices, test_indices = data._digits_split(data._digits_tensors()[1])
    assert len(set(train_indices.tolist()) & set(test_indices.tolist())) == 0
    assert sorted(train_indices.tolist() + test_indices.tolist()) == list(range(1797))


def test_single_channel_option_only_for_digits() -> None:
    grey = load_dataset("digits", "test", channels=1)
    assert grey.images.shape[1] == 1 and len(grey.mean) == 1
    assert torch.equal(grey.images[:, 0], load_dataset("digits", "test").images[:, 0])
    with pytest.raises(ValueError, match="channels"):
        load_dataset("cifar10", "test", channels=1)


# ---------------------------------------------------------------------------------------------- subsets


def test_subset_is_stratified_seeded_and_drawn_from_the_data() -> None:
    train = load_dataset("digits", "train")
    subset = train.subset(200, seed=1)
    assert len(subset) == 200 and subset.class_counts().tolist() == [20] * 10
    assert subset.subset_of == len(train) and subset.subset_seed == 1 and "subset" in repr(subset)
    assert torch.equal(subset.images, train.subset(200, seed=1).images)
    assert not torch.equal(subset.images, train.subset(200, seed=2).images)
    # every chosen image is an image of the full set, with its label
    rows = {bytes(image.flatten().numpy()): int(label) for image, label in zip(train.images, train.labels)}
    assert all(
        rows[bytes(image.flatten().numpy())] == int(label)
        for image, label in zip(subset.images, subset.labels)
    )
    via_loader = load_dataset("digits", "train", subset=200, seed=1)
    assert torch.equal(via_loader.images, subset.images) and torch.equal(via_loader.labels, subset.labels)


def test_subset_keeps_class_shares_with_largest_remainders() -> None:
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    toy = make_dataset(torch.zeros(100, 1, 2, 2, dtype=torch.uint8), labels)
    assert toy.subset(10).class_counts().tolist() == [5, 3, 2]
    assert toy.subset(7).class_counts().tolist() == [4, 2, 1]  # quotas 3.5, 2.1, 1.4: the .5 gets the spare
    for bad in (0, 101, 2.5):
        with pytest.raises(ValueError, match="between 1 and 100"):
            toy.subset(bad)


def test_image_dataset_rejects_malformed_tensors() -> None:
    with pytest.raises(ValueError, match="uint8"):
        make_dataset(torch.zeros(4, 3, 8, 8))
    with pytest.raises(ValueError, match="int64"):
        make_dataset(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="labels must lie"):
        make_dataset(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 2, 5]), num_classes=3)


# -------------------------------------------------------------------------------------------- augmentation


def test_crop_and_flip_matches_a_per_image_reference() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 12, 10), dtype=torch.uint8, generator=generator)
    top, left = (
        torch.randint(0, 7, (40,), generator=generator),
        torch.randint(0, 7, (40,), generator=generator),
    )
    flip = torch.rand(40, generator=generator) < 0.5
    expected = []
    for image, y, x, mirrored in zip(images, top.tolist(), left.tolist(), flip.tolist()):
        crop = F.pad(image, (3, 3, 3, 3))[:, y : y + 12, x : x + 10]
        expected.append(crop.flip(-1) if mirrored else crop)
    assert torch.equal(crop_and_flip(images, top, left, flip, padding=3), torch.stack(expected))
    centre = torch.full((40,), 3)
    assert torch.equal(crop_and_flip(images, centre, centre, None, padding=3), images)


def test_loader_crops_are_shifted_copies_with_zeros_entering() -> None:
    image = torch.randint(1, 256, (3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    toy = make_dataset(image.expand(300, -1, -1, -1).contiguous(), flip_ok=False)
    loader = TensorLoader(toy, 100, train=True, seed=3)
    plan = loader.epoch_plan(0)
    pixels = to_pixels(all_batches(loader)[0], toy)
    shifts = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)]
    candidates = torch.stack([shifted(image, dy, dx) for dy, dx in shifts])
    found = []
    for position, out in enumerate(pixels):
        matches = [shift for shift, candidate in zip(shifts, candidates) if torch.equal(out, candidate)]
        assert len(matches) == 1, f"image {position} is not a shifted copy of the original"
        found.append(matches[0])
        # the window's top-left corner in the padded image is (top, left): the picture moves by padding - top
        assert matches[0] == (4 - int(plan.top[position]), 4 - int(plan.left[position]))
    assert len(set(found)) > 40  # 81 possible offsets, 300 draws
    assert (0, 0) in found and any(dy == 4 for dy, _ in found) and any(dx == -4 for _, dx in found)
    centre = to_pixels(all_batches(TensorLoader(toy, 100, train=False))[0], toy)
    assert torch.equal(centre, image.expand(300, -1, -1, -1))  # augment=False: the image itself


def test_loader_flips_exactly_mirror_about_half_the_images() -> None:
    image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    toy = make_dataset(image.expand(400, -1, -1, -1).contiguous(), flip_ok=True)
    flipping = TensorLoader(toy, 64, train=True, padding=0)
    assert flipping.flip is True  # default: the data set's flip_ok
    pixels = to_pixels(all_batches(flipping)[0], toy)
    mirrored = torch.tensor([torch.equal(out, image.flip(-1)) for out in pixels])
    unchanged = torch.tensor([torch.equal(out, image) for out in pixels])
    assert bool((mirrored | unchanged).all())
    assert 120 < int(mirrored.sum()) < 280
    assert mirrored.tolist() == flipping.epoch_plan(0).flip.tolist()
    steady = TensorLoader(toy, 64, train=True, padding=0, flip=False)
    assert torch.equal(to_pixels(all_batches(steady)[0], toy), image.expand(400, -1, -1, -1))
    digits_loader = TensorLoader(load_dataset("digits", "test"), 64, train=True)
    assert digits_loader.flip is False and "flip" not in digits_loader.augmentation


def test_normalisation_matches_torchvision() -> None:
    from torchvision import transforms

    test = load_dataset("digits", "test")
    images, labels = all_batches(TensorLoader(test, 50, train=False))
    normalise = transforms.Normalize(test.mean, test.std)
    expected = normalise(test.images.float() / 255)  # ToTensor's scaling, then Normalize
    first_pil = transforms.ToPILImage()(test.images[0])
    torch.testing.assert_close(normalise(transforms.ToTensor()(first_pil)), expected[0])
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(labels, test.labels)


def test_channels_last_batches_hold_the_same_values() -> None:
    test = load_dataset("digits", "test")
    plain = next(iter(TensorLoader(test, 32, train=True, seed=4)))[0]
    strided = next(iter(TensorLoader(test, 32, train=True, seed=4, channels_last=True)))[0]
    assert strided.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(plain, strided)


# -------------------------------------------------------------------------------------- order and epochs


def test_shuffling_is_seeded_per_epoch_and_independent_of_history() -> None:
    train = load_dataset("digits", "train", subset=400)
    first, second = TensorLoader(train, 128, train=True, seed=7), TensorLoader(train, 128, train=True, seed=7)
    epoch0_a, epoch1_a = all_batches(first), all_batches(first)
    epoch0_b = all_batches(second)
    assert first.epoch == 2 and second.epoch == 1
    assert torch.equal(epoch0_a[0], epoch0_b[0]) and torch.equal(epoch0_a[1], epoch0_b[1])
    assert not torch.equal(epoch0_a[1], epoch1_a[1])  # epochs differ
    pinned = TensorLoader(train, 128, train=True, seed=7)
    pinned.set_epoch(1)
    assert torch.equal(all_batches(pinned)[0], epoch1_a[0])  # epoch 1 without running epoch 0
    assert torch.equal(torch.cat([b[0] for b in first.epoch_batches(1)]), epoch1_a[0])
    other_seed = all_batches(TensorLoader(train, 128, train=True, seed=8))
    assert not torch.equal(other_seed[1], epoch0_a[1])
    evaluation = all_batches(TensorLoader(train, 128, train=False))
    assert torch.equal(evaluation[1], train.labels)  # evaluation keeps the order


def test_batches_need_no_host_sync() -> None:
    """On the meta device tensors have shapes but no values, so any step that reads a value on the host
    (``.item()``, boolean masks, ``nonzero``), which would stall a GPU once per batch, fails here."""
    test = load_dataset("digits", "test")
    loader = TensorLoader(test, 64, train=True, device="meta", flip=True)
    shapes = [(images.shape, images.dtype, labels.shape) for images, labels in loader]
    assert len(shapes) == len(loader) and shapes[0] == ((64, 3, 32, 32), torch.float32, (64,))
    assert loader.images.device.type == "meta"  # the data set was moved to the device once


@pytest.mark.parametrize("drop_last", [False, True])
def test_every_image_once_per_epoch(drop_last: bool) -> None:
    count, batch_size = 1000, 64
    ids = torch.arange(count)  # one class per image: the label tells which image came out
    toy = make_dataset(torch.zeros(count, 1, 4, 4, dtype=torch.uint8), ids)
    loader = TensorLoader(toy, batch_size, train=True, drop_last=drop_last)
    for _ in range(2):
        sizes, seen = [], []
        for images, labels in loader:
            sizes.append(len(labels))
            seen.append(labels)
        seen_ids = torch.cat(seen)
        assert len(sizes) == len(loader)
        if drop_last:
            assert len(loader) == 15 and sizes == [64] * 15
            assert len(set(seen_ids.tolist())) == 15 * 64
        else:
            assert len(loader) == 16 and sizes == [64] * 15 + [40]
            assert sorted(seen_ids.tolist()) == list(range(count))


def test_fingerprint_names_data_augmentation_and_seed() -> None:
    train = load_dataset("digits", "train", subset=300, seed=1)
    loader = TensorLoader(train, 64, train=True, seed=5)
    fingerprint = loader.fingerprint
    assert (
        fingerprint
        == TensorLoader(
            load_dataset("digits", "train", subset=300, seed=1), 64, train=True, seed=5
        ).fingerprint
    )
    for word in ("digits", "train", "n=300", "subset", "crop(pad=4)", "seed=5", "batch=64"):
        assert word in fingerprint
    variants = [
        TensorLoader(train, 64, train=True, seed=6),
        TensorLoader(train, 32, train=True, seed=5),
        TensorLoader(train, 64, train=False, seed=5),
        TensorLoader(train, 64, train=True, seed=5, padding=2),
        TensorLoader(load_dataset("digits", "train", subset=300, seed=2), 64, train=True, seed=5),
    ]
    assert len({fingerprint, *(variant.fingerprint for variant in variants)}) == 1 + len(variants)


def test_loader_rejects_bad_arguments() -> None:
    test = load_dataset("digits", "test")
    with pytest.raises(ValueError, match="batch_size"):
        TensorLoader(test, 0, train=True)
    with pytest.raises(ValueError, match="padding"):
        TensorLoader(test, 8, train=True, padding=-1)
    with pytest.raises(ValueError, match="leaves no batch"):
        TensorLoader(test, 1000, train=True, drop_last=True)


# --------------------------------------------------------------------------------------- names and errors


def test_unknown_names_and_splits_list_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="digits.*cifar10.*cifar100.*imagenet64"):
        load_dataset("mnist", "train")
    with pytest.raises(ValueError, match="'train', 'test'"):
        load_dataset("digits", "validation")
    assert len(load_dataset("digits", "val")) == len(load_dataset("digits", "test"))


def test_missing_cifar_names_the_paths_and_both_remedies(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as caught:
        load_dataset("cifar10", "train", root=tmp_path)
    assert isinstance(caught.value, FileNotFoundError)
    message = str(caught.value)
    assert str(tmp_path / "cifar10" / "cifar-10-batches-py") in message
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert f"{tmp_path}/train/<class>" in message
    assert "download=True" in message and "root=" in message and "KDBOOK_DATA" in message
    with pytest.raises(DatasetNotFoundError, match="no-data-here"):  # root=None: $KDBOOK_DATA
        load_dataset("cifar100", "test")


# -------------------------------------------------------------------------------------- on-disk formats


def write_png_tree(
    split_folder: Path, classes: list[str], per_class: int, size: int = 32, seed: int = 0
) -> dict:
    generator = np.random.default_rng(seed)
    written = {}
    for class_name in classes:
        (split_folder / class_name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = generator.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(split_folder / class_name / f"{index:04d}.png")
            written[(class_name, index)] = pixels
    return written


def test_image_folder_tree_is_decoded_labelled_and_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    classes = list(CIFAR10_CLASSES)
    written = write_png_tree(tmp_path / "cifar10" / "train", classes, per_class=3)
    write_png_tree(tmp_path / "cifar10" / "val", classes, per_class=1, seed=1)
    train = load_dataset("cifar10", "train", root=tmp_path)
    assert len(train) == 30 and train.classes == classes
    assert train.labels.tolist() == [label for label in range(10) for _ in range(3)]
    assert torch.equal(train.images[4], torch.from_numpy(written[(classes[1], 1)]).permute(2, 0, 1))
    assert train.mean == data.CIFAR10_MEAN and train.flip_ok
    assert len(load_dataset("cifar10", "test", root=tmp_path)) == 10  # test/ may be called val/

    cached_files = list((tmp_path / "cache" / "decoded").glob("*.pt"))
    assert len(cached_files) == 2

    def no_decoding(files: list) -> None:
        raise AssertionError("decoded again although the cache is valid")

    with monkeypatch.context() as patched:
        patched.setattr(data, "_decode_images", no_decoding)
        assert torch.equal(load_dataset("cifar10", "train", root=tmp_path).images, train.images)
    # editing a file invalidates the cache
    new_pixels = np.full((32, 32, 3), 7, dtype=np.uint8)
    Image.fromarray(new_pixels).save(tmp_path / "cifar10" / "train" / classes[0] / "0000.png")
    edited = load_dataset("cifar10", "train", root=tmp_path)
    assert bool((edited.images[0] == 7).all()) and torch.equal(edited.images[1:], train.images[1:])


def test_image_folder_with_the_wrong_class_count_is_skipped(tmp_path: Path) -> None:
    write_png_tree(tmp_path / "train", ["a", "b", "c"], per_class=1, size=8)
    with pytest.raises(DatasetNotFoundError, match="3 class folders, not 10"):
        load_dataset("cifar10", "train", root=tmp_path)


def write_cifar_pickles(folder: Path, name: str, sizes: dict[str, int]) -> None:
    """Tiny files in the exact layout of the CIFAR python release (as torchvision unpacks it)."""
    generator = np.random.default_rng(0)
    folder.mkdir(parents=True)
    num_classes = 10 if name == "cifar10" else 100
    for file_name, count in sizes.items():
        entry = {
            "batch_label": f"synthetic {file_name}",
            "data": generator.integers(0, 256, (count, 3072), dtype=np.uint8),
            "filenames": [f"image_{k}.png" for k in range(count)],
        }
        labels = generator.integers(0, num_classes, count).tolist()
        if name == "cifar10":
            entry["labels"] = labels
        else:
            entry["fine_labels"] = labels
            entry["coarse_labels"] = [label // 5 for label in labels]
        with open(folder / file_name, "wb") as handle:
            pickle.dump(entry, handle, protocol=2)
    if name == "cifar10":
        meta_file, meta = "batches.meta", {"label_names": list(CIFAR10_CLASSES), "num_vis": 3072}
    else:
        meta_file = "meta"
        meta = {
            "fine_label_names": [f"fine{k:02d}" for k in range(100)],
            "coarse_label_names": [f"coarse{k:02d}" for k in range(20)],
        }
    with open(folder / meta_file, "wb") as handle:
        pickle.dump(meta, handle, protocol=2)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickles_read_like_torchvision(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvision.datasets import cifar

    if name == "cifar10":
        folder = tmp_path / "cifar-10-batches-py"
        write_cifar_pickles(folder, name, {**{f"data_batch_{k}": 4 for k in range(1, 6)}, "test_batch": 3})
    else:
        folder = tmp_path / "cifar-100-python"
        write_cifar_pickles(folder, name, {"train": 6, "test": 3})
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)  # synthetic files, other md5s
    reference_class = cifar.CIFAR10 if name == "cifar10" else cifar.CIFAR100
    for split in ("train", "test"):
        ours = load_dataset(name, split, root=tmp_path)
        reference = reference_class(str(tmp_path), train=split == "train")
        assert torch.equal(ours.images, torch.from_numpy(reference.data).permute(0, 3, 1, 2))
        assert ours.labels.tolist() == reference.targets and ours.classes == reference.classes
    assert len(load_dataset(name, "train", root=tmp_path)) == (20 if name == "cifar10" else 6)
    # the first stored value of a row is the top-left red pixel
    with open(folder / ("test_batch" if name == "cifar10" else "test"), "rb") as handle:
        row = pickle.load(handle, encoding="latin1")["data"][0]
    test = load_dataset(name, "test", root=tmp_path)
    assert torch.equal(test.images[0], torch.from_numpy(row).view(3, 32, 32))
    assert test.mean == (data.CIFAR10_MEAN if name == "cifar10" else data.CIFAR100_MEAN)


def test_download_goes_through_torchvision_and_explains_failures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvision.datasets import cifar

    def offline(self: cifar.CIFAR10) -> None:
        raise OSError("Network is unreachable")

    monkeypatch.setattr(cifar.CIFAR10, "download", offline)
    with pytest.raises(DatasetNotFoundError, match="Network is unreachable.*KDBOOK_DATA"):
        load_dataset("cifar10", "test", root=tmp_path, download=True)

    def fake_download(self: cifar.CIFAR10) -> None:  # what torchvision leaves on disk, in miniature
        sizes = {**{f"data_batch_{k}": 2 for k in range(1, 6)}, "test_batch": 3}
        write_cifar_pickles(Path(self.root) / "cifar-10-batches-py", "cifar10", sizes)

    monkeypatch.setattr(cifar.CIFAR10, "download", fake_download)
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    assert len(load_dataset("cifar10", "test", root=tmp_path, download=True)) == 3
    assert len(load_dataset("cifar10", "train", root=tmp_path)) == 10  # now on disk: no download needed


def write_imagenet64(folder: Path, file_name: str, count: int, seed: int, with_mean: bool) -> dict:
    generator = np.random.default_rng(seed)
    arrays = {
        "data": generator.integers(0, 256, (count, 12288), dtype=np.uint8),
        "labels": generator.integers(1, 1001, count).tolist(),  # 1..1000, as in the release
    }
    if with_mean:
        arrays["mean"] = arrays["data"].mean(axis=0)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / file_name, **arrays)
    return arrays


def test_imagenet64_npz_files(tmp_path: Path) -> None:
    written = {}
    for batch in range(1, 11):  # as the two training downloads unpack
        part = "Imagenet64_train_part1_npz" if batch <= 5 else "Imagenet64_train_part2_npz"
        written[batch] = write_imagenet64(tmp_path / part, f"train_data_batch_{batch}.npz", 2, batch, True)
    validation = write_imagenet64(tmp_path / "Imagenet64_val_npz", "val_data.npz", 3, 99, False)
    (tmp_path / "map_clsloc.txt").write_text("n01440764 1 tench\nn02012849 135 crane\nn03126707 518 crane\n")

    train = load_dataset("imagenet64", "train", root=tmp_path)
    assert len(train) == 20 and train.images.shape[1:] == (3, 64, 64) and train.num_classes == 1000
    expected_labels = [label - 1 for batch in range(1, 11) for label in written[batch]["labels"]]
    assert train.labels.tolist() == expected_labels
    first_row = written[1]["data"][0]
    assert torch.equal(train.images[0, 0], torch.from_numpy(first_row[:4096]).view(64, 64))  # R plane
    assert torch.equal(train.images[0, 2], torch.from_numpy(first_row[8192:]).view(64, 64))  # B plane
    assert train.classes[0] == "tench" and train.classes[1] == "class_001"
    assert train.classes[134] == "crane (n02012849)" and train.classes[517] == "crane (n03126707)"
    val = load_dataset("imagenet64", "val", root=tmp_path)
    assert val.split == "test" and val.labels.tolist() == [label - 1 for label in validation["labels"]]
    assert val.mean == train.mean == data.IMAGENET_MEAN

    (tmp_path / "Imagenet64_train_part2_npz" / "train_data_batch_7.npz").unlink()
    with pytest.warns(UserWarning, match="train_data_batch_7"):
        assert len(load_dataset("imagenet64", "train", root=tmp_path)) == 18


def test_imagenet64_missing_or_download_explains(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="image-net.org") as caught:
        load_dataset("imagenet64", "test", root=tmp_path)
    assert str(tmp_path) in str(caught.value) and "KDBOOK_DATA" in str(caught.value)
    with pytest.raises(ValueError, match="download=True is not available"):
        load_dataset("imagenet64", "train", root=tmp_path, download=True)


def test_preset_data_holds_out_a_validation_split_and_uses_the_preset_subsets() -> None:
    preset = get_preset("quick")
    splits = preset_data(preset)
    assert (splits.train.split, splits.val.split, splits.test.split) == ("train", "val", "test")
    full = load_dataset("digits", "train")
    assert len(splits.val) == preset.val_size and len(splits.train) + len(splits.val) == len(full)
    # stratified, disjoint, and the same hold-out every time
    assert splits.val.class_counts().min() >= preset.val_size // 10 - 1
    seen = {bytes(image.numpy()) for image in splits.train.images}
    assert not any(bytes(image.numpy()) in seen for image in splits.val.images)
    assert torch.equal(preset_data(preset).val.images, splits.val.images)

    small = preset.replace(train_subset=100, test_subset=50)
    train, val, test = preset_data(small)
    assert (len(train), len(val), len(test)) == (100, preset.val_size, 50)
    assert train.class_counts().tolist() == [10] * 10


def test_holdout_and_resized() -> None:
    data = load_dataset("digits", "train", subset=200, seed=0)
    rest, held = data.holdout(50, seed=3)
    assert (len(rest), len(held)) == (150, 50) and held.class_counts().tolist() == [5] * 10
    with pytest.raises(ValueError, match="between 1 and 199"):
        data.holdout(200)
    small = data.resized(8)
    assert small.images.shape == (200, 3, 8, 8) and small.images.dtype == torch.uint8
    assert data.resized(32) is data
    # the digits are 8x8 scans upsampled to 32x32: going back to 8x8 and up again changes little
    back = torch.nn.functional.interpolate(
        small.images.float(), size=32, mode="bilinear", align_corners=False
    )
    assert (back - data.images.float()).abs().mean() < 20


# ------------------------------------------------------------------------------------------- real CIFAR-10


@pytest.mark.cifar
def test_real_cifar10_test_split_through_the_image_folder_path(cifar10_root: Path) -> None:
    test = load_dataset("cifar10", "test", root=cifar10_root)
    assert len(test) == 10_000 and test.images.shape[1:] == (3, 32, 32)
    assert test.classes == list(CIFAR10_CLASSES)  # airplane .. truck: CIFAR-10's own label order
    assert test.class_counts().tolist() == [1000] * 10
    mean = (test.images.double() / 255).mean(dim=(0, 2, 3))
    assert mean.tolist() == pytest.approx(data.CIFAR10_MEAN, abs=0.01)  # test pixels: near the train mean


def test_the_digest_follows_in_place_changes_and_new_tensors() -> None:
    dataset = load_dataset("digits", "test", subset=50, seed=0)
    first = dataset.digest()
    assert dataset.digest() == first
    dataset.images[3, 0, 0, 0] += 1  # in place: the version counter moves
    changed = dataset.digest()
    assert changed != first
    dataset.images[3, 0, 0, 0] -= 1
    assert dataset.digest() == first, "the digest is of the values, so the same pixels give it back"
    dataset.labels = dataset.labels.flip(0)  # another tensor
    assert dataset.digest() not in (first, changed)
    loader = TensorLoader(dataset, 16, train=False)
    assert f"data={dataset.digest()}" in loader.fingerprint


def test_colab_with_a_gpu_picks_lab_and_fetches_cifar(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys
    import types

    from torchvision.datasets import cifar

    from kdbook_utils import presets

    monkeypatch.delenv("KDBOOK_PRESET", raising=False)
    assert get_preset().name == "quick"  # not on Colab: offline, whatever the hardware
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert get_preset().name == "quick"  # Colab's CPU runtime: the small preset
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert get_preset().name == "lab"
    monkeypatch.setenv("KDBOOK_PRESET", "quick")
    assert get_preset().name == "quick"  # an instructor's choice wins

    fetched: list[str] = []

    def fake_download(self: cifar.CIFAR10) -> None:
        fetched.append(self.root)
        sizes = {**{f"data_batch_{k}": 30 for k in range(1, 6)}, "test_batch": 20}
        write_cifar_pickles(Path(self.root) / "cifar-10-batches-py", "cifar10", sizes)

    monkeypatch.setattr(cifar.CIFAR10, "download", fake_download)
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    lab = presets.get_preset("lab").replace(val_size=20)
    splits = preset_data(lab, root=tmp_path, progress=False)
    assert fetched and len(splits.train) + len(splits.val) == 150 and len(splits.test) == 20
    monkeypatch.delitem(sys.modules, "google.colab")
    with pytest.raises(DatasetNotFoundError):  # elsewhere a missing file is an error, never a download
        preset_data(lab, root=tmp_path / "empty", progress=False)
