"""Argument extractor: a LeNet-style conv classifier that maps one MNIST image to digit logits."""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from estinet.errors import ConfigError
from estinet.structured import build_structured

IMAGE_SIZE = 28  # MNIST images are (1, 28, 28)


@dataclass
class ExtractorConfig:
    """Layer sizes of the argument extractor (conf/extractor/*.yaml)."""

    conv1_channels: int = 10
    conv2_channels: int = 20
    kernel_size: int = 5
    hidden: int = 50  # width of the fully connected layer before the logits
    num_classes: int = 10
    dropout: float = 0.0  # dropout probability before each fully connected layer

    def __post_init__(self) -> None:
        for name in ("conv1_channels", "conv2_channels", "kernel_size", "hidden", "num_classes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"extractor.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"extractor.dropout must be in [0, 1), got {self.dropout}")
        if self.feature_map_size < 1:
            raise ConfigError(
                f"extractor.kernel_size={self.kernel_size} is too large for {IMAGE_SIZE}x"
                f"{IMAGE_SIZE} images because nothing is left after two conv and max-pool stages"
            )

    @property
    def feature_map_size(self) -> int:
        """Side of the square feature map after two (valid conv, 2x2 max-pool) stages."""
        side = IMAGE_SIZE
        for _ in range(2):
            side = (side - self.kernel_size + 1) // 2
        return side

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ExtractorConfig":
        """Build the config from a mapping or DictConfig, raising ConfigError for invalid keys."""
        return build_structured(cls, cfg, "extractor")


class ArgumentExtractor(nn.Module):
    """Conv classifier: images (N, 1, 28, 28) -> digit logits (N, num_classes)."""

    def __init__(self, config: ExtractorConfig) -> None:
        super().__init__()
        self.config = config
        self.conv1 = nn.Conv2d(1, config.conv1_channels, config.kernel_size)
        self.conv2 = nn.Conv2d(config.conv1_channels, config.conv2_channels, config.kernel_size)
        self.dropout = nn.Dropout(config.dropout)
        flat_features = config.conv2_channels * config.feature_map_size**2  # 320 by default
        self.fc1 = nn.Linear(flat_features, config.hidden)
        self.fc2 = nn.Linear(config.hidden, config.num_classes)
        # Channels-last conv weights make every conv activation NHWC, where oneDNN's convolutions
        # and max-pools run 1.4-1.9x faster on CPU for these shapes (benchmarks/levers.py). The
        # logits equal those of the default layout up to float rounding.
        # NOTE: measured on CPU only. The effect of this layout on CUDA is unmeasured.
        self.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(images), 2))  # (N, C1, 12, 12) by default
        x = F.relu(F.max_pool2d(self.conv2(x), 2))  # (N, C2, 4, 4)
        x = x.flatten(start_dim=1)  # (N, C2 * 4 * 4)
        x = F.relu(self.fc1(self.dropout(x)))  # (N, hidden)
        return self.fc2(self.dropout(x))  # (N, num_classes)
