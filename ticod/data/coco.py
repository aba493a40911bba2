"""COCO annotation files -> one record per image, and the category id <-> label mapping.

The shard tool joins instances and captions once, offline, into per-image records (the ``.json`` member
of a shard sample, described in :mod:`ticod.data.records`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ticod.data.records import record_tasks, task_list

PathArg = str | Path
# Karpathy split name -> the "split" values of dataset_coco.json it takes (restval is train data).
KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


class CocoFormatError(ValueError):
    """An annotation file that is not in COCO format; the message names the file and the missing key."""


INSTANCE_KEYS = {
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("id", "image_id", "category_id", "bbox", "iscrowd"),
    "categories": ("id", "name"),
}
# file_name/width/height are required only of images that no instances file has (captions-only images).
CAPTION_KEYS = {"images": ("id",), "annotations": ("image_id", "caption")}
CAPTION_IMAGE_KEYS = ("file_name", "width", "height")
KARPATHY_KEYS = {"images": ("cocoid", "filepath", "filename", "split", "sentences")}


def _paths(paths: PathArg | Sequence[PathArg] | None) -> list[Path]:
    if paths is None:
        return []
    if isinstance(paths, (str, Path)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def _load(
    path: str | Path, schema: dict[str, tuple[str, ...]], what: str = "a COCO annotation file"
) -> dict[str, Any]:
    """Read a COCO JSON file and check the keys we rely on, naming the first one missing."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise CocoFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CocoFormatError(f"{path}: not {what} (top level is {type(data).__name__})")
    for section, keys in schema.items():
        if section not in data:
            raise CocoFormatError(f"{path}: not {what}: missing top-level key '{section}'")
        if not isinstance(data[section], list):
            raise CocoFormatError(f"{path}: '{section}' must be a list")
        for i, entry in enumerate(data[section]):
            missing = [k for k in keys if not isinstance(entry, dict) or k not in entry]
            if missing:
                raise CocoFormatError(f"{path}: {section}[{i}] is missing key '{missing[0]}'")
    return data


def _empty_record(image_id: int, file_name: str, width: int, height: int) -> dict[str, Any]:
    return {
        "image_id": image_id,
        "file_name": file_name,
        "width": width,
        "height": height,
        "boxes": [],
        "category_ids": [],
        "iscrowd": [],
        "areas": [],
        "ann_ids": [],
        "captions": [],
    }


def _add_image(
    records: dict[int, dict[str, Any]], origin: dict[int, Path], path: Path, im: dict[str, Any]
) -> None:
    """Add an image entry; the same id again (another file of a merge) must describe the same image."""
    rec = _empty_record(int(im["id"]), str(im["file_name"]), int(im["width"]), int(im["height"]))
    old = records.get(rec["image_id"])
    if old is None:
        records[rec["image_id"]] = rec
        origin[rec["image_id"]] = path
    elif [old[k] for k in CAPTION_IMAGE_KEYS] != [rec[k] for k in CAPTION_IMAGE_KEYS]:
        raise CocoFormatError(
            f"{path}: image {rec['image_id']} ({rec['file_name']}, {rec['width']}x{rec['height']}) differs "
            f"from image {rec['image_id']} of {origin[rec['image_id']]} ({old['file_name']}, "
            f"{old['width']}x{old['height']})"
        )


def load_records(
    instances_path: PathArg | Sequence[PathArg] | None,
    captions_path: PathArg | Sequence[PathArg] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Join COCO instances and/or captions files into per-image records.

    Several files of a kind merge (e.g. Karpathy's splits take images from train2014 and val2014). Images
    of an instances file are labelled for boxes (an empty box list is a negative) and take the captions of
    their id; images only in a captions file are captions-only.

    Args:
        instances_path: COCO ``instances_*.json`` file(s), or None (a captions-only set).
        captions_path: COCO ``captions_*.json`` file(s), or None (a boxes-only set).

    Returns:
        ``(records, categories)``: records sorted by image id, each in the shard ``.json`` format
        (image_id, file_name, width, height, boxes xywh, category_ids, iscrowd, areas, ann_ids,
        captions, tasks); categories sorted by id (id, name, supercategory), [] without instances.

    Raises:
        ValueError: neither kind of file given.
        CocoFormatError: a file is not COCO, an annotation refers to an unknown image or category, or
            merged files disagree (same image id, other image; same category id, other category).
    """
    inst_paths, cap_paths = _paths(instances_path), _paths(captions_path)
    if not inst_paths and not cap_paths:
        raise ValueError("load_records needs an instances file, a captions file or both")
    records: dict[int, dict[str, Any]] = {}
    origin: dict[int, Path] = {}  # where each image came from, for merge errors
    cats: dict[int, dict[str, Any]] = {}
    instance_anns: list[tuple[Path, dict[str, Any]]] = []
    for path in inst_paths:
        inst = _load(path, INSTANCE_KEYS)
        for im in inst["images"]:
            _add_image(records, origin, path, im)
        for c in inst["categories"]:
            cat = {
                "id": int(c["id"]),
                "name": str(c["name"]),
                "supercategory": str(c.get("supercategory", "")),
            }
            if cats.setdefault(cat["id"], cat) != cat:
                raise CocoFormatError(
                    f"{path}: category {cat} differs from {cats[cat['id']]} of another file"
                )
        instance_anns += [(path, ann) for ann in inst["annotations"]]
    boxed = set(records)
    seen: set[int] = set()
    # Sorted over all files so each image's boxes are in annotation-id order however the files split.
    for path, ann in sorted(instance_anns, key=lambda pa: int(pa[1]["id"])):
        rec = records.get(int(ann["image_id"]))
        if rec is None:
            raise CocoFormatError(f"{path}: annotation {ann['id']} refers to unknown image {ann['image_id']}")
        if int(ann["category_id"]) not in cats:
            raise CocoFormatError(
                f"{path}: annotation {ann['id']} has unknown category_id {ann['category_id']}"
            )
        if int(ann["id"]) in seen:  # ann_ids are the ground truth's ids: a duplicate breaks evaluation
            raise CocoFormatError(f"{path}: annotation id {ann['id']} appears twice")
        seen.add(int(ann["id"]))
        box = [float(v) for v in ann["bbox"]]
        if len(box) != 4:
            raise CocoFormatError(f"{path}: annotation {ann['id']} bbox must have 4 numbers")
        rec["boxes"].append(box)
        rec["category_ids"].append(int(ann["category_id"]))
        rec["iscrowd"].append(int(ann["iscrowd"]))
        # COCOeval's area ranges use 'area' (mask area), not the box area; keep it when present.
        rec["areas"].append(float(ann.get("area", box[2] * box[3])))
        rec["ann_ids"].append(int(ann["id"]))
    caption_anns: list[tuple[Path, dict[str, Any]]] = []
    for path in cap_paths:
        caps = _load(path, CAPTION_KEYS)
        for i, im in enumerate(caps["images"]):
            if int(im["id"]) in boxed:
                continue
            missing = [k for k in CAPTION_IMAGE_KEYS if k not in im]
            if missing:
                raise CocoFormatError(f"{path}: images[{i}] is missing key '{missing[0]}'")
            _add_image(records, origin, path, im)
        caption_anns += [(path, ann) for ann in caps["annotations"]]
    for path, ann in sorted(caption_anns, key=lambda pa: int(pa[1].get("id", 0))):
        rec = records.get(int(ann["image_id"]))
        if rec is None:
            raise CocoFormatError(
                f"{path}: caption {ann.get('id', '?')} refers to unknown image {ann['image_id']}"
            )
        rec["captions"].append(str(ann["caption"]).strip())
    for iid, rec in records.items():
        rec["tasks"] = task_list(iid in boxed, bool(rec["captions"]))
    return [records[k] for k in sorted(records)], [cats[k] for k in sorted(cats)]


def annotation_description(path: PathArg, prefix_bytes: int = 1 << 16) -> str:
    """``info.description`` of a COCO JSON file ("COCO 2017 Dataset"), or "" where it has none.

    Read from the file's first ``prefix_bytes`` only (COCO files start with ``info``), so a 450 MB
    instances file is not parsed a second time.
    """
    with open(path, "rb") as f:
        head = f.read(prefix_bytes).decode("utf-8", errors="ignore")
    start = re.match(r'\s*\{\s*"info"\s*:\s*', head)
    if start is None:
        return ""
    try:
        info, _ = json.JSONDecoder().raw_decode(head, start.end())
    except json.JSONDecodeError:
        return ""
    return str(info.get("description", "")) if isinstance(info, dict) else ""


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from an image's header (no decode); (0, 0) if unreadable: the writer then skips it."""
    try:
        with Image.open(path) as im:
            return int(im.width), int(im.height)
    except (OSError, ValueError):
        return 0, 0


IMAGE_INFO_KEYS = {"images": ("id", "file_name")}


def load_image_info(path: PathArg, images_dir: PathArg) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Records of an image list without annotations (COCO's ``image_info_test-dev2017.json``).

    Each record is labelled for nothing (``tasks`` empty): a split to predict on, not to score. Sizes come
    from the file where it gives them, else from the JPEG headers in ``images_dir``. Categories are the
    file's (test-dev lists COCO's 80), [] where it has none.

    Raises:
        CocoFormatError: not an image list, or an image id given twice.
    """
    data = _load(path, IMAGE_INFO_KEYS, "an image info file")
    records: dict[int, dict[str, Any]] = {}
    for im in data["images"]:
        iid = int(im["id"])
        if iid in records:
            raise CocoFormatError(f"{path}: image id {iid} appears twice")
        if "width" in im and "height" in im:
            size = int(im["width"]), int(im["height"])
        else:
            size = _image_size(Path(images_dir) / str(im["file_name"]))
        records[iid] = {**_empty_record(iid, str(im["file_name"]), *size), "tasks": []}
    cats = sorted(
        (
            {"id": int(c["id"]), "name": str(c["name"]), "supercategory": str(c.get("supercategory", ""))}
            for c in data.get("categories", [])
        ),
        key=lambda c: c["id"],
    )
    return [records[k] for k in sorted(records)], cats


def load_karpathy(
    path: PathArg,
    split: str,
    instances: PathArg | Sequence[PathArg] | None = None,
    captions: PathArg | Sequence[PathArg] | None = None,
    images_dir: PathArg | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Records of one Karpathy split of COCO 2014 (``dataset_coco.json``).

    Args:
        path: Karpathy's ``dataset_coco.json``.
        split: "train" (Karpathy's train + restval), "val" or "test".
        instances: COCO 2014 instances file(s) (train2014 and val2014): boxes, categories and sizes;
            every image of the split must be in them. Without them the split is captions-only.
        captions: COCO captions file(s) to take captions from instead of the sentences' raw text.
        images_dir: The COCO root holding ``train2014/`` and ``val2014/``; image sizes are read from the
            JPEG headers there when neither instances nor captions files are given.

    Returns:
        ``(records, categories)`` as :func:`load_records`, sorted by image id; ``file_name`` is
        ``filepath/filename`` (relative to the COCO root).

    Raises:
        CocoFormatError: unknown split, not a Karpathy file, or an image of the split missing from the
            instances (or captions) files.
        ValueError: sizes are needed from the images but ``images_dir`` is None.
    """
    if split not in KARPATHY_SPLITS:
        raise CocoFormatError(
            f"{path}: unknown Karpathy split {split!r} (choose from {', '.join(KARPATHY_SPLITS)}; "
            "train takes train + restval)"
        )
    data = _load(path, KARPATHY_KEYS, "a Karpathy dataset_coco.json")
    picked: dict[int, tuple[int, dict[str, Any]]] = {}
    for i, im in enumerate(data["images"]):
        if im["split"] in KARPATHY_SPLITS[split]:
            if int(im["cocoid"]) in picked:
                raise CocoFormatError(f"{path}: cocoid {im['cocoid']} appears twice in split {split!r}")
            picked[int(im["cocoid"])] = (i, im)
    if not picked:
        raise CocoFormatError(f"{path}: no images in Karpathy split {split!r}")
    categories: list[dict[str, Any]] = []
    base: dict[int, dict[str, Any]] | None = None
    if instances is not None or captions is not None:
        recs, categories = load_records(instances, captions)
        base = {r["image_id"]: r for r in recs}
        names = [str(p) for p in _paths(instances if instances is not None else captions)]
        kind = "instances" if instances is not None else "captions"
        for cid in sorted(picked):
            # With instances, an image only in a captions file would silently lose its boxes.
            if cid not in base or (instances is not None and not record_tasks(base[cid])[0]):
                raise CocoFormatError(
                    f"{path}: cocoid {cid} of Karpathy split {split!r} is not in the {kind} file(s) {names}"
                )
    elif images_dir is None:
        raise ValueError(
            "load_karpathy needs images_dir to read image sizes without instances/captions files"
        )
    records = []
    for cid in sorted(picked):
        i, im = picked[cid]
        file_name = "/".join(p for p in (str(im["filepath"]), str(im["filename"])) if p)
        if base is not None:
            rec = dict(base[cid], file_name=file_name)
        else:
            assert images_dir is not None
            rec = _empty_record(cid, file_name, *_image_size(Path(images_dir) / file_name))
        if captions is None:
            sentences = im["sentences"]
            for j, s in enumerate(sentences):
                if not isinstance(s, dict) or "raw" not in s:
                    raise CocoFormatError(f"{path}: images[{i}].sentences[{j}] is missing key 'raw'")
            rec["captions"] = [str(s["raw"]).strip() for s in sentences]
        rec["tasks"] = task_list(instances is not None, bool(rec["captions"]))
        records.append(rec)
    return records, categories


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


def label_categories(categories: Sequence[dict[str, Any]]) -> tuple[list[int], list[str]]:
    """Original COCO id and name of each label 1..K (labels follow the sorted category ids)."""
    cats = sorted(categories, key=lambda c: int(c["id"]))
    return [int(c["id"]) for c in cats], [str(c["name"]) for c in cats]
