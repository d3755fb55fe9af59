"""Lists of MNIST images whose target is the sum of their digits.

A list is a row of k indices into the images of one split. The lists are drawn once and
deterministically, so every run and every model of the same config uses the same lists. Digit labels
are kept only to compute the sums and for diagnostics. Training uses the sums alone.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, ListConfig, OmegaConf

from estinet.data.mnist import load_mnist, prepare_mnist
from estinet.errors import ConfigError

log = logging.getLogger(__name__)

TRAIN = "train"
VALIDATION = "validation"
TEST = "test"


@dataclass
class ImageSplit:
    """Normalized MNIST images of one split and their digit labels."""

    images: torch.Tensor  # (N, 1, 28, 28) float32, (pixel / 255 - mean) / std
    labels: torch.Tensor  # (N,) int64, digits 0..9

    @classmethod
    def from_uint8(
        cls, images: torch.Tensor, labels: torch.Tensor, *, mean: float, std: float
    ) -> ImageSplit:
        """Normalize uint8 images (N, 28, 28) and pair them with labels (N,)."""
        if images.dtype != torch.uint8 or images.ndim != 3:
            raise ValueError(
                "expected uint8 images of shape (N, 28, 28), "
                f"got {images.dtype} {tuple(images.shape)}"
            )
        if labels.shape != images.shape[:1]:
            expected = (len(images),)
            raise ValueError(f"expected labels of shape {expected}, got {tuple(labels.shape)}")
        scaled = images.to(torch.float32).div(255.0).sub(mean).div(std)
        return cls(images=scaled.unsqueeze(1), labels=labels.to(torch.int64))

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device | str) -> ImageSplit:
        return ImageSplit(self.images.to(device), self.labels.to(device))


@dataclass
class ListSet:
    """Fixed lists of images from one split with the sums of their digits."""

    split: ImageSplit
    indices: torch.Tensor  # (L, k) int64, row i contains the image indices of list i
    sums: torch.Tensor  # (L,) int64, sum of the digit labels of each list

    @property
    def k(self) -> int:
        """Number of images in each list."""
        return self.indices.shape[1]

    def __len__(self) -> int:
        return self.indices.shape[0]

    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather the lists at `rows` (B,) as images (B, k, 1, 28, 28) and sums (B,)."""
        positions = self.indices.index_select(0, rows)  # (B, k)
        # index_select copies whole images, 1.5x faster than advanced indexing (benchmarks/levers.py).
        images = self.split.images.index_select(0, positions.flatten())  # (B * k, 1, 28, 28)
        return images.view(*positions.shape, *images.shape[1:]), self.sums[rows]

    def digit_labels(self, rows: torch.Tensor) -> torch.Tensor:
        """Return the digit labels (B, k) of the lists at `rows`, for diagnostics only."""
        return self.split.labels[self.indices[rows]]

    def to(self, device: torch.device | str) -> ListSet:
        """Move the split, indices and sums to `device`.

        This copies the split, so list sets that share one should move with AdditionData.to.
        """
        return ListSet(self.split.to(device), self.indices.to(device), self.sums.to(device))

    def batches(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        shuffle: bool = False,
    ) -> Iterator[torch.Tensor]:
        """Yield the row indices (B,) of successive batches, on the device of `indices`.

        Without shuffle, rows come in order and the last partial batch is kept, so an evaluation
        covers every list exactly once. With shuffle, the order is a permutation drawn from
        `generator` (a CPU generator), and the last partial batch is dropped so that every training
        step gets `batch_size` lists. When there are fewer lists than `batch_size`, that single
        partial batch is yielded anyway.
        """
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        count = len(self)
        if shuffle:
            order = torch.randperm(count, generator=generator).to(self.indices.device)
            stop = count - count % batch_size if count >= batch_size else count
        else:
            order = torch.arange(count, device=self.indices.device)
            stop = count
        for start in range(0, stop, batch_size):
            yield order[start : start + batch_size]


def build_lists(split: ImageSplit, num_lists: int, k: int, seed_key: tuple[int, str]) -> ListSet:
    """Draw `num_lists` lists of `k` images each, uniformly with replacement from `split`.

    `seed_key` is (list_seed, split name). The lists depend only on list_seed, the split name, k and
    the split's size, so changing the number of training lists or the training seed leaves the
    validation and test lists unchanged. With the same key, a larger `num_lists` extends the
    smaller set of lists rather than replacing it.
    """
    if num_lists < 1:
        raise ConfigError(f"num_lists must be >= 1, got {num_lists}")
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    list_seed, split_name = seed_key

    # crc32 gives each split name a stable integer, unlike hash(), which varies between processes.
    rng = np.random.default_rng([list_seed, zlib.crc32(split_name.encode()), k])
    drawn = rng.integers(0, len(split), size=(num_lists, k), dtype=np.int64)
    indices = torch.from_numpy(drawn).to(split.labels.device)  # (L, k)
    sums = split.labels[indices].sum(dim=1)  # (L,)
    return ListSet(split, indices, sums)


@dataclass
class AdditionData:
    """Image splits and list sets of one image-addition experiment.

    The training and validation images are disjoint parts of MNIST train, and the test images are
    MNIST test, so no image is in two splits.
    """

    train_images: ImageSplit
    val_images: ImageSplit
    test_images: ImageSplit
    train_lists: ListSet
    val_lists: ListSet
    test_lists: dict[int, ListSet]  # keyed by k

    def to(self, device: torch.device | str) -> AdditionData:
        """Move to `device`, copying each split once and sharing it between its list sets."""
        train_images = self.train_images.to(device)
        val_images = self.val_images.to(device)
        test_images = self.test_images.to(device)

        def move(lists: ListSet, split: ImageSplit) -> ListSet:
            return ListSet(split, lists.indices.to(device), lists.sums.to(device))

        return AdditionData(
            train_images=train_images,
            val_images=val_images,
            test_images=test_images,
            train_lists=move(self.train_lists, train_images),
            val_lists=move(self.val_lists, val_images),
            test_lists={k: move(lists, test_images) for k, lists in self.test_lists.items()},
        )


def build_addition_data(
    data_cfg: DictConfig | Mapping, device: torch.device | str = "cpu"
) -> AdditionData:
    """Load MNIST per `data_cfg`, split it and draw the training, validation and test lists.

    `data_cfg` is the Hydra `data` node (conf/data/mnist.yaml). A relative `root` is resolved
    against the directory the command was started from, also after Hydra changed the working
    directory, so that the jobs of a multirun share one copy of MNIST.

    Raises:
        ConfigError: a value in `data_cfg` is missing or invalid.
        DataError: MNIST is not available (see estinet.data.mnist.prepare_mnist).
    """
    cfg = check_data_config(data_cfg)
    root = to_absolute_path(cfg.root)

    prepare_mnist(root, download_timeout=cfg.download_timeout, verify=cfg.verify)
    train_pixels, train_labels = load_mnist(root, train=True, prepare=False)
    test_pixels, test_labels = load_mnist(root, train=False, prepare=False)

    # The validation images are the last `validation_images` images of MNIST train.
    held_out = cfg.validation_images
    if held_out >= len(train_labels):
        raise ConfigError(
            f"data.validation_images must be less than the {len(train_labels)} training images "
            f"in {root}, got {held_out}"
        )
    cut = len(train_labels) - held_out

    def make_split(images: torch.Tensor, labels: torch.Tensor) -> ImageSplit:
        return ImageSplit.from_uint8(images, labels, mean=cfg.mean, std=cfg.std).to(device)

    train_images = make_split(train_pixels[:cut], train_labels[:cut])
    val_images = make_split(train_pixels[cut:], train_labels[cut:])
    test_images = make_split(test_pixels, test_labels)

    test_ks = cfg.test.k if isinstance(cfg.test.k, ListConfig) else [cfg.test.k]
    data = AdditionData(
        train_images=train_images,
        val_images=val_images,
        test_images=test_images,
        train_lists=build_lists(
            train_images, cfg.train.num_lists, cfg.train.k, (cfg.list_seed, TRAIN)
        ),
        val_lists=build_lists(
            val_images, cfg.validation.num_lists, cfg.validation.k, (cfg.list_seed, VALIDATION)
        ),
        test_lists={
            k: build_lists(test_images, cfg.test.num_lists, k, (cfg.list_seed, TEST))
            for k in test_ks
        },
    )
    log.info(
        "Images: %d train, %d validation, %d test. Lists: %d train (k=%d), %d validation (k=%d), "
        "%d test for each k in %s",
        len(train_images),
        len(val_images),
        len(test_images),
        len(data.train_lists),
        data.train_lists.k,
        len(data.val_lists),
        data.val_lists.k,
        cfg.test.num_lists,
        list(data.test_lists),
    )
    return data


def check_data_config(data_cfg: DictConfig | Mapping) -> DictConfig:
    """Return `data_cfg` as a DictConfig, raising ConfigError with a one-line message if invalid."""
    cfg = data_cfg if isinstance(data_cfg, DictConfig) else OmegaConf.create(dict(data_cfg))

    if not require(cfg, "root", STRING):
        raise ConfigError("data.root must be a non-empty path")
    require(cfg, "verify", BOOLEAN)
    if not require(cfg, "download_timeout", NUMBER) > 0:
        raise ConfigError(f"data.download_timeout must be > 0 seconds, got {cfg.download_timeout}")
    require_int(cfg, "list_seed", minimum=0)
    require_int(cfg, "validation_images", minimum=1)
    require(cfg, "mean", NUMBER)
    if not require(cfg, "std", NUMBER) > 0:
        raise ConfigError(f"data.std must be > 0, got {cfg.std}")

    for part in (TRAIN, VALIDATION, TEST):
        require_int(cfg, f"{part}.num_lists", minimum=1)
    require_int(cfg, "train.k", minimum=1)
    require_int(cfg, "validation.k", minimum=1)

    test_k = OmegaConf.select(cfg, "test.k")
    test_ks = list(test_k) if isinstance(test_k, ListConfig) else [test_k]
    if not test_ks or not all(is_int(k) and k >= 1 for k in test_ks):
        raise ConfigError(f"data.test.k must be an integer >= 1 or a list of them, got {test_k}")
    if len(set(test_ks)) != len(test_ks):
        raise ConfigError(f"data.test.k must not repeat a value, got {test_k}")
    return cfg


def is_int(value: object) -> bool:
    # bool is a subclass of int, but true/false in a config is never meant as a count.
    return isinstance(value, int) and not isinstance(value, bool)


# Value kinds for `require`: a test and its name for error messages.
ValueKind = tuple[Callable[[object], bool], str]
STRING: ValueKind = (lambda value: isinstance(value, str), "a string")
BOOLEAN: ValueKind = (lambda value: isinstance(value, bool), "true or false")
INTEGER: ValueKind = (is_int, "an integer")
NUMBER: ValueKind = (lambda value: is_int(value) or isinstance(value, float), "a number")


def require(cfg: DictConfig, key: str, kind: ValueKind) -> Any:
    """Return the value at the dotted `key`, or raise ConfigError if it is missing or mistyped."""
    value = OmegaConf.select(cfg, key)
    if value is None:
        raise ConfigError(f"data.{key} is missing")
    accepts, kind_name = kind
    if not accepts(value):
        raise ConfigError(f"data.{key} must be {kind_name}, got {value!r}")
    return value


def require_int(cfg: DictConfig, key: str, *, minimum: int) -> int:
    value = require(cfg, key, INTEGER)
    if value < minimum:
        raise ConfigError(f"data.{key} must be an integer >= {minimum}, got {value}")
    return value
