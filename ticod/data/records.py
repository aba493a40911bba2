"""The per-image record (the ``.json`` member of a shard sample): what it is labelled for, and the
pycocotools ground truth a set of records gives.

A record holds ``image_id``, ``file_name``, ``width``, ``height``, ``boxes`` (xywh), ``category_ids``,
``iscrowd``, ``areas``, ``ann_ids``, ``captions`` and ``tasks``: what its image is labelled for, a subset
of :data:`TASKS` in that order. ``"boxes"`` with an empty box list is an image annotated to have no
objects (a negative), while an image not annotated for boxes has no ``"boxes"`` in ``tasks``. Records
written before ``tasks`` existed are read with :func:`record_tasks`.

The COCO readers (:mod:`ticod.data.coco`) make records, the shard writer and readers
(:mod:`ticod.data.shards`) store and read them; both import this module and not each other.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

TASKS = ("boxes", "captions")  # what a record can be labelled for, in the order of its "tasks" list


def record_tasks(record: dict[str, Any]) -> tuple[bool, bool]:
    """``(has_boxes, has_caption)`` of a per-image record.

    Records without ``tasks`` (written before it existed) were all box-labelled. A caption task with an
    empty caption list counts as no caption: there is nothing to train or score against.
    """
    tasks = record.get("tasks")
    if tasks is None:
        return True, bool(record["captions"])
    return "boxes" in tasks, "captions" in tasks and bool(record.get("captions"))


def task_list(has_boxes: bool, has_caption: bool) -> list[str]:
    """The ``tasks`` entry of a record with these labels."""
    return [t for t, on in zip(TASKS, (has_boxes, has_caption), strict=True) if on]


def coco_ground_truth(
    records: Iterable[dict[str, Any]], categories: Sequence[dict[str, Any]]
) -> tuple[dict[str, Any], dict[int, list[str]]]:
    """Per-image records -> (COCO instances dict for ``pycocotools.coco.COCO``, image id -> captions).

    Partial labels: the instances hold only the images labelled for boxes (with an empty box list: a
    negative), the captions only the images labelled for captions; box and caption metrics are then taken
    over exactly those.
    """
    images, annotations, refs = [], [], {}
    for rec in records:
        iid = int(rec["image_id"])
        has_boxes, has_caption = record_tasks(rec)
        if has_caption:
            refs[iid] = list(rec["captions"])
        if not has_boxes:
            continue
        images.append(
            {"id": iid, "file_name": rec["file_name"], "width": rec["width"], "height": rec["height"]}
        )
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
