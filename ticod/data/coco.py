"""COCO annotation files -> one record per image, category id <-> label mapping, and ground truth from shards.

The shard tool joins instances and captions once, offline, into per-image records (the ``.json`` member
of a shard sample); the evaluator rebuilds pycocotools-ready ground truth from those records.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


class CocoFormatError(ValueError):
    """An annotation file that is not in COCO format; the message names the file and the missing key."""


INSTANCE_KEYS = {
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("id", "image_id", "category_id", "bbox", "iscrowd"),
    "categories": ("id", "name"),
}
CAPTION_KEYS = {"images": ("id",), "annotations": ("image_id", "caption")}


def _load(path: str | Path, schema: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    """Read a COCO JSON file and check the keys we rely on, naming the first one missing."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise CocoFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CocoFormatError(f"{path}: not a COCO annotation file (top level is {type(data).__name__})")
    for section, keys in schema.items():
        if section not in data:
            raise CocoFormatError(f"{path}: not a COCO annotation file: missing top-level key '{section}'")
        if not isinstance(data[section], list):
            raise CocoFormatError(f"{path}: '{section}' must be a list")
        for i, entry in enumerate(data[section]):
            missing = [k for k in keys if not isinstance(entry, dict) or k not in entry]
            if missing:
                raise CocoFormatError(f"{path}: {section}[{i}] is missing key '{missing[0]}'")
    return data


def load_records(
    instances_path: str | Path, captions_path: str | Path | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Join a COCO instances file and (optionally) a captions file into per-image records.

    Returns:
        ``(records, categories)``: records sorted by image id, each in the shard ``.json`` format
        (image_id, file_name, width, height, boxes xywh, category_ids, iscrowd, areas, ann_ids,
        captions); categories sorted by id (id, name, supercategory).

    Raises:
        CocoFormatError: a file is not COCO, or an annotation refers to an unknown image or category.
    """
    inst = _load(instances_path, INSTANCE_KEYS)
    records: dict[int, dict[str, Any]] = {}
    for im in inst["images"]:
        records[int(im["id"])] = {
            "image_id": int(im["id"]),
            "file_name": str(im["file_name"]),
            "width": int(im["width"]),
            "height": int(im["height"]),
            "boxes": [],
            "category_ids": [],
            "iscrowd": [],
            "areas": [],
            "ann_ids": [],
            "captions": [],
        }
    categories = sorted(
        (
            {"id": int(c["id"]), "name": str(c["name"]), "supercategory": str(c.get("supercategory", ""))}
            for c in inst["categories"]
        ),
        key=lambda c: c["id"],
    )
    known = {c["id"] for c in categories}
    for ann in sorted(inst["annotations"], key=lambda a: int(a["id"])):
        rec = records.get(int(ann["image_id"]))
        if rec is None:
            raise CocoFormatError(
                f"{instances_path}: annotation {ann['id']} refers to unknown image {ann['image_id']}"
            )
        if int(ann["category_id"]) not in known:
            raise CocoFormatError(
                f"{instances_path}: annotation {ann['id']} has unknown category_id {ann['category_id']}"
            )
        box = [float(v) for v in ann["bbox"]]
        if len(box) != 4:
            raise CocoFormatError(f"{instances_path}: annotation {ann['id']} bbox must have 4 numbers")
        rec["boxes"].append(box)
        rec["category_ids"].append(int(ann["category_id"]))
        rec["iscrowd"].append(int(ann["iscrowd"]))
        # COCOeval's area ranges use 'area' (mask area), not the box area; keep it when present.
        rec["areas"].append(float(ann.get("area", box[2] * box[3])))
        rec["ann_ids"].append(int(ann["id"]))
    if captions_path is not None:
        caps = _load(captions_path, CAPTION_KEYS)
        for ann in sorted(caps["annotations"], key=lambda a: int(a.get("id", 0))):
            rec = records.get(int(ann["image_id"]))
            if rec is not None:  # captions of images not in the instances file are ignored
                rec["captions"].append(str(ann["caption"]).strip())
    return [records[k] for k in sorted(records)], categories


class CategoryMap:
    """Original (sparse) COCO category ids <-> contiguous labels 1..K in sorted-id order (0 = background)."""

    def __init__(self, categories: Sequence[dict[str, Any]]) -> None:
        cats = sorted(categories, key=lambda c: int(c["id"]))
        self.ids: list[int] = [int(c["id"]) for c in cats]
        self.names: list[str] = [str(c["name"]) for c in cats]
        self._label = {cid: i + 1 for i, cid in enumerate(self.ids)}
        if len(self._label) != len(self.ids):
            raise ValueError(f"duplicate category ids in {self.ids}")

    def __len__(self) -> int:
        return len(self.ids)

    def to_label(self, category_id: int) -> int:
        """Label 1..K of a COCO category id; KeyError for an unknown id."""
        return self._label[int(category_id)]

    def to_category_id(self, label: int) -> int:
        """COCO category id of a label 1..K."""
        if not 1 <= label <= len(self.ids):
            raise KeyError(f"label {label} outside 1..{len(self.ids)}")
        return self.ids[label - 1]

    def name(self, label: int) -> str:
        """Category name of a label 1..K."""
        self.to_category_id(label)  # validates the range
        return self.names[label - 1]


def coco_ground_truth(
    records: Iterable[dict[str, Any]], categories: Sequence[dict[str, Any]]
) -> tuple[dict[str, Any], dict[int, list[str]]]:
    """Per-image records -> (COCO instances dict for ``pycocotools.coco.COCO``, image id -> captions)."""
    images, annotations, refs = [], [], {}
    for rec in records:
        iid = int(rec["image_id"])
        images.append(
            {"id": iid, "file_name": rec["file_name"], "width": rec["width"], "height": rec["height"]}
        )
        refs[iid] = list(rec["captions"])
        for box, cat, crowd, area, ann_id in zip(
            rec["boxes"], rec["category_ids"], rec["iscrowd"], rec["areas"], rec["ann_ids"], strict=True
        ):
            annotations.append(
                {
                    "id": int(ann_id),
                    "image_id": iid,
                    "category_id": int(cat),
                    "bbox": [float(v) for v in box],
                    "area": float(area),
                    "iscrowd": int(crowd),
                }
            )
    images.sort(key=lambda im: im["id"])
    annotations.sort(key=lambda a: a["id"])
    instances = {"images": images, "annotations": annotations, "categories": [dict(c) for c in categories]}
    return instances, refs


def ground_truth_from_shards(
    shards_dir: str | Path, split: str
) -> tuple[dict[str, Any], dict[int, list[str]]]:
    """COCO ground truth (instances dict, image id -> captions) rebuilt from a split's shards.

    Reads only the ``.json`` members; unreadable ones are skipped (the eval loader counts them as bad).
    """
    from ticod.data.shards import iter_shard_records, read_manifest  # shards imports this module

    manifest = read_manifest(shards_dir, split)
    return coco_ground_truth(iter_shard_records(shards_dir, split), manifest["categories"])
