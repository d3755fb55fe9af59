"""MNIST acquisition and the image-addition list datasets built from it."""

from estinet.data.lists import (
    AdditionData,
    ImageSplit,
    ListSet,
    build_addition_data,
    build_lists,
    check_data_config,
)
from estinet.data.mnist import MNIST_MD5, MnistUnavailableError, load_mnist, prepare_mnist, raw_dir

__all__ = [
    "MNIST_MD5",
    "AdditionData",
    "ImageSplit",
    "ListSet",
    "MnistUnavailableError",
    "build_addition_data",
    "build_lists",
    "check_data_config",
    "load_mnist",
    "prepare_mnist",
    "raw_dir",
]
