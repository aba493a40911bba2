"""Per-class box AP: our table against COCOeval run for each category alone, on the real COCO sample."""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import math

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ticod.config import EvalConfig
from ticod.evaluate import compute_metrics, write_outputs
from ticod.ground_truth import GroundTruth
from ticod.metrics.detection import detection_metrics
from ticod.metrics.per_class import PER_CLASS_CSV, describe_worst, worst


@pytest.fixture(scope="module")
def gt(coco_sample) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(coco_sample / "instances_train2017.json"))


def realistic_detections(gt: COCO, seed: int = 0) -> list[dict]:
    """A detector's output, roughly: most boxes found, jittered by a class-dependent amount; duplicates,
    confusions with another class and background boxes, all with scores (so APs spread over [0, 1])."""
    rng = np.random.default_rng(seed)
    cat_ids = sorted(gt.getCatIds())
    noise = {c: rng.uniform(0.02, 0.2) for c in cat_ids}  # some classes are easy, some hard
    dets = []
    for ann in gt.dataset["annotations"]:
        if ann["iscrowd"] or rng.uniform() < 0.15:  # missed
            continue
        x, y, w, h = ann["bbox"]
        for dup in range(1 + int(rng.uniform() < 0.2)):
            j = rng.normal(0, noise[ann["category_id"]], 4) * [w, h, w, h]
            cat = ann["category_id"] if rng.uniform() > 0.1 else int(rng.choice(cat_ids))
            box = [x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3])]
            score = float(np.clip(rng.normal(0.8 - 0.3 * dup - noise[cat], 0.15), 0.01, 1.0))
            dets.append({"image_id": ann["image_id"], "category_id": cat, "bbox": box, "score": score})
    for im in gt.dataset["images"]:  # background
        for _ in range(3):
            w, h = rng.uniform(10, im["width"] / 3), rng.uniform(10, im["height"] / 3)
            box = [rng.uniform(0, im["width"] - w), rng.uniform(0, im["height"] - h), w, h]
            dets.append(
                {"image_id": im["id"], "category_id": int(rng.choice(cat_ids)), "bbox": box}
                | {"score": float(rng.uniform(0.01, 0.6))}
            )
    return dets


def cocoeval_one_category(gt: COCO, dets: list[dict], cat_id: int) -> tuple[float, float]:
    """(AP, AP50) that COCOeval reports with ``params.catIds = [cat_id]``."""
    ev = COCOeval(gt, gt.loadRes(copy.deepcopy(dets)), iouType="bbox")
    ev.params.catIds = [cat_id]
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0]), float(ev.stats[1])


def test_per_class_ap_equals_cocoeval_per_category(gt):
    dets = realistic_detections(gt)
    m = detection_metrics(gt, dets, classwise=True)
    rows = m["per_class"]
    assert [r["category_id"] for r in rows] == sorted(gt.getCatIds()) and len(rows) == 80
    assert [r["name"] for r in rows] == [gt.cats[c]["name"] for c in sorted(gt.getCatIds())]
    with contextlib.redirect_stdout(io.StringIO()):
        for r in rows:
            ap, ap50 = cocoeval_one_category(gt, dets, r["category_id"])
            assert (r["AP"], r["AP50"]) == pytest.approx((ap, ap50), abs=1e-12), r["name"]
            assert r["num_gt"] == len(gt.getAnnIds(catIds=[r["category_id"]], iscrowd=False))
    aps = [r["AP"] for r in rows]
    # Non-trivial: a spread of APs, most strictly inside (0, 1), and their mean is COCOeval's AP.
    assert min(aps) < 0.2 and max(aps) > 0.6 and sum(0.0 < a < 1.0 for a in aps) >= 60
    assert float(np.mean(aps)) == pytest.approx(m["AP"], abs=1e-12)


def test_evaluation_writes_the_table_and_names_the_worst_classes(gt, tmp_path):
    dets = realistic_detections(gt, seed=1)
    records = {}
    for d in dets:  # the evaluator's per-image records: xyxy, labels 1..K over the sorted category ids
        rec = records.setdefault(
            d["image_id"], {"image_id": d["image_id"], "boxes": [], "scores": [], "labels": []}
        )
        x, y, w, h = d["bbox"]
        rec["boxes"].append([x, y, x + w, y + h])
        rec["scores"].append(d["score"])
        rec["labels"].append(sorted(gt.getCatIds()).index(d["category_id"]) + 1)
    truth = GroundTruth(gt, {}, sorted(gt.getImgIds()))

    metrics, detections, captions = compute_metrics(
        [records[i] for i in sorted(records)], truth, sorted(gt.getCatIds()), EvalConfig(bertscore=False)
    )
    per_class = metrics.pop("per_class")
    write_outputs(tmp_path, metrics, detections, captions, per_class)
    with (tmp_path / PER_CLASS_CSV).open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 80 and list(table[0]) == ["category_id", "name", "AP", "AP50", "num_gt"]
    for row, r in zip(table, per_class, strict=True):
        assert int(row["category_id"]) == r["category_id"] and row["name"] == r["name"]
        assert float(row["AP"]) == pytest.approx(r["AP"], abs=1e-6)
        assert float(row["AP50"]) == pytest.approx(r["AP50"], abs=1e-6)

    low = worst(per_class)
    assert len(low) == 10 and [r["AP"] for r in low] == sorted(r["AP"] for r in per_class)[:10]
    line = describe_worst(per_class)
    assert line.startswith("10 worst of 80 classes") and all(r["name"] in line for r in low)


def test_a_class_without_ground_truth_has_no_ap():
    coco = COCO()
    coco.dataset = {
        "images": [{"id": 1, "width": 100, "height": 100}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0}
        ],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    dets = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "score": 0.9}]
    a, b = detection_metrics(coco, dets, classwise=True)["per_class"]
    assert a["AP"] == pytest.approx(1.0) and math.isnan(b["AP"]) and b["num_gt"] == 0
    assert worst([a, b]) == [a]
