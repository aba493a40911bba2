"""COCO box AP: our wrapper against pycocotools run directly, and cases whose AP is known exactly."""

from __future__ import annotations

import contextlib
import copy
import io
import random

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ticod.metrics.detection import DETECTION_KEYS, detection_metrics, load_results

CATEGORY_IDS = [1, 3, 7]  # non-contiguous, like COCO's


def _gt_dataset() -> dict:
    """Four images; small (area < 32²), medium and large boxes; one crowd box."""
    rng = random.Random(0)
    images, anns = [], []
    for image_id in (139, 285, 632, 724):
        images.append({"id": image_id, "width": 640, "height": 480, "file_name": f"{image_id:012d}.jpg"})
        for side in (20, 60, 150):  # one box per COCO area range
            x, y = rng.uniform(10, 400), rng.uniform(10, 250)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": rng.choice(CATEGORY_IDS),
                    "bbox": [x, y, float(side), side * 0.9],
                    "area": side * side * 0.9,
                    "iscrowd": 0,
                }
            )
    anns.append(
        {"id": len(anns) + 1, "image_id": 139, "category_id": 1, "bbox": [0.0, 0.0, 300.0, 300.0]}
        | {"area": 90000.0, "iscrowd": 1}
    )
    cats = [{"id": c, "name": f"cat{c}", "supercategory": "thing"} for c in CATEGORY_IDS]
    return {"images": images, "annotations": anns, "categories": cats}


def _coco(dataset: dict) -> COCO:
    gt = COCO()
    gt.dataset = copy.deepcopy(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


@pytest.fixture(scope="module")
def gt() -> COCO:
    return _coco(_gt_dataset())


def _perfect(gt: COCO) -> list[dict]:
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 1.0}
        for a in gt.dataset["annotations"]
        if not a["iscrowd"]
    ]


def test_perfect_detections_give_ap_one(gt):
    m = detection_metrics(gt, _perfect(gt))
    assert set(m) == set(DETECTION_KEYS)
    for k in DETECTION_KEYS:
        if k == "AR1":  # at most one detection per image and class: images with two boxes of a class miss one
            continue
        assert m[k] == pytest.approx(1.0, abs=1e-12), k


def test_equals_pycocotools_run_directly(gt):
    rng = np.random.default_rng(1)
    results = []
    for d in _perfect(gt) * 2:  # every box twice, jittered: true positives and duplicate false positives
        x, y, w, h = d["bbox"]
        jitter = rng.normal(0, 0.15, 4) * [w, h, w, h]
        results.append(d | {"bbox": [x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3]]})
        results[-1]["score"] = float(rng.uniform())
    for image_id in (139, 724):  # pure false positives with high scores
        results.append(
            {"image_id": image_id, "category_id": 3, "bbox": [5.0, 5.0, 40.0, 40.0], "score": 0.99}
        )

    direct = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), iouType="bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        direct.evaluate()
        direct.accumulate()
        direct.summarize()
    ours = detection_metrics(gt, results)
    assert [ours[k] for k in DETECTION_KEYS] == [float(s) for s in direct.stats]
    assert 0.0 < ours["AP"] < 1.0


def test_shifted_boxes_drop_ap_as_expected(gt):
    """Shift every box right by w/5: IoU = (w - w/5) / (w + w/5) = 2/3 for each detection.

    COCO averages 10 IoU thresholds 0.50:0.05:0.95; IoU 2/3 passes 0.50, 0.55, 0.60 and 0.65, so AP = 0.4,
    AP50 = 1 and AP75 = 0.
    """
    shifted = []
    for d in _perfect(gt):
        x, y, w, h = d["bbox"]
        shifted.append(d | {"bbox": [x + w / 5, y, w, h]})
    m = detection_metrics(gt, shifted)
    assert m["AP"] == pytest.approx(0.4, abs=1e-12)
    assert m["AP50"] == pytest.approx(1.0, abs=1e-12)
    assert m["AP75"] == pytest.approx(0.0, abs=1e-12)
    for k in ("APs", "APm", "APl"):
        assert m[k] == pytest.approx(0.4, abs=1e-12), k


def test_empty_results_give_zero_not_a_crash(gt):
    m = detection_metrics(gt, [])
    assert [m[k] for k in DETECTION_KEYS] == [0.0] * len(DETECTION_KEYS)
    assert load_results(gt, []).getImgIds() == gt.getImgIds()


def test_image_subset_ignores_images_not_predicted(gt):
    first = [d for d in _perfect(gt) if d["image_id"] == 139]
    assert detection_metrics(gt, first, image_ids=[139])["AP"] == pytest.approx(1.0, abs=1e-12)
    # Over all four images the other three images' boxes are misses.
    assert detection_metrics(gt, first)["AP"] < 0.5


def test_no_ground_truth_in_an_area_range_is_minus_one():
    dataset = _gt_dataset()
    dataset["annotations"] = [a for a in dataset["annotations"] if a["area"] >= 32**2]  # drop small boxes
    gt = _coco(dataset)
    m = detection_metrics(gt, _perfect(gt))
    assert m["APs"] == -1.0 and m["AP"] == pytest.approx(1.0, abs=1e-12)
