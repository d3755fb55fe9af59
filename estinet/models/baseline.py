"""NALU baseline: an argument extractor and an estimator-shaped head trained end to end on sums.

It has the same networks as EstiNet, but the head is a learned part of the model rather than a
stand-in: it is never replaced by the black box, so the trained network is used as-is at test time.
"""

import torch
from torch import nn

from estinet.models.estimator import BlackBoxEstimator, EstimatorConfig
from estinet.models.extractor import ArgumentExtractor, ExtractorConfig


class NaluBaseline(nn.Module):
    """Image lists (B, k, 1, 28, 28) -> (predicted output (B,), digit logits (B, k, C)).

    NOTE: trained on k=10, this network fits k=10 (test MAE near 1.4) but misses k=100 sums by
    300 to 440, unlike the 7.88 reported by Jacovi et al. (2019); docs/ablations.md lists the
    head variants tried.
    """

    def __init__(
        self, extractor_config: ExtractorConfig, estimator_config: EstimatorConfig
    ) -> None:
        super().__init__()
        if estimator_config.input_size != extractor_config.num_classes:
            raise ValueError(
                f"estimator input_size ({estimator_config.input_size}) must equal the extractor's "
                f"num_classes ({extractor_config.num_classes})"
            )
        self.extractor = ArgumentExtractor(extractor_config)
        self.head = BlackBoxEstimator(estimator_config)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.ndim != 5:
            raise ValueError(
                f"expected image lists of shape (B, k, 1, 28, 28), got {tuple(images.shape)}"
            )
        batch_size, length = images.shape[:2]
        logits = self.extractor(images.flatten(0, 1))  # (B * k, C)
        logits = logits.view(batch_size, length, -1)  # (B, k, C)
        prediction = self.head(torch.softmax(logits, dim=-1))  # (B,)
        return prediction, logits
