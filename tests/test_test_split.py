"""A test split without labels (COCO test-dev): sharded from an image list, evaluated into results files.

The results files go to test servers, so they must load in pycocotools as they are: the demo val split
sharded twice, with its labels and as an image list without them, gives the same detections; those of
the image list are not scored and load with ``COCO.loadRes``.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from ticod.config import load_config
from ticod.data.shards import iter_shard_records, read_manifest
from ticod.evaluate import UNSCORED, run_evaluation
from ticod.factory import build_model, build_tokenizer
from ticod.shard_coco import main as shard_coco


def image_info(instances: Path, out: Path, drop_sizes_of: int = 0) -> Path:
    """An ``image_info_*.json`` as COCO ships for test-dev: images and categories, no annotations; the
    first ``drop_sizes_of`` images without width/height (read from the JPEG headers then)."""
    data = json.loads(instances.read_text())
    images = [dict(im) for im in data["images"]]
    for im in images[:drop_sizes_of]:
        del im["width"], im["height"]
    info = {"info": data.get("info", {}), "images": images, "categories": data["categories"]}
    out.write_text(json.dumps(info))
    return out


def test_shard_an_image_list_without_annotations(coco_sample, tmp_path):
    info = image_info(coco_sample / "instances_train2017.json", tmp_path / "image_info.json", drop_sizes_of=5)
    args = ["--images", coco_sample / "images", "--image-info", info, "--out", tmp_path / "shards"]
    args += ["--split", "test", "--limit", "12", "--no-progress", "--verify", "header"]
    assert shard_coco([str(a) for a in args]) == 0
    manifest = read_manifest(tmp_path / "shards", "test")
    assert manifest["total_samples"] == 12 and manifest["tasks"]["none"] == 12
    assert manifest["num_boxes"] == 0 and manifest["num_captions"] == 0 and manifest["dataset"] == "coco"
    assert len(manifest["categories"]) == 80
    for rec in iter_shard_records(tmp_path / "shards", "test"):
        assert rec["tasks"] == [] and rec["boxes"] == [] and rec["captions"] == []
        with Image.open(coco_sample / "images" / rec["file_name"]) as im:  # from the JSON or the header
            assert (rec["width"], rec["height"]) == im.size
    # Labels and an image list do not mix.
    with pytest.raises(SystemExit):
        shard_coco([str(a) for a in [*args, "--instances", coco_sample / "instances_train2017.json"]])


@pytest.fixture(scope="module")
def val_as_test_split(demo_coco_dir, tmp_path_factory) -> Path:
    """The demo val images sharded as a test split (``test``), from an image list without sizes."""
    out = tmp_path_factory.mktemp("test_split")
    info = image_info(demo_coco_dir / "annotations" / "instances_val.json", out / "image_info.json", 3)
    args = [
        "--images",
        demo_coco_dir / "val",
        "--image-info",
        info,
        "--out",
        out / "shards",
        "--split",
        "test",
    ]
    assert shard_coco([str(a) for a in [*args, "--no-progress", "--samples-per-shard", "3"]]) == 0
    return out / "shards"


def evaluate_split(cfg, categories, out_dir: Path) -> dict:
    tokenizer = build_tokenizer(cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer).eval()
    result = run_evaluation(
        model, cfg, tokenizer, categories, rank=0, world_size=1, device=torch.device("cpu"), out_dir=out_dir
    )
    return result.metrics


def test_a_split_without_labels_gives_results_files_that_load_in_pycocotools(
    demo_shards_dir, val_as_test_split, tmp_path
):
    common = [f"data.tokenizer={demo_shards_dir / 'tokenizer'}", "eval.bertscore=false", "data.num_workers=0"]
    common += ["model.roi.score_thresh=0.0", "model.roi.detections_per_img=20"]  # boxes from a random model
    categories = read_manifest(demo_shards_dir, "train")["categories"]
    labelled = load_config("demo", [*common, f"data.shards_dir={demo_shards_dir}", "data.val_split=val"])
    unlabelled = load_config("demo", [*common, f"data.shards_dir={val_as_test_split}", "data.val_split=test"])

    scored = evaluate_split(labelled, categories, tmp_path / "val")
    results = evaluate_split(unlabelled, categories, tmp_path / "test")
    assert "AP" in scored and "AP" not in results and "BLEU-4" not in results
    assert results["scoring"] == UNSCORED and results["num_images"] == scored["num_images"] == 8
    assert not (tmp_path / "test" / "per_class.csv").exists()

    detections = json.loads((tmp_path / "test" / "detections.json").read_text())
    # The same model on the same images: the detections of the labelled split, every image's.
    assert detections == json.loads((tmp_path / "val" / "detections.json").read_text())
    assert len(detections) == results["num_detections"] > 0
    info = json.loads((val_as_test_split.parent / "image_info.json").read_text())
    gt = COCO()
    gt.dataset = {"images": info["images"], "categories": info["categories"], "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        loaded = gt.loadRes(str(tmp_path / "test" / "detections.json"))
    assert len(loaded.getAnnIds()) == len(detections)
    assert {d["category_id"] for d in detections} <= {c["id"] for c in categories}  # the source's ids
    for ann, det in zip(loaded.loadAnns(loaded.getAnnIds()), detections, strict=True):
        assert ann["bbox"] == det["bbox"] and ann["area"] == pytest.approx(det["bbox"][2] * det["bbox"][3])

    captions = json.loads((tmp_path / "test" / "captions.json").read_text())
    assert sorted(c["image_id"] for c in captions) == sorted(im["id"] for im in info["images"])
    assert all(set(c) == {"image_id", "caption"} and isinstance(c["caption"], str) for c in captions)
