"""COCO box AP with pycocotools ``COCOeval``, the reference implementation the paper's numbers use."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ticod.metrics.per_class import per_class_ap

log = logging.getLogger("ticod")

# Names of COCOeval.stats[0..11], in its order.
DETECTION_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def load_results(gt: COCO, results: list[dict]) -> COCO:
    """``gt.loadRes(results)``, also for an empty list (on which pycocotools fails)."""
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            return gt.loadRes(copy.deepcopy(results))  # loadRes adds keys to the dicts it is given
    empty = COCO()
    empty.dataset = {
        "images": list(gt.dataset["images"]),
        "categories": copy.deepcopy(gt.dataset.get("categories", [])),
    }
    empty.dataset["annotations"] = []
    with contextlib.redirect_stdout(io.StringIO()):
        empty.createIndex()
    return empty


def detection_metrics(
    gt: COCO, results: list[dict], image_ids: Iterable[int] | None = None, *, classwise: bool = False
) -> dict[str, Any]:
    """COCO bbox metrics of ``results`` against ``gt``.

    Args:
        gt: Ground truth (original COCO instances JSON or one rebuilt from the shards).
        results: COCO results format: ``{"image_id", "category_id" (original COCO id), "bbox" [x, y, w, h]
            in original image pixels, "score"}``.
        image_ids: Images to evaluate on (default: all of ``gt``). Pass the evaluated subset when only part
            of the split was predicted, otherwise its other images count as misses.
        classwise: Also return ``"per_class"``: AP and AP50 of every category (:mod:`ticod.metrics.per_class`).

    Returns:
        ``DETECTION_KEYS`` -> float. As in pycocotools, -1.0 means no ground truth in that area range.
    """
    dt = load_results(gt, results)
    coco_eval = COCOeval(gt, dt, iouType="bbox")
    if image_ids is not None:
        coco_eval.params.imgIds = sorted(set(image_ids))
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    log.debug("COCOeval bbox:\n%s", summary.getvalue())
    out: dict[str, Any] = {
        k: float(v) for k, v in zip(DETECTION_KEYS, np.asarray(coco_eval.stats), strict=True)
    }
    if classwise:
        out["per_class"] = per_class_ap(coco_eval)
    return out
