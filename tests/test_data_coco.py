"""ticod.data.coco: ground truth rebuilt from shards equals the source COCO files, as pycocotools reads them."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from pycocotools.coco import COCO

from ticod.data.coco import ground_truth_from_shards


def test_ground_truth_from_shards_matches_source(demo_coco_dir: Path, demo_shards_dir: Path) -> None:
    instances, refs = ground_truth_from_shards(demo_shards_dir, "val")
    source = json.loads((demo_coco_dir / "annotations/instances_val.json").read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        rebuilt, original = COCO(), COCO(str(demo_coco_dir / "annotations/instances_val.json"))
        rebuilt.dataset = instances
        rebuilt.createIndex()
    assert rebuilt.getImgIds() == original.getImgIds() and len(refs) == len(source["images"]) == 8
    assert rebuilt.loadCats(rebuilt.getCatIds()) == original.loadCats(original.getCatIds())
    keys = ("id", "image_id", "category_id", "bbox", "area", "iscrowd")
    for ann_id in original.getAnnIds():
        assert {k: rebuilt.anns[ann_id][k] for k in keys} == {k: original.anns[ann_id][k] for k in keys}
    assert len(rebuilt.getAnnIds()) == len(original.getAnnIds())
    captions = json.loads((demo_coco_dir / "annotations/captions_val.json").read_text())["annotations"]
    assert sum(len(v) for v in refs.values()) == len(captions)
    for cap in captions:
        assert cap["caption"] in refs[cap["image_id"]]
