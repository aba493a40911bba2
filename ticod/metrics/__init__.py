"""Evaluation metrics, pure functions of ground truth and predictions (no model, no distributed code)."""

from ticod.metrics.captioning import BERTSCORE_KEYS, COCO_CAPTION_KEYS, caption_metrics, load_bertscorer
from ticod.metrics.detection import DETECTION_KEYS, detection_metrics

__all__ = [
    "BERTSCORE_KEYS",
    "COCO_CAPTION_KEYS",
    "DETECTION_KEYS",
    "caption_metrics",
    "detection_metrics",
    "load_bertscorer",
]
