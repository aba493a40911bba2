"""Box AP and AP50 per category from COCOeval's precision array (mmdetection's ``classwise=True`` table).

``COCOeval.eval["precision"]`` is indexed [IoU threshold, recall point, category, area range, max dets];
a category's AP is the mean of its entries over all IoU thresholds and recall points (area "all", 100
detections), its AP50 the same at IoU 0.5 only: what COCOeval reports for that category alone
(``params.catIds = [c]``). A category without ground truth in the evaluated images has no AP (NaN).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.cocoeval import COCOeval

PER_CLASS_CSV = "per_class.csv"
COLUMNS = ("category_id", "name", "AP", "AP50", "num_gt")


def per_class_ap(coco_eval: COCOeval) -> list[dict[str, Any]]:
    """One row per category of ``coco_eval`` (after ``accumulate``), in category id order."""
    precision = coco_eval.eval["precision"]
    params = coco_eval.params
    iou50 = int(np.argmin(np.abs(np.asarray(params.iouThrs) - 0.5)))
    area_all, max_dets = params.areaRngLbl.index("all"), len(params.maxDets) - 1
    images = set(params.imgIds)
    gt = coco_eval.cocoGt
    rows = []
    for k, cat_id in enumerate(params.catIds):
        p = precision[:, :, k, area_all, max_dets]
        anns = gt.loadAnns(gt.getAnnIds(catIds=[cat_id], iscrowd=False))
        rows.append(
            {
                "category_id": int(cat_id),
                "name": str(gt.cats[cat_id].get("name", cat_id)),
                "AP": _mean_valid(p),
                "AP50": _mean_valid(p[iou50]),
                "num_gt": sum(a["image_id"] in images for a in anns),
            }
        )
    return rows


def _mean_valid(p: np.ndarray) -> float:
    valid = p[p > -1]
    return float(valid.mean()) if valid.size else float("nan")


def worst(rows: Sequence[dict[str, Any]], n: int = 10) -> list[dict[str, Any]]:
    """The ``n`` categories of lowest AP (those with an AP), lowest first."""
    scored = [r for r in rows if not math.isnan(r["AP"])]
    return sorted(scored, key=lambda r: (r["AP"], r["AP50"], r["category_id"]))[:n]


def describe_worst(rows: Sequence[dict[str, Any]], n: int = 10) -> str:
    """A console line: "10 worst of 80 classes (AP / AP50): toaster 0.000/0.000, ..."."""
    low = worst(rows, n)
    scored = sum(not math.isnan(r["AP"]) for r in rows)
    parts = ", ".join(f"{r['name']} {r['AP']:.3f}/{r['AP50']:.3f}" for r in low)
    return f"{len(low)} worst of {scored} classes (AP / AP50): {parts}"


def write_per_class_csv(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """``rows`` as CSV (columns :data:`COLUMNS`; NaN where a class has no ground truth)."""
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: f"{r[k]:.6f}" if isinstance(r[k], float) else r[k] for k in COLUMNS})
    return path


def table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows) for a wandb table."""
    return list(COLUMNS), [[r[k] for k in COLUMNS] for r in rows]
