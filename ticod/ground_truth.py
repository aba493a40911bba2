"""The ground truth an evaluation scores against: COCO instances, reference captions, the expected images.

Read on rank 0 only (:func:`ticod.evaluate.run_evaluation`), from the original COCO JSON files or rebuilt
from a split's shards (:func:`ticod.data.shards.ground_truth_from_shards`).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO


@dataclass
class GroundTruth:
    """What the predictions are scored against.

    Attributes:
        instances: COCO instances ground truth (boxes, crowd flags, areas, categories); None when only
            captions are evaluated.
        captions: Image id -> all reference captions.
        image_ids: The images of the evaluated split (or subset), each expected exactly once.
    """

    instances: COCO | None
    captions: dict[int, list[str]]
    image_ids: list[int]


def _coco_from_dict(dataset: dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


@functools.lru_cache(maxsize=8)
def load_ground_truth(instances_json: str, captions_json: str, shards_dir: str, split: str) -> GroundTruth:
    """The original COCO JSON files when given, else the ground truth rebuilt from the split's shards.

    Rebuilt from shards, it reads only the ``.json`` members (format-2 manifests seek to them; the JPEGs are
    never read), and lacks the samples that cannot be read; the eval loader counts those as bad and
    :func:`ticod.evaluate.dedupe` expects them missing, so the expected images are then all the manifest lists.
    Cached: training evaluates the same split every ``eval.every`` steps.
    """
    instances: dict[str, Any] | None = None
    refs: dict[int, list[str]] = {}
    if not (instances_json and captions_json):
        from ticod.data.shards import ground_truth_from_shards

        instances, refs = ground_truth_from_shards(shards_dir, split)
    if instances_json:
        instances = json.loads(Path(instances_json).read_text())
    if captions_json:
        refs = {}
        for ann in json.loads(Path(captions_json).read_text())["annotations"]:
            refs.setdefault(int(ann["image_id"]), []).append(ann["caption"])
    assert instances is not None
    ids = sorted(int(im["id"]) for im in instances["images"])
    if not instances_json:
        from ticod.data.shards import read_manifest

        keys = [int(k) for s in read_manifest(shards_dir, split)["shards"] for k in s.get("keys", [])]
        ids = sorted(keys) or ids  # manifests without keys (older ones): the readable images
    return GroundTruth(_coco_from_dict(instances), refs, ids)


def subset(gt: GroundTruth, image_ids: Iterable[int]) -> GroundTruth:
    """The same ground truth, expecting only ``image_ids`` (``eval.max_images``)."""
    keep = set(image_ids)
    return GroundTruth(gt.instances, gt.captions, [i for i in gt.image_ids if i in keep])
