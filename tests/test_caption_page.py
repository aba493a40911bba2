"""The page of sample predictions written at each evaluation: N images, their boxes drawn, predicted and
reference captions, the images beside the page, and the same rows as a wandb table."""

from __future__ import annotations

import re

import torch
from PIL import Image
from tiny_model import (
    CATEGORY_IDS,
    CATEGORY_NAMES,
    MEAN,
    STD,
    build_eval_model,
    eval_config,
    ground_truth_from,
    make_batches,
    predict_batches,
    word_tokenizer,
)

from ticod.caption_page import IMAGES, PAGE
from ticod.evaluate import evaluate


def test_evaluation_writes_a_page_of_n_images_with_their_captions(tmp_path):
    cfg = eval_config("eval.num_sample_images=5", "eval.bertscore=false")
    model, batches = build_eval_model(cfg), make_batches()
    records = [r for recs in predict_batches(model, batches) for r in recs]
    gt = ground_truth_from(records)
    result = evaluate(
        model,
        batches,
        gt=gt,
        category_ids=CATEGORY_IDS,
        category_names=CATEGORY_NAMES,
        tokenizer=word_tokenizer(),
        cfg=cfg.eval,
        rank=0,
        world_size=1,
        out_dir=tmp_path,
        device=torch.device("cpu"),
        image_mean=MEAN,
        image_std=STD,
    )
    page = (tmp_path / PAGE).read_text()
    rows = [line for line in page.splitlines() if line.startswith("| ![")]
    first = records[:5]  # the first images of the split (rank 0's share)
    assert len(rows) == 5 and len(list((tmp_path / IMAGES).iterdir())) == 5
    for row, rec in zip(rows, first, strict=True):
        iid = rec["image_id"]
        image, predicted, refs = row.strip("| ").split(" | ")
        assert image == f"![{iid}]({IMAGES}/{iid}.jpg)<br>{iid}"
        assert predicted == rec["caption"]
        assert re.findall(r"\d+\. ([^<]*)", refs) == gt.captions[iid]
        with Image.open(tmp_path / IMAGES / f"{iid}.jpg") as im:  # the image with its boxes drawn
            assert im.size == result.sample_images[first.index(rec)][0].size
    columns, table = result.tables["samples"]
    assert columns == ["image_id", "image", "predicted", "references"]
    assert [r[0] for r in table] == [r["image_id"] for r in first]
    assert [r[2] for r in table] == [r["caption"] for r in first]
    assert all(isinstance(r[1], Image.Image) for r in table)
