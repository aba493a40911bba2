"""Evaluation: prediction -> COCO conversion, exactly-once counting, and world size 1 vs 2 (gloo, CPU).

The model is a tiny random-init TICOD. To make its metrics informative (not all zero), the ground truth
is built from its own predictions on some images, plus boxes and captions it does not predict: AP and
BLEU land strictly between 0 and 1, so a lost or double-counted image would change them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import minilm_dir
from tiny_model import (
    BATCH,
    CATEGORY_IDS,
    CATEGORY_NAMES,
    EOS,
    MEAN,
    NUM_CLASSES,
    NUM_IMAGES,
    STD,
    build_eval_model,
    eval_config,
    ground_truth_from,
    make_batches,
    predict_batches,
    save_ground_truth,
    word_tokenizer,
)

from ticod.config import Config
from ticod.data.coco import label_categories
from ticod.data.eval_stream import build_eval_loader
from ticod.data.tokenizer import load_tokenizer
from ticod.evaluate import (
    EvalCountError,
    _predict,
    coco_detections,
    dedupe,
    evaluate,
    render_sample,
    to_records,
)
from ticod.ground_truth import GroundTruth, load_ground_truth, subset
from ticod.models import TICOD
from ticod.visualize import label_color


# ------------------------------------------------------------------------------------ unit tests
def test_records_and_coco_results_use_original_ids_and_xywh():
    tok = word_tokenizer()
    outputs = [
        {
            "boxes": torch.tensor([[10.0, 20.0, 50.0, 80.0], [0.0, 0.0, 5.0, 5.0]]),
            "scores": torch.tensor([0.9, 0.2]),
            "labels": torch.tensor([2, 4]),
            "caption_ids": torch.tensor([5, 6, 7]),
        },
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
        | {"caption_ids": torch.tensor([], dtype=torch.int64)},
    ]
    meta = [{"image_id": 139}, {"image_id": 285}]
    records = to_records(outputs, meta, tok)
    assert records[0]["caption"] == "w5 w6 w7" and records[1]["caption"] == ""
    assert coco_detections(records, CATEGORY_IDS, score_threshold=0.0) == [
        {"image_id": 139, "category_id": 5, "bbox": [10.0, 20.0, 40.0, 60.0], "score": pytest.approx(0.9)},
        {"image_id": 139, "category_id": 11, "bbox": [0.0, 0.0, 5.0, 5.0], "score": pytest.approx(0.2)},
    ]
    assert len(coco_detections(records, CATEGORY_IDS, score_threshold=0.5)) == 1
    json.dumps(records)  # plain Python: picklable and JSON-able


def test_dedupe_counts_every_image_exactly_once():
    recs = [{"image_id": i} for i in (3, 1, 2, 1)]  # a loader may repeat samples to even out ranks
    assert [r["image_id"] for r in dedupe(recs, [1, 2, 3])] == [1, 2, 3]
    with pytest.raises(EvalCountError, match="1 missing"):
        dedupe(recs, [1, 2, 3, 4])
    assert len(dedupe(recs, [1, 2, 3, 4], bad_samples=1)) == 3  # a skipped (bad) sample may be missing
    with pytest.raises(EvalCountError, match="1 not in the ground truth"):
        dedupe(recs, [1, 2])


def test_render_sample_draws_on_the_denormalised_image():
    image = torch.zeros(3, 20, 30)  # normalised zeros = the mean colour
    record = {
        "image_id": 7,
        "boxes": [[2.0, 2.0, 40.0, 30.0]],
        "scores": [0.9],
        "labels": [3],
        "caption": "w5",
    }
    pil, caption = render_sample(image, {"scale": 0.5}, record, CATEGORY_NAMES, MEAN, STD)
    assert caption == "7: w5" and pil.width == 30 and pil.height > 20  # caption band below
    assert pil.getpixel((29, 19)) == tuple(round(m * 255) for m in MEAN)  # outside the box: the mean colour
    assert pil.getpixel((1, 12)) == label_color("train")  # left edge of the box, scaled by 0.5 to x = 1


def test_evaluate_single_process_writes_consistent_outputs(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ticod")
    cfg = eval_config()
    model, tok, batches = build_eval_model(cfg), word_tokenizer(), make_batches()
    records = [r for recs in predict_batches(model, batches) for r in recs]
    gt = ground_truth_from(records)
    cfg.eval.bertscore = False
    cfg.eval.num_sample_images = 3
    result = evaluate(
        model,
        batches,
        gt=gt,
        category_ids=CATEGORY_IDS,
        category_names=CATEGORY_NAMES,
        tokenizer=tok,
        cfg=cfg.eval,
        rank=0,
        world_size=1,
        out_dir=tmp_path,
        device=torch.device("cpu"),
        image_mean=MEAN,
        image_std=STD,
    )
    m = result.metrics
    assert m["num_images"] == NUM_IMAGES and m["bad_samples"] == 0
    assert 0.0 < m["AP"] < 1.0 and 0.0 < m["AP50"] < 1.0
    assert 0.0 < m["BLEU-4"] < 1.0 and m["CIDEr"] > 0.0
    assert "BERTScore-F1" not in m
    assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(m)
    dets = json.loads((tmp_path / "detections.json").read_text())
    assert len(dets) == m["num_detections"] == sum(len(r["boxes"]) for r in records)
    assert dets == coco_detections(records, CATEGORY_IDS, 0.0)
    caps = json.loads((tmp_path / "captions.json").read_text())
    assert caps == [{"image_id": r["image_id"], "caption": r["caption"]} for r in records]
    assert len(result.sample_images) == 3
    # Per-class AP: a CSV beside metrics.json, a wandb table, the worst classes on the console.
    columns, rows = result.tables["per_class"]
    assert [r[columns.index("name")] for r in rows] == CATEGORY_NAMES
    assert (tmp_path / "per_class.csv").read_text().count("\n") == 1 + NUM_CLASSES
    assert any("worst of" in r.getMessage() and "per_class.csv" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------- world size 1 vs 2
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(
    rank: int, world_size: int, port: int, out_dir: str, gt_file: str, drop_last_batch: bool
) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        cfg = eval_config(f"eval.bertscore_model={minilm_dir()}", "eval.bertscore_num_layers=6")
        gt = GroundTruth(**torch.load(gt_file, weights_only=False))
        batches = make_batches()
        if drop_last_batch:
            batches = batches[:-1]
        mine = batches[rank::world_size]  # uneven: 4 batches of 2, 2, 2, 1 images
        if world_size == 2 and rank == 1 and not drop_last_batch:
            mine = [*mine, batches[0]]  # a repeated sample, as loaders that even out ranks produce
        try:
            evaluate(
                build_eval_model(cfg),
                mine,
                gt=gt,
                category_ids=CATEGORY_IDS,
                category_names=CATEGORY_NAMES,
                tokenizer=word_tokenizer(),
                cfg=cfg.eval,
                rank=rank,
                world_size=world_size,
                out_dir=out_dir,
                device=torch.device("cpu"),
                image_mean=MEAN,
                image_std=STD,
            )
        except (EvalCountError, RuntimeError) as e:
            Path(out_dir, f"error_rank{rank}.txt").write_text(f"{type(e).__name__}: {e}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def saved_gt(tmp_path_factory) -> str:
    torch.set_num_threads(1)  # the same kernels as the spawned ranks
    per_batch = predict_batches(build_eval_model(eval_config()), make_batches())
    return save_ground_truth([r for recs in per_batch for r in recs], tmp_path_factory.mktemp("gt"))


def _run(world_size: int, out_dir: Path, gt_file: str, drop_last_batch: bool = False) -> None:
    mp.spawn(
        _rank_main, args=(world_size, _free_port(), str(out_dir), gt_file, drop_last_batch), nprocs=world_size
    )


@pytest.mark.slow
def test_world_size_one_and_two_give_identical_metrics(tmp_path, saved_gt):
    one, two = tmp_path / "ws1", tmp_path / "ws2"
    _run(1, one, saved_gt)
    _run(2, two, saved_gt)
    m1 = json.loads((one / "metrics.json").read_text())
    m2 = json.loads((two / "metrics.json").read_text())
    varying = {"world_size", "predict_time_s", "total_time_s", "samples_read"}
    assert {k: v for k, v in m1.items() if k not in varying} == {
        k: v for k, v in m2.items() if k not in varying
    }
    assert m1["num_images"] == NUM_IMAGES and (m1["world_size"], m2["world_size"]) == (1, 2)
    assert m2["samples_read"] == NUM_IMAGES + BATCH  # rank 1 read a repeated batch, counted once
    assert 0.0 < m1["AP"] < 1.0 and 0.0 < m1["BLEU-4"] < 1.0 and 0.0 < m1["BERTScore-F1"] <= 1.0
    assert m1["bertscore"]["model"] == minilm_dir() and m1["bertscore"]["num_layers"] == 6
    for name in ("detections.json", "captions.json"):
        assert (one / name).read_text() == (two / name).read_text()


@pytest.mark.slow
def test_a_missing_image_fails_on_every_rank(tmp_path, saved_gt):
    _run(2, tmp_path, saved_gt, drop_last_batch=True)
    assert "EvalCountError" in (tmp_path / "error_rank0.txt").read_text()
    assert "1 missing" in (tmp_path / "error_rank1.txt").read_text()
    assert not (tmp_path / "metrics.json").exists()


def test_ground_truth_from_original_coco_json(tmp_path):
    instances = {
        "images": [{"id": 9, "width": 64, "height": 48}, {"id": 4, "width": 32, "height": 32}],
        "annotations": [
            {"id": 1, "image_id": 9, "category_id": 5, "bbox": [1, 2, 10, 20], "area": 150.0, "iscrowd": 0}
        ],
        "categories": [{"id": c, "name": n} for c, n in zip(CATEGORY_IDS, CATEGORY_NAMES, strict=True)],
    }
    captions = {
        "images": instances["images"],
        "annotations": [
            {"id": 1, "image_id": 9, "caption": "A bus."},
            {"id": 2, "image_id": 4, "caption": "A train."},
            {"id": 3, "image_id": 9, "caption": "A red bus."},
        ],
    }
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    gt = load_ground_truth(str(tmp_path / "instances.json"), str(tmp_path / "captions.json"), "unused", "val")
    assert gt.image_ids == [4, 9]
    assert gt.captions == {9: ["A bus.", "A red bus."], 4: ["A train."]}
    assert gt.instances is not None and gt.instances.getAnnIds(imgIds=[9]) == [1]
    assert subset(gt, [9, 77]).image_ids == [9]
    assert label_categories(list(reversed(instances["categories"]))) == (CATEGORY_IDS, CATEGORY_NAMES)


# ------------------------------------------------------------------- streams that own no image
@pytest.mark.parametrize("case", ["max_images", "unreadable_shard"])
def test_streams_without_images_and_unreadable_shards_count_each_image_once(case, demo_shards_dir, tmp_path):
    """4 ranks x 2 workers = 8 streams over the 3 demo val shards (3 + 3 + 2 images): each stream owns a
    contiguous run of one image. With ``eval.max_images=3`` five streams own none and hand out nothing;
    with the middle shard unreadable, the three streams that own its images read no image, count each of
    them bad once, and hand those counts over in a batch of 0 images, which must not reach the model.
    """
    shards, max_images = demo_shards_dir, 0
    if case == "max_images":
        max_images = 3
    else:
        shards = tmp_path / "shards"
        shutil.copytree(demo_shards_dir, shards)
        (shards / "val-000001.tar").write_bytes(b"not a tar archive" * 64)
    cfg = eval_config(f"data.shards_dir={shards}", "data.num_workers=2", "data.eval_batch_size=2")
    cfg.data.test_min_size, cfg.data.max_size = 64, 96  # a few seconds on CPU
    model, tok = build_eval_model(cfg), load_tokenizer(demo_shards_dir / "tokenizer")
    records, bad, empty_batches = [], 0, 0
    for rank in range(4):
        loader = build_eval_loader(cfg.data, tok, rank=rank, world_size=4, max_samples=max_images)
        batches = list(loader)
        empty_batches += sum(not b.meta for b in batches)
        recs, _, rank_bad, _ = _predict(model, batches, tok, torch.device("cpu"), num_samples=0)
        records += recs
        bad += rank_bad
    assert empty_batches == (0 if case == "max_images" else 3)  # the case this test is about
    readable = [0, 1, 2] if case == "max_images" else [0, 1, 2, 6, 7]  # indices into image_ids
    expected_bad = 0 if case == "max_images" else 3
    assert bad == expected_bad
    assert len(loader.image_ids) == (3 if case == "max_images" else 8)
    # The ground truth is rebuilt from the shards (no COCO JSON given), as in training's evaluation.
    gt = subset(load_ground_truth("", "", str(shards), "val"), loader.image_ids)
    assert gt.image_ids == sorted(loader.image_ids)
    unique = dedupe(records, gt.image_ids, bad)  # raises unless each image is counted once
    assert len(records) == len(unique)
    assert sorted(r["image_id"] for r in records) == sorted(loader.image_ids[i] for i in readable)


# ------------------------------------------------------------------------- ZeRO-3, uneven shares
ZERO3_SHARES = (slice(0, 3), slice(3, None))  # batches of rank 0 (2 + 2 + 2 images) and rank 1 (1 image)


def eos_forced_model(cfg: Config, eos_scale: float) -> TICOD:
    """The tiny model with its EOS embedding scaled: EOS wins at some steps of some images, not others
    (the untouched model writes ``max_new_tokens`` for every image)."""
    model = build_eval_model(cfg)
    with torch.no_grad():
        model.captioner.gpt.transformer.wte.weight[EOS] *= eos_scale
    return model


@pytest.fixture(scope="module")
def zero3_case(tmp_path_factory) -> tuple[float, list[dict], str]:
    """An EOS scale at which the first batches of the two ranks end their captions at different lengths
    (so HF generate would stop at a different step on each rank), the reference records, and the GT file."""
    cfg, batches = eval_config(), make_batches()
    torch.set_num_threads(1)  # the same kernels as the spawned ranks
    for eos_scale in [2.0 + 0.2 * i for i in range(20)]:
        per_batch = predict_batches(eos_forced_model(cfg, eos_scale), batches)
        longest = [max(len(r["caption"].split()) for r in recs) for recs in per_batch]
        first = [longest[share][0] for share in ZERO3_SHARES]
        if first[0] != first[1] and min(longest) < cfg.model.captioner.max_new_tokens:
            break
    else:
        pytest.fail("no EOS scale makes the captions end at different lengths on the two ranks")
    records = [r for recs in per_batch for r in recs]
    return eos_scale, records, save_ground_truth(records, tmp_path_factory.mktemp("gt_zero3"))


def _zero3_rank_main(rank: int, port: int, out_dir: str, gt_file: str, eos_scale: float) -> None:
    from ticod import engine as engine_lib

    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    engine_lib.init_distributed("gloo", timeout_s=120)  # a rank left waiting fails the test, not hangs it
    try:
        cfg = eval_config("deepspeed.zero_stage=3", "deepspeed.precision=fp32", "eval.bertscore=false")
        engine = engine_lib.build_engine(eos_forced_model(cfg, eos_scale), cfg, world_size=2)
        engine.eval()
        evaluate(
            engine.module,
            make_batches()[ZERO3_SHARES[rank]],
            gt=GroundTruth(**torch.load(gt_file, weights_only=False)),
            category_ids=CATEGORY_IDS,
            category_names=CATEGORY_NAMES,
            tokenizer=word_tokenizer(),
            cfg=cfg.eval,
            rank=rank,
            world_size=2,
            out_dir=out_dir,
            device=torch.device("cpu"),
            image_mean=MEAN,
            image_std=STD,
            synced=True,
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_zero3_two_ranks_uneven_shares_and_caption_lengths(tmp_path, zero3_case):
    """ZeRO-3 partitions the weights, so every module forward is a collective. Rank 0 has 3 batches and
    rank 1 one, and their first batches' captions end at different steps: the ranks must still finish,
    with the predictions of one process that holds the whole model."""
    eos_scale, records, gt_file = zero3_case
    mp.spawn(_zero3_rank_main, args=(_free_port(), str(tmp_path), gt_file, eos_scale), nprocs=2)
    assert json.loads((tmp_path / "metrics.json").read_text())["num_images"] == NUM_IMAGES
    captions = [{"image_id": r["image_id"], "caption": r["caption"]} for r in records]
    assert json.loads((tmp_path / "captions.json").read_text()) == captions
    assert json.loads((tmp_path / "detections.json").read_text()) == coco_detections(
        records, CATEGORY_IDS, 0.0
    )
