"""Turn a COCO split (JPEG dir + instances and/or captions JSON) into WebDataset shards + a manifest.

``ticod-shard-coco`` (installed), ``python -m ticod.shard_coco`` or ``python tools/shard_coco.py`` (a
checkout). Example (real COCO 2017)::

    ticod-shard-coco --images coco/train2017 \\
        --instances coco/annotations/instances_train2017.json \\
        --captions coco/annotations/captions_train2017.json \\
        --out data/shards --split train --workers 8 --train-tokenizer 8000

One sample per image: ``<id>.jpg`` (original bytes, untouched) and ``<id>.json`` (boxes in COCO xywh,
original category ids, crowd flags, areas, annotation ids, all captions, and ``tasks``: what the image is
labelled for). Output order is by image id whatever ``--workers`` is.

Partial labels: ``--instances`` and ``--captions`` are each optional (one or more files each; several
merge), at least one is needed. Images of an instances file are labelled for boxes: those without boxes
are kept as negatives, crowd boxes are kept and flagged, and those without captions follow
``--missing-captions`` (kept as boxes-only samples by default). Images only in a captions file are
captions-only samples (no categories for a captions-only set). Missing or undecodable images are skipped
and reported (``--strict`` fails instead). An output dir that already has this split's shards is refused
unless ``--overwrite`` (which deletes them first), so runs never mix.

Karpathy splits of COCO 2014: ``--karpathy dataset_coco.json --split train|val|test`` (train = train +
restval) with ``--images`` the COCO root holding ``train2014/`` and ``val2014/``. Captions are the
sentences' raw text unless ``--captions`` files are given; boxes come from ``--instances`` (pass the
train2014 and val2014 files); without them the split is captions-only and image sizes are read from the
JPEG headers.

A test split without labels (COCO test-dev): ``--image-info image_info_test-dev2017.json --split test``.
Every listed image is kept, labelled for nothing; sizes come from the file, else the JPEG headers. An
evaluation of such a split writes the results files (``detections.json``, ``captions.json``) unscored.

``--train-tokenizer VOCAB`` also trains a byte-level BPE of that vocabulary size on the written
samples' captions and saves it to ``OUT/tokenizer`` (use it with ``data.tokenizer=""`` or that path).
Exit status: 0 on success, 1 on a data error (message on stderr).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ticod.data.coco import (
    CocoFormatError,
    annotation_description,
    load_image_info,
    load_karpathy,
    load_records,
)
from ticod.data.shards import MISSING_CAPTIONS, VERIFY_MODES, ShardError, sha256_file, write_shards


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--images", required=True, help="directory with the split's JPEG files (--karpathy: the COCO root)"
    )
    p.add_argument(
        "--instances", nargs="+", help="COCO instances_*.json file(s): boxes (without: a captions-only set)"
    )
    p.add_argument("--captions", nargs="+", help="COCO captions_*.json file(s) (without: a boxes-only set)")
    p.add_argument(
        "--image-info",
        metavar="PATH",
        help="an image list without annotations (image_info_test-dev2017.json): a test split, predicted and "
        "written as results files, not scored; sizes from the file or the JPEG headers",
    )
    p.add_argument(
        "--karpathy", metavar="PATH", help="Karpathy dataset_coco.json: write its --split (train/val/test)"
    )
    p.add_argument("--out", required=True, help="output directory for shards and manifest")
    p.add_argument(
        "--dataset",
        default="",
        help="the dataset's public name, kept in the manifest for model cards (default: from the annotation "
        "file's info.description, 'COCO 2017 Dataset' -> coco)",
    )
    p.add_argument(
        "--split",
        default="train",
        help="name prefix of the shards (default: train); with --karpathy also the Karpathy split "
        "(train = train + restval, val, test)",
    )
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument(
        "--max-shard-bytes", type=int, default=0, help="start a new shard before this size (0: off)"
    )
    p.add_argument("--workers", type=int, default=1, help="processes reading and checking images")
    p.add_argument("--limit", type=int, default=0, help="only the first N images by id (0: all)")
    p.add_argument("--strict", action="store_true", help="fail on a missing or unreadable image")
    p.add_argument(
        "--missing-captions",
        choices=MISSING_CAPTIONS,
        default="keep",
        help="box-labelled images without captions: keep them as boxes-only samples (default), skip "
        "them, or fail",
    )
    p.add_argument("--overwrite", action="store_true", help="replace this split's existing shards in --out")
    p.add_argument(
        "--train-tokenizer", type=int, default=0, metavar="VOCAB", help="train a BPE into OUT/tokenizer"
    )
    p.add_argument(
        "--verify",
        choices=VERIFY_MODES,
        default="decode",
        help="JPEG check: draft-decode every image (default) or only parse its headers and find its end "
        "marker (~3x faster; what only a decode finds is then skipped and counted by the training loader)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if not (a.instances or a.captions or a.karpathy or a.image_info):
        p.error("at least one of --instances, --captions, --karpathy or --image-info is required")
    if a.image_info and (a.instances or a.captions or a.karpathy):
        p.error("--image-info is a split without labels: give it without --instances, --captions, --karpathy")
    return a


def _file(path: str, **extra: str) -> dict[str, str]:
    return {"path": str(Path(path).resolve()), "sha256": sha256_file(path), **extra}


def _sources(a: argparse.Namespace) -> dict[str, object]:
    """Manifest provenance: every annotation file with its sha256 (``instances[1]`` ... when several)."""
    sources: dict[str, object] = {}
    if a.karpathy:
        sources["karpathy"] = _file(a.karpathy, split=a.split)
    if a.image_info:
        sources["image_info"] = _file(a.image_info)
    for kind in ("instances", "captions"):
        paths = getattr(a, kind) or []
        for i, path in enumerate(paths):
            sources[kind if len(paths) == 1 else f"{kind}[{i}]"] = _file(path)
    sources["images"] = str(Path(a.images).resolve())
    return sources


def dataset_name(a: argparse.Namespace) -> str:
    """``--dataset``, else a slug of the first annotation file's ``info.description`` (years and the word
    "dataset" dropped: "COCO 2017 Dataset" -> "coco"), else the name of the images' folder."""
    if a.dataset:
        return a.dataset
    for path in [*(a.instances or []), *(a.captions or []), *([a.image_info] if a.image_info else [])]:
        words = re.findall(r"[a-z0-9]+", annotation_description(path).split("(")[0].lower())
        words = [w for w in words if w != "dataset" and not re.fullmatch(r"(19|20)\d\d", w)]
        if words:
            return "-".join(words)
    images = Path(a.images).resolve()
    return images.name if a.karpathy else images.parent.name  # the COCO root / coco/train2017 -> coco


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        if a.karpathy:
            records, categories = load_karpathy(a.karpathy, a.split, a.instances, a.captions, a.images)
        elif a.image_info:
            records, categories = load_image_info(a.image_info, a.images)
        else:
            records, categories = load_records(a.instances, a.captions)
        if a.limit:
            records = records[: a.limit]
        sources = _sources(a)
        dataset = dataset_name(a)
        manifest, summary = write_shards(
            records,
            categories,
            a.images,
            a.out,
            a.split,
            samples_per_shard=a.samples_per_shard,
            max_shard_bytes=a.max_shard_bytes,
            workers=a.workers,
            strict=a.strict,
            missing_captions=a.missing_captions,
            overwrite=a.overwrite,
            sources=sources,
            progress=not a.no_progress,
            verify=a.verify,
            dataset=dataset,
            unlabelled=bool(a.image_info),
        )
    except (CocoFormatError, ShardError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"split '{a.split}' -> {a.out}\n{summary.text()}")
    if a.train_tokenizer:
        from ticod.data.tokenizer import train_caption_tokenizer

        written = {int(k) for s in manifest["shards"] for k in s["keys"]}
        captions = [c for r in records if r["image_id"] in written for c in r["captions"]]
        tok = train_caption_tokenizer(captions, Path(a.out) / "tokenizer", a.train_tokenizer)
        print(
            f"tokenizer: {len(tok)} tokens trained on {len(captions)} captions -> {Path(a.out) / 'tokenizer'}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
