"""Evaluation: FID (frechet), precision/recall/density/coverage (prdc), feature detectors, image I/O."""

from .detectors import DEFAULT_DETECTOR_URL, compute_features, detector_in_channels, load_detector
from .frechet import FeatureStats, StreamingFID, frechet_distance, load_ref, save_ref
from .images import ImageFiles, ImageSourceError
from .prdc import compute_prdc

__all__ = [
    "DEFAULT_DETECTOR_URL",
    "FeatureStats",
    "ImageFiles",
    "ImageSourceError",
    "StreamingFID",
    "compute_features",
    "compute_prdc",
    "detector_in_channels",
    "frechet_distance",
    "load_detector",
    "load_ref",
    "save_ref",
]
