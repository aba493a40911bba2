"""Real COCO data end to end, and a partial-label mix: train, evaluate each source, predict.

The 80 real train2017 images of ``../shared/coco_sample`` (tests skip without it) go through the shard tool
as users run it; the demo-size model trains a few steps on them with all 80 categories, then on a mix of
the demo shards (boxes and captions), half of the COCO images with boxes only and the other half with
captions only.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from helpers import ok, run_killing_group, run_train, train_log

from ticod.shard_coco import main as shard_coco

pytestmark = [pytest.mark.slow, pytest.mark.parallel_ok]  # trainers of one process

REAL = ["data.num_workers=0", "data.eval_batch_size=4", "eval.at_end=true", "eval.bertscore=false"]


def write_subset(coco: Path, out: Path, ids: list[int], kind: str) -> Path:
    """The ``kind`` ("instances" or "captions") annotations of ``ids``, as a COCO file of its own."""
    data = json.loads((coco / f"{kind}_train2017.json").read_text())
    keep = set(ids)
    data["images"] = [im for im in data["images"] if im["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    path = out / f"{kind}_{len(ids)}_{min(ids)}.json"
    path.write_text(json.dumps(data))
    return path


def shard(
    coco: Path, out: Path, split: str, instances: Path | None, captions: Path | None, *extra: str
) -> None:
    args = ["--images", str(coco / "images"), "--out", str(out), "--split", split, "--no-progress"]
    args += ["--instances", str(instances)] if instances else []
    args += ["--captions", str(captions)] if captions else []
    assert shard_coco([*args, "--samples-per-shard", "10", *extra]) == 0


def eval_rows(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return {k: v for r in rows for k, v in r.items() if k.startswith("eval/")}


@pytest.fixture(scope="module")
def coco_shards(coco_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``full``: all 80 images, both labels (val: the first 12); ``boxes``/``caps``: the even/odd images
    with boxes only / captions only (val: 6 of each)."""
    out = tmp_path_factory.mktemp("coco_real")
    ids = sorted(
        im["id"] for im in json.loads((coco_sample / "instances_train2017.json").read_text())["images"]
    )
    full = out / "full"
    inst, caps = coco_sample / "instances_train2017.json", coco_sample / "captions_train2017.json"
    shard(coco_sample, full, "train", inst, caps, "--train-tokenizer", "400")
    val = [write_subset(coco_sample, out, ids[:12], kind) for kind in ("instances", "captions")]
    shard(coco_sample, full, "val", *val)
    even, odd = ids[0::2], ids[1::2]
    shard(coco_sample, out / "boxes", "train", write_subset(coco_sample, out, even, "instances"), None)
    shard(coco_sample, out / "boxes", "val", write_subset(coco_sample, out, even[:6], "instances"), None)
    shard(coco_sample, out / "caps", "train", None, write_subset(coco_sample, out, odd, "captions"))
    shard(coco_sample, out / "caps", "val", None, write_subset(coco_sample, out, odd[:6], "captions"))
    return {"full": full, "boxes": out / "boxes", "caps": out / "caps"}


def test_real_coco_sample_trains_on_80_classes_evaluates_and_predicts(coco_shards, coco_sample, tmp_path):
    full = coco_shards["full"]
    manifest = json.loads((full / "train-manifest.json").read_text())
    assert manifest["total_samples"] == 80 and len(manifest["categories"]) == 80
    assert manifest["num_crowd_boxes"] == 8 and manifest["num_boxes"] == 739
    run = tmp_path / "run"
    # After 3 steps class scores are ~1/81: keep every box, so the category ids below are checked.
    over = [f"data.shards_dir={full}", "model.num_classes=80", "model.roi.score_thresh=0", "max_steps=3"]
    ok(run_train([f"run_dir={run}", *over, *REAL]))
    rows = train_log(run)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["train/loss"]) for r in rows)
    metrics = eval_rows(run)
    assert metrics["eval/num_images"] == 12 and metrics["eval/num_box_images"] == 12
    for key in ("eval/AP", "eval/BLEU-4", "eval/CIDEr"):
        assert math.isfinite(metrics[key]), key
    detections = json.loads((run / "eval" / "step_00000003" / "detections.json").read_text())
    assert detections and {d["category_id"] for d in detections} <= {c["id"] for c in manifest["categories"]}

    images = sorted((coco_sample / "images").glob("*.jpg"))[:2]
    cmd = [sys.executable, "-m", "ticod.predict", "--checkpoint", str(run / "export"), *map(str, images)]
    ok(
        run_killing_group(
            [*cmd, "--out", str(tmp_path / "pred"), "--score-threshold", "0"], env=None, timeout=300
        )
    )
    coco_ids = {c["id"] for c in manifest["categories"]}
    for image in images:
        pred = json.loads((tmp_path / "pred" / f"{image.stem}.json").read_text())
        assert pred["detections"] and {d["category_id"] for d in pred["detections"]} <= coco_ids
        assert isinstance(pred["caption"], str)


def test_partial_label_mix_trains_and_reports_each_source(coco_shards, demo_shards_dir, tmp_path):
    boxes, caps = coco_shards["boxes"], coco_shards["caps"]
    assert json.loads((boxes / "train-manifest.json").read_text())["tasks"]["boxes"] == 40
    assert json.loads((caps / "train-manifest.json").read_text())["tasks"]["captions"] == 40
    sources = (
        f"data.sources=[{{name: shapes, shards_dir: {demo_shards_dir}, weight: 2}}, "
        f"{{name: coco_boxes, shards_dir: {boxes}}}, {{name: coco_caps, shards_dir: {caps}}}]"
    )
    common = [sources, f"data.tokenizer={demo_shards_dir / 'tokenizer'}", *REAL]
    run = tmp_path / "run"
    # The shapes' 6 categories and COCO's 80 share no name: 86 labels. The error names the sources' share.
    bad = run_train([f"run_dir={run}", "model.num_classes=80", "max_steps=1", *common])
    assert bad.returncode != 0 and "86 categories after merging by name" in bad.stderr
    assert "80 from coco_boxes" in bad.stderr

    ok(run_train([f"run_dir={run}", "model.num_classes=86", "max_steps=4", *common]))
    rows = train_log(run)
    last = rows[-1]
    per_source = {k: v for k, v in last.items() if k.startswith("train/samples/")}
    assert set(per_source) <= {"train/samples/shapes", "train/samples/coco_boxes", "train/samples/coco_caps"}
    assert sum(per_source.values()) == last["train/samples"] == 4 * 2
    assert all(math.isfinite(r["train/loss"]) for r in rows)

    metrics = eval_rows(run)
    # Each source on its own val split and its own labels: boxes where it has them, captions likewise.
    assert metrics["eval/shapes/num_images"] == 8 and math.isfinite(metrics["eval/shapes/AP"])
    assert math.isfinite(metrics["eval/shapes/BLEU-4"])
    assert metrics["eval/coco_boxes/num_box_images"] == 6 and math.isfinite(metrics["eval/coco_boxes/AP"])
    assert metrics["eval/coco_boxes/num_caption_images"] == 0 and "eval/coco_boxes/BLEU-4" not in metrics
    assert metrics["eval/coco_caps/num_box_images"] == 0 and "eval/coco_caps/AP" not in metrics
    assert metrics["eval/coco_caps/num_caption_images"] == 6 and math.isfinite(
        metrics["eval/coco_caps/CIDEr"]
    )
    step = run / "eval" / "step_00000004"
    for name in ("shapes", "coco_boxes", "coco_caps"):
        assert (step / name / "metrics.json").is_file()
    assert json.loads((step / "metrics.json").read_text())["coco_caps/num_caption_images"] == 6
    card = (run / "export" / "README.md").read_text()
    assert "shapes+coco_boxes+coco_caps" in card and "coco_boxes/train" in card

    # A requeue that resumes the mix goes on; one onto other data says so.
    more = [f"run_dir={run}", "model.num_classes=86", "max_steps=5", "checkpoint.resume=auto"]
    reweighted = common[0].replace("weight: 2", "weight: 3")
    resumed = run_train([*more, reweighted, *common[1:], "eval.at_end=false"])
    ok(resumed)
    assert "the training data changed since the checkpoint" in resumed.stderr
    assert [r["step"] for r in train_log(run)][-1] == 5
