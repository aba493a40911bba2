"""ticod.data.coco and ticod.data.records: ground truth rebuilt from shards equals the source COCO files,
as pycocotools reads them; per-image records name their tasks, and several annotation files merge into
one set of records."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from ticod.data.coco import CocoFormatError, load_karpathy, load_records
from ticod.data.records import TASKS, coco_ground_truth, record_tasks
from ticod.data.shards import ground_truth_from_shards


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


def test_record_tasks() -> None:
    assert TASKS == ("boxes", "captions")
    # Records written before "tasks" existed were all labelled for boxes.
    assert record_tasks({"boxes": [], "captions": ["a cat"]}) == (True, True)
    assert record_tasks({"boxes": [[0, 0, 1, 1]], "captions": []}) == (True, False)
    assert record_tasks({"boxes": [], "captions": [], "tasks": ["boxes", "captions"]}) == (True, False)
    assert record_tasks({"boxes": [], "captions": ["a"], "tasks": ["captions"]}) == (False, True)
    assert record_tasks({"boxes": [], "captions": ["a"], "tasks": ["boxes"]}) == (True, False)
    assert record_tasks({"boxes": [], "captions": [], "tasks": []}) == (False, False)


def split_file(src: Path, dst: Path, ids: set[int]) -> Path:
    """``src`` cut to the images ``ids`` (and their annotations)."""
    data = json.loads(src.read_text())
    data["images"] = [im for im in data["images"] if im["id"] in ids]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    dst.write_text(json.dumps(data))
    return dst


def test_load_records_merges_files(demo_coco_dir: Path, tmp_path: Path) -> None:
    ann = demo_coco_dir / "annotations"
    whole, categories = load_records(ann / "instances_val.json", ann / "captions_val.json")
    ids = [r["image_id"] for r in whole]
    inst = [split_file(ann / "instances_val.json", tmp_path / f"i{k}.json", set(ids[k::2])) for k in (0, 1)]
    caps = [split_file(ann / "captions_val.json", tmp_path / f"c{k}.json", set(ids[k::3])) for k in (0, 1, 2)]
    assert load_records(inst, caps) == (whole, categories)
    assert load_records(tuple(reversed(inst)), list(reversed(caps))) == (whole, categories)  # any order
    assert all(r["tasks"] == ["boxes", "captions"] for r in whole)

    boxes_only, cats = load_records(inst, None)
    assert cats == categories and all(r["tasks"] == ["boxes"] and not r["captions"] for r in boxes_only)
    captions_only, cats = load_records(None, caps[:2])
    assert cats == [] and [r["image_id"] for r in captions_only] == sorted(set(ids[0::3]) | set(ids[1::3]))
    assert all(r["tasks"] == ["captions"] and r["boxes"] == [] and r["captions"] for r in captions_only)

    data = json.loads(inst[1].read_text())
    data["images"].append({**json.loads(inst[0].read_text())["images"][0], "width": 1})
    inst[1].write_text(json.dumps(data))
    with pytest.raises(CocoFormatError, match=f"image {ids[0]} .* differs from image {ids[0]} of"):
        load_records(inst, None)
    with pytest.raises(CocoFormatError, match=r"annotation id \d+ appears twice"):
        load_records([ann / "instances_val.json", ann / "instances_val.json"], None)
    with pytest.raises(ValueError, match="needs an instances file, a captions file or both"):
        load_records(None, None)


def test_load_karpathy_errors(tmp_path: Path) -> None:
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": [{"cocoid": 1, "filepath": "val2014", "filename": "a.jpg"}]}))
    with pytest.raises(CocoFormatError, match="unknown Karpathy split 'restval'"):
        load_karpathy(path, "restval", images_dir=tmp_path)
    with pytest.raises(CocoFormatError, match=r"images\[0\] is missing key 'split'"):
        load_karpathy(path, "val", images_dir=tmp_path)
    path.write_text(json.dumps([1]))
    with pytest.raises(CocoFormatError, match=r"not a Karpathy dataset_coco\.json"):
        load_karpathy(path, "val", images_dir=tmp_path)
    entry = {"cocoid": 1, "filepath": "val2014", "filename": "a.jpg", "split": "test", "sentences": []}
    path.write_text(json.dumps({"images": [entry]}))
    with pytest.raises(CocoFormatError, match="no images in Karpathy split 'val'"):
        load_karpathy(path, "val", images_dir=tmp_path)
    # A missing image file gives size 0x0: the shard writer then skips it as missing, as for COCO files.
    records, categories = load_karpathy(path, "test", images_dir=tmp_path)
    assert categories == [] and records[0]["tasks"] == [] and records[0]["width"] == 0


def test_ground_truth_scores_each_task_only_on_the_images_labelled_for_it() -> None:
    def record(image_id: int, tasks: list[str], boxes: int, captions: int) -> dict:
        return {
            "image_id": image_id,
            "file_name": f"{image_id}.jpg",
            "width": 64,
            "height": 48,
            "boxes": [[1.0, 2.0, 10.0, 10.0]] * boxes,
            "category_ids": [3] * boxes,
            "iscrowd": [0] * boxes,
            "areas": [100.0] * boxes,
            "ann_ids": [10 * image_id + k for k in range(boxes)],
            "captions": ["a cat"] * captions,
            "tasks": tasks,
        }

    records = [
        record(1, ["boxes", "captions"], 2, 5),
        record(2, ["boxes"], 0, 0),  # annotated, no objects: a negative, scored for boxes
        record(3, ["captions"], 0, 5),  # not annotated for boxes: not in the box ground truth
        record(4, ["boxes"], 1, 0),
    ]
    instances, refs = coco_ground_truth(records, [{"id": 3, "name": "cat"}])
    assert [im["id"] for im in instances["images"]] == [1, 2, 4]
    assert sorted({a["image_id"] for a in instances["annotations"]}) == [1, 4]
    assert sorted(refs) == [1, 3]
