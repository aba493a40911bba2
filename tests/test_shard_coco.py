"""tools/shard_coco.py: faithful samples, manifest, determinism across workers, real-COCO quirks, and partial
labels (instances-only, captions-only and mixed sources, Karpathy splits)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import load_tool
from PIL import Image

from ticod.data.coco import load_records

shard_coco = load_tool("shard_coco")


def read_tar(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def run(coco: Path, out: Path, split: str = "val", *extra: object) -> int:
    ann = coco / "annotations"
    args = ["--images", coco / split, "--instances", ann / f"instances_{split}.json"]
    args += ["--captions", ann / f"captions_{split}.json", "--out", out, "--split", split, "--no-progress"]
    return shard_coco.main([str(a) for a in [*args, *extra]])


def shard(*args: object) -> int:
    """The CLI with exactly these arguments (plus --no-progress)."""
    return shard_coco.main([str(a) for a in [*args, "--no-progress"]])


def read_split(out: Path, split: str) -> tuple[dict, dict[int, dict]]:
    """(manifest, image id -> written record) of a split."""
    manifest = json.loads((out / f"{split}-manifest.json").read_text())
    records = {}
    for s in manifest["shards"]:
        for name, data in read_tar(out / s["name"]).items():
            if name.endswith(".json"):
                records[int(name.split(".")[0])] = json.loads(data)
    assert list(records) == sorted(records) and len(records) == manifest["total_samples"]
    return manifest, records


def tasks_counts(boxes_captions: int = 0, boxes: int = 0, captions: int = 0) -> dict[str, int]:
    return {"boxes+captions": boxes_captions, "boxes": boxes, "captions": captions}


@pytest.fixture
def coco_copy(demo_coco_dir: Path, tmp_path: Path) -> Path:
    """A writable copy of the demo dataset (for breaking it)."""
    return Path(shutil.copytree(demo_coco_dir, tmp_path / "coco"))


def test_samples_match_source_and_manifest_counts(demo_coco_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "shards"
    assert run(demo_coco_dir, out, "train", "--samples-per-shard", 10) == 0
    summary = capsys.readouterr().out
    manifest = json.loads((out / "train-manifest.json").read_text())
    ann = demo_coco_dir / "annotations"
    records, categories = load_records(ann / "instances_train.json", ann / "captions_train.json")
    assert [s["samples"] for s in manifest["shards"]] == [10, 10, 4]
    assert manifest["total_samples"] == len(records) == 24
    assert manifest["categories"] == categories
    assert manifest["tasks"] == tasks_counts(boxes_captions=24)
    src = ann / "instances_train.json"
    assert manifest["sources"]["instances"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()

    read = {}
    for shard in manifest["shards"]:
        members = read_tar(out / shard["name"])
        assert len(members) == 2 * shard["samples"] and shard["bytes"] == (out / shard["name"]).stat().st_size
        keys = sorted({name.split(".")[0] for name in members})
        assert keys == shard["keys"]
        for key in keys:
            read[key] = (members[f"{key}.jpg"], json.loads(members[f"{key}.json"]))
    assert sum(s["samples"] for s in manifest["shards"]) == len(read)
    assert list(read) == sorted(read)  # image-id order across shards
    for rec in records:
        jpg, meta = read[f"{rec['image_id']:012d}"]
        assert jpg == (demo_coco_dir / "train" / rec["file_name"]).read_bytes()  # bytes untouched
        assert meta == rec
    boxes = sum(len(r["boxes"]) for r in records)
    assert "images written: 24 in 3 shards" in summary and f"boxes: {boxes} (" in summary
    assert "captions: 120" in summary and "skipped: 0" in summary
    assert "labels: 24 boxes+captions, 0 boxes only, 0 captions only" in summary


def test_workers_give_identical_shards(demo_coco_dir: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(demo_coco_dir, a, "train", "--samples-per-shard", 7, "--workers", 1) == 0
    assert run(demo_coco_dir, b, "train", "--samples-per-shard", 7, "--workers", 2) == 0
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and len(names) == 5
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_max_shard_bytes_and_limit(demo_coco_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    assert run(demo_coco_dir, out, "train", "--max-shard-bytes", 30_000, "--limit", 10) == 0
    manifest = json.loads((out / "train-manifest.json").read_text())
    assert manifest["total_samples"] == 10 and len(manifest["shards"]) > 1
    # Every shard but a single-sample one respects the limit (tar pads to 10 KiB records).
    for s in manifest["shards"]:
        assert s["samples"] == 1 or s["bytes"] <= 30_000 + 10240


def test_refuses_to_mix_runs_and_overwrite_replaces(demo_coco_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "s"
    assert run(demo_coco_dir, out, "val", "--samples-per-shard", 2) == 0
    assert (out / "val-000003.tar").exists()
    assert run(demo_coco_dir, out, "val", "--samples-per-shard", 8) == 1
    assert "already has 5 file(s) of split 'val'" in capsys.readouterr().err
    assert run(demo_coco_dir, out, "train") == 0  # another split in the same dir is fine
    assert run(demo_coco_dir, out, "val", "--samples-per-shard", 8, "--overwrite") == 0
    assert sorted(p.name for p in out.glob("val-*")) == ["val-000000.tar", "val-manifest.json"]
    assert (out / "train-000000.tar").exists()


def test_corrupt_and_missing_images_are_skipped_and_reported(coco_copy: Path, tmp_path: Path, capsys) -> None:
    records, _ = load_records(coco_copy / "annotations/instances_val.json", None)
    truncated, garbage, missing = (coco_copy / "val" / r["file_name"] for r in records[:3])
    truncated.write_bytes(truncated.read_bytes()[:300])
    garbage.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 20)
    missing.unlink()
    out = tmp_path / "s"
    assert run(coco_copy, out, "val") == 0
    text = capsys.readouterr().out
    assert "skipped: 3" in text and "unreadable JPEG: 2" in text and "missing image file: 1" in text
    manifest = json.loads((out / "val-manifest.json").read_text())
    assert manifest["total_samples"] == 5
    assert manifest["skipped"] == {"missing image file": 1, "unreadable JPEG": 2}
    keys = {k for s in manifest["shards"] for k in s["keys"]}
    assert not keys & {f"{r['image_id']:012d}" for r in records[:3]}

    assert run(coco_copy, tmp_path / "strict", "val", "--strict") == 1
    err = capsys.readouterr().err
    assert "(--strict)" in err and ("unreadable JPEG" in err or "missing image file" in err)
    assert not list((tmp_path / "strict").glob("*.tar*"))  # no partial shard left behind


@pytest.mark.parametrize("verify", ["decode", "header"])
def test_jpeg_check_modes(coco_copy: Path, tmp_path: Path, verify: str) -> None:
    """Both modes skip truncated files and non-JPEGs; only ``decode`` sees a broken Huffman table."""
    records, _ = load_records(coco_copy / "annotations/instances_val.json", None)
    paths = [coco_copy / "val" / r["file_name"] for r in records[:3]]
    truncated, png, bogus = paths
    truncated.write_bytes(truncated.read_bytes()[:-200])
    Image.open(png).save(png, format="PNG")
    data = bytearray(bogus.read_bytes())
    dht = data.index(b"\xff\xc4")  # define-Huffman-table: code counts summing far over 256
    data[dht + 5 : dht + 21] = b"\xff" * 16
    bogus.write_bytes(bytes(data))
    out = tmp_path / verify
    assert run(coco_copy, out, "val", "--verify", verify) == 0
    manifest = json.loads((out / "val-manifest.json").read_text())
    assert manifest["jpeg_check"] == verify
    kept = {k for s in manifest["shards"] for k in s["keys"]}
    skipped = {r["image_id"] for r in records if f"{r['image_id']:012d}" not in kept}
    ids = [r["image_id"] for r in records[:3]]
    assert skipped == set(ids if verify == "decode" else ids[:2])
    assert manifest["total_samples"] == len(records) - len(skipped)


def test_grayscale_and_cmyk_jpegs_kept_untouched(coco_copy: Path, tmp_path: Path) -> None:
    records, _ = load_records(coco_copy / "annotations/instances_val.json", None)
    paths = [coco_copy / "val" / r["file_name"] for r in records[:2]]
    Image.open(paths[0]).convert("L").save(paths[0], quality=90)
    Image.open(paths[1]).convert("CMYK").save(paths[1], quality=90)
    out = tmp_path / "s"
    assert run(coco_copy, out, "val") == 0
    members = read_tar(out / "val-000000.tar")
    for path, mode in zip(paths, ["L", "CMYK"], strict=True):
        data = members[path.stem + ".jpg"]
        assert data == path.read_bytes() and Image.open(io.BytesIO(data)).mode == mode


def test_non_coco_json_is_a_clear_error(coco_copy: Path, tmp_path: Path, capsys) -> None:
    ann = coco_copy / "annotations" / "instances_val.json"
    data = json.loads(ann.read_text())
    ann.write_text(json.dumps({"images": data["images"], "categories": data["categories"]}))
    assert run(coco_copy, tmp_path / "s", "val") == 1
    assert "not a COCO annotation file: missing top-level key 'annotations'" in capsys.readouterr().err
    data["annotations"][0].pop("bbox")
    ann.write_text(json.dumps(data))
    assert run(coco_copy, tmp_path / "s", "val") == 1
    assert "annotations[0] is missing key 'bbox'" in capsys.readouterr().err
    ann.write_text("[1, 2, 3]")
    assert run(coco_copy, tmp_path / "s", "val") == 1
    assert "not a COCO annotation file (top level is list)" in capsys.readouterr().err


def test_partial_labels_mixed_source(coco_copy: Path, tmp_path: Path, capsys) -> None:
    """A negative, a crowd box, a box-labelled image without captions and a captions-only image."""
    ann = coco_copy / "annotations"
    inst = json.loads((ann / "instances_val.json").read_text())
    caps = json.loads((ann / "captions_val.json").read_text())
    first, second, third = (im["id"] for im in inst["images"][:3])
    inst["annotations"] = [a for a in inst["annotations"] if a["image_id"] != first]  # no boxes
    crowd = next(a for a in inst["annotations"] if a["image_id"] == second)
    crowd["iscrowd"] = 1
    caps["annotations"] = [c for c in caps["annotations"] if c["image_id"] != second]  # no captions
    inst["images"] = [im for im in inst["images"] if im["id"] != third]  # only in the captions file
    inst["annotations"] = [a for a in inst["annotations"] if a["image_id"] != third]
    (ann / "instances_val.json").write_text(json.dumps(inst))
    (ann / "captions_val.json").write_text(json.dumps(caps))
    boxed = {a["image_id"] for a in inst["annotations"]}
    negatives = sum(im["id"] not in boxed for im in inst["images"])
    assert negatives >= 1

    assert run(coco_copy, tmp_path / "keep", "val") == 0  # keep is the default
    text = capsys.readouterr().out
    assert "labels: 6 boxes+captions, 1 boxes only, 1 captions only" in text
    assert f"images without boxes (negatives): {negatives}\n" in text and "skipped: 0" in text
    manifest, written = read_split(tmp_path / "keep", "val")
    assert manifest["tasks"] == tasks_counts(6, 1, 1) and manifest["total_samples"] == 8
    empty = written[first]
    assert empty["boxes"] == [] and empty["category_ids"] == [] and len(empty["captions"]) == 5
    assert empty["tasks"] == ["boxes", "captions"]  # a real negative: still labelled for boxes
    kept = written[second]
    assert kept["captions"] == [] and kept["tasks"] == ["boxes"]
    assert kept["iscrowd"][kept["ann_ids"].index(crowd["id"])] == 1
    only = written[third]
    assert only["tasks"] == ["captions"] and only["boxes"] == [] and len(only["captions"]) == 5
    source = next(im for im in caps["images"] if im["id"] == third)
    assert [only["file_name"], only["width"], only["height"]] == [
        source["file_name"],
        source["width"],
        source["height"],
    ]
    others = set(written) - {first, second, third}
    assert all(written[i]["tasks"] == ["boxes", "captions"] for i in others)

    assert run(coco_copy, tmp_path / "skip", "val", "--missing-captions", "skip") == 0
    text = capsys.readouterr().out
    assert "no captions: 1" in text and "labels: 6 boxes+captions, 0 boxes only, 1 captions only" in text
    manifest, written = read_split(tmp_path / "skip", "val")
    assert second not in written and manifest["skipped"] == {"no captions": 1}
    assert run(coco_copy, tmp_path / "err", "val", "--missing-captions", "error") == 1
    assert f"image {second}" in capsys.readouterr().err


def test_instances_only_source(coco_copy: Path, tmp_path: Path, capsys) -> None:
    ann = coco_copy / "annotations"
    inst = json.loads((ann / "instances_val.json").read_text())
    empty = inst["images"][-1]["id"]
    inst["annotations"] = [a for a in inst["annotations"] if a["image_id"] != empty]
    (ann / "instances_val.json").write_text(json.dumps(inst))
    out = tmp_path / "s"
    assert shard("--images", coco_copy / "val", "--instances", ann / "instances_val.json", "--out", out) == 0
    text = capsys.readouterr().out
    assert "labels: 0 boxes+captions, 8 boxes only, 0 captions only" in text and "captions: 0\n" in text
    manifest, written = read_split(out, "train")
    assert manifest["tasks"] == tasks_counts(boxes=8) and manifest["num_captions"] == 0
    assert manifest["num_boxes"] == len(inst["annotations"]) and manifest["skipped"] == {}
    assert sorted(manifest["sources"]) == ["images", "instances"]
    assert all(r["tasks"] == ["boxes"] and r["captions"] == [] for r in written.values())
    assert written[empty]["boxes"] == [] and written[empty]["tasks"] == ["boxes"]  # a negative, kept
    assert written.keys() == {im["id"] for im in inst["images"]}


def test_captions_only_source(coco_copy: Path, tmp_path: Path, capsys) -> None:
    ann = coco_copy / "annotations"
    caps = json.loads((ann / "captions_val.json").read_text())
    unlabelled = caps["images"][0]["id"]
    caps["annotations"] = [c for c in caps["annotations"] if c["image_id"] != unlabelled]
    (ann / "captions_val.json").write_text(json.dumps(caps))
    out = tmp_path / "s"
    args = ["--images", coco_copy / "val", "--captions", ann / "captions_val.json", "--out", out]
    assert shard(*args, "--split", "val") == 0
    text = capsys.readouterr().out
    assert "labels: 0 boxes+captions, 0 boxes only, 7 captions only" in text
    assert "images without boxes (negatives): 0" in text and "no labels: 1" in text
    manifest, written = read_split(out, "val")
    assert manifest["categories"] == [] and manifest["tasks"] == tasks_counts(captions=7)
    assert manifest["num_boxes"] == 0 and manifest["num_captions"] == len(caps["annotations"]) == 35
    assert manifest["skipped"] == {"no labels": 1} and unlabelled not in written
    assert sorted(manifest["sources"]) == ["captions", "images"]
    sizes = {im["id"]: [im["width"], im["height"]] for im in caps["images"]}
    assert [sz for s in manifest["shards"] for sz in s["sizes"]] == [sizes[i] for i in written]
    for iid, rec in written.items():
        assert rec["tasks"] == ["captions"] and rec["boxes"] == rec["category_ids"] == rec["ann_ids"] == []
        assert rec["captions"] == [c["caption"].strip() for c in caps["annotations"] if c["image_id"] == iid]

    data = caps["images"][1]
    del data["width"]
    (ann / "captions_val.json").write_text(json.dumps(caps))
    assert shard(*args, "--split", "bad") == 1
    assert "captions_val.json: images[1] is missing key 'width'" in capsys.readouterr().err


def test_needs_instances_or_captions(demo_coco_dir: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        shard("--images", demo_coco_dir / "val", "--out", tmp_path / "s")
    assert e.value.code == 2
    assert (
        "at least one of --instances, --captions, --karpathy or --image-info is required"
        in capsys.readouterr().err
    )


def test_old_style_records_are_written_with_tasks(demo_coco_dir: Path, tmp_path: Path) -> None:
    """Records made without ``tasks`` (older code) are box-labelled; the written ones name their tasks."""
    from ticod.data.shards import write_shards

    ann = demo_coco_dir / "annotations"
    records, categories = load_records(ann / "instances_val.json", ann / "captions_val.json")
    old = [{k: v for k, v in r.items() if k != "tasks"} for r in records]
    old[0]["captions"] = []
    manifest, summary = write_shards(old, categories, demo_coco_dir / "val", tmp_path, "val", progress=False)
    assert manifest["tasks"] == tasks_counts(7, 1) and summary.tasks["boxes"] == 1
    _, written = read_split(tmp_path, "val")
    assert written[old[0]["image_id"]] == {**old[0], "tasks": ["boxes"]}
    assert all(written[r["image_id"]] == r for r in records[1:])


def test_train_tokenizer_option(demo_coco_dir: Path, tmp_path: Path) -> None:
    from ticod.data.tokenizer import load_tokenizer

    out = tmp_path / "s"
    assert run(demo_coco_dir, out, "train", "--train-tokenizer", 300) == 0
    tok = load_tokenizer(out / "tokenizer")
    ids = tok("two red circles", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "two red circles" and 257 < len(tok) <= 300


def test_demo_generator_is_deterministic(tmp_path: Path) -> None:
    make = load_tool("make_demo_coco").make_demo_coco
    a, b = make(tmp_path / "a", 6, 2, seed=3), make(tmp_path / "b", 6, 2, seed=3)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 6 + 2 + 4
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes()
    c = make(tmp_path / "c", 6, 2, seed=4)
    assert (a / "annotations/captions_train.json").read_text() != (
        c / "annotations/captions_train.json"
    ).read_text()
    image = np.asarray(Image.open(next((a / "train").glob("*.jpg"))))
    assert image.ndim == 3 and min(image.shape[:2]) >= 96 and max(image.shape[:2]) <= 192


# Karpathy split of each arranged image, in id order: train2014 gets the demo's first 8 train images,
# val2014 the 8 val images. Every split takes images from both folders, so each needs both instances files.
KARPATHY_TRAIN2014 = ["train", "train", "train", "train", "train", "restval", "val", "test"]
KARPATHY_VAL2014 = ["restval", "restval", "val", "val", "test", "test", "restval", "train"]


@pytest.fixture
def karpathy_root(demo_coco_dir: Path, tmp_path: Path) -> Path:
    """A COCO 2014 style root from demo images: ``train2014/`` and ``val2014/`` with COCO_*2014_ names,
    ``annotations/{instances,captions}_{train,val}2014.json`` and Karpathy's ``dataset_coco.json``."""
    root = tmp_path / "coco2014"
    ann = demo_coco_dir / "annotations"
    entries = []
    for demo, year, splits in (
        ("train", "train2014", KARPATHY_TRAIN2014),
        ("val", "val2014", KARPATHY_VAL2014),
    ):
        inst = json.loads((ann / f"instances_{demo}.json").read_text())
        caps = json.loads((ann / f"captions_{demo}.json").read_text())
        images = sorted(inst["images"], key=lambda im: im["id"])[: len(splits)]
        ids = {im["id"] for im in images}
        (root / year).mkdir(parents=True)
        for im, split in zip(images, splits, strict=True):
            name = f"COCO_{year}_{im['id']:012d}.jpg"
            shutil.copyfile(demo_coco_dir / demo / im["file_name"], root / year / name)
            im["file_name"] = name
            sentences = [f"  karpathy {im['id']} sentence {j}. " for j in range(3)]
            entries.append(
                {
                    "filepath": year,
                    "filename": name,
                    "cocoid": im["id"],
                    "imgid": len(entries),
                    "split": split,
                    "sentences": [{"raw": r, "tokens": r.split(), "imgid": len(entries)} for r in sentences],
                }
            )
        for data, kind in ((inst, "instances"), (caps, "captions")):
            data["images"] = images
            data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
            (root / "annotations").mkdir(exist_ok=True)
            (root / "annotations" / f"{kind}_{year}.json").write_text(json.dumps(data))
    (root / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return root


def karpathy_ids(root: Path, *splits: str) -> list[int]:
    entries = json.loads((root / "dataset_coco.json").read_text())["images"]
    return sorted(e["cocoid"] for e in entries if e["split"] in splits)


def test_karpathy_captions_only_sizes_from_jpeg_headers(karpathy_root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "s"
    for split, parts in (("train", ("train", "restval")), ("val", ("val",)), ("test", ("test",))):
        args = ["--karpathy", karpathy_root / "dataset_coco.json", "--images", karpathy_root]
        assert shard(*args, "--out", out, "--split", split) == 0
        manifest, written = read_split(out, split)
        assert list(written) == karpathy_ids(karpathy_root, *parts)
        assert manifest["categories"] == [] and manifest["tasks"] == tasks_counts(captions=len(written))
        assert manifest["sources"]["karpathy"]["split"] == split
        digest = hashlib.sha256((karpathy_root / "dataset_coco.json").read_bytes()).hexdigest()
        assert manifest["sources"]["karpathy"]["sha256"] == digest
        for iid, rec in written.items():
            assert rec["tasks"] == ["captions"] and rec["boxes"] == []
            assert rec["captions"] == [f"karpathy {iid} sentence {j}." for j in range(3)]
            with Image.open(karpathy_root / rec["file_name"]) as im:
                assert [rec["width"], rec["height"]] == list(im.size)
            assert rec["file_name"].split("/")[0] in ("train2014", "val2014")
    assert len(karpathy_ids(karpathy_root, "train", "restval")) == 10  # 6 from train2014, 4 from val2014
    assert "labels: 0 boxes+captions, 0 boxes only, 3 captions only" in capsys.readouterr().out


def test_karpathy_with_instances_and_captions_files(karpathy_root: Path, tmp_path: Path) -> None:
    ann = karpathy_root / "annotations"
    instances = [ann / "instances_train2014.json", ann / "instances_val2014.json"]
    base = ["--karpathy", karpathy_root / "dataset_coco.json", "--images", karpathy_root, "--instances"]
    source, categories = load_records(
        instances, [ann / "captions_train2014.json", ann / "captions_val2014.json"]
    )
    source = {r["image_id"]: r for r in source}

    assert shard(*base, *instances, "--out", tmp_path / "a", "--split", "val") == 0
    manifest, written = read_split(tmp_path / "a", "val")
    assert list(written) == karpathy_ids(karpathy_root, "val") and manifest["categories"] == categories
    assert manifest["tasks"] == tasks_counts(boxes_captions=3)
    assert sorted(manifest["sources"]) == ["images", "instances[0]", "instances[1]", "karpathy"]
    for iid, rec in written.items():
        assert rec["tasks"] == ["boxes", "captions"]
        assert rec["captions"] == [f"karpathy {iid} sentence {j}." for j in range(3)]
        keys = ("boxes", "category_ids", "iscrowd", "areas", "ann_ids", "width", "height")
        assert {k: rec[k] for k in keys} == {k: source[iid][k] for k in keys}
        name = source[iid]["file_name"]  # COCO_{year}_<id>.jpg, in the {year}/ folder
        assert rec["file_name"] == f"{name.split('_')[1]}/{name}"

    captions = [ann / "captions_train2014.json", ann / "captions_val2014.json"]
    assert shard(*base, *instances, "--captions", *captions, "--out", tmp_path / "b", "--split", "train") == 0
    _, written = read_split(tmp_path / "b", "train")
    assert list(written) == karpathy_ids(karpathy_root, "train", "restval")
    assert all(rec["captions"] == source[iid]["captions"] != [] for iid, rec in written.items())


def test_karpathy_errors(karpathy_root: Path, tmp_path: Path, capsys) -> None:
    base = ["--karpathy", karpathy_root / "dataset_coco.json", "--images", karpathy_root, "--out", tmp_path]
    assert shard(*base, "--split", "restval") == 1
    assert "unknown Karpathy split 'restval'" in capsys.readouterr().err
    ann = karpathy_root / "annotations"
    inst = json.loads((ann / "instances_val2014.json").read_text())
    gone = karpathy_ids(karpathy_root, "test")[-1]
    assert any(im["id"] == gone for im in inst["images"])
    inst["images"] = [im for im in inst["images"] if im["id"] != gone]
    inst["annotations"] = [a for a in inst["annotations"] if a["image_id"] != gone]
    (ann / "instances_val2014.json").write_text(json.dumps(inst))
    instances = [ann / "instances_train2014.json", ann / "instances_val2014.json"]
    assert shard(*base, "--split", "test", "--instances", *instances) == 1
    assert (
        f"cocoid {gone} of Karpathy split 'test' is not in the instances file(s)" in capsys.readouterr().err
    )
    (karpathy_root / "dataset_coco.json").write_text(json.dumps({"annotations": []}))
    assert shard(*base, "--split", "test") == 1
    assert "missing top-level key 'images'" in capsys.readouterr().err
    assert not list(tmp_path.glob("test-*"))


def test_real_coco_sample_as_partial_label_pair(coco_sample: Path, tmp_path: Path) -> None:
    """Real COCO: half the images instances-only, the other half captions-only, each as its own shard set."""
    inst = json.loads((coco_sample / "instances_train2017.json").read_text())
    caps = json.loads((coco_sample / "captions_train2017.json").read_text())
    ids = sorted(im["id"] for im in inst["images"])
    halves = {"boxes": set(ids[: len(ids) // 2]), "captions": set(ids[len(ids) // 2 :])}
    cut = {}
    for kind, data in (("boxes", inst), ("captions", caps)):
        keep = halves[kind]
        cut[kind] = {
            **data,
            "images": [im for im in data["images"] if im["id"] in keep],
            "annotations": [a for a in data["annotations"] if a["image_id"] in keep],
        }
        (tmp_path / f"{kind}.json").write_text(json.dumps(cut[kind]))
    out = tmp_path / "shards"
    images = coco_sample / "images"
    assert (
        shard("--images", images, "--instances", tmp_path / "boxes.json", "--out", out, "--split", "det") == 0
    )
    assert (
        shard("--images", images, "--captions", tmp_path / "captions.json", "--out", out, "--split", "cap")
        == 0
    )

    det, det_records = read_split(out, "det")
    anns = cut["boxes"]["annotations"]
    assert set(det_records) == halves["boxes"] and det["tasks"] == tasks_counts(boxes=40)
    assert det["num_boxes"] == len(anns) and det["num_crowd_boxes"] == sum(a["iscrowd"] for a in anns)
    assert (
        det["categories"] == load_records(tmp_path / "boxes.json", None)[1] and len(det["categories"]) == 80
    )
    assert det["num_captions"] == 0 and det["skipped"] == {}
    assert all(r["tasks"] == ["boxes"] and r["captions"] == [] for r in det_records.values())

    cap, cap_records = read_split(out, "cap")
    assert set(cap_records) == halves["captions"] and cap["tasks"] == tasks_counts(captions=40)
    assert cap["num_captions"] == len(cut["captions"]["annotations"]) == 200 and cap["num_boxes"] == 0
    assert cap["categories"] == [] and cap["skipped"] == {}
    sizes = {im["id"]: [im["width"], im["height"]] for im in caps["images"]}
    for iid, rec in cap_records.items():
        assert rec["tasks"] == ["captions"] and rec["boxes"] == [] and len(rec["captions"]) == 5
        assert [rec["width"], rec["height"]] == sizes[iid]
        with Image.open(images / rec["file_name"]) as im:
            assert list(im.size) == sizes[iid]
