"""Predict: per-image JSON and PNG from a tiny random-init TICOD on generated images."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image, ImageChops
from tiny_model import CATEGORY_IDS, CATEGORY_NAMES, build_eval_model, eval_config, word_tokenizer

from ticod.data.eval_stream import build_eval_loader
from ticod.data.shards import write_shards
from ticod.evaluate import _predict
from ticod.predict import find_images, output_names, predict, preprocess, render

SMALL = ["data.test_min_size=64", "data.max_size=96", "data.train_min_sizes=[64]"]
CATEGORIES = [
    {"id": c, "name": n, "supercategory": "x"} for c, n in zip(CATEGORY_IDS, CATEGORY_NAMES, strict=True)
]


@pytest.fixture
def images(tmp_path):
    g = torch.Generator().manual_seed(0)
    paths = []
    for sub, (w, h) in [("a", (120, 90)), ("a", (80, 100)), ("b", (200, 100))]:
        d = tmp_path / "images" / sub
        d.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        path = d / f"{w}.jpg" if sub == "a" else d / "120.jpg"  # b/120.jpg clashes with a/120.jpg by stem
        Image.fromarray(pixels).save(path)
        paths.append(path)
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    return paths


def test_find_images_and_unique_names(images, tmp_path):
    found = find_images([tmp_path / "images"])
    assert found == sorted(images)
    assert output_names(found) == ["120", "80", "120_1"]
    assert find_images([images[1]]) == [images[1]]
    with pytest.raises(FileNotFoundError):
        find_images([tmp_path / "missing.jpg"])


def test_preprocess_resizes_like_eval_and_pads():
    cfg = eval_config(*SMALL).data
    wide, tall = Image.new("RGB", (200, 100), (124, 116, 104)), Image.new("RGB", (60, 80))
    out = preprocess([wide, tall], cfg)
    batch, sizes = out.images, out.image_sizes
    # wide: shorter side 100 -> 64 would make the longer 128 > 96, so the longer side sets the scale.
    assert sizes == [(48, 96), (85, 64)]
    assert batch.shape == (2, 3, 85, 96) and batch.dtype == torch.uint8  # the model normalises
    assert batch[0, :, 48:].sum() == 0 and batch[1, :, :, 64:].sum() == 0  # zero padding
    assert batch[0, :, :48, :96].flatten(1).unique(dim=1).tolist() == [[124], [116], [104]]


def test_predict_writes_consistent_json_and_png(images, tmp_path):
    cfg = eval_config(*SMALL)
    tok = word_tokenizer()
    model = build_eval_model(cfg)
    model.tokenizer = tok
    out = tmp_path / "out"
    paths = find_images([tmp_path / "images"])
    records = predict(
        model, cfg.data, CATEGORIES, paths, out, batch_size=2, score_threshold=0.0, device=torch.device("cpu")
    )

    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{n}.{e}" for n in ["120", "80", "120_1"] for e in ("json", "png")
    )
    for path, name, record in zip(paths, output_names(paths), records, strict=True):
        assert json.loads((out / f"{name}.json").read_text()) == record
        image = Image.open(path).convert("RGB")
        assert (record["height"], record["width"]) == (image.height, image.width)
        dets = record["detections"]
        assert dets and isinstance(record["caption"], str)
        assert [d["score"] for d in dets] == sorted((d["score"] for d in dets), reverse=True)
        for d in dets:
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 <= x2 <= image.width and 0 <= y1 <= y2 <= image.height  # original pixels
            assert (
                CATEGORY_IDS[d["label"] - 1] == d["category_id"]
                and CATEGORY_NAMES[d["label"] - 1] == d["category"]
            )
        png = Image.open(out / f"{name}.png")
        assert png.width == image.width and png.height > image.height  # caption band
        assert ImageChops.difference(png.convert("RGB"), render(image, record)).getbbox() is None
        assert ImageChops.difference(
            png.crop((0, 0, image.width, image.height)).convert("RGB"), image
        ).getbbox()

    # The same as the model run directly on one image (batch of 1: no padding from other images).
    one = preprocess([Image.open(paths[2])], cfg.data)
    batch, sizes = one.images, one.image_sizes
    with torch.no_grad():
        direct = model(batch, image_sizes=sizes, orig_sizes=[(100, 200)])[0]
    single = predict(
        model,
        cfg.data,
        CATEGORIES,
        [paths[2]],
        tmp_path / "one",
        batch_size=1,
        score_threshold=0.0,
        device=torch.device("cpu"),
    )
    assert len(single[0]["detections"]) == len(direct["boxes"]) and single[0]["caption"] == direct["caption"]
    top = int(direct["scores"].argmax())
    assert single[0]["detections"][0]["box"] == [round(v, 2) for v in direct["boxes"][top].tolist()]

    threshold = sorted(d["score"] for d in single[0]["detections"])[len(single[0]["detections"]) // 2]
    kept = predict(
        model,
        cfg.data,
        CATEGORIES,
        [paths[2]],
        tmp_path / "thr",
        batch_size=1,
        score_threshold=threshold,
        device=torch.device("cpu"),
    )
    assert kept[0]["detections"] == [d for d in single[0]["detections"] if d["score"] >= threshold]
    assert 0 < len(kept[0]["detections"]) < len(single[0]["detections"])


def test_predict_on_exif_rotated_jpeg_matches_eval_from_a_shard(tmp_path):
    """A phone photo stored sideways with EXIF orientation 6: predict on the file gives the boxes and caption
    that evaluation gives on the same JPEG from a shard (same decode, rotation, resize and normalisation)."""
    g = torch.Generator().manual_seed(1)
    stored = Image.fromarray(torch.randint(0, 256, (60, 90, 3), generator=g, dtype=torch.uint8).numpy())
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    images = tmp_path / "images"
    images.mkdir()
    path = images / "photo.jpg"
    stored.save(path, exif=exif)
    record = {
        "image_id": 7, "file_name": "photo.jpg", "width": 60, "height": 90,  # the upright frame
        "boxes": [], "category_ids": [], "iscrowd": [], "areas": [], "ann_ids": [], "captions": ["w5 w6"],
    }  # fmt: skip
    write_shards([record], CATEGORIES, images, tmp_path / "shards", "val", progress=False)
    cfg = eval_config(*SMALL, f"data.shards_dir={tmp_path / 'shards'}", "data.num_workers=0")
    tok = word_tokenizer()
    model = build_eval_model(cfg)
    model.tokenizer = tok
    cpu = torch.device("cpu")

    loader = build_eval_loader(cfg.data, tok, rank=0, world_size=1, split="val")
    (evaluated,), _, bad, _ = _predict(model, loader, tok, cpu, 0)
    assert bad == 0 and evaluated["image_id"] == 7
    (predicted,) = predict(
        model, cfg.data, CATEGORIES, [path], tmp_path / "out", batch_size=1, score_threshold=0.0, device=cpu
    )
    assert (predicted["width"], predicted["height"]) == (60, 90)  # upright, as eval sees it
    order = sorted(range(len(evaluated["scores"])), key=lambda i: -evaluated["scores"][i])
    assert len(order) > 0
    assert [d["box"] for d in predicted["detections"]] == [
        [round(v, 2) for v in evaluated["boxes"][i]] for i in order
    ]
    assert [d["label"] for d in predicted["detections"]] == [evaluated["labels"][i] for i in order]
    assert predicted["caption"] == evaluated["caption"]
