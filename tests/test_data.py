"""Tests of the image-addition list datasets (estinet.data.lists) on the synthetic MNIST."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from estinet.data import AdditionData, ImageSplit, ListSet, build_addition_data, build_lists, mnist
from estinet.errors import ConfigError

from conftest import SYNTHETIC_TEST_IMAGES, SYNTHETIC_TRAIN_IMAGES


def small_split(count: int = 50) -> ImageSplit:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (count, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.arange(count) % 10
    return ImageSplit.from_uint8(pixels, labels, mean=0.1307, std=0.3081)


def assert_same_lists(first: ListSet, second: ListSet) -> None:
    assert torch.equal(first.indices, second.indices)
    assert torch.equal(first.sums, second.sums)


def image_digests(split: ImageSplit) -> set[str]:
    return {hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in split.images}


# --------------------------------------------------------------------------------------------------
# ImageSplit and build_lists


def test_image_split_normalizes_pixels():
    pixels = torch.tensor([[0, 255], [51, 102]], dtype=torch.uint8).repeat(14, 14).unsqueeze(0)
    labels = torch.tensor([7], dtype=torch.uint8)

    split = ImageSplit.from_uint8(pixels, labels, mean=0.5, std=0.25)

    assert split.images.shape == (1, 1, 28, 28)
    assert split.images.dtype == torch.float32
    assert split.labels.dtype == torch.int64
    assert split.images[0, 0, 0, 0].item() == pytest.approx((0.0 - 0.5) / 0.25)
    assert split.images[0, 0, 0, 1].item() == pytest.approx((1.0 - 0.5) / 0.25)
    assert split.images[0, 0, 1, 0].item() == pytest.approx((0.2 - 0.5) / 0.25)
    assert len(split) == 1


def test_image_split_rejects_bad_input():
    uint8_images = torch.zeros(2, 28, 28, dtype=torch.uint8)
    labels = torch.zeros(2, dtype=torch.int64)

    with pytest.raises(ValueError, match="uint8 images of shape"):
        ImageSplit.from_uint8(uint8_images.unsqueeze(1), labels, mean=0.0, std=1.0)
    with pytest.raises(ValueError, match="uint8 images of shape"):
        ImageSplit.from_uint8(uint8_images.float(), labels, mean=0.0, std=1.0)
    with pytest.raises(ValueError, match="labels of shape"):
        ImageSplit.from_uint8(uint8_images, torch.zeros(3), mean=0.0, std=1.0)


def test_build_lists_shapes_and_sums():
    split = small_split()

    lists = build_lists(split, num_lists=30, k=4, seed_key=(0, "train"))

    assert lists.indices.shape == (30, 4)
    assert lists.indices.dtype == torch.int64
    assert lists.sums.shape == (30,)
    assert lists.sums.dtype == torch.int64
    assert lists.k == 4
    assert len(lists) == 30
    assert int(lists.indices.min()) >= 0
    assert int(lists.indices.max()) < len(split)
    assert torch.equal(lists.sums, split.labels[lists.indices].sum(dim=1))


def test_build_lists_same_seed_identical():
    split = small_split()

    first = build_lists(split, 20, 3, (5, "test"))
    second = build_lists(split, 20, 3, (5, "test"))

    assert_same_lists(first, second)


@pytest.mark.parametrize(
    "seed_key, k",
    [((6, "test"), 3), ((5, "validation"), 3), ((5, "test"), 4)],
    ids=["list_seed", "split name", "k"],
)
def test_build_lists_key_changes_lists(seed_key, k):
    split = small_split()
    reference = build_lists(split, 20, 3, (5, "test"))

    other = build_lists(split, 20, k, seed_key)

    assert not torch.equal(reference.indices[:, :3], other.indices[:, :3])


def test_build_lists_more_lists_extend():
    split = small_split()

    short = build_lists(split, 10, 3, (0, "train"))
    long = build_lists(split, 25, 3, (0, "train"))

    assert torch.equal(long.indices[:10], short.indices)


@pytest.mark.parametrize("num_lists, k", [(0, 3), (5, 0), (-1, 2)])
def test_build_lists_rejects_bad_sizes(num_lists, k):
    with pytest.raises(ConfigError, match="must be >= 1"):
        build_lists(small_split(), num_lists, k, (0, "train"))


# --------------------------------------------------------------------------------------------------
# ListSet


def test_batch_gathers_images_and_sums():
    split = small_split()
    lists = build_lists(split, 12, 5, (0, "train"))
    rows = torch.tensor([3, 0, 11])

    images, sums = lists.batch(rows)

    assert images.shape == (3, 5, 1, 28, 28)
    assert images.dtype == torch.float32
    assert sums.shape == (3,)
    for b, row in enumerate(rows.tolist()):
        expected = torch.stack([split.images[i] for i in lists.indices[row].tolist()])
        assert torch.equal(images[b], expected), row
        assert sums[b].item() == lists.sums[row].item(), row


def test_digit_labels_sum_to_sums():
    lists = build_lists(small_split(), 12, 5, (0, "train"))
    rows = torch.arange(12)

    labels = lists.digit_labels(rows)

    assert labels.shape == (12, 5)
    assert torch.equal(labels.sum(dim=1), lists.sums)


def test_batches_in_order_keep_partial():
    lists = build_lists(small_split(), 10, 2, (0, "train"))

    batches = list(lists.batches(4))

    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_batches_shuffled_drop_partial():
    lists = build_lists(small_split(), 10, 2, (0, "train"))

    batches = list(lists.batches(4, generator=torch.Generator().manual_seed(0), shuffle=True))
    rows = torch.cat(batches)

    assert [len(b) for b in batches] == [4, 4]
    assert len(set(rows.tolist())) == 8
    assert rows.tolist() != list(range(8))


def test_batches_shuffled_repeat_with_seed():
    lists = build_lists(small_split(), 10, 2, (0, "train"))

    first = list(lists.batches(3, generator=torch.Generator().manual_seed(7), shuffle=True))
    second = list(lists.batches(3, generator=torch.Generator().manual_seed(7), shuffle=True))

    assert [b.tolist() for b in first] == [b.tolist() for b in second]


def test_batches_shuffled_small_set_kept():
    lists = build_lists(small_split(), 3, 2, (0, "train"))

    batches = list(lists.batches(8, shuffle=True))

    assert len(batches) == 1
    assert sorted(batches[0].tolist()) == [0, 1, 2]


def test_batches_rejects_zero_size():
    lists = build_lists(small_split(), 3, 2, (0, "train"))

    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        next(lists.batches(0))


# --------------------------------------------------------------------------------------------------
# build_addition_data


def test_addition_data_shapes(data_cfg):
    data = build_addition_data(data_cfg)

    assert isinstance(data, AdditionData)
    assert len(data.train_images) == SYNTHETIC_TRAIN_IMAGES - 100
    assert len(data.val_images) == 100
    assert len(data.test_images) == SYNTHETIC_TEST_IMAGES
    for split in (data.train_images, data.val_images, data.test_images):
        assert split.images.dtype == torch.float32
        assert split.images.shape[1:] == (1, 28, 28)
        assert split.labels.dtype == torch.int64
    assert data.train_lists.indices.shape == (256, 3)
    assert data.val_lists.indices.shape == (64, 3)
    assert sorted(data.test_lists) == [3, 10]
    for k, lists in data.test_lists.items():
        assert lists.indices.shape == (64, k)
        assert lists.split is data.test_images
    assert data.train_lists.split is data.train_images
    assert data.val_lists.split is data.val_images


def test_addition_data_sums_match_labels(data_cfg):
    data = build_addition_data(data_cfg)

    for lists in (data.train_lists, data.val_lists, *data.test_lists.values()):
        rows = torch.arange(len(lists))
        assert torch.equal(lists.sums, lists.digit_labels(rows).sum(dim=1))


def test_addition_data_splits_disjoint(data_cfg):
    data = build_addition_data(data_cfg)
    pixels, labels = mnist.load_mnist(data_cfg.root, train=True, verify=False)

    # Training images are the head of MNIST train and validation images its last 100.
    expected_train = ImageSplit.from_uint8(pixels[:-100], labels[:-100], mean=0.1307, std=0.3081)
    expected_val = ImageSplit.from_uint8(pixels[-100:], labels[-100:], mean=0.1307, std=0.3081)
    assert torch.allclose(data.train_images.images, expected_train.images)
    assert torch.allclose(data.val_images.images, expected_val.images)
    assert torch.equal(data.val_images.labels, expected_val.labels)

    train_digests = image_digests(data.train_images)
    val_digests = image_digests(data.val_images)
    test_digests = image_digests(data.test_images)
    assert train_digests.isdisjoint(val_digests)
    assert train_digests.isdisjoint(test_digests)
    assert val_digests.isdisjoint(test_digests)


def test_addition_data_deterministic(data_cfg):
    first = build_addition_data(data_cfg)
    second = build_addition_data(data_cfg)

    assert_same_lists(first.train_lists, second.train_lists)
    assert_same_lists(first.val_lists, second.val_lists)
    for k in first.test_lists:
        assert_same_lists(first.test_lists[k], second.test_lists[k])


def test_list_seed_changes_every_list(data_cfg):
    reference = build_addition_data(data_cfg)

    other = build_addition_data(OmegaConf.merge(data_cfg, {"list_seed": 1}))

    assert not torch.equal(reference.train_lists.indices, other.train_lists.indices)
    assert not torch.equal(reference.val_lists.indices, other.val_lists.indices)
    for k in reference.test_lists:
        assert not torch.equal(reference.test_lists[k].indices, other.test_lists[k].indices), k


def test_train_count_keeps_other_lists(data_cfg):
    reference = build_addition_data(data_cfg)

    other = build_addition_data(
        OmegaConf.merge(data_cfg, {"train": {"num_lists": 100}, "test": {"k": [10]}})
    )

    assert len(other.train_lists) == 100
    assert_same_lists(reference.val_lists, other.val_lists)
    assert_same_lists(reference.test_lists[10], other.test_lists[10])


def test_relative_root_uses_cwd(data_cfg, monkeypatch):
    root = Path(data_cfg.root)
    monkeypatch.chdir(root.parent)

    data = build_addition_data(OmegaConf.merge(data_cfg, {"root": root.name}))

    assert len(data.test_images) == SYNTHETIC_TEST_IMAGES


def test_addition_data_to_shares_splits(data_cfg):
    data = build_addition_data(data_cfg).to("cpu")

    assert data.train_lists.split is data.train_images
    assert data.val_lists.split is data.val_images
    for lists in data.test_lists.values():
        assert lists.split is data.test_images


def test_plain_dict_config_accepted(data_cfg):
    data = build_addition_data(OmegaConf.to_container(data_cfg))

    assert len(data.val_lists) == 64


def test_single_test_k_accepted(data_cfg):
    data = build_addition_data(OmegaConf.merge(data_cfg, {"test": {"k": 5}}))

    assert list(data.test_lists) == [5]


# --------------------------------------------------------------------------------------------------
# Config validation


INVALID_CONFIGS = [
    ({"train": {"k": 0}}, "data.train.k must be an integer >= 1, got 0"),
    ({"validation": {"num_lists": 0}}, "data.validation.num_lists must be an integer >= 1"),
    ({"test": {"num_lists": -3}}, "data.test.num_lists must be an integer >= 1"),
    ({"test": {"k": [3, 0]}}, "data.test.k must be an integer >= 1 or a list of them"),
    ({"test": {"k": []}}, "data.test.k must be an integer >= 1 or a list of them"),
    ({"test": {"k": [3, 3]}}, "data.test.k must not repeat a value"),
    ({"train": {"k": 2.5}}, "data.train.k must be an integer, got 2.5"),
    ({"train": {"num_lists": True}}, "data.train.num_lists must be an integer, got True"),
    ({"validation_images": 0}, "data.validation_images must be an integer >= 1"),
    ({"validation_images": SYNTHETIC_TRAIN_IMAGES}, "data.validation_images must be less than"),
    ({"list_seed": -1}, "data.list_seed must be an integer >= 0"),
    ({"std": 0.0}, "data.std must be > 0"),
    ({"download_timeout": 0}, "data.download_timeout must be > 0 seconds"),
    ({"verify": "yes"}, "data.verify must be true or false"),
    ({"root": ""}, "data.root must be a non-empty path"),
]


@pytest.mark.parametrize(
    "override, message", INVALID_CONFIGS, ids=[m.split(" must")[0] for _, m in INVALID_CONFIGS]
)
def test_invalid_config_rejected(data_cfg, override, message):
    with pytest.raises(ConfigError) as excinfo:
        build_addition_data(OmegaConf.merge(data_cfg, override))

    assert message in str(excinfo.value)
    assert "\n" not in str(excinfo.value)


def test_missing_config_key_rejected(data_cfg):
    config = OmegaConf.to_container(data_cfg)
    del config["train"]["num_lists"]

    with pytest.raises(ConfigError, match="data.train.num_lists is missing"):
        build_addition_data(config)
