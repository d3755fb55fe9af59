"""Networks of EstiNet: argument extractor, NAC/NALU layers, black-box estimator, NALU baseline."""

from estinet.models.baseline import NaluBaseline
from estinet.models.estimator import BlackBoxEstimator, EstimatorConfig
from estinet.models.extractor import ArgumentExtractor, ExtractorConfig
from estinet.models.nalu import NAC, NALU

__all__ = [
    "NAC",
    "NALU",
    "ArgumentExtractor",
    "BlackBoxEstimator",
    "EstimatorConfig",
    "ExtractorConfig",
    "NaluBaseline",
]
